"""FP8 <-> BF16 checkpoint conversion on CPU, shard by shard.

Every output shard has the same file name as its source shard and is written under a temporary name, fsynced and
renamed when complete. One job at a time per destination: `.dsv3-job.lock` is flock'ed for the whole job and holds
the pid. A job marker in the destination records the job, so a re-run after an interruption (kill -9, SIGTERM,
Ctrl-C) keeps the finished shards whose header and size are exactly as planned, redoes the rest, and produces
byte-identical output. The side files, remote code, config.json and index are written last; the index's metadata
records the job it completes and the marker is then removed, so re-running a finished job is a no-op success.

What happens to each tensor (every other case is a one-line error naming file and tensor):
  fp8-to-bf16  float8_e4m3fn + `<name>_scale_inv` -> dequantized to --dtype; a `.weight` in bf16/fp16/fp32 (norms,
               embeddings, the unquantized projections) -> cast to --dtype; e_score_correction_bias and every
               tensor that is not a `.weight` (buffers, int tensors) -> passed through, same dtype, same bytes.
               Errors: float8 without its scale, a scale on anything but an e4m3 weight, other float8 or integer
               `.weight`s, a finite value that overflows --dtype.
  bf16-to-fp8  the official FP8 projections (bf16/fp16/fp32) -> float8_e4m3fn + scale, refusing NaN/Inf blocks;
               everything else passed through. Errors: scales or float8 tensors (already quantized).
"""

import fcntl
import fnmatch
import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from dsv3.modeling_deepseek.configuration_deepseek import layer_index
from dsv3.modeling_deepseek.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    SCALE_FORMATS,
    blockwise_dequant,
    blockwise_quant,
    check_scale,
    fp8_quantization_config,
    is_fp8_weight,
    scale_shape,
)
from tqdm.auto import tqdm

from .checkpoint import (
    INDEX_NAME,
    REMOTE_CODE_DIR,
    REMOTE_CODE_FILES,
    SAFETENSORS_DTYPES,
    SIDE_FILES,
    SINGLE_NAME,
    BackgroundCommit,
    CheckpointError,
    CheckpointReader,
    PlannedTensor,
    atomic_write_json,
    copy_remote_code,
    copy_side_files,
    fsync_dir,
    read_config,
    resolve_model_path,
    shard_is_complete,
    with_auto_map,
    write_shard_streaming,
)
from .record import RECORD_FILE, new_record, write_record

MARKER = ".dsv3-job.json"
LOCK = ".dsv3-job.lock"
JOB_KEY = "dsv3_job"  # in the index's metadata: the id of the job whose complete output this folder is
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CASTABLE = (torch.bfloat16, torch.float16, torch.float32)  # weight dtypes a converter casts or quantizes
SCALE_SUFFIX = "_scale_inv"
# One compute thread by default. The job is memory-bound and a writer thread already overlaps the disk, so more
# threads gain little on an idle machine, and beside a busy process every parallel region waits for its slowest
# thread: with 2 threads on 2 cores, one of them busy elsewhere, the job ran 3.5x slower than with 1
# (benchmarks/fp8_convert.py measures both). --workers N asks for more.
DEFAULT_WORKERS = 1
# Files this tool writes into a destination (also while being written, as `<name>.tmp`). `--force` removes these
# and nothing else: a foreign file or any folder in the destination is refused by name, never deleted and never
# silently kept beside our output; the destination folder itself is never removed or recreated (it may be a mount
# point, a symlink, or carry a setgid bit the user set up).
OUR_FILES = frozenset(
    {INDEX_NAME, SINGLE_NAME, "config.json", MARKER, LOCK, RECORD_FILE, *SIDE_FILES, *REMOTE_CODE_FILES}
    # the GPTQ job's resume state and its memory-mapped calibration activations (convert/gptq_stream.py)
    | {".dsv3-gptq-state.json", *(f".dsv3-gptq-acts-{k}.bin" for k in "abxm")}
)
OUR_SHARDS = "model-*.safetensors"
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
    already_complete: bool = False  # the destination already held this job's complete output: nothing written

    def summary(self) -> str:
        if self.already_complete:
            return (
                f"{self.dst}: already complete ({self.shards_resumed} shards, {self.tensors} tensors, "
                f"{self.output_bytes / 1e6:.1f} MB); nothing to do"
            )
        rate = self.input_elements / self.seconds / 1e9 if self.seconds else 0.0
        mbs = self.output_bytes / self.seconds / 1e6 if self.seconds else 0.0
        return (
            f"{self.dst}: {self.shards_written} shards written, {self.shards_resumed} resumed, "
            f"{self.tensors} tensors, {self.output_bytes / 1e6:.1f} MB in {self.seconds:.1f}s "
            f"({rate:.2f} Gelem/s in, {mbs:.0f} MB/s out)"
        )


