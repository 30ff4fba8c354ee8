"""FP8 <-> BF16 checkpoint conversion on CPU, shard by shard.

Every output shard is written under a temporary name and renamed when complete, and has the same file name as
its source shard; a job marker in the destination records the job, so a re-run after an interruption (even
kill -9) skips finished shards and produces byte-identical output. The index, config.json, side files and
remote code are written last; the marker is removed when the job is complete.
"""

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from modeling_deepseek.configuration_deepseek import layer_index
from modeling_deepseek.fp8 import (
    FP8_DTYPE,
    SCALE_FORMATS,
    blockwise_dequant,
    blockwise_quant,
    check_scale,
    fp8_quantization_config,
    is_fp8_weight,
    scale_shape,
)

from .checkpoint import (
    INDEX_NAME,
    CheckpointError,
    CheckpointReader,
    PlannedTensor,
    atomic_write_json,
    copy_remote_code,
    copy_side_files,
    read_config,
    resolve_model_path,
    shard_tensor_bytes,
    with_auto_map,
    write_shard_streaming,
)

MARKER = ".dsv3-job.json"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SCALE_SUFFIX = "_scale_inv"
# Plans one shard: (its tensor names, a reader for cross-shard lookups) -> the output tensors, in order, with
# shapes and dtypes known up front and the data computed lazily. Validation happens while planning, so a bad
# input fails before anything is written.
ShardPlan = Callable[[list[str], CheckpointReader], list[PlannedTensor]]


@dataclass
class ConvertReport:
    dst: Path
    shards_written: int = 0
    shards_resumed: int = 0
    tensors: int = 0
    input_elements: int = 0
    output_bytes: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        rate = self.input_elements / self.seconds / 1e9 if self.seconds else 0.0
        mbs = self.output_bytes / self.seconds / 1e6 if self.seconds else 0.0
        return (
            f"{self.dst}: {self.shards_written} shards written, {self.shards_resumed} resumed, "
            f"{self.tensors} tensors, {self.output_bytes / 1e6:.1f} MB in {self.seconds:.1f}s "
            f"({rate:.2f} Gelem/s in, {mbs:.0f} MB/s out)"
        )


def _prepare_destination(src: Path, dst: Path, job: dict, force: bool) -> None:
    """Starts a fresh job, or resumes the same job found there. Refuses a non-empty destination without --force."""
    if src.resolve() == dst.resolve() or src.resolve() in dst.resolve().parents:
        raise CheckpointError(f"{dst}: the destination must not be the source folder or inside it")
    marker = dst / MARKER
    if dst.exists():
        # Our own marker's temporary file alone means a run was killed before it started: still empty.
        entries = [p for p in dst.iterdir() if p.name != MARKER + ".tmp"]
        if entries and marker.is_file() and json.loads(marker.read_text()) == job:
            # Resuming our own job: half-written files never count as output (ours end in .tmp; safetensors'
            # own writer uses .tmpXXXXXX). Only here, inside a folder that is provably ours, is anything deleted.
            for stale in [*dst.glob("*.tmp"), *dst.glob(".tmp*")]:
                stale.unlink()
            return
        if entries and not force:
            raise CheckpointError(f"{dst}: exists and is not empty (use --force to overwrite)")
        shutil.rmtree(dst)
    dst.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, job)


def _run(
    src: Path,
    dst: Path,
    job: dict,
    plan: ShardPlan,
    new_config: dict,
    force: bool,
    workers: int,
    keep: Callable[[str], bool] = lambda name: True,
) -> ConvertReport:
    t0 = time.perf_counter()
    reader = CheckpointReader(src)
    _prepare_destination(src, dst, job, force)
    report = ConvertReport(dst=dst)
    weight_map: dict[str, str] = {}
    sizes: dict[str, int] = {}
    total_in = sum((src / s).stat().st_size for s in reader.shards if (src / s).is_file())
    disable = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").lower() in ("1", "true", "yes")
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, workers))  # compute threads; a writer thread overlaps the disk
    try:
        with tqdm(total=total_in, unit="B", unit_scale=True, desc="converting", disable=disable) as bar:
            for shard in reader.shards:
                out_path = dst / shard
                names = [n for n in reader.names_in(shard) if keep(n)]
                if out_path.is_file():  # finished by an earlier, interrupted run (renames are atomic)
                    header = shard_tensor_bytes(out_path)
                    report.shards_resumed += 1
                elif names:
                    planned = plan(names, reader)
                    report.input_elements += sum(reader.get(n).numel() for n in names)
                    header = write_shard_streaming(out_path, planned) if planned else {}
                    report.shards_written += bool(planned)
                    del planned
                    reader.close()  # unmap the shard: resident memory stays at about one shard
                else:
                    header = {}
                for name, size in header.items():
                    weight_map[name], sizes[name] = shard, size
                bar.update((src / shard).stat().st_size)
    finally:
        torch.set_num_threads(threads)
    report.tensors = len(weight_map)
    report.output_bytes = sum(sizes.values())
    copy_side_files(src, dst)
    copy_remote_code(dst)
    atomic_write_json(dst / "config.json", with_auto_map(new_config))
    atomic_write_json(
        dst / INDEX_NAME,
        {"metadata": {"total_size": report.output_bytes}, "weight_map": dict(sorted(weight_map.items()))},
    )
    (dst / MARKER).unlink()
    report.seconds = time.perf_counter() - t0
    return report


