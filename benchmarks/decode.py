"""Decode speed on CPU: ours (fp32 / bf16, eager / compiled) vs transformers' native DeepseekV3 and llama.cpp on
the same weights, in one run, plus prefill, cache bytes per token, memory after load and MTP speculative decoding.

    .venv/bin/python benchmarks/decode.py [--quick] [--threads 2] [--workdir DIR]

The weights: a ~70M-parameter checkpoint in the official layout (hidden 512, 4 layers of which 3 MoE with 16
routed experts + 1 shared, top-4 in 4 groups, MLA with kv_lora_rank 512 / rope 64 as in V3, V3's YaRN, one MTP
layer), random, stored in BF16, so every engine runs exactly the same numbers (fp32 runs widen them).
  decode      tok/s of greedy generation at 128 / 1024 / 4096 tokens of context, batch 1, through each engine's
              own generate loop: model.generate for ours and native (eager; "compiled" = static cache +
              torch.compile of the forward), Llama.eval one token at a time for llama.cpp (its best CPU setup:
              BF16 weights, flash attention, F16 KV cache). Best of --repeats; the 4096/128 column is the
              slowdown with context, "+ms/step" the time the longer context adds to every step (attention over
              the extra cached tokens: comparable across engines whatever their speed at short context).
  prefill     tok/s of one forward over 512 tokens.
  cache       bytes per token per layer the engine's cache holds (ours: the 576-value latent).
  memory      peak RSS that loading the model and decoding add to a fresh process (grouped experts stacked in
              place) over the model's bytes; the process first loads and runs a tiny checkpoint, so the fixed
              cost of the libraries (~110 MB whatever the model's size) is not counted against the model.
  MTP         generate(use_mtp=True) vs plain generate at batch 1 and 4 (left-padded prompts of different
              lengths): speedup and draft acceptance, on (a) a 16-layer version of the bench layer with a
              259-token vocabulary, trained briefly on predictable text (counting sequences; the MTP head then
              agrees with the main model almost always); one draft costs about 1/16 of a main step, as one MTP
              layer against 61 in V3 is small; (b) the 4-layer bench weights trained the same way (a draft there
              costs about half a step: its 16k-token head dominates both); (c) the trained demo model
              (dsv3.demo_model), or a random model when that is unavailable (acceptance then means nothing);
              (d) the trained reference model (benchmarks/train_reference.py) when it is cached.
llama.cpp needs `llama_cpp` importable (bash ../shared/tools/llamacpp/setup.sh .venv); without it that column
says why it is empty. --quick: contexts 128 and 1024, fewer tokens and repeats, no compiled rows, shorter MTP
training.
"""

import argparse
import contextlib
import gc
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsv3.convert.checkpoint import atomic_write_json, copy_remote_code  # noqa: E402
from dsv3.convert.tiny import build_tokenizer, write_official_layout  # noqa: E402
from dsv3.modeling_deepseek.configuration_deepseek import DeepseekV3Config  # noqa: E402
from dsv3.modeling_deepseek.modeling_deepseek import DeepseekV3ForCausalLM  # noqa: E402

from dsv3.demo_model import tie_mtp, untie_mtp  # noqa: E402
from dsv3.generate import compile_config  # noqa: E402