# ------------------------------------------------------------------------------------------ the destination
def _refuse_overlap(src: Path, dst: Path, reader: CheckpointReader) -> None:
    # The source is never written: the destination may not be the source, lie inside it or contain it (after
    # symlinks), nor hold a file the source reads through a link (a Hub snapshot's shards point into blobs/).
    s, d = src.resolve(), dst.resolve()
    if d == s or s in d.parents or d in s.parents:
        raise CheckpointError(
            f"{dst}: the destination must not be the source folder, inside it, or contain it ({src})"
        )
    for name in (*reader.shards, INDEX_NAME, "config.json", *SIDE_FILES):
        real = (src / name).resolve()
        if d in real.parents:
            raise CheckpointError(f"{dst}: holds the source's {name} ({real}); choose another destination")


@contextmanager
def _exclusive(dst: Path) -> Iterator[None]:
    """One writer per destination for the whole job: an flock on DST/.dsv3-job.lock, which names our pid. The
    file is removed (while still held) when the job ends; one left by a killed job is harmless (the kernel has
    released its lock)."""
    try:
        dst.mkdir(parents=True, exist_ok=True)  # an existing folder is used as it is
    except FileExistsError:
        raise CheckpointError(f"{dst}: exists and is not a folder") from None
    except OSError as err:
        raise CheckpointError(f"{dst}: cannot create the folder ({err.strerror or err})") from None
    path = dst / LOCK
    fd = _lock(path, dst)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def _lock(path: Path, dst: Path) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError as err:
            raise CheckpointError(f"{path}: cannot create the job lock ({err.strerror or err})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise CheckpointError(
                f"{dst}: another conversion (pid {holder}) is writing here; wait for it to end or stop it"
            ) from None
        # The previous holder removes the file before it lets go: a lock on a file no longer at `path` guards
        # nothing, so open the current one and lock again.
        try:
            here = os.stat(path)
        except FileNotFoundError:
            here = None
        there = os.fstat(fd)
        if here is not None and (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino):
            return fd
        os.close(fd)


def _lock_holder(fd: int) -> str:
    for _ in range(50):  # the holder writes its pid right after locking: wait for it, briefly
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.01)
    return "unknown"