# ------------------------------------------------------------------------------------------ FP8 -> BF16
def fp8_to_bf16(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    dtype: str = "bf16",
    drop_mtp: bool = False,
    workers: int | None = None,
    force: bool = False,
) -> ConvertReport:
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype: choose from {', '.join(DTYPES)}, got {dtype!r}")
    src, dst = resolve_model_path(str(src)), Path(dst)
    config = read_config(src)
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") != "fp8":
        raise CheckpointError(
            f"{src / 'config.json'}: quantization_config.quant_method is not 'fp8' "
            f"(found {quant.get('quant_method')!r}); nothing to dequantize"
        )
    block = tuple(quant.get("weight_block_size", [128, 128]))
    target = DTYPES[dtype]
    n_layers = config["num_hidden_layers"]
    job = {"job": "fp8-to-bf16", "src": str(src.resolve()), "dtype": dtype, "drop_mtp": drop_mtp}

    def keep(name: str) -> bool:
        layer = layer_index(name)
        return not (drop_mtp and layer is not None and layer >= n_layers)

    def plan(names: list[str], reader: CheckpointReader) -> list[PlannedTensor]:
        out = []
        for name in names:
            where = src / reader.weight_map[name]
            t = reader.get(name)  # a lazy view of the mapped shard: nothing is read yet
            if name.endswith(SCALE_SUFFIX):
                if name.removesuffix(SCALE_SUFFIX) not in reader:
                    raise CheckpointError(f"{where}: {name} has no weight to scale")
                continue  # consumed by its weight
            if t.dtype == FP8_DTYPE:
                scale_name = name + SCALE_SUFFIX
                if scale_name not in reader:
                    raise CheckpointError(f"{where}: {name} is FP8 but the checkpoint has no {scale_name}")
                scale = reader.get(scale_name)  # may live in another shard: found through the index
                try:
                    check_scale(name, t, scale, block)
                except ValueError as err:
                    raise CheckpointError(f"{where}: {err}") from None
                make = partial(blockwise_dequant, t, scale, target, block)  # make(out) fills the ring buffer
                out.append(PlannedTensor(name, tuple(t.shape), target, lambda buf, make=make: make(out=buf)))
            elif not t.is_floating_point():
                raise CheckpointError(f"{where}: {name} has unexpected dtype {t.dtype}")
            elif name.endswith("e_score_correction_bias"):
                # It selects experts by small differences: it stays as shipped (fp32).
                out.append(PlannedTensor(name, tuple(t.shape), t.dtype, lambda buf, t=t: buf.copy_(t)))
            else:
                out.append(PlannedTensor(name, tuple(t.shape), target, lambda buf, t=t: buf.copy_(t)))
        return out

    new_config = {k: v for k, v in config.items() if k != "quantization_config"}
    new_config["torch_dtype"] = str(target).removeprefix("torch.")
    if drop_mtp:
        new_config["num_nextn_predict_layers"] = 0
    return _run(src, dst, job, plan, new_config, force, workers or os.cpu_count() or 1, keep)


# ------------------------------------------------------------------------------------------ BF16 -> FP8
def bf16_to_fp8(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    block_size: int = 128,
    scale_fmt: str = "float",
    workers: int | None = None,
    force: bool = False,
) -> ConvertReport:
    if scale_fmt not in SCALE_FORMATS:
        raise CheckpointError(f"--scale-fmt: choose from {', '.join(SCALE_FORMATS)}, got {scale_fmt!r}")
    if block_size <= 0:
        raise CheckpointError(f"--block-size: must be positive, got {block_size}")
    src, dst = resolve_model_path(str(src)), Path(dst)
    config = read_config(src)
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method")
        raise CheckpointError(
            f"{src / 'config.json'}: already quantized ({method}); convert from BF16/FP16/FP32"
        )
    block = (block_size, block_size)
    job = {"job": "bf16-to-fp8", "src": str(src.resolve()), "block_size": block_size, "scale_fmt": scale_fmt}

    def plan(names: list[str], reader: CheckpointReader) -> list[PlannedTensor]:
        out = []
        for name in names:
            t = reader.get(name)
            if not t.is_floating_point() or t.dtype == FP8_DTYPE:
                raise CheckpointError(
                    f"{src / reader.weight_map[name]}: {name} has unexpected dtype {t.dtype} for a BF16 checkpoint"
                )
            if is_fp8_weight(name, t):
                # One quantization yields both tensors: the weight's thunk computes, the scale's reads the result.
                done: dict[str, torch.Tensor] = {}

                def quantize(buf: torch.Tensor, t=t, done=done) -> torch.Tensor:
                    q, done["scale"] = blockwise_quant(t, block, scale_fmt)
                    return q

                out.append(PlannedTensor(name, tuple(t.shape), FP8_DTYPE, quantize))
                out.append(
                    PlannedTensor(
                        name + SCALE_SUFFIX,
                        scale_shape(tuple(t.shape), block),
                        torch.float32,
                        lambda buf, done=done: done.pop("scale"),
                    )
                )
            else:
                out.append(PlannedTensor(name, tuple(t.shape), t.dtype, lambda buf, t=t: buf.copy_(t)))
        return out

    quant = fp8_quantization_config(block_size, scale_fmt)
    new_config = {**config, "quantization_config": quant, "torch_dtype": "bfloat16"}
    return _run(src, dst, job, plan, new_config, force, workers or os.cpu_count() or 1)
