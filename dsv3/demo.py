"""`dsv3 demo`: the main job end to end on the built-in tiny checkpoint, printing the numbers that matter.

FP8 checkpoint (official layout) -> load (dequantized / kept FP8) -> convert FP8 <-> BF16 -> compare with
transformers' native class -> generate -> MTP training loss -> save and reload elsewhere.
"""

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

MARKER = ".dsv3-demo"


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


def run_demo(workdir: str | Path, log: Callable[[str], None] = print) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import DeepseekV3ForCausalLM as NativeDeepseekV3
    from transformers.utils import logging as hf_logging

    from dsv3.convert.fp8 import bf16_to_fp8, fp8_to_bf16
    from dsv3.convert.tiny import build_tiny

    # The native class reports our MTP layer as "unexpected" (it drops layer L); that is the point of step 5.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    workdir = Path(workdir)
    _prepare_workdir(workdir)
    results: dict = {}
    t0 = time.perf_counter()

    # 1. The built-in checkpoint in DeepSeek's FP8 release layout.
    fp8_dir = build_tiny(workdir / "tiny-v3-fp8", "v3", fp8=True)
    src = _tensors(fp8_dir)
    n_fp8 = sum(t.dtype == torch.float8_e4m3fn for t in src.values())
    kv_a = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"
    log(
        f"[1] built tiny DeepSeek-V3 FP8 checkpoint: {len(src)} tensors ({n_fp8} float8_e4m3fn + scales), "
        f"MTP layer 3; {kv_a.split('.', 3)[-1]} {list(src[kv_a].shape)} has scale "
        f"{list(src[kv_a + '_scale_inv'].shape)} (partial last block)"
    )

    # 2. FP8 -> BF16 on CPU, and back.
    bf16_dir, again_dir = workdir / "tiny-v3-bf16", workdir / "tiny-v3-fp8-again"
    report = fp8_to_bf16(fp8_dir, bf16_dir)
    bf16 = _tensors(bf16_dir)
    exact = sum(
        _same_bits(bf16[n], (src[n].float() * _expand(src[n + "_scale_inv"], src[n].shape)).bfloat16())
        for n, t in src.items()
        if t.dtype == torch.float8_e4m3fn
    )
    bf16_to_fp8(bf16_dir, again_dir)
    again = _tensors(again_dir)
    round_trip = sum(_same_bits(src[n], again[n]) for n in src if n in again)
    results.update(fp8_dequant_exact=f"{exact}/{n_fp8}", fp8_round_trip=f"{round_trip}/{len(src)}")
    log(
        f"[2] convert fp8-to-bf16: {report.summary().split(': ', 1)[1]}\n"
        f"    bit-identical to bf16(fp32(q) * scale): {exact}/{n_fp8}; bf16-to-fp8 again reproduces "
        f"{round_trip}/{len(src)} tensors byte for byte"
    )

    # 3. Load the FP8 folder directly: dequantized at load, or kept in FP8.
    load = dict(trust_remote_code=True, dtype=torch.float32)
    deq = AutoModelForCausalLM.from_pretrained(fp8_dir, **load).eval()
    keep = AutoModelForCausalLM.from_pretrained(fp8_dir, fp8_mode="keep", **load).eval()
    tok = AutoTokenizer.from_pretrained(fp8_dir)
    ids = tok(["The quick brown fox jumps over the lazy dog."], return_tensors="pt").input_ids
    with torch.no_grad():
        same = torch.equal(deq(ids).logits, keep(ids).logits)
    mem = sum(t.numel() * t.element_size() for t in keep.state_dict().values())
    mem_bf16 = sum(t.numel() * 2 if t.is_floating_point() else 0 for t in deq.state_dict().values())
    results["keep_fp8_memory_vs_bf16"] = mem / mem_bf16
    log(
        f"[3] AutoModelForCausalLM on the FP8 folder (CPU): dequantized at load, or fp8_mode='keep' "
        f"({mem / mem_bf16:.2f}x the BF16 bytes); logits identical: {same}"
    )

    # 4. Our model vs transformers' native DeepseekV3 on the same (converted) weights.
    model = AutoModelForCausalLM.from_pretrained(bf16_dir, **load).eval()
    native = NativeDeepseekV3.from_pretrained(bf16_dir, dtype=torch.float32).eval()
    prompts = ["The quick brown fox", "Once upon a time there was"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        diff = (
            (model(**batch).logits - native(**batch).logits)
            .abs()[batch["attention_mask"].bool()]
            .max()
            .item()
        )
    results["max_abs_diff_vs_transformers"] = diff
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"[4] {n_params:,} parameters (MTP included); logits vs transformers' native DeepseekV3ForCausalLM: "
        f"max |diff| = {diff:.2e}"
    )

    # 5. Generation with the latent cache, left-padded batch.
    with torch.no_grad():
        res = model.generate(
            **batch,
            max_new_tokens=16,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            return_dict_in_generate=True,
            output_logits=True,
        )
        gen = res.sequences
        gen_native = native.generate(
            **batch, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id
        )
        full = model(gen, attention_mask=batch_mask(batch, gen)).logits
    P = batch["input_ids"].shape[1]
    decode_diff = (full[:, P - 1 : -1] - torch.stack(res.logits, dim=1)).abs().max().item()
    results["greedy_identical_to_native"] = bool(torch.equal(gen, gen_native))
    results["cached_decode_vs_full_forward"] = decode_diff
    cache_values = _cache_values_per_token(res.past_key_values, gen.shape[0])
    results["cache_values_per_token_per_layer"] = cache_values
    log(
        f"[5] greedy generate, left-padded batch: identical to native = {results['greedy_identical_to_native']}; "
        f"cached decode vs full forward max |diff| = {decode_diff:.2e}; cache holds {cache_values} "
        f"values/token/layer (kv_lora_rank {model.config.kv_lora_rank} + rope {model.config.qk_rope_head_dim})"
    )
    for p, row in zip(prompts, gen, strict=True):
        log(f"      {p!r} -> {tok.decode(row[P:], skip_special_tokens=True)!r}")

    # 6. Training loss: next token + MTP (token two ahead).
    out = model(ids, labels=ids)
    results.update(lm_loss=out.lm_loss.item(), mtp_loss=out.mtp_loss.item(), loss=out.loss.item())
    log(
        f"[6] training loss: lm {out.lm_loss.item():.3f} + {model.config.mtp_loss_weight} x mtp "
        f"{out.mtp_loss.item():.3f} = {out.loss.item():.3f}"
    )

    # 7. save_pretrained carries the remote code; reload in a fresh process from another folder.
    saved = workdir / "resaved"
    model.save_pretrained(saved)
    tok.save_pretrained(saved)
    check = (
        "import torch, sys; from transformers import AutoModelForCausalLM as A;"
        "m = A.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32);"
        "print(sum(p.numel() for p in m.parameters()))"
    )
    fresh = subprocess.run(
        [sys.executable, "-c", check, str(saved)], capture_output=True, text=True, check=True
    )
    results["reload_params"] = int(fresh.stdout.strip().splitlines()[-1])
    config = json.loads((saved / "config.json").read_text())
    log(
        f"[7] save_pretrained -> {saved.name} (auto_map {sorted(config['auto_map'])}); reloaded in a fresh "
        f"process through the Auto classes: {results['reload_params']:,} parameters"
    )

    # 8. INT8 W8A8 (compressed-tensors int-quantized), straight from the FP8 shards; loaded with int8 weights.
    results.update(_int8_step(fp8_dir, workdir / "tiny-v3-int8", model, ids, log))

    results["seconds"] = time.perf_counter() - t0
    log(f"done in {results['seconds']:.1f}s; everything is in {workdir}")
    return results


