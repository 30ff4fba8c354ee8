"""`dsv3 demo`: the main job end to end on the trained demo model, printing the numbers that matter.

The demo model (trained on first use, then cached; see demo_model.py) -> DeepSeek's FP8 release layout ->
convert FP8 <-> BF16 -> load (dequantized / kept FP8) -> compare with transformers' native class -> generate ->
MTP speculative decoding -> MTP training loss -> save and reload elsewhere -> INT8 -> GPTQ -> eval -> card.

Each capability is one step function in STEPS, `step_xxx(ctx) -> None`, sharing a DemoContext: the folders
written so far (ctx.paths), the tokenizer, loaded models (ctx.model(key)) and the results dict run_demo returns.
A new capability is one more function appended to STEPS.
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

MARKER = ".dsv3-demo"
GPTQ_GROUP = 128  # the demo model's Linear inputs are all multiples of 128
# Prompts from the training domain (CPython's reference docs), so the continuations are the model's real output.
PROMPTS = ("The assignment statement", "A function definition")


@dataclass
class DemoContext:
    workdir: Path
    log: Callable[[str], None] = print
    results: dict = field(default_factory=dict)
    # Folders written so far, by role: "demo_model", "fp8", "bf16", "fp8_again", "resaved", "int8", ...
    paths: dict[str, Path] = field(default_factory=dict)
    tokenizer: Any = None
    heldout: str = ""  # pydoc_split()'s held-out text: every perplexity here is measured on it
    heldout_ids: torch.Tensor | None = None  # ...and its tokens (set with the tokenizer)
    step: int = 0  # the running step's number, for say()
    models: dict = field(default_factory=dict)  # loaded once per (role, options), fp32, eval mode

    def say(self, text: str) -> None:
        """Log under the running step's number; continuation lines indented."""
        self.log(f"[{self.step}] " + text.replace("\n", "\n    "))

    def model(self, role: str, **options):
        from transformers import AutoModelForCausalLM

        key = (role, tuple(sorted(options.items())))
        if key not in self.models:
            self.models[key] = AutoModelForCausalLM.from_pretrained(
                self.paths[role], trust_remote_code=True, dtype=torch.float32, **options
            ).eval()
        return self.models[key]


def _prepare_workdir(workdir: Path) -> None:
    if workdir.exists():
        if not (workdir / MARKER).exists() and any(workdir.iterdir()):
            raise ValueError(f"{workdir}: exists and is not a previous demo folder; choose another --workdir")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / MARKER).write_text("created by dsv3 demo; safe to delete\n")


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from dsv3.convert.checkpoint import CheckpointReader

    reader = CheckpointReader(folder)
    return {name: reader.get(name) for name in reader}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
    return a.dtype == b.dtype and torch.equal(a.view(view[a.element_size()]), b.view(view[b.element_size()]))


def _expand(scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    # Written out here (not the library's helper) so the demo checks the formula independently.
    return scale.repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]


def _held_out_batch(ctx: DemoContext, n_tokens: int = 64) -> torch.Tensor:
    return ctx.heldout_ids[None, :n_tokens]  # (1, n_tokens)