SHARED = ROOT.parent / "shared"
LLAMACPP = SHARED / "tools" / "llamacpp"
YARN = {
    "type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
BENCH = dict(
    vocab_size=16384,
    hidden_size=512,
    intermediate_size=1536,
    moe_intermediate_size=256,
    num_hidden_layers=4,
    num_nextn_predict_layers=1,
    num_attention_heads=8,
    num_key_value_heads=8,
    n_shared_experts=1,
    n_routed_experts=16,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    first_k_dense_replace=1,
    routed_scaling_factor=2.5,
    kv_lora_rank=512,
    q_lora_rank=384,
    qk_rope_head_dim=64,
    v_head_dim=64,
    qk_nope_head_dim=64,
    topk_method="noaux_tc",
    scoring_func="sigmoid",
    norm_topk_prob=True,
    rope_scaling=YARN,
    rope_theta=10000,
    max_position_embeddings=163840,
    rms_norm_eps=1e-6,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=2,
    tie_word_embeddings=False,
    initializer_range=0.02,
)
RECIPE_VERSION = 3  # bump when the checkpoints below change, so cached ones are rebuilt


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- checkpoints
def _save(model: DeepseekV3ForCausalLM, out: Path) -> Path:
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    write_official_layout(model, tmp, torch.bfloat16, max_shard_bytes=200 * 2**20)
    build_tokenizer(tmp, model.config.vocab_size)
    atomic_write_json(
        tmp / "generation_config.json", {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    )
    os.rename(tmp, out)
    return out


def bench_checkpoint(workdir: Path) -> Path:
    out = workdir / f"bench-random-v{RECIPE_VERSION}"
    if not out.exists():
        log(f"writing the bench checkpoint to {out}")
        torch.manual_seed(0)
        _save(DeepseekV3ForCausalLM(DeepseekV3Config(**BENCH)).eval(), out)
    copy_remote_code(out)  # cached weights, but always this tree's model code
    return out


CYCLE = 256  # counting runs over ids 3 .. 3 + CYCLE - 1, wrapping around


def counting_batch(gen: torch.Generator, B: int, S: int) -> torch.Tensor:
    # Predictable text: runs of consecutive ids (mod CYCLE) from random starts; every token fixes the next ones.
    start = torch.randint(0, CYCLE, (B, 1), generator=gen)
    return 3 + (start + torch.arange(S)) % CYCLE


# MTP speed depends on what one draft costs against one main-model step: in DeepSeek-V3 the MTP module is 1 decoder
# layer against 61 (and a 129k-token head that both share), on the 4-layer bench model it is about half a step (the
# 16k-token head dominates both). This model keeps the bench layer but is deeper and has a vocabulary sized for
# counting text, so a draft costs about what it costs in V3 relative to a layer: 1 MTP layer against 16.
MTP_BENCH = dict(BENCH, num_hidden_layers=16, vocab_size=CYCLE + 3)


def predictable_checkpoint(workdir: Path, steps: int, config: dict = BENCH, name: str = "bench") -> Path:
    """`config`'s weights after `steps` AdamW steps on counting sequences (MTP head tied to the main embedding and
    head while training, as the demo model does; untied on save)."""
    out = workdir / f"{name}-counting-{steps}-v{RECIPE_VERSION}"
    if out.exists():
        copy_remote_code(out)
        return out
    log(f"training the {name} model on predictable text ({steps} steps) -> {out}")
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**config)).float()
    tie_mtp(model)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    # Warm-up, cosine decay and clipping: the 16-layer model diverges at a constant 2e-3.
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps)))
    )
    gen = torch.Generator().manual_seed(0)
    model.train()
    for step in range(steps):
        ids = counting_batch(gen, 8, 64)
        out_ = model(ids, labels=ids)
        out_.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        model.update_expert_bias()
        if (step + 1) % max(1, steps // 10) == 0:
            log(f"  step {step + 1}/{steps}  lm {out_.lm_loss.item():.3f}  mtp {out_.mtp_loss.item():.3f}")
    untie_mtp(model)
    return _save(model.eval(), out)


def demo_checkpoint() -> tuple[Path | None, str]:
    try:
        from dsv3.demo_model import get_demo_model
    except ImportError as err:
        return None, f"dsv3.demo_model unavailable ({err})"
    return get_demo_model(log=log), "the trained demo model"


def reference_checkpoint() -> Path | None:
    """benchmarks/train_reference.py's model when it is cached (training it takes ~25 min: not done here)."""
    from benchmarks.train_reference import RECIPE_VERSION as REFERENCE_RECIPE
    from benchmarks.train_reference import cache_dir

    out = cache_dir() / "reference-model"
    meta = out / "dsv3-reference.json"
    if not meta.is_file() or json.loads(meta.read_text()).get("recipe") != REFERENCE_RECIPE:
        return None
    copy_remote_code(out)  # this tree's model code
    return out


# ------------------------------------------------------------------------------------------------ timing
class StepTimer:
    """A generate streamer that stamps every put(): the first is the prompt, then one per decode step."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass

    def decode_rate(self) -> float:
        # From the first generated token (prefill done) to the last: decode steps only.
        steps = len(self.stamps) - 2
        return steps / (self.stamps[-1] - self.stamps[1])


def prompt(ctx: int, vocab: int, seed: int = 0, B: int = 1) -> torch.Tensor:
    return torch.randint(3, vocab, (B, ctx), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_decode_rate(model, ctx: int, new: int, repeats: int, **kwargs) -> float:
    ids = prompt(ctx, model.config.vocab_size)
    best = 0.0
    for _ in range(repeats):
        timer = StepTimer()
        model.generate(ids, max_new_tokens=new, do_sample=False, streamer=timer, pad_token_id=2, **kwargs)
        best = max(best, timer.decode_rate())
    return best


@torch.no_grad()
def prefill_rate(model, n: int, repeats: int) -> float:
    ids = prompt(n, model.config.vocab_size, seed=1)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model(ids, use_cache=True)
        best = min(best, time.perf_counter() - start)
    return n / best


@torch.no_grad()
def cache_bytes_per_token_layer(model, n: int = 16) -> float:
    cache = model(prompt(n, model.config.vocab_size), use_cache=True).past_key_values
    layers = [layer for layer in cache.layers if getattr(layer, "keys", None) is not None]
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in layers) / (len(layers) * n)


def load_ours(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=dtype).eval()


def load_native(path: Path, dtype: torch.dtype):
    from transformers import DeepseekV3ForCausalLM as Native

    return Native.from_pretrained(path, dtype=dtype).eval()


# -------------------------------------------------------------------------------------------- llama.cpp
def llama_cpp_reason() -> str | None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama_cpp is not importable (bash ../shared/tools/llamacpp/setup.sh .venv builds it)"
    if not (LLAMACPP / "convert_to_gguf.py").is_file():
        return f"{LLAMACPP}/convert_to_gguf.py not found"
    return None


def gguf_file(ckpt: Path, outtype: str = "bf16") -> Path:
    out = ckpt / f"bench-{outtype}.gguf"
    if not out.exists():
        log(f"converting {ckpt.name} to GGUF ({outtype})")
        cmd = [sys.executable, str(LLAMACPP / "convert_to_gguf.py"), str(ckpt), "--outtype", outtype]
        subprocess.run([*cmd, "--outfile", str(out)], check=True, capture_output=True)
    return out


@contextlib.contextmanager
def llama_model(gguf: Path, n_ctx: int, threads: int):
    import llama_cpp

    llm = llama_cpp.Llama(
        str(gguf),
        n_ctx=n_ctx,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        flash_attn=True,
        logits_all=False,
        verbose=False,
    )
    try:
        yield llm
    finally:
        llm.close()


def llama_rates(gguf: Path, contexts: list[int], new: int, repeats: int, threads: int) -> dict:
    """Decode tok/s per context (greedy: argmax of each step's logits fed back) and prefill tok/s of 512."""
    import llama_cpp
    import numpy as np

    rates = {}
    with llama_model(gguf, max(contexts) + new + 8, threads) as llm:
        n_vocab = llm.n_vocab()

        def next_token() -> int:  # argmax of the last position's logits (Llama.scores is only kept with
            # logits_all, which would make every step copy the logits of the whole batch)
            return int(
                np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(n_vocab,)))
            )

        for ctx in contexts:
            ids = prompt(ctx, BENCH["vocab_size"])[0].tolist()
            best = 0.0
            for _ in range(repeats):
                llm.reset()
                llm.eval(ids)
                tok = next_token()
                start = time.perf_counter()
                for _ in range(new):
                    llm.eval([tok])
                    tok = next_token()
                best = max(best, new / (time.perf_counter() - start))
            rates[ctx] = best
        ids = prompt(512, BENCH["vocab_size"], seed=1)[0].tolist()
        best = float("inf")
        for _ in range(repeats):
            llm.reset()
            start = time.perf_counter()
            llm.eval(ids)
            best = min(best, time.perf_counter() - start)
        rates["prefill"] = 512 / best
    return rates