class Terminated(KeyboardInterrupt):
    """SIGTERM during a job unwinds like Ctrl-C: temporary files are removed, the marker stays for resume."""


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be installed from (and only run in) the main thread
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        raise Terminated(f"terminated by signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _job_id(src: Path, reader: CheckpointReader, job: dict) -> str:
    """A job is its parameters and its source files (config and index bytes; each shard's name, size and mtime),
    not their paths: the same source converted the same way has the same id wherever it lives, an edited or
    different source (another fine-tune with identical shapes) has another."""
    digest = hashlib.sha256(json.dumps(job, sort_keys=True).encode())
    for name in (INDEX_NAME, "config.json"):
        if (src / name).is_file():
            digest.update(name.encode() + b"\0" + (src / name).read_bytes())
    for shard in reader.shards:
        if not (src / shard).is_file():
            raise CheckpointError(f"{src / shard}: listed in the index but missing")
        st = (src / shard).stat()
        digest.update(f"{shard}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return digest.hexdigest()[:32]


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _written_by_us(path: Path, shards: set[str]) -> bool:
    name = path.name.removesuffix(".tmp")
    return not path.is_dir() and (
        name in OUR_FILES or name in shards or fnmatch.fnmatchcase(name, OUR_SHARDS)
    )


def _prepare_destination(dst: Path, marker: dict, shards: set[str], force: bool) -> None:
    """Starts a fresh job, or resumes the same job found there. A non-empty destination needs --force, which
    removes our files only (OUR_FILES) and refuses, naming it, the first file that is not ours."""
    # A lock file, or our marker's temporary file alone (killed before it started), still counts as empty.
    entries = sorted(p for p in dst.iterdir() if p.name not in (LOCK, MARKER + ".tmp"))
    if entries and _read_json(dst / MARKER).get("id") == marker["id"]:
        for p in entries:  # resuming our own job: half-written files never count as output
            if p.name.endswith(".tmp") and _written_by_us(p, shards):
                p.unlink()
        return
    if entries and not force:
        raise CheckpointError(f"{dst}: exists and is not empty (use --force to overwrite)")
    foreign = next((p for p in entries if not _written_by_us(p, shards)), None)
    if foreign is not None:
        raise CheckpointError(
            f"{dst}: --force removes only files this tool writes, and {foreign.name} is not one "
            f"(move it away or choose another destination)"
        )
    for p in [*entries, dst / (MARKER + ".tmp")]:
        p.unlink(missing_ok=True)
    atomic_write_json(dst / MARKER, marker)


# ------------------------------------------------------------------------------------------ the job
def _plans(
    reader: CheckpointReader, plan: ShardPlan, keep: Callable[[str], bool]
) -> Iterator[tuple[str, list[str], list[PlannedTensor]]]:
    for shard in reader.shards:
        names = [n for n in reader.names_in(shard) if keep(n)]
        yield shard, names, plan(names, reader) if names else []
        reader.close()  # unmap the shard: resident memory stays at about one shard


def _is_complete(
    src: Path, dst: Path, reader: CheckpointReader, plan: ShardPlan, keep, job_id: str, config: dict
):
    """Whether DST already holds this job's finished output: no marker, an index naming this job and listing
    exactly the planned tensors, the same config.json, side files and remote code, and every shard's header and
    size as planned (headers only: no tensor data is read)."""
    index = _read_json(dst / INDEX_NAME)
    metadata = index.get("metadata")
    if (dst / MARKER).exists() or not isinstance(metadata, dict) or metadata.get(JOB_KEY) != job_id:
        return False
    if _read_json(dst / "config.json") != config:
        return False
    expected: dict[str, str] = {}
    for shard, _, planned in _plans(reader, plan, keep):
        if planned and not shard_is_complete(dst / shard, planned):
            return False
        expected.update(dict.fromkeys((t.name for t in planned), shard))
    copies = [(src / n, dst / n) for n in SIDE_FILES if (src / n).is_file()]
    copies += [(REMOTE_CODE_DIR / n, dst / n) for n in REMOTE_CODE_FILES]
    return index.get("weight_map") == expected and all(
        b.is_file() and a.read_bytes() == b.read_bytes() for a, b in copies
    )


def _complete_report(dst: Path) -> ConvertReport:
    index = _read_json(dst / INDEX_NAME)
    return ConvertReport(
        dst=dst,
        shards_resumed=len(set(index["weight_map"].values())),
        tensors=len(index["weight_map"]),
        output_bytes=index["metadata"]["total_size"],
        already_complete=True,
    )


def _convert_shards(
    src: Path, dst: Path, reader: CheckpointReader, plan: ShardPlan, keep, workers: int
) -> tuple[ConvertReport, dict[str, str]]:
    report = ConvertReport(dst=dst)
    weight_map: dict[str, str] = {}
    total_in = sum((src / s).stat().st_size for s in reader.shards)
    disable = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").lower() in ("1", "true", "yes")
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, workers))  # compute threads; a writer thread overlaps the disk
    commit = BackgroundCommit()  # shard k is fsynced and renamed while shard k+1 computes
    try:
        with tqdm(total=total_in, unit="B", unit_scale=True, desc="converting", disable=disable) as bar:
            for shard, names, planned in _plans(reader, plan, keep):
                # A final name alone proves nothing (a crash can persist the rename before the data): only a
                # shard whose header and size are exactly as planned counts as done.
                if planned and shard_is_complete(dst / shard, planned):
                    report.shards_resumed += 1
                elif planned:
                    report.input_elements += sum(reader.get(n).numel() for n in names)
                    write_shard_streaming(dst / shard, planned, commit)
                    report.shards_written += 1
                weight_map.update(dict.fromkeys((t.name for t in planned), shard))
                report.output_bytes += sum(t.nbytes for t in planned)
                bar.update((src / shard).stat().st_size)
        commit.wait()
    finally:
        commit.close()
        torch.set_num_threads(threads)
    report.tensors = len(weight_map)
    return report, weight_map