# ------------------------------------------------------------------------------------------------- steps
def step_demo_model(ctx: DemoContext) -> None:
    """The trained demo model (from the cache, or trained now), and the tokenizer every later step uses."""
    from transformers import AutoTokenizer

    from dsv3.convert.record import read_record
    from dsv3.demo_model import demo_model_dir, encode, get_demo_model

    cached = demo_model_dir().is_dir()  # only a finished model is ever renamed to this name
    path = get_demo_model(log=ctx.log)
    ctx.paths["demo_model"] = path
    ctx.tokenizer = AutoTokenizer.from_pretrained(path)
    ctx.heldout_ids = encode(ctx.tokenizer, ctx.heldout)
    operation = read_record(path)["operation"]
    r, p = operation["results"], operation["params"]
    ctx.results.update(
        demo_model=str(path),
        demo_model_cached=cached,
        heldout_ppl=r["heldout_ppl"],
        unigram_ppl=r["unigram_ppl"],
        mtp_agreement=r["mtp_agreement"],
    )
    ctx.say(
        f"demo model ({'cached' if cached else 'trained now'}: {path}): {r['parameters'] / 1e6:.1f}M parameters, "
        f"MLA + {p['n_routed_experts']}-expert grouped MoE + MTP, trained {r['train_seconds']:.0f}s on CPython's "
        f"docs\nheld-out perplexity {r['heldout_ppl']:.1f} (unigram {r['unigram_ppl']:.0f}); MTP head agrees "
        f"with the main head's t+2 on {r['mtp_agreement']:.0%} of held-out positions "
        f"(true t+2: {r['mtp_accuracy']:.0%})"
    )


def step_fp8_release(ctx: DemoContext) -> None:
    """The demo model written in DeepSeek's FP8 release layout: the starting "official checkpoint"."""
    from dsv3.convert.checkpoint import copy_side_files
    from dsv3.convert.record import new_record, write_record
    from dsv3.convert.tiny import write_official_layout

    out = ctx.workdir / "demo-v3-fp8"
    model = ctx.model("demo_model")
    write_official_layout(model, out, torch.bfloat16, fp8=True)
    copy_side_files(ctx.paths["demo_model"], out)
    write_record(out, new_record(ctx.paths["demo_model"], "release-fp8", {"weight_block_size": [128, 128]}))
    ctx.paths["fp8"] = out
    src = _tensors(out)
    n_fp8 = sum(t.dtype == torch.float8_e4m3fn for t in src.values())
    partial = next(
        n for n, t in src.items() if t.dtype == torch.float8_e4m3fn and any(d % 128 for d in t.shape)
    )
    n_shards = len(set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values()))
    ctx.say(
        f"FP8 release layout: {len(src)} tensors in {n_shards} shards ({n_fp8} float8_e4m3fn + "
        f"weight_scale_inv), MTP layer {model.config.num_hidden_layers} included; "
        f"{partial.split('.', 3)[-1]} {list(src[partial].shape)} has scale "
        f"{list(src[partial + '_scale_inv'].shape)} (partial last block)"
    )


def step_convert(ctx: DemoContext) -> None:
    """FP8 -> BF16 on CPU, bit-exact against the formula, and back to FP8 byte for byte."""
    from dsv3.convert.fp8 import bf16_to_fp8, fp8_to_bf16

    fp8_dir = ctx.paths["fp8"]
    bf16_dir, again_dir = ctx.workdir / "demo-v3-bf16", ctx.workdir / "demo-v3-fp8-again"
    report = fp8_to_bf16(fp8_dir, bf16_dir)
    src, bf16 = _tensors(fp8_dir), _tensors(bf16_dir)
    fp8_names = [n for n, t in src.items() if t.dtype == torch.float8_e4m3fn]
    exact = sum(
        _same_bits(bf16[n], (src[n].float() * _expand(src[n + "_scale_inv"], src[n].shape)).bfloat16())
        for n in fp8_names
    )
    bf16_to_fp8(bf16_dir, again_dir)
    again = _tensors(again_dir)
    round_trip = sum(_same_bits(src[n], again[n]) for n in src if n in again)
    ctx.paths.update(bf16=bf16_dir, fp8_again=again_dir)
    ctx.results.update(
        fp8_dequant_exact=f"{exact}/{len(fp8_names)}", fp8_round_trip=f"{round_trip}/{len(src)}"
    )
    ctx.say(
        f"convert fp8-to-bf16: {report.summary().split(': ', 1)[1]}\n"
        f"bit-identical to bf16(fp32(q) * scale): {exact}/{len(fp8_names)}; bf16-to-fp8 again reproduces "
        f"{round_trip}/{len(src)} tensors byte for byte"
    )