# ---------------------------------------------------------------------------------------------------- MTP
def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), 2)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    return ids, mask


def mtp_prompts(path: Path, vocab: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of 48, 39, 30, ... tokens: counting runs for the counting-trained model, held-out text otherwise."""
    lengths = [48 - 9 * i for i in range(batch)]
    if "counting" in path.name:
        gen = torch.Generator().manual_seed(7)
        return left_padded([counting_batch(gen, 1, n)[0] for n in lengths])
    from transformers import AutoTokenizer

    if path.name == "reference-model":  # its held-out text: wikitext-2 test
        text = (SHARED / "data" / "text" / "wikitext2_test.txt").read_text()
    else:
        from dsv3.corpus import pydoc_split

        text = pydoc_split()[1]
    ids = AutoTokenizer.from_pretrained(path)(text[:20000], add_special_tokens=False).input_ids
    return left_padded([torch.tensor(ids[1000 * i : 1000 * i + n]) for i, n in enumerate(lengths)])


@torch.no_grad()
def mtp_rows(
    model, ids: torch.Tensor, mask: torch.Tensor, new: int, repeats: int, ks: list[int]
) -> list[dict]:
    """Plain vs MTP generate with K = each of `ks` draft tokens per step, greedy, best of `repeats` each (runs
    interleaved, so slow drift on a busy machine hits all alike); also checks that the tokens match."""
    kwargs = dict(attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=2, eos_token_id=None)
    times, outs, stats = {}, {}, {}
    for _ in range(repeats):
        for k in [0, *ks]:  # 0: plain generate
            extra = dict(use_mtp=True, num_speculative_tokens=k) if k else {}
            start = time.perf_counter()
            outs[k] = model.generate(ids, **kwargs, **extra)
            times[k] = min(times.get(k, float("inf")), time.perf_counter() - start)
            if k:
                stats[k] = model.last_mtp_stats
    tokens = ids.shape[0] * new
    return [
        {
            "k": k,
            "plain": tokens / times[0],
            "mtp": tokens / times[k],
            "speedup": times[0] / times[k],
            "acceptance": stats[k].acceptance,
            "per_step": 1 + stats[k].accepted_per_step,
            "identical": torch.equal(outs[0], outs[k]),
        }
        for k in ks
    ]


# ------------------------------------------------------------------------------------------------- memory
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec. The fixed cost of a
# process that has loaded and run any checkpoint of this code (imports of transformers' generation and loading
# machinery, the remote-code modules, allocator arenas: ~110 MB, the same for a 15 MB model as for this one) is
# paid first, on a tiny checkpoint; the ratios are of what loading and decoding *this* model adds.
MEMORY_PROBE = """
import gc, sys, torch
torch.set_num_threads(int(sys.argv[4]))
from transformers import AutoModelForCausalLM
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))
def load_and_decode(path, dtype):
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=dtype)
    with torch.no_grad():
        model.generate(torch.randint(3, 500, (1, 16)), max_new_tokens=4, do_sample=False, pad_token_id=2)
    return model
