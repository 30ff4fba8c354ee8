"""Loading a checkpoint folder (or Hub id) with our remote code and generating text."""

import os
from pathlib import Path

import torch

from dsv3.convert.checkpoint import CheckpointError, read_config, resolve_model_path
from dsv3.convert.fp8 import DTYPES as CONVERT_DTYPES

DTYPES = {**CONVERT_DTYPES, "auto": "auto"}
# A tokenizer needs one of these; tokenizer_config.json alone cannot build one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def check_model_folder(path: Path) -> None:
    """One-line errors naming the missing file, before transformers gets a chance to fail obscurely."""
    read_config(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{path}: no tokenizer ({' or '.join(TOKENIZER_FILES)} not found)")


def load_model(model: str | os.PathLike, dtype: str = "fp32", device: str = "cpu"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"--dtype: choose from {', '.join(DTYPES)}, got {dtype!r}")
    path = resolve_model_path(str(model))
    check_model_folder(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=DTYPES[dtype])
    return lm.to(device).eval(), tokenizer


@torch.no_grad()
def generate_text(
    model: str | os.PathLike,
    prompt: str,
    max_new_tokens: int = 32,
    dtype: str = "fp32",
    sample: bool = False,
    seed: int = 0,
) -> str:
    # Checked before the (possibly long) model load.
    if not prompt:
        raise ValueError("--prompt: must not be empty")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens: must be at least 1, got {max_new_tokens}")
    lm, tokenizer = load_model(model, dtype)
    torch.manual_seed(seed)
    inputs = tokenizer(prompt, return_tensors="pt")
    out = lm.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=sample, pad_token_id=tokenizer.pad_token_id
    )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
