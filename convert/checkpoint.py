"""Checkpoint folders: read tensors through the index, write shards atomically, copy the side files."""

import errno
import json
import math
import os
import queue
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import modeling_deepseek
from modeling_deepseek.configuration_deepseek import AUTO_MAP

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


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (is this a checkpoint folder?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: invalid JSON ({err})") from None


class CheckpointReader:
    """Tensors of a safetensors checkpoint by name, through the index's weight map (so a scale that lives in
    another shard is found), opening each shard lazily."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self._handles: dict = {}
        index = self.folder / INDEX_NAME
        if index.is_file():
            try:
                self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from None
        elif (self.folder / SINGLE_NAME).is_file():
            self.weight_map = {name: SINGLE_NAME for name in self._open(SINGLE_NAME).keys()}
        else:
            raise CheckpointError(f"{self.folder}: no {INDEX_NAME} or {SINGLE_NAME}")

    @property
    def shards(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def names_in(self, shard: str) -> list[str]:
        return [name for name, file in self.weight_map.items() if file == shard]

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
        index = {"metadata": {"total_size": self._total}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_json(self.folder / INDEX_NAME, index)
        return index


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


RING_MAX_BYTES = 512 * 2**20  # larger tensors (embeddings, lm_head) get a buffer of their own
SAFETENSORS_DTYPES = {
    torch.float8_e4m3fn: "F8_E4M3",
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
}


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


_ITEMSIZE = {name: torch.empty(0, dtype=dtype).element_size() for dtype, name in SAFETENSORS_DTYPES.items()}


def shard_tensor_bytes(path: Path) -> dict[str, int]:
    """name -> bytes of every tensor in a finished shard, from its header alone."""
    with safe_open(path, framework="pt") as f:
        return {
            k: math.prod(f.get_slice(k).get_shape()) * _ITEMSIZE[f.get_slice(k).get_dtype()] for k in f.keys()
        }


def write_shard_streaming(path: Path, planned: list[PlannedTensor]) -> dict[str, int]:
    """Write a safetensors file without holding it in memory: the header first (every shape is planned), then
    each tensor's bytes as soon as it is computed, by a writer thread while the next tensor computes. Written
    under a temporary name and renamed when complete. Returns name -> bytes."""
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
    tmp = path.with_name(path.name + ".tmp")
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

    def writer(f) -> None:
        while (chunk := pending.get()) is not None:
            if not failure:
                try:
                    f.write(chunk)
                except BaseException as err:  # reported by the main thread
                    failure.append(err)

    try:
        with open(tmp, "wb") as f:
            f.write(len(head).to_bytes(8, "little") + head)
            thread = threading.Thread(target=writer, args=(f,), daemon=True)
            thread.start()
            try:
                for i, t in enumerate(planned):
                    data = t.make(buffer(i, t))
                    if tuple(data.shape) != tuple(t.shape) or data.dtype != t.dtype:
                        raise CheckpointError(
                            f"{path}: {t.name} came out {data.dtype} {list(data.shape)}, "
                            f"planned {t.dtype} {list(t.shape)}"
                        )
                    pending.put(memoryview(data.contiguous().view(torch.uint8).flatten().numpy()))
                    if failure:
                        break
            finally:
                pending.put(None)
                thread.join()
            if failure:
                raise failure[0]
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            raise CheckpointError(f"{path}: no space left on the device") from None
        raise CheckpointError(f"{path}: cannot write ({err.strerror or err})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {t.name: t.nbytes for t in planned}


def copy_side_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in SIDE_FILES:
        if (src / name).is_file():
            tmp = dst / (name + ".tmp")
            shutil.copyfile(src / name, tmp)
            os.replace(tmp, dst / name)
            copied.append(name)
    return copied


def copy_remote_code(dst: Path) -> None:
    for name in REMOTE_CODE_FILES:
        tmp = dst / (name + ".tmp")
        shutil.copyfile(REMOTE_CODE_DIR / name, tmp)
        os.replace(tmp, dst / name)


def with_auto_map(config: dict) -> dict:
    return {**config, "auto_map": dict(AUTO_MAP)}


def install_remote_code(folder: str | os.PathLike) -> list[str]:
    """Put our remote-code files and auto_map into an existing checkpoint folder (e.g. an official download
    whose own modeling files break on transformers 5). Originals are kept once as *.orig. Returns what changed."""
    folder = Path(folder)
    config = read_config(folder)
    changed = []
    for name in (*REMOTE_CODE_FILES, "config.json"):
        path, backup = folder / name, folder / (name + ".orig")
        if path.is_file() and not backup.exists():
            shutil.copy2(path, backup)
            changed.append(f"backed up {name} -> {backup.name}")
    copy_remote_code(folder)
    atomic_write_json(folder / "config.json", with_auto_map(config))
    changed.append("wrote " + ", ".join(REMOTE_CODE_FILES) + " and config.json auto_map")
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