def _finish(
    src: Path, dst: Path, report: ConvertReport, weight_map: dict, config: dict, job_id: str, job: dict
) -> None:
    copy_side_files(src, dst)
    params = {k: v for k, v in job.items() if k not in ("job", "src")}
    results = {"tensors": report.tensors, "output_bytes": report.output_bytes}
    write_record(dst, new_record(src, job["job"], params, results))
    copy_remote_code(dst)
    atomic_write_json(dst / "config.json", config)
    atomic_write_json(
        dst / INDEX_NAME,
        {
            "metadata": {"total_size": report.output_bytes, JOB_KEY: job_id},
            "weight_map": dict(sorted(weight_map.items())),
        },
    )
    (dst / MARKER).unlink(missing_ok=True)
    fsync_dir(dst)


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
    _refuse_overlap(src, dst, reader)
    job_id = _job_id(src, reader, job)
    config = with_auto_map(new_config)
    with _exclusive(dst), _sigterm_unwinds():
        if not force and _is_complete(src, dst, reader, plan, keep, job_id, config):
            report = _complete_report(dst)
        else:
            marker = {"id": job_id, **job, "src": str(src.resolve())}
            _prepare_destination(dst, marker, set(reader.shards), force)
            report, weight_map = _convert_shards(src, dst, reader, plan, keep, workers)
            _finish(src, dst, report, weight_map, config, job_id, job)
    report.seconds = time.perf_counter() - t0
    return report


# ------------------------------------------------------------------------------------------ tensors
def _where(reader: CheckpointReader, name: str) -> Path:
    return reader.folder / reader.weight_map[name]


def _passthrough(where: Path, name: str, t: torch.Tensor) -> PlannedTensor:
    if t.dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{where}: {name} has dtype {t.dtype}, which this writer cannot store")
    return PlannedTensor(name, tuple(t.shape), t.dtype, lambda buf: buf.copy_(t))  # same dtype: same bytes


def _no_overflow(
    where: Path, name: str, out: torch.Tensor, source: torch.Tensor | None = None
) -> torch.Tensor:
    # An inf in the output where the source is finite (an FP8 source has no inf at all) did not fit the dtype.
    if torch.isinf(out).any():
        bad = torch.isinf(out) if source is None else torch.isinf(out) & ~torch.isinf(source)
        if bad.any():
            at = bad.nonzero()[0].tolist()
            raise CheckpointError(
                f"{where}: {name} overflows {str(out.dtype).removeprefix('torch.')} at {at} "
                f"(a finite value becomes inf); choose a wider --dtype"
            )
    return out


def _cast(where: Path, name: str, t: torch.Tensor, target: torch.dtype) -> PlannedTensor:
    if torch.finfo(target).max >= torch.finfo(t.dtype).max:  # the range fits: no scan needed
        return PlannedTensor(name, tuple(t.shape), target, lambda buf: buf.copy_(t))
    return PlannedTensor(name, tuple(t.shape), target, lambda buf: _no_overflow(where, name, buf.copy_(t), t))


def _dequant(where: Path, name: str, q: torch.Tensor, scale: torch.Tensor, target, block) -> PlannedTensor:
    try:
        check_scale(name, q, scale, block)
    except ValueError as err:
        raise CheckpointError(f"{where}: {err}") from None
    make = partial(blockwise_dequant, q, scale, target, block)  # make(out=buf) fills the ring buffer
    # |q| <= 448 and the scales are finite, so only a scale above finfo(target).max / 448 can overflow: the output
    # is scanned for inf only then (the fast path stays one pass).
    largest = FP8_MAX * float(scale.abs().max()) if scale.numel() else 0.0
    if largest <= torch.finfo(target).max:
        return PlannedTensor(name, tuple(q.shape), target, lambda buf: make(out=buf))
    return PlannedTensor(name, tuple(q.shape), target, lambda buf: _no_overflow(where, name, make(out=buf)))


def _plan_fp8_to_float(
    name: str, reader: CheckpointReader, target: torch.dtype, block
) -> PlannedTensor | None:
    where, t = _where(reader, name), reader.get(name)  # a lazy view of the mapped shard: nothing is read yet
    if name.endswith(SCALE_SUFFIX):
        weight = name.removesuffix(SCALE_SUFFIX)
        if weight not in reader:
            raise CheckpointError(f"{where}: {name} has no weight to scale")
        if reader.get(weight).dtype != FP8_DTYPE:
            raise _scale_on_non_fp8(reader, weight)
        return None  # consumed by its weight
    scale_name = name + SCALE_SUFFIX
    if scale_name in reader:
        if t.dtype != FP8_DTYPE:
            raise _scale_on_non_fp8(reader, name)
        return _dequant(
            where, name, t, reader.get(scale_name), target, block
        )  # the scale may be in another shard
    if t.dtype == FP8_DTYPE:
        raise CheckpointError(f"{where}: {name} is FP8 but the checkpoint has no {scale_name}")
    if not name.endswith(".weight"):
        return _passthrough(
            where, name, t
        )  # e_score_correction_bias (selects experts: stays as shipped), buffers
    if t.dtype not in CASTABLE:
        raise CheckpointError(f"{where}: {name} has unexpected dtype {t.dtype}")
    return _cast(where, name, t, target)


