"""`dsv3 demo`: the main job end to end on the built-in tiny checkpoint, printing the numbers that matter."""

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


def run_demo(workdir: str | Path, log: Callable[[str], None] = print) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import DeepseekV3ForCausalLM as NativeDeepseekV3
    from transformers.utils import logging as hf_logging

    from convert.tiny import build_tiny

    # The native class reports our MTP layer as "unexpected" (it drops layer L); that is the point of step 3.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    workdir = Path(workdir)
    _prepare_workdir(workdir)
    results: dict = {}
    t0 = time.perf_counter()

    ckpt = build_tiny(workdir / "tiny-v3", "v3")
    n_shards = len(list(ckpt.glob("model-*.safetensors")))
    log(f"[1] built tiny DeepSeek-V3 checkpoint (official layout, {n_shards} shards, MTP layer) -> {ckpt}")

    model = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    n_params = sum(p.numel() for p in model.parameters())
    n_mtp = sum(
        p.numel()
        for n, p in model.named_parameters()
        if n.startswith(f"model.layers.{model.config.num_hidden_layers}.")
    )
    log(
        f"[2] loaded with AutoModelForCausalLM(trust_remote_code=True): {n_params:,} parameters "
        f"({n_mtp:,} in the MTP module)"
    )

    prompts = ["The quick brown fox", "Once upon a time there was"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        ours = model(**batch).logits
        native = NativeDeepseekV3.from_pretrained(ckpt, dtype=torch.float32).eval()
        theirs = native(**batch).logits
    real = batch["attention_mask"].bool()
    diff = (ours - theirs).abs()[real].max().item()
    results["max_abs_diff_vs_transformers"] = diff
    log(
        f"[3] logits vs transformers' native DeepseekV3ForCausalLM on the same weights: max |diff| = {diff:.2e}"
    )

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
    step_logits = torch.stack(res.logits, dim=1)  # (B, new, V) from the cached decode
    decode_diff = (full[:, P - 1 : -1] - step_logits).abs().max().item()
    results["greedy_identical_to_native"] = bool(torch.equal(gen, gen_native))
    results["cached_decode_vs_full_forward"] = decode_diff
    cache_values = _cache_values_per_token(res.past_key_values, gen.shape[0])
    results["cache_values_per_token_per_layer"] = cache_values
    log(
        f"[4] greedy generate, left-padded batch: identical to native = {results['greedy_identical_to_native']}; "
        f"cached decode vs full forward max |diff| = {decode_diff:.2e}; cache holds {cache_values} values/token/layer "
        f"(kv_lora_rank {model.config.kv_lora_rank} + rope {model.config.qk_rope_head_dim})"
    )
    for p, row in zip(prompts, gen, strict=True):
        log(f"      {p!r} -> {tok.decode(row[P:], skip_special_tokens=True)!r}")

    ids = tok(
        ["The model reads a sequence of tokens and predicts the next one."], return_tensors="pt"
    ).input_ids
    out = model(ids, labels=ids)
    results.update(lm_loss=out.lm_loss.item(), mtp_loss=out.mtp_loss.item(), loss=out.loss.item())
    log(
        f"[5] training loss: lm {out.lm_loss.item():.3f} + {model.config.mtp_loss_weight} x mtp "
        f"{out.mtp_loss.item():.3f} = {out.loss.item():.3f}"
    )

    saved = workdir / "tiny-v3-resaved"
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
    log(
        f"[6] save_pretrained -> {saved.name}; reloaded in a fresh process through the Auto classes: "
        f"{results['reload_params']:,} parameters"
    )

    results["seconds"] = time.perf_counter() - t0
    log(f"done in {results['seconds']:.1f}s")
    return results


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