def _int8_step(fp8_dir: Path, out: Path, bf16_model, ids: torch.Tensor, log) -> dict:
    from transformers import AutoModelForCausalLM

    from dsv3.convert.quantize import quantize_int8

    report = quantize_int8(fp8_dir, out)
    int8 = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    linears = [m for m in int8.modules() if type(m).__name__ == "Int8Linear"]
    int8_bytes = sum(p.numel() * p.element_size() for m in linears for p in m.parameters())
    bf16_bytes = sum(m.in_features * m.out_features * 2 for m in linears)
    with torch.no_grad():
        a, b = bf16_model(ids).logits, int8(ids).logits
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    log(
        f"[8] quantize int8 (W8A8, from the FP8 shards): {report.summary().split(': ', 1)[1]}\n"
        f"    {len(linears)} int8 linears kept int8 in memory ({int8_bytes / bf16_bytes:.2f}x their BF16 bytes); "
        f"top-1 agreement with BF16 {agree:.0%} (random weights: a format check, not a quality number)"
    )
    return {"int8_linears": len(linears), "int8_memory_vs_bf16": int8_bytes / bf16_bytes, "int8_top1_agree": agree}


def _expand(scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    # Written out here (not the library's helper) so the demo checks the formula independently.
    return scale.repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]


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
