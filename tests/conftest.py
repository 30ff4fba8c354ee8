import contextlib
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """Built-in tiny checkpoints in the official layout, one per preset, built once per session."""
    from dsv3.convert.tiny import build_tiny

    cache: dict[str, Path] = {}

    def get(preset: str = "v3") -> Path:
        if preset not in cache:
            cache[preset] = build_tiny(tmp_path_factory.mktemp(f"tiny-{preset}"), preset)
        return cache[preset]

    return get


def run_python(code: str, *args: str) -> str:
    """Run code in a fresh interpreter (fresh module cache), return stdout; fail with stderr's tail."""
    import subprocess

    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@contextlib.contextmanager
def mounted_tmpfs(folder: Path, size: str, why: str):
    """A tmpfs mounted at `folder` (created) for the block, unmounted after; skips with `why` when mounting is
    not allowed here (it needs root)."""
    import subprocess

    folder.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
    ).returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root) to {why}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def folder_digest(folder: Path, exclude=()) -> dict[str, str]:
    """sha256 of every file in `folder` (not `exclude`); the metadata record is hashed without its timestamps,
    so two runs of the same job compare equal."""
    import hashlib
    import json

    from dsv3.convert.record import RECORD_FILE

    def data(p: Path) -> bytes:
        if p.name != RECORD_FILE:
            return p.read_bytes()
        record = json.loads(p.read_text())
        record["operation"].pop("started")
        record["operation"].pop("finished")
        return json.dumps(record, sort_keys=True).encode()

    return {
        p.name: hashlib.sha256(data(p)).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name not in exclude
    }