def step_load_fp8(ctx: DemoContext) -> None:
    """Load the FP8 folder directly (dequantized at load, or kept FP8); what FP8 costs in perplexity."""
    from dsv3.demo_model import heldout_perplexity

    deq, keep = ctx.model("fp8"), ctx.model("fp8", fp8_mode="keep")
    ids = _held_out_batch(ctx)
    with torch.no_grad():
        same = torch.equal(deq(ids).logits, keep(ids).logits)
    # The kept projections: float8 weight + fp32 block scales, against the same weights in BF16.
    kept = {n: t for n, t in keep.state_dict().items() if t.dtype == torch.float8_e4m3fn}
    mem = sum(t.numel() + keep.state_dict()[n + "_scale_inv"].numel() * 4 for n, t in kept.items())
    mem_bf16 = sum(t.numel() * 2 for t in kept.values())
    ppl_fp8 = heldout_perplexity(deq, ctx.tokenizer, ctx.heldout)
    ppl_bf16 = ctx.results["heldout_ppl"]
    ctx.results.update(keep_fp8_memory_vs_bf16=mem / mem_bf16, fp8_same_logits=same, heldout_ppl_fp8=ppl_fp8)
    ctx.say(
        f"AutoModelForCausalLM on the FP8 folder (CPU): dequantized at load, or fp8_mode='keep' "
        f"({len(kept)} projections stay float8: {mem / mem_bf16:.2f}x their BF16 bytes); logits identical: {same}\n"
        f"held-out perplexity with the FP8 weights {ppl_fp8:.2f} vs {ppl_bf16:.2f} BF16 "
        f"({ppl_fp8 / ppl_bf16 - 1:+.2%})"
    )


def step_vs_native(ctx: DemoContext) -> None:
    """Our model vs transformers' native DeepseekV3 on the same (converted) weights."""
    from transformers import DeepseekV3ForCausalLM as NativeDeepseekV3

    model = ctx.model("bf16")
    native = NativeDeepseekV3.from_pretrained(ctx.paths["bf16"], dtype=torch.float32).eval()
    ctx.models["native"] = native
    batch = ctx.tokenizer(list(PROMPTS), return_tensors="pt", padding=True)
    with torch.no_grad():
        diff = (
            (model(**batch).logits - native(**batch).logits)
            .abs()[batch["attention_mask"].bool()]
            .max()
            .item()
        )
    n_params = sum(p.numel() for p in model.parameters())
    ctx.results["max_abs_diff_vs_transformers"] = diff
    ctx.say(
        f"{n_params:,} parameters (MTP included); logits vs transformers' native DeepseekV3ForCausalLM: "
        f"max |diff| = {diff:.2e}"
    )