def _scale_on_non_fp8(reader: CheckpointReader, weight: str) -> CheckpointError:
    dtype = reader.get(weight).dtype
    return CheckpointError(
        f"{_where(reader, weight)}: {weight} is {dtype} but has a {weight + SCALE_SUFFIX}; "
        f"only float8_e4m3fn weights carry scales"
    )


def _first_bad_block(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> tuple[int, int] | None:
    # A NaN or Inf in a block leaves a NaN code in it (NaN / scale, or inf / inf) and an Inf makes its scale inf.
    # e4m3fn's NaNs are 0x7F and 0xFF, the int8 and the uint8 maximum: two cheap reductions say whether to look.
    nan_codes = q.numel() > 0 and (q.view(torch.int8).max() == 127 or q.view(torch.uint8).max() == 255)
    if not nan_codes and torch.isfinite(scale).all():
        return None
    found = [tuple(x) for x in (~torch.isfinite(scale)).nonzero().tolist()]
    found += [
        (r // block[0], c // block[1])
        for r, c in ((q.view(torch.uint8) & 0x7F) == 0x7F).nonzero()[:1].tolist()
    ]
    return min(found)


def _quantize(where: Path, name: str, t: torch.Tensor, block, scale_fmt: str) -> list[PlannedTensor]:
    done: dict[
        str, torch.Tensor
    ] = {}  # one quantization yields both tensors: the scale's thunk reads the result

    def quantize(buf: torch.Tensor) -> torch.Tensor:
        q, done["scale"] = blockwise_quant(t, block, scale_fmt)
        bad = _first_bad_block(q, done["scale"], block)
        if bad is not None:
            raise CheckpointError(
                f"{where}: {name} has NaN or Inf in block (row {bad[0]}, col {bad[1]}) of "
                f"{block[0]}x{block[1]}; cannot quantize it"
            )
        return q

    scale = PlannedTensor(
        name + SCALE_SUFFIX, scale_shape(tuple(t.shape), block), torch.float32, lambda buf: done.pop("scale")
    )
    return [PlannedTensor(name, tuple(t.shape), FP8_DTYPE, quantize), scale]


def _plan_float_to_fp8(name: str, reader: CheckpointReader, block, scale_fmt: str) -> list[PlannedTensor]:
    where, t = _where(reader, name), reader.get(name)
    float8 = t.dtype.is_floating_point and t.element_size() == 1
    if name.endswith(SCALE_SUFFIX) or name + SCALE_SUFFIX in reader or float8:
        raise CheckpointError(
            f"{where}: {name} ({t.dtype}) is already quantized; convert from a BF16/FP16/FP32 checkpoint"
        )
    if name.endswith(".weight") and t.dtype not in CASTABLE:
        raise CheckpointError(f"{where}: {name} has unexpected dtype {t.dtype} for a BF16 checkpoint")
    if is_fp8_weight(name, t):
        return _quantize(where, name, t, block, scale_fmt)
    return [_passthrough(where, name, t)]  # norms, embeddings, router, e_score_correction_bias, buffers


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
    job = {"job": "fp8-to-bf16", "dtype": dtype, "drop_mtp": drop_mtp}

    def keep(name: str) -> bool:
        layer = layer_index(name)
        return not (drop_mtp and layer is not None and layer >= n_layers)

    def plan(names: list[str], reader: CheckpointReader) -> list[PlannedTensor]:
        planned = (_plan_fp8_to_float(name, reader, target, block) for name in names)
        return [p for p in planned if p is not None]

    new_config = {k: v for k, v in config.items() if k != "quantization_config"}
    new_config["torch_dtype"] = str(target).removeprefix("torch.")
    if drop_mtp:
        new_config["num_nextn_predict_layers"] = 0
    return _run(src, dst, job, plan, new_config, force, workers or DEFAULT_WORKERS, keep)


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
    job = {"job": "bf16-to-fp8", "block_size": block_size, "scale_fmt": scale_fmt}

    def plan(names: list[str], reader: CheckpointReader) -> list[PlannedTensor]:
        return [p for name in names for p in _plan_float_to_fp8(name, reader, block, scale_fmt)]

    quant = fp8_quantization_config(block_size, scale_fmt)
    new_config = {**config, "quantization_config": quant, "torch_dtype": "bfloat16"}
    return _run(src, dst, job, plan, new_config, force, workers or DEFAULT_WORKERS)