dtype = getattr(torch, sys.argv[3])
del_model = load_and_decode(sys.argv[2], dtype)
del del_model
gc.collect()
base = status("VmRSS")
model = load_and_decode(sys.argv[1], dtype)
size = sum(t.nbytes for t in model.state_dict().values())
print((status("VmHWM") - base) / size, (status("VmRSS") - base) / size, base / 2**20)
"""


def memory_ratio(path: Path, tiny: Path, dtype: str, threads: int) -> tuple[float, float, float]:
    """(peak RSS added / model bytes, final RSS added / model bytes, process RSS before in MiB), in a fresh
    process that first loaded and ran `tiny` (see MEMORY_PROBE)."""
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(path), str(tiny), dtype, str(threads)],
        capture_output=True,
        text=True,
        check=True,
    )
    peak, final, base = out.stdout.split()
    return float(peak), float(final), float(base)


# -------------------------------------------------------------------------------------------------- report
def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        cells = zip(r, widths, strict=True)
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells))

    return "\n".join([title, line(header), line(["-" * w for w in widths]), *map(line, rows)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="Contexts 128/1024, fewer tokens, no compiled rows.")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--workdir", type=Path, default=Path(os.environ.get("DSV3_CACHE", Path.home() / ".cache/dsv3"))
    )
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-native", action="store_true", help="Skip transformers' native class.")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    contexts = [128, 1024] if args.quick else [128, 1024, 4096]
    new = 8 if args.quick else 32
    repeats = args.repeats or (1 if args.quick else 3)
    workdir = args.workdir / "bench-decode"
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = bench_checkpoint(workdir)
    n_params = sum(t.numel() for t in load_ours(ckpt, torch.bfloat16).state_dict().values())
    load = os.getloadavg()[0]
    print(
        f"bench model: {n_params / 1e6:.1f}M parameters (MTP layer included), BF16 on disk; {args.threads} threads; "
        f"load average {load:.1f} at start on {os.cpu_count()} CPUs; torch {torch.__version__}"
    )
    decode: dict[str, dict] = {}
    prefill: dict[str, float] = {}
    cache_bytes: dict[str, float] = {}
    engines = [
        ("ours fp32 eager", "ours", torch.float32, False),
        ("ours bf16 eager", "ours", torch.bfloat16, False),
    ]
    if not args.quick:
        engines += [
            ("ours fp32 compiled", "ours", torch.float32, True),
            ("ours bf16 compiled", "ours", torch.bfloat16, True),
        ]
    if not args.no_native:
        engines += [
            ("native fp32", "native", torch.float32, False),
            ("native bf16", "native", torch.bfloat16, False),
        ]
    for name, kind, dtype, compiled in engines:
        log(f"measuring {name}")
        model = (load_ours if kind == "ours" else load_native)(ckpt, dtype)
        kwargs = dict(cache_implementation="static", compile_config=compile_config()) if compiled else {}
        n = new if kind == "ours" else max(4, new // 2)
        decode[name] = {}
        for c in contexts:
            if compiled:  # (re)compile for this cache size outside the measurement
                hf_decode_rate(model, c, 3, 1, **kwargs)
            decode[name][c] = hf_decode_rate(model, c, n, repeats, **kwargs)
        if not compiled:
            prefill[name] = prefill_rate(model, 512, repeats)
            cache_bytes[name] = cache_bytes_per_token_layer(model)
        del model
        gc.collect()
        torch._dynamo.reset()
    reason = llama_cpp_reason()
    llama = None
    if reason is None:
        log("measuring llama.cpp")
        llama = llama_rates(gguf_file(ckpt), contexts, new, repeats, args.threads)
        decode["llama.cpp bf16, flash attn"] = {c: llama[c] for c in contexts}
        prefill["llama.cpp bf16, flash attn"] = llama["prefill"]

    lo, hi = contexts[0], contexts[-1]
    header = ["decode tok/s (batch 1)", *[f"ctx {c}" for c in contexts], f"{hi}/{lo}", f"+ms/step {lo}->{hi}"]
    rows = [
        [k, *[fmt(v[c]) for c in contexts], fmt(v[hi] / v[lo], 2), fmt(1e3 / v[hi] - 1e3 / v[lo], 2)]
        for k, v in decode.items()
    ]
    ours = {c: max(v[c] for k, v in decode.items() if k.startswith("ours")) for c in contexts}
    for anchor in [k for k in decode if not k.startswith("ours")]:
        rows.append(
            [f"best ours / {anchor}", *[fmt(ours[c] / decode[anchor][c], 2) + "x" for c in contexts], "", ""]
        )
    if reason is not None:
        rows.append([f"llama.cpp: skipped, {reason}", *[""] * (len(contexts) + 2)])
    print()
    print(table("Decode", header, rows))
    print()
    best_prefill = max(v for k, v in prefill.items() if k.startswith("ours"))
    rows = [[k, fmt(v, 0), fmt(best_prefill / v, 2) + "x"] for k, v in prefill.items()]
    print(table("Prefill (512 tokens)", ["engine", "tok/s", "best ours / this"], rows))
    print()
    cfg = DeepseekV3Config(**BENCH)
    latent = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    rows = [[k, fmt(v, 0)] for k, v in cache_bytes.items()]
    rows.append(
        [
            f"formula: (kv_lora_rank + qk_rope_head_dim) x dtype bytes = {latent} x 4 | x 2",
            f"{latent * 4} | {latent * 2}",
        ]
    )
    print(table("KV cache", ["engine", "bytes/token/layer"], rows))
    print()
    rows = []
    tiny = workdir / "tiny-v3"
    if not tiny.exists():
        from dsv3.convert.tiny import build_tiny

        build_tiny(tiny, "v3")
    copy_remote_code(tiny)
    for dtype in ("float32", "bfloat16"):
        peak, final, base = memory_ratio(ckpt, tiny, dtype, args.threads)
        rows.append([f"ours {dtype}", fmt(peak, 3), fmt(final, 3), fmt(base, 0)])
    print(
        table(
            "Memory (fresh process: what load + decode of this model add, after a tiny model paid the fixed cost)",
            [
                "model",
                "peak RSS added / model bytes",
                "final RSS added / model bytes",
                "process RSS before, MiB",
            ],
            rows,
        )
    )
    print()

    rows = []
    deep = predictable_checkpoint(workdir, 60 if args.quick else 200, MTP_BENCH, "mtp-bench")
    trained = predictable_checkpoint(workdir, 60 if args.quick else 160)
    demo, demo_note = demo_checkpoint()
    layers = MTP_BENCH["num_hidden_layers"]
    models = [
        (f"{layers}-layer bench, vocab {MTP_BENCH['vocab_size']}, trained on counting text", deep),
        ("4-layer bench, vocab 16k, trained on counting text", trained),
    ]
    models.append(
        (demo_note, demo)
        if demo is not None
        else (f"random bench weights ({demo_note}; acceptance meaningless)", ckpt)
    )
    reference = reference_checkpoint()
    skipped = []
    if reference is not None:
        models.append(("the trained reference model (wikitext-2 test prompts)", reference))
    else:
        skipped.append(
            "the reference model: not trained yet (bash scripts/bench.sh train_reference, ~25 min)"
        )
    mtp_new = 16 if args.quick else 64
    for label, path in models:
        model = load_ours(path, torch.float32)
        for batch in (1, 4):
            log(f"MTP: {label}, batch {batch}")
            prompts = mtp_prompts(path, model.config.vocab_size, batch)
            for r in mtp_rows(model, *prompts, mtp_new, repeats, [1, 2, 3]):
                rows.append(
                    [
                        f"{label}, batch {batch}",
                        str(r["k"]),
                        fmt(r["plain"]),
                        fmt(r["mtp"]),
                        fmt(r["speedup"], 2) + "x",
                        f"{r['acceptance']:.1%}",
                        fmt(r["per_step"], 2),
                        "yes" if r["identical"] else "NO",
                    ]
                )
        del model
        gc.collect()
    header = [
        "MTP (fp32 eager, greedy)",
        "drafts K",
        "plain tok/s",
        "MTP tok/s",
        "speedup",
        "acceptance",
        "tokens/step",
        "same tokens",
    ]
    print(table("MTP speculative decoding (K > 1: the MTP module chained on its own output)", header, rows))
    for reason in skipped:
        print(f"skipped: {reason}")


if __name__ == "__main__":
    main()
