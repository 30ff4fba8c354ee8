"""Checkpoint folders: read tensors through the index, write shards atomically, copy the side files.

Every file is written as `<name>.tmp`, fsynced, renamed over `<name>`, and the folder fsynced after the rename: a
crash leaves either the old file, the complete new one, or a `.tmp` that the next run removes, never a short file
under a final name. Files get the user's umask (0o666 & ~umask), whatever the library underneath does.
"""

import errno
import json
import math
import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from dsv3.modeling_deepseek.configuration_deepseek import AUTO_MAP
from safetensors import safe_open
from safetensors.torch import save_file

from dsv3 import modeling_deepseek

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
REMOTE_CODE_DIR = Path(modeling_deepseek.__file__).parent
# Every flat sibling in modeling_deepseek/ is remote code (the model imports fp8.py by relative import).
REMOTE_CODE_FILES = tuple(sorted(p.name for p in REMOTE_CODE_DIR.glob("*.py") if p.name != "__init__.py"))
# Files that travel with a checkpoint unchanged (config.json is rewritten by whoever changes the weights).
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
)


class CheckpointError(ValueError):
    """A checkpoint problem, worded as one line that names the file and tensor."""


def _reason(err: OSError) -> str:
    return "no space left on the device" if err.errno == errno.ENOSPC else (err.strerror or str(err))


def fsync_dir(folder: Path) -> None:
    # Makes the renames inside `folder` durable. Some filesystems cannot fsync a directory (EINVAL): nothing to do.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def current_umask() -> int:
    try:  # Linux >= 4.7 reports it without changing it (os.umask would, for a moment, for every thread)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def create_new(tmp: Path):
    """Open `tmp` for writing, truncated, mode 0o666 & ~umask. O_NOFOLLOW: a symlink planted under one of our
    temporary names cannot redirect the write outside the folder."""
    return os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o666), "wb")


