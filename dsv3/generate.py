"""Loading a checkpoint folder (or Hub id) with our remote code and generating text."""

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass
class Generation:
    text: str
    new_tokens: int
    seconds: float  # the whole generate call: prefill and decode
    mtp: Any = None  # MTPStats (remote code's class) when generated with --mtp
    compile_seconds: float | None = None  # with --compile: the warm-up run that compiled the decode step

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> str:
        line = f"{self.new_tokens} new tokens in {self.seconds:.2f} s: {self.tokens_per_second:.1f} tok/s"
        if self.compile_seconds is not None:
            line += (
                f" (static cache, compiled: warm-up and compilation took {self.compile_seconds:.1f} s before)"
            )
        return f"{line}; {self.mtp}" if self.mtp is not None else line


def compile_config(skip_module_guards: bool = True):
    """transformers' CompileConfig for the decode step, on CPUs too (transformers compiles only on GPUs unless
    told otherwise; no CUDA graphs, which do not exist on CPUs).

    With `skip_module_guards` (the default), Dynamo does not re-check the model's module attributes before every
    step (torch.compiler.skip_guard_on_all_nn_modules_unsafe): ~0.2 ms less per decode step, ~7% of a step of the
    decode benchmark at short context. The compiled step then assumes that the model's structure stays as it was
    when it compiled: after casting or moving the model, train()/eval(), set_mla_path or swapping modules, call
    torch._dynamo.reset() and `del model._compiled_call` (weights updated in place are fine: tensors are read
    afresh at every step). `dsv3 generate --compile` never modifies the model between its runs."""
    from transformers import CompileConfig

    if skip_module_guards:
        options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        config = CompileConfig(fullgraph=False, dynamic=None, mode=None, options=options)
    else:
        config = CompileConfig(fullgraph=False, dynamic=None, mode="default")
    config._compile_all_devices = True
    return config


@torch.no_grad()
def run_generation(
    model: str | os.PathLike,
    prompt: str,
    max_new_tokens: int = 32,
    dtype: str = "fp32",
    sample: bool = False,
    seed: int = 0,
    mtp: bool = False,
    draft_tokens: int = 1,
    compile: bool = False,
) -> Generation:
    """Load, generate (greedy, or sampled with the checkpoint's generation config), time it. With `mtp`, MTP
    speculative decoding: the same greedy text, fewer main-model forwards; `draft_tokens` drafts per step (more
    than 1 chains the MTP module). With `compile`, a static cache and a torch.compile'd decode step: a first,
    untimed run of the same length compiles it, then the timed run."""
    # Checked before the (possibly long) model load.
    if not prompt:
        raise ValueError("--prompt: must not be empty")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens: must be at least 1, got {max_new_tokens}")
    if draft_tokens < 1:
        raise ValueError(f"--draft-tokens: must be at least 1, got {draft_tokens}")
    if compile and mtp:
        raise ValueError("--compile: MTP decoding does not run on the static cache yet; use one or the other")
    if mtp:
        path = resolve_model_path(str(model))
        if not read_config(path).get("num_nextn_predict_layers"):
            raise ValueError(f"--mtp: {path} has no MTP module (num_nextn_predict_layers is 0)")
    lm, tokenizer = load_model(model, dtype)
    torch.manual_seed(seed)
    inputs = tokenizer(prompt, return_tensors="pt")
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=sample, pad_token_id=tokenizer.pad_token_id)
    if mtp:
        kwargs.update(use_mtp=True, num_speculative_tokens=draft_tokens)
    compile_seconds = None
    if compile:
        kwargs.update(cache_implementation="static", compile_config=compile_config())
        start = time.perf_counter()
        lm.generate(**inputs, **kwargs)  # same shapes as the timed run: compiles the decode step once
        compile_seconds = time.perf_counter() - start
        torch.manual_seed(seed)
    start = time.perf_counter()
    out = lm.generate(**inputs, **kwargs)
    seconds = time.perf_counter() - start
    new = out[0, inputs["input_ids"].shape[1] :]
    text = tokenizer.decode(new, skip_special_tokens=True)
    return Generation(text, len(new), seconds, lm.last_mtp_stats if mtp else None, compile_seconds)
