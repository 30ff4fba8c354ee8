"""llm-compressor's GPTQ W4A16 on one of our checkpoints: the reference point for our GPTQ (benchmarks/quantize.py).

    /path/to/llmc-venv/bin/python benchmarks/llmcompressor_job.py SRC DST CALIB.txt \
        [--group-size 64] [--nsamples 128] [--seqlen 128] [--targets all|experts] [--act-order]

Runs under a separate virtual environment with llm-compressor installed (it pins its own transformers, which
the dsv3 package does not), so it imports nothing from dsv3: SRC (a BF16 checkpoint in the official DeepSeek
layout) is loaded through its remote code. The calibration samples are the windows our GPTQ takes
(convert/gptq_stream.calibration_ids, repeated below): the whole file tokenized without special tokens, nsamples
non-overlapping windows of seqlen tokens spread evenly over it. The scheme is ours: symmetric int4, one scale per
group of `--group-size` input columns, the same modules left unquantized (lm_head, routers, embeddings, the MTP
layer's eh_proj and shared_head.head), every decoder-block Linear (`all`) or the routed experts only
(`experts`); activation order (compressed-tensors' "weight" ordering) only with --act-order, as in ours.
DST is written in compressed-tensors' pack-quantized format with the tokenizer. The last line of stdout is one
JSON object: wall seconds, the versions used, a digest of the calibration windows, this process's own peak RSS,
and the targeted modules no calibration forward reached.

Two shims make llm-compressor's sequential pipeline trace our remote code (tracing_ignore and
keep_model_outputs_in_traces below); nothing in the model changes. The MTP layer (model.layers.{L}) only runs in
a forward with labels, so llm-compressor never calibrates it and saves its projections with uninitialized scales
(NaN or garbage); the main model's perplexity does not use it.
"""

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch

# The modules our GPTQ never quantizes (convert/quantize.py IGNORE): compressed-tensors' target syntax.
IGNORE = ["lm_head", r"re:.*mlp\.gate$", r"re:.*embed_tokens$", r"re:.*eh_proj$", r"re:.*shared_head\.head$"]
EXPERT_TARGET = r"re:.*mlp\.experts\.\d+\.(gate|up|down)_proj$"


def calibration_ids(calib: Path, tokenizer, nsamples: int, seqlen: int) -> torch.Tensor:
    """(nsamples, seqlen) token ids, exactly as convert/gptq_stream.calibration_ids builds them."""
    ids = torch.tensor(
        tokenizer(calib.read_text(encoding="utf-8"), add_special_tokens=False).input_ids, dtype=torch.long
    )
    if len(ids) < nsamples * seqlen:
        raise SystemExit(f"{calib}: {len(ids):,} tokens, fewer than {nsamples} x {seqlen}")
    stride = len(ids) // nsamples
    return torch.stack([ids[i * stride : i * stride + seqlen] for i in range(nsamples)])


def ids_digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def tracing_ignore(oneshot) -> list[str]:
    """oneshot's default list of functions the sequential pipeline's tracer calls instead of tracing into, plus
    our model's `_sum_optional` (the per-sequence balance loss summed over layers): traced, its `is None` tests
    would be decided on proxies and bake `None + None` into the graph of the second layer."""
    import inspect

    return [*inspect.signature(oneshot).parameters["tracing_ignore"].default, "_sum_optional"]


def keep_model_outputs_in_traces() -> None:
    """llm-compressor's sequential tracer records a transformers ModelOutput passed to a function as a plain dict
    (fx's rule for dict subclasses). Our DeepseekV3Model.forward ends in `result if return_dict else
    result.to_tuple()`, which the tracer wraps as such a function, so at run time the wrapped code gets a dict and
    DeepseekV3ForCausalLM's `out.last_hidden_state` fails (AttributeError: 'dict' object has no attribute
    'last_hidden_state', in the last subgraph). Record ModelOutputs as a call of their own class instead, as the
    tracer already does for configs. Tracing only: the calibration forward itself is unchanged."""
    from llmcompressor.pipelines.sequential import helpers
    from transformers.utils import ModelOutput

    original = helpers.SequentialTracer.create_arg

    def create_arg(self, a):
        if isinstance(a, ModelOutput):
            return self.create_node(
                "call_function", type(a), (), {k: self.create_arg(v) for k, v in a.items()}
            )
        return original(self, a)

    helpers.SequentialTracer.create_arg = create_arg