@contextmanager
def _replaced_atomically(path: Path) -> Iterator[Path]:
    """Yields `path`.tmp to write; then commit_file (fsync, rename over `path`, fsync the folder). If writing
    fails the temporary file is removed: an OSError becomes one line naming `path`; KeyboardInterrupt / SIGTERM
    propagate, and no half-written file stays behind."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"{path}: cannot write ({_reason(err)})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    commit_file(tmp, path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with _replaced_atomically(path) as tmp, create_new(tmp) as f:
        f.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def copy_file_atomic(source: Path, target: Path) -> None:
    try:
        data = source.read_bytes()  # side files and remote code are small (tokenizer.json: a few MB)
    except OSError as err:
        raise CheckpointError(f"{source}: cannot read ({_reason(err)})") from None
    atomic_write_bytes(target, data)


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (is this a checkpoint folder?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: invalid JSON ({err})") from None


def _check_weight_map(index: Path, weight_map) -> dict[str, str]:
    # Shard names come from a file we did not write: each must be a plain *.safetensors name in this folder (no
    # separator, no "..", not absolute), or a converter would read from, and write to, paths outside its folders.
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: weight_map is not an object")
    for name, file in weight_map.items():
        plain = (
            isinstance(file, str) and file == os.path.basename(file) and "\\" not in file and "\0" not in file
        )
        if not (plain and file.endswith(".safetensors") and file not in (".", "..")):
            raise CheckpointError(
                f"{index}: weight_map entry {name} -> {file!r} is not a .safetensors file name in this folder"
            )
    return weight_map


class CheckpointReader:
    """Tensors of a safetensors checkpoint by name, through the index's weight map (so a scale that lives in
    another shard is found), opening each shard lazily."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self._handles: dict = {}
        index = self.folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from None
            self.weight_map: dict[str, str] = _check_weight_map(index, weight_map)
        elif (self.folder / SINGLE_NAME).is_file():
            self.weight_map = {name: SINGLE_NAME for name in self._open(SINGLE_NAME).keys()}
        else:
            raise CheckpointError(f"{self.folder}: no {INDEX_NAME} or {SINGLE_NAME}")
        self._by_shard: dict[str, list[str]] = {}
        for name, shard in self.weight_map.items():
            self._by_shard.setdefault(shard, []).append(name)

    @property
    def shards(self) -> list[str]:
        return sorted(self._by_shard)

    def names_in(self, shard: str) -> list[str]:
        """The index's names for this shard; a tensor the shard holds but the index does not list is an error
        (a converter would otherwise drop it silently)."""
        names = self._by_shard.get(shard, [])
        extra = sorted(set(self._open(shard).keys()) - set(names))
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise CheckpointError(
                f"{self.folder / shard}: holds {extra[0]}{more}, which {INDEX_NAME} does not list"
            )
        return list(names)

    def _open(self, shard: str):
        if shard not in self._handles:
            path = self.folder / shard
            if not path.is_file():
                raise CheckpointError(f"{path}: listed in the index but missing")
            try:
                handle = safe_open(path, framework="pt")
            except Exception as err:  # safetensors raises its own error types for truncated/corrupt headers
                raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from None
            self._handles[shard] = handle
        return self._handles[shard]

    def close(self) -> None:
        # Tensors are views of the shards' memory maps: dropping the handles (and the tensors) unmaps them, so a
        # streaming job's resident memory stays at about one shard.
        self._handles.clear()

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.folder / INDEX_NAME}: no tensor {name}")
        shard = self.weight_map[name]
        handle = self._open(shard)
        if name not in handle.keys():
            raise CheckpointError(f"{self.folder / shard}: index lists {name} but the shard does not hold it")
        try:
            return handle.get_tensor(name)
        except Exception as err:
            raise CheckpointError(f"{self.folder / shard}: cannot read {name} ({err})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.weight_map)


class ShardWriter:
    """Writes tensors into numbered shards of at most `max_shard_bytes`, flushing each shard as soon as it is
    full (memory stays at one shard), then the index. Shards are written under temporary names and renamed to
    model-XXXXX-of-NNNNN.safetensors once their count is known."""

    def __init__(self, folder: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._flushed: list[tuple[Path, list[str]]] = []
        self._total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self._total += size

    def _flush(self) -> None:
        path = self.folder / f"shard-{len(self._flushed) + 1:05d}.partial"
        write_shard(path, self._pending)
        self._flushed.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> dict:
        if self._pending:
            self._flush()
        n = len(self._flushed)
        weight_map = {}
        for i, (path, names) in enumerate(self._flushed, start=1):
            shard = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.folder / shard)
            weight_map.update(dict.fromkeys(names, shard))
        fsync_dir(self.folder)
        index = {"metadata": {"total_size": self._total}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_json(self.folder / INDEX_NAME, index)
        return index


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with _replaced_atomically(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        # safetensors creates its files 0600; ours follow the umask like every other file we write.
        os.chmod(tmp, 0o666 & ~current_umask())


RING_MAX_BYTES = 512 * 2**20  # larger tensors (embeddings, lm_head) get a buffer of their own
# Every dtype safetensors can name: a tensor a converter passes through keeps its own.
SAFETENSORS_DTYPES = {
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
    torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.bool: "BOOL",
    torch.complex64: "C64",
}
for _bits in (16, 32, 64):  # torch >= 2.3
    if hasattr(torch, f"uint{_bits}"):
        SAFETENSORS_DTYPES[getattr(torch, f"uint{_bits}")] = f"U{_bits}"


@dataclass
class PlannedTensor:
    """An output tensor whose name, shape and dtype are known before its data is computed. `make(out)` computes
    it, into `out` (a reusable buffer of the planned shape and dtype) when it can, or returns a tensor of its own."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[torch.Tensor], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty(0, dtype=self.dtype).element_size()


def shard_header(planned: list[PlannedTensor]) -> bytes:
    """The exact bytes a streamed shard starts with: 8-byte little-endian header length, then the JSON header."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in planned:
        header[t.name] = {
            "dtype": SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format allows trailing spaces; keeps the data 8-byte aligned
    return len(head).to_bytes(8, "little") + head


def shard_is_complete(path: Path, planned: list[PlannedTensor]) -> bool:
    """Whether `path` is the shard `planned` describes, written to the end: its header bytes are exactly the
    planned ones (same names, dtypes, shapes, offsets) and its size is header + every tensor's bytes. A file with
    a final name but short (a crash between rename and writeback) or from another job fails this and is redone."""
    head = shard_header(planned)
    try:
        if path.stat().st_size != len(head) + sum(t.nbytes for t in planned):
            return False
        with open(path, "rb") as f:
            return f.read(len(head)) == head
    except OSError:
        return False


def write_shard_streaming(
    path: Path, planned: list[PlannedTensor], commit: Callable[[Path, Path], None] | None = None
) -> dict[str, int]:
    """Write a safetensors file without holding it in memory: the header first (every shape is planned), then
    each tensor's bytes as soon as it is computed, by a writer thread while the next tensor computes. Written
    under a temporary name, then `commit(tmp, path)` (default: commit_file, here and now; a BackgroundCommit
    does it while the caller computes the next shard). Returns name -> bytes."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with create_new(tmp) as f:
            f.write(shard_header(planned))
            _stream_tensors(f, path, planned)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"{path}: cannot write ({_reason(err)})") from None
    except BaseException:  # a bad tensor, KeyboardInterrupt, SIGTERM: no half-written file stays behind
        tmp.unlink(missing_ok=True)
        raise
    (commit or commit_file)(tmp, path)
    return {t.name: t.nbytes for t in planned}


def commit_file(tmp: Path, path: Path) -> None:
    """fsync `tmp`, rename it to `path`, fsync the folder: a final name only ever points at data on disk."""
    try:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"{path}: cannot write ({_reason(err)})") from None


class BackgroundCommit:
    """Commits written shards (commit_file) in a background thread so the next shard computes while the disk
    catches up with the last one. At most one commit is pending (a new one first waits for it), so the overlap
    is one shard and a failure surfaces by the next shard. `close()` waits for the pending commit, on success and
    on error alike: an interrupted job leaves final shards and no temporary file from this side."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="commit")
        self._pending: Future | None = None

    def __call__(self, tmp: Path, path: Path) -> None:
        self.wait()
        self._pending = self._pool.submit(commit_file, tmp, path)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()  # re-raises the commit's CheckpointError here, in the caller's thread

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def _stream_tensors(f, path: Path, planned: list[PlannedTensor]) -> None:
    pending: queue.Queue = queue.Queue(maxsize=2)  # at most two computed tensors wait for the disk
    failure: list[BaseException] = []
    # Output buffers are reused round-robin: fresh allocations would pay a page fault per 4 KiB on first touch.
    # Four slots: two queued, one being written, one being computed.
    ring: list[torch.Tensor | None] = [None] * 4

    def buffer(i: int, t: PlannedTensor) -> torch.Tensor:
        if t.nbytes > RING_MAX_BYTES:
            return torch.empty(t.shape, dtype=t.dtype)
        slot = ring[i % len(ring)]
        if slot is None or slot.numel() < t.nbytes:
            slot = ring[i % len(ring)] = torch.empty(t.nbytes, dtype=torch.uint8)
        return slot[: t.nbytes].view(t.dtype).view(t.shape)

    def writer() -> None:
        while (chunk := pending.get()) is not None:
            if not failure:
                try:
                    f.write(chunk)
                except BaseException as err:  # reported by the main thread
                    failure.append(err)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        for i, t in enumerate(planned):
            data = t.make(buffer(i, t))
            if tuple(data.shape) != tuple(t.shape) or data.dtype != t.dtype:
                raise CheckpointError(
                    f"{path}: {t.name} came out {data.dtype} {list(data.shape)}, planned {t.dtype} {list(t.shape)}"
                )
            pending.put(memoryview(data.contiguous().view(torch.uint8).flatten().numpy()))
            if failure:
                break
    finally:
        pending.put(None)
        thread.join()
    if failure:
        raise failure[0]


def copy_side_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in SIDE_FILES:
        if (src / name).is_file():
            copy_file_atomic(src / name, dst / name)
            copied.append(name)
    return copied


def copy_remote_code(dst: Path) -> None:
    for name in REMOTE_CODE_FILES:
        copy_file_atomic(REMOTE_CODE_DIR / name, dst / name)


def with_auto_map(config: dict) -> dict:
    return {**config, "auto_map": dict(AUTO_MAP)}


def _already_ours(path: Path) -> bool:
    # A file that already is what we would write: our remote code byte for byte, or a config.json that already
    # carries our auto_map. Backing it up would keep our own file as the "original".
    if path.name == "config.json":
        return read_config(path.parent) == with_auto_map(read_config(path.parent))
    return path.read_bytes() == (REMOTE_CODE_DIR / path.name).read_bytes()


def install_remote_code(folder: str | os.PathLike) -> list[str]:
    """Put our remote-code files and auto_map into an existing checkpoint folder (e.g. an official download
    whose own modeling files break on transformers 5). Originals are kept once as *.orig (never our own files,
    so running this twice keeps the real originals). Returns what changed."""
    folder = Path(folder)
    config = read_config(folder)
    changed = []
    for name in (*REMOTE_CODE_FILES, "config.json"):
        path, backup = folder / name, folder / (name + ".orig")
        if path.is_file() and not backup.exists() and not _already_ours(path):
            copy_file_atomic(path, backup)
            changed.append(f"backed up {name} -> {backup.name}")
    copy_remote_code(folder)
    changed.append("wrote " + ", ".join(REMOTE_CODE_FILES))
    if config != with_auto_map(config):  # an official config already carries the same auto_map: left as is
        atomic_write_json(folder / "config.json", with_auto_map(config))
        changed.append("wrote the config.json auto_map")
    return changed


def resolve_model_path(model: str) -> Path:
    """A local folder as is; otherwise a Hub repo id resolved through huggingface_hub (offline-aware)."""
    path = Path(model)
    if path.is_dir():
        return path
    if path.exists() or model.startswith((".", "/")) or model.count("/") != 1:
        raise ValueError(f"{model}: not a checkpoint folder (and not a Hub repo id)")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model))