def step_generate(ctx: DemoContext) -> None:
    """Greedy generation with the latent cache, left-padded batch, against native and a full forward."""
    model, native, tok = ctx.model("bf16"), ctx.models["native"], ctx.tokenizer
    batch = tok(list(PROMPTS), return_tensors="pt", padding=True)
    # Greedy with a mild repetition penalty (a 3.6M-parameter model otherwise loops); a logits processor that
    # both classes share, so the comparison with native stays exact.
    greedy = dict(max_new_tokens=24, do_sample=False, repetition_penalty=1.2, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        res = model.generate(**batch, **greedy, return_dict_in_generate=True, output_logits=True)
        gen = res.sequences
        gen_native = native.generate(**batch, **greedy)
        full = model(gen, attention_mask=batch_mask(batch, gen)).logits
    P = batch["input_ids"].shape[1]
    decode_diff = (full[:, P - 1 : -1] - torch.stack(res.logits, dim=1)).abs().max().item()
    cache_values = _cache_values_per_token(res.past_key_values, gen.shape[0])
    ctx.results.update(
        greedy_identical_to_native=bool(torch.equal(gen, gen_native)),
        cached_decode_vs_full_forward=decode_diff,
        cache_values_per_token_per_layer=cache_values,
        generated={
            p: tok.decode(row[P:], skip_special_tokens=True) for p, row in zip(PROMPTS, gen, strict=True)
        },
    )
    ctx.say(
        f"greedy generate (repetition_penalty 1.2), left-padded batch: identical to native = {ctx.results['greedy_identical_to_native']}; "
        f"cached decode vs full forward max |diff| = {decode_diff:.2e}; cache holds {cache_values} "
        f"values/token/layer (kv_lora_rank {model.config.kv_lora_rank} + rope {model.config.qk_rope_head_dim})"
        + "".join(f"\n  {p!r} -> {text!r}" for p, text in ctx.results["generated"].items())
    )


def step_mtp_generate(ctx: DemoContext) -> None:
    """Greedy generation with and without MTP speculative decoding: same tokens, both speeds, the acceptance."""
    model, tok = ctx.model("bf16"), ctx.tokenizer
    rows = {}
    for name, prompts in (("batch 1", PROMPTS[:1]), (f"batch {len(PROMPTS)}", PROMPTS)):
        batch = tok(list(prompts), return_tensors="pt", padding=True)
        greedy = dict(max_new_tokens=48, do_sample=False, pad_token_id=tok.pad_token_id)
        seconds, outs = {}, {}
        with torch.no_grad():
            for use_mtp in (False, True, False, True):  # alternate, keep the best of two
                started = time.perf_counter()
                outs[use_mtp] = model.generate(**batch, **greedy, use_mtp=use_mtp)
                took = time.perf_counter() - started
                seconds[use_mtp] = min(took, seconds.get(use_mtp, took))
        new = outs[False].shape[0] * (outs[False].shape[1] - batch["input_ids"].shape[1])
        stats = model.last_mtp_stats
        rows[name] = dict(
            identical=bool(torch.equal(outs[False], outs[True])),
            plain_tok_s=new / seconds[False],
            mtp_tok_s=new / seconds[True],
            speedup=seconds[False] / seconds[True],
            acceptance=stats.acceptance,
        )
    ctx.results["mtp_generate"] = rows
    ctx.say(
        "generate(use_mtp=True): the MTP module drafts the token after next, the main model verifies it "
        "(greedy, 48 new tokens)\n"
        + "\n".join(
            f"{name}: identical to plain greedy = {r['identical']}; {r['plain_tok_s']:.0f} -> "
            f"{r['mtp_tok_s']:.0f} tok/s ({r['speedup']:.2f}x), draft acceptance {r['acceptance']:.0%}"
            for name, r in rows.items()
        )
        + "\n(4 layers: one draft costs about half a main step, 1/62 in V3; the MTP head never saw the model's own "
        f"greedy loops, so acceptance here is below its {ctx.results['mtp_agreement']:.0%} agreement on held-out "
        "text)"
    )


def step_mtp_loss(ctx: DemoContext) -> None:
    """The training loss on held-out text: next token + MTP (the token two ahead)."""
    model = ctx.model("bf16")
    ids = _held_out_batch(ctx)
    with torch.no_grad():
        out = model(ids, labels=ids)
    ctx.results.update(lm_loss=out.lm_loss.item(), mtp_loss=out.mtp_loss.item(), loss=out.loss.item())
    ctx.say(
        f"training loss on held-out text: lm {out.lm_loss.item():.3f} + {model.config.mtp_loss_weight} x mtp "
        f"{out.mtp_loss.item():.3f} = {out.loss.item():.3f}"
    )


def step_save_reload(ctx: DemoContext) -> None:
    """save_pretrained carries the remote code; reload in a fresh process from another folder."""
    saved = ctx.workdir / "resaved"
    ctx.model("bf16").save_pretrained(saved)
    ctx.tokenizer.save_pretrained(saved)
    check = (
        "import torch, sys; from transformers import AutoModelForCausalLM as A;"
        "m = A.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32);"
        "print(sum(p.numel() for p in m.parameters()))"
    )
    fresh = subprocess.run(
        [sys.executable, "-c", check, str(saved)], capture_output=True, text=True, check=True
    )
    ctx.paths["resaved"] = saved
    ctx.results["reload_params"] = int(fresh.stdout.strip().splitlines()[-1])
    config = json.loads((saved / "config.json").read_text())
    ctx.say(
        f"save_pretrained -> {saved.name} (auto_map {sorted(config['auto_map'])}); reloaded in a fresh "
        f"process through the Auto classes: {ctx.results['reload_params']:,} parameters"
    )


def step_int8(ctx: DemoContext) -> None:
    """INT8 W8A8 (compressed-tensors int-quantized) straight from the FP8 shards, kept int8 in memory."""
    from dsv3.convert.quantize import quantize_int8
    from dsv3.demo_model import heldout_perplexity

    out = ctx.workdir / "demo-v3-int8"
    report = quantize_int8(ctx.paths["fp8"], out)
    ctx.paths["int8"] = out
    bf16, int8 = ctx.model("bf16"), ctx.model("int8")
    linears = [m for m in int8.modules() if type(m).__name__ == "Int8Linear"]
    int8_bytes = sum(p.numel() * p.element_size() for m in linears for p in m.parameters())
    bf16_bytes = sum(m.in_features * m.out_features * 2 for m in linears)
    ppl_bf16 = heldout_perplexity(bf16, ctx.tokenizer, ctx.heldout)
    ppl_int8 = heldout_perplexity(int8, ctx.tokenizer, ctx.heldout)
    ctx.results.update(
        int8_linears=len(linears),
        int8_memory_vs_bf16=int8_bytes / bf16_bytes,
        heldout_ppl_bf16_from_fp8=ppl_bf16,
        heldout_ppl_int8=ppl_int8,
        int8_ppl_increase=ppl_int8 / ppl_bf16 - 1,
    )
    ctx.say(
        f"quantize int8 (W8A8, from the FP8 shards): {report.summary().split(': ', 1)[1]}\n"
        f"{len(linears)} int8 linears kept int8 in memory ({int8_bytes / bf16_bytes:.2f}x their BF16 bytes); "
        f"held-out perplexity BF16 {ppl_bf16:.2f} -> INT8 {ppl_int8:.2f} ({ppl_int8 / ppl_bf16 - 1:+.2%})"
    )


def step_gptq(ctx: DemoContext) -> None:
    """GPTQ W4A16 vs round-to-nearest (same bits, groups and format), streamed layer by layer from the FP8
    shards, calibrated on the demo model's training text; held-out perplexity of each."""
    from dsv3.convert.gptq_stream import GPTQOptions, quantize_gptq
    from dsv3.corpus import pydoc_split
    from dsv3.demo_model import heldout_perplexity

    calib = ctx.workdir / "calib.txt"
    calib.write_text(pydoc_split()[0])
    base = heldout_perplexity(ctx.model("bf16"), ctx.tokenizer, ctx.heldout)
    lines, ppl = [], {}
    for method in ("rtn", "gptq"):
        out = ctx.workdir / f"demo-v3-w4-{method}"
        opts = GPTQOptions(bits=4, group_size=GPTQ_GROUP, nsamples=64, seqlen=128, method=method)
        report = quantize_gptq(ctx.paths["fp8"], out, calib, opts)
        ctx.paths[f"w4-{method}"] = out
        ppl[method] = heldout_perplexity(ctx.model(f"w4-{method}"), ctx.tokenizer, ctx.heldout)
        lines.append(
            f"| {method.upper()} W4 g{GPTQ_GROUP}, every decoder Linear | {ppl[method]:.2f} | "
            f"{ppl[method] / base - 1:+.2%} | {report.seconds:.1f} |"
        )
    ctx.results.update(heldout_ppl_w4_rtn=ppl["rtn"], heldout_ppl_w4_gptq=ppl["gptq"], heldout_ppl_bf16=base)
    ctx.say(
        "quantize gptq (layer-streamed from the FP8 shards, every expert calibrated on every token):\n"
        "| weights | held-out ppl | vs BF16 | quantize s |\n|---|---|---|---|\n"
        f"| BF16 | {base:.2f} | | |\n" + "\n".join(lines)
    )


def step_eval(ctx: DemoContext) -> None:
    """lm-eval on the shipped offline tasks (held-out pydoc perplexity, word order), BF16 vs GPTQ-W4."""
    from dsv3.eval import demo_report

    for role in ("bf16", "w4-gptq"):
        markdown, results = demo_report(ctx.paths[role], ctx.workdir / f"eval-{role}", record=True)
        order = results["results"]["dsv3_pydoc_order"]
        ctx.results[f"eval_{role}_word_order_acc"] = order["acc,none"]
        ctx.say(
            f"dsv3 eval {ctx.paths[role].name} (recorded in its dsv3_record.json):\n{_table_only(markdown)}"
        )


def _table_only(markdown: str) -> str:
    return "\n".join(line for line in markdown.splitlines() if line.startswith("|"))


def step_card(ctx: DemoContext) -> None:
    """The model card for the GPTQ output, from its record, and what `dsv3 push --dry-run` would upload."""
    from dsv3.model_cards import demo_publish

    listing = demo_publish(ctx.paths["w4-gptq"])
    ctx.say(f"dsv3 card + dsv3 push --dry-run {ctx.paths['w4-gptq'].name}:\n{listing}")


STEPS: list[Callable[[DemoContext], None]] = [
    step_demo_model,
    step_fp8_release,
    step_convert,
    step_load_fp8,
    step_vs_native,
    step_generate,
    step_mtp_generate,
    step_mtp_loss,
    step_save_reload,
    step_int8,
    step_gptq,
    step_eval,
    step_card,
]


def run_demo(workdir: str | Path, log: Callable[[str], None] = print) -> dict:
    from transformers.utils import logging as hf_logging

    from dsv3.corpus import pydoc_split

    # The native class reports our MTP layer as "unexpected" (it drops layer L); step_vs_native expects that.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    workdir = Path(workdir)
    _prepare_workdir(workdir)
    ctx = DemoContext(workdir=workdir, log=log, heldout=pydoc_split()[1])
    t0 = time.perf_counter()
    with _no_converter_progress_bars():  # the steps print one summary line each instead
        for ctx.step, step in enumerate(STEPS):
            started = time.perf_counter()
            step(ctx)
            ctx.results.setdefault("step_seconds", {})[step.__name__] = round(
                time.perf_counter() - started, 2
            )
    ctx.results["seconds"] = time.perf_counter() - t0
    log(f"done in {ctx.results['seconds']:.1f}s; everything is in {workdir}")
    return ctx.results


@contextlib.contextmanager
def _no_converter_progress_bars():
    # Converters and GPTQ honour HF_HUB_DISABLE_PROGRESS_BARS; lm-eval's bars are plain tqdm (TQDM_DISABLE).
    names = ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE")
    before = {name: os.environ.get(name) for name in names}
    os.environ.update(dict.fromkeys(names, "1"))
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def batch_mask(batch, gen: torch.Tensor) -> torch.Tensor:
    # Prompt padding stays masked, every generated position is real.
    mask = torch.ones_like(gen)
    mask[:, : batch["attention_mask"].shape[1]] = batch["attention_mask"]
    return mask


def _cache_values_per_token(cache, batch_size: int) -> int:
    # Measured from the cache object generate returned: stored elements / (batch * tokens * layers).
    layers = [layer for layer in cache.layers if getattr(layer, "keys", None) is not None]
    total = sum(layer.keys.numel() + layer.values.numel() for layer in layers)
    tokens = layers[0].keys.shape[-2]
    return total // (batch_size * tokens * len(layers))