def vm_hwm_gib() -> float:
    """This process's own peak RSS (VmHWM). Unlike a parent's wait4/getrusage ru_maxrss, which Linux floors at
    the RSS of the process that spawned it (the pre-exec memory map's high-water mark is carried over)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # kB
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("calib", type=Path)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--targets", choices=("all", "experts"), default="all")
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    import compressed_tensors
    import llmcompressor
    import transformers
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.utils import match_named_modules
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    keep_model_outputs_in_traces()
    tokenizer = AutoTokenizer.from_pretrained(args.src)
    model = AutoModelForCausalLM.from_pretrained(args.src, trust_remote_code=True, dtype=torch.float32)
    ids = calibration_ids(args.calib, tokenizer, args.nsamples, args.seqlen)
    # Batches of one sample, no attention mask: a plain causal forward, as our GPTQ runs.
    loader = DataLoader(
        list(ids), batch_size=1, shuffle=False, collate_fn=lambda b: {"input_ids": torch.stack(b)}
    )
    scheme = QuantizationScheme(
        targets=[EXPERT_TARGET] if args.targets == "experts" else ["Linear"],
        weights=QuantizationArgs(
            num_bits=4,
            type="int",
            symmetric=True,
            strategy="group",
            group_size=args.group_size,
            observer="minmax",
            actorder="weight" if args.act_order else None,
        ),
    )
    recipe = GPTQModifier(
        config_groups={"group_0": scheme},
        ignore=IGNORE,
        # GPTQModifier's default would turn on "weight" activation ordering; ours only with --act-order.
        actorder="weight" if args.act_order else None,
        dampening_frac=0.01,  # our first dampening step (convert/gptq.py DAMP_STEPS)
    )
    # Which targeted Linears a calibration forward reaches: llm-compressor leaves the others uncalibrated (their
    # saved scales are whatever memory held: NaN or garbage), e.g. the MTP layer, which only runs with labels.
    seen: set[str] = set()
    targeted = dict(match_named_modules(model, scheme.targets, IGNORE))
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, name=name: seen.add(name))
        for name, m in targeted.items()
    ]
    oneshot(
        model=model,
        processor=tokenizer,
        recipe=recipe,
        dataset=loader,
        num_calibration_samples=args.nsamples,
        max_seq_length=args.seqlen,
        shuffle_calibration_samples=False,
        tracing_ignore=tracing_ignore(oneshot),
        trust_remote_code_model=True,
        save_compressed=True,
        output_dir=str(args.dst),
    )
    seconds = time.perf_counter() - t0
    for h in hooks:
        h.remove()
    never = sorted(set(targeted) - seen)
    print(
        json.dumps(
            {
                "seconds": round(seconds, 2),
                "llmcompressor": llmcompressor.__version__,
                "compressed_tensors": compressed_tensors.__version__,
                "transformers": transformers.__version__,
                "torch": torch.__version__,
                "targets": args.targets,
                "group_size": args.group_size,
                "act_order": args.act_order,
                "calib_windows": list(ids.shape),
                "calib_sha256": ids_digest(ids),
                "vm_hwm_gib": round(vm_hwm_gib(), 3),
                "modules_targeted": len(targeted),
                "modules_never_calibrated": len(never),
                # e.g. ["model.layers.4"]: the decoder blocks holding them
                "layers_never_calibrated": sorted({".".join(n.split(".")[:3]) for n in never}),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
