"""The converters' safety rules: the source is never touched, --force removes only our own files, one writer per
destination, resumable and durable output, finished jobs succeed, unknown tensors error or pass through exactly,
paths from files stay inside their folders, files follow the umask."""

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from dsv3.convert.checkpoint import (
    INDEX_NAME,
    REMOTE_CODE_FILES,
    CheckpointError,
    CheckpointReader,
    ShardWriter,
    copy_remote_code,
    copy_side_files,
    install_remote_code,
    with_auto_map,
)
from dsv3.convert.fp8 import bf16_to_fp8, fp8_to_bf16
from dsv3.modeling_deepseek.configuration_deepseek import AUTO_MAP
from dsv3.modeling_deepseek.fp8 import FP8_DTYPE, blockwise_quant, fp8_quantization_config
from safetensors.torch import save_file

from tests.conftest import folder_digest, mounted_tmpfs, run_python

LOCK, MARKER = ".dsv3-job.lock", ".dsv3-job.json"  # in the destination while a job runs
ENV = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
CONVERT = "import sys; from convert.fp8 import fp8_to_bf16; fp8_to_bf16(sys.argv[1], sys.argv[2])"
# The same job with every dequantization slowed down (argv[3] seconds each), so a test can act mid-job.
SLOW_CONVERT = (
    "import sys, time\n"
    "import dsv3.convert.fp8 as f\n"
    "real = f.blockwise_dequant\n"
    "def slow(*a, **k):\n"
    "    time.sleep(float(sys.argv[3]))\n"
    "    return real(*a, **k)\n"
    "f.blockwise_dequant = slow\n"
    "f.fp8_to_bf16(sys.argv[1], sys.argv[2])\n"
)


@pytest.fixture(scope="module")
def fp8_src(tmp_path_factory):
    from dsv3.convert.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("safety-fp8"), "v3", fp8=True)


@pytest.fixture(scope="module")
def clean_digest(fp8_src, tmp_path_factory):
    out = tmp_path_factory.mktemp("safety-clean") / "bf16"
    fp8_to_bf16(fp8_src, out)
    return _digest(out)


def _digest(folder: Path) -> dict[str, str]:
    # Remote code is copied from the working tree (which may change while tests run); everything else counts.
    return folder_digest(folder, exclude=REMOTE_CODE_FILES)


def _wait_for(condition, timeout: float = 60.0) -> None:
    end = time.time() + timeout
    while not condition():
        assert time.time() < end, "timed out"
        time.sleep(0.01)


def _handmade(
    folder: Path, tensors: dict[str, torch.Tensor], quantized: bool = True, index: dict | None = None
):
    """A one-shard checkpoint with exactly these tensors (index = the weight map to write, default: all)."""
    folder.mkdir(parents=True)
    shard = "model-00001-of-00001.safetensors"
    save_file(tensors, folder / shard, metadata={"format": "pt"})
    weight_map = index if index is not None else dict.fromkeys(tensors, shard)
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"model_type": "deepseek_v3", "num_hidden_layers": 1}
    if quantized:
        config["quantization_config"] = fp8_quantization_config()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _load(folder: Path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(folder)
    return {name: reader.get(name) for name in reader}


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


# ------------------------------------------------------------------------- 1. the source is sacred
def test_force_never_deletes_a_source_inside_the_destination(fp8_src, tmp_path):
    parent = tmp_path / "parent"
    model = parent / "model"
    shutil.copytree(fp8_src, model)
    before = _digest(model)
    (tmp_path / "link").symlink_to(model)
    for dst in (parent, model, model / "inside", tmp_path / "link", tmp_path):
        with pytest.raises(CheckpointError, match="must not be the source folder, inside it, or contain it"):
            fp8_to_bf16(model, dst, force=True)
    assert _digest(model) == before and sorted(p.name for p in parent.iterdir()) == ["model"]


def test_force_refuses_a_foreign_file_and_removes_nothing(fp8_src, tmp_path, clean_digest):
    dst = tmp_path / "dst"
    dst.mkdir()
    for name in ("config.json", "model-00009-of-00009.safetensors", "notes.txt"):
        (dst / name).write_text("earlier")
    with pytest.raises(CheckpointError, match="notes.txt is not one") as err:
        fp8_to_bf16(fp8_src, dst, force=True)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in dst.iterdir()) == [
        "config.json",
        "model-00009-of-00009.safetensors",
        "notes.txt",
    ]
    (dst / "notes.txt").unlink()
    fp8_to_bf16(fp8_src, dst, force=True)  # everything left is ours: replaced, the stale shard removed
    assert _digest(dst) == clean_digest


def test_force_keeps_a_setgid_or_symlinked_destination(fp8_src, tmp_path, clean_digest):
    setgid = tmp_path / "setgid"
    setgid.mkdir()
    setgid.chmod(0o2775)
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    for dst in (setgid, link):
        (dst / "config.json").write_text("{}")  # an earlier output: --force is needed
        fp8_to_bf16(fp8_src, dst, force=True)
        assert _digest(dst) == clean_digest
    assert stat.S_IMODE(setgid.stat().st_mode) == 0o2775
    assert link.is_symlink() and _digest(real) == clean_digest


def test_force_works_on_a_mount_point_destination(fp8_src, tmp_path, clean_digest):
    with mounted_tmpfs(tmp_path / "mnt", "64m", "make a mount-point destination") as mnt:
        (mnt / "config.json").write_text("{}")
        fp8_to_bf16(fp8_src, mnt, force=True)
        assert os.path.ismount(mnt) and _digest(mnt) == clean_digest


# ------------------------------------------------------------------------- 2. one writer, durable, verified
def test_a_second_converter_on_the_same_destination_fails_at_once_naming_the_first_ones_pid(
    fp8_src, tmp_path
):
    dst = tmp_path / "dst"
    first = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, str(fp8_src), str(dst), "0.2"], env=ENV)
    try:
        lock = dst / LOCK
        _wait_for(lambda: lock.is_file() and lock.read_text().strip() == str(first.pid))
        second = subprocess.run(
            [sys.executable, "-m", "dsv3.cli", "convert", "fp8-to-bf16", str(fp8_src), str(dst)],
            capture_output=True,
            text=True,
            env=ENV,
        )
        assert first.poll() is None  # the second one failed while the first was still running
        err = second.stderr.strip()
        assert second.returncode == 1 and "\n" not in err and f"pid {first.pid}" in err, err
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait()


def test_a_truncated_final_named_shard_is_redone_on_resume(fp8_src, tmp_path, clean_digest):
    dst = tmp_path / "dst"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, str(fp8_src), str(dst), "0.02"], env=ENV)
    _wait_for(lambda: len(list(dst.glob("model-*.safetensors"))) >= 2 or proc.poll() is not None)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (dst / MARKER).exists()  # killed mid-job
    # A crash that persisted the rename but not all the data leaves a short file under its final name.
    victim = sorted(dst.glob("model-*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    subprocess.run([sys.executable, "-c", CONVERT, str(fp8_src), str(dst)], check=True, env=ENV)
    assert _digest(dst) == clean_digest


def test_every_file_is_fsynced_before_its_rename_and_its_folder_after(fp8_src, tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", os.path.realpath(a), os.path.realpath(b)))
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    fp8_to_bf16(fp8_src, tmp_path / "dst")
    renames = [(i, e) for i, e in enumerate(events) if e[0] == "replace"]
    assert len(renames) > 10
    for i, (_, tmp, final) in renames:
        assert ("fsync", tmp) in events[:i], tmp
        assert ("fsync", os.path.dirname(final)) in events[i + 1 :], final


# ------------------------------------------------------------------------- 3. finished is a success
def test_rerunning_a_finished_job_is_a_success_that_writes_nothing(fp8_src, tmp_path):
    dst = tmp_path / "dst"
    fp8_to_bf16(fp8_src, dst)
    before = {p.name: p.stat().st_mtime_ns for p in dst.iterdir()}
    assert LOCK not in before and MARKER not in before
    report = fp8_to_bf16(fp8_src, dst)
    assert report.already_complete and "already complete" in report.summary() and report.shards_written == 0
    assert {p.name: p.stat().st_mtime_ns for p in dst.iterdir()} == before
    proc = subprocess.run(
        [sys.executable, "-m", "dsv3.cli", "convert", "fp8-to-bf16", str(fp8_src), str(dst)],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert proc.returncode == 0 and "already complete" in proc.stdout, proc.stderr


def test_a_different_job_on_a_finished_destination_still_needs_force(fp8_src, tmp_path, clean_digest):
    dst = tmp_path / "dst"
    fp8_to_bf16(fp8_src, dst)
    with pytest.raises(CheckpointError, match="not empty"):
        fp8_to_bf16(fp8_src, dst, dtype="fp32")
    # Another source with the same shapes (here: an edited copy) is another job.
    other = tmp_path / "other"
    shutil.copytree(fp8_src, other)
    shard = sorted(other.glob("model-*.safetensors"))[0]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    with pytest.raises(CheckpointError, match="not empty"):
        fp8_to_bf16(other, dst)
    # A finished output that was damaged afterwards is not complete any more.
    victim = sorted(dst.glob("model-*.safetensors"))[-1]
    victim.write_bytes(victim.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match="not empty"):
        fp8_to_bf16(fp8_src, dst)
    assert not fp8_to_bf16(fp8_src, dst, force=True).already_complete
    assert _digest(dst) == clean_digest


def test_sigterm_removes_temporary_files_and_the_rerun_resumes_byte_identically(
    fp8_src, tmp_path, clean_digest
):
    dst = tmp_path / "dst"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_CONVERT, str(fp8_src), str(dst), "0.02"],
        env=ENV,
        stderr=subprocess.DEVNULL,
    )
    _wait_for(lambda: any(dst.glob("model-*.tmp")) and any(dst.glob("model-*.safetensors")))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    assert not list(dst.glob("*.tmp")) and (dst / MARKER).exists() and not (dst / LOCK).exists()
    subprocess.run([sys.executable, "-c", CONVERT, str(fp8_src), str(dst)], check=True, env=ENV)
    assert _digest(dst) == clean_digest


# ------------------------------------------------------------------------- 4. unknown: an error or exact
W = "model.layers.0.mlp.down_proj.weight"


def _fp8_pair(rows: int = 64, cols: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    return blockwise_quant(torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 0.02)


@pytest.mark.parametrize(
    "case, message",
    [
        ("e5m2", f"{W} has unexpected dtype torch.float8_e5m2"),
        ("e5m2+scale", f"{W} is torch.float8_e5m2 but has a {W}_scale_inv"),
        ("bf16+scale", f"{W} is torch.bfloat16 but has a {W}_scale_inv"),
        ("fp32+scale", f"{W} is torch.float32 but has a {W}_scale_inv"),
        ("int8", f"{W} has unexpected dtype torch.int8"),
        ("unlisted", "holds model.extra, which model.safetensors.index.json does not list"),
    ],
)
def test_every_unknown_weight_or_scale_combination_is_an_error_naming_file_and_tensor(
    tmp_path, case, message
):
    q, scale = _fp8_pair()
    weight = {
        "e5m2": q.float().to(torch.float8_e5m2),
        "int8": q.view(torch.int8),
        "bf16+scale": q.bfloat16(),
        "fp32+scale": q.float(),
        "unlisted": q,
    }.get(case, q.float().to(torch.float8_e5m2))
    tensors = {W: weight, "model.norm.weight": torch.ones(8)}
    if case.endswith("+scale") or case == "unlisted":
        tensors[W + "_scale_inv"] = scale
    index = None
    if case == "unlisted":
        tensors["model.extra"] = torch.zeros(3)
        index = dict.fromkeys([W, W + "_scale_inv", "model.norm.weight"], "model-00001-of-00001.safetensors")
    src = _handmade(tmp_path / "src", tensors, index=index)
    with pytest.raises(CheckpointError) as err:
        fp8_to_bf16(src, tmp_path / "dst")
    text = str(err.value)
    assert message in text and str(src / "model-00001-of-00001.safetensors") in text and "\n" not in text, (
        text
    )


def _buffers() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    nan_payload = torch.tensor([0x7FC00123, 0x3F800000], dtype=torch.int32).view(torch.float32)
    return {
        "model.rotary_emb.inv_freq": torch.cat([torch.linspace(1e-4, 1, 6), nan_payload]),  # fp32 buffer
        "model.position_ids": torch.arange(10, dtype=torch.int64),
        "model.causal_mask": torch.tensor([True, False, True]),
        "model.layers.0.mlp.gate.e_score_correction_bias": torch.randn(8, generator=gen) * 1e-3,
        "model.layers.0.self_attn.o_proj.bias": torch.randn(8, generator=gen).bfloat16(),
    }


def test_tensors_that_are_not_weights_pass_through_byte_identical_in_their_own_dtype(tmp_path):
    q, scale = _fp8_pair()
    src = _handmade(
        tmp_path / "src",
        {W: q, W + "_scale_inv": scale, "model.norm.weight": torch.rand(8) + 0.5, **_buffers()},
    )
    fp8_to_bf16(src, tmp_path / "bf16")
    out = _load(tmp_path / "bf16")
    assert out[W].dtype == torch.bfloat16 and out["model.norm.weight"].dtype == torch.bfloat16  # the job
    assert W + "_scale_inv" not in out
    for name, t in _buffers().items():
        assert out[name].dtype == t.dtype and _raw(out[name]) == _raw(t), name
    # and back: the buffers again pass through, the projection is quantized
    bf16_to_fp8(tmp_path / "bf16", tmp_path / "fp8")
    again = _load(tmp_path / "fp8")
    assert again[W].dtype == FP8_DTYPE and _raw(again[W]) == _raw(q)
    for name, t in _buffers().items():
        assert again[name].dtype == t.dtype and _raw(again[name]) == _raw(t), name


@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
@pytest.mark.parametrize("value, at, block", [("inf", (200, 150), (1, 1)), ("nan", (10, 259), (0, 2))])
def test_nan_or_inf_in_a_block_is_an_error_naming_tensor_and_block(tmp_path, scale_fmt, value, at, block):
    w = (torch.randn(300, 260, generator=torch.Generator().manual_seed(1)) * 0.02).bfloat16()
    w[at] = float(value)
    src = _handmade(tmp_path / "src", {W: w}, quantized=False)
    with pytest.raises(CheckpointError) as err:
        bf16_to_fp8(src, tmp_path / "dst", scale_fmt=scale_fmt)
    assert f"{W} has NaN or Inf in block (row {block[0]}, col {block[1]})" in str(err.value), str(err.value)
    assert not (tmp_path / "dst" / INDEX_NAME).exists()


@pytest.mark.parametrize("case", ["cast", "dequant"])
def test_a_value_that_overflows_fp16_is_an_error_naming_the_tensor(tmp_path, case):
    q, scale = _fp8_pair()
    tensors = {"model.norm.weight": torch.tensor([1.0, float("inf"), -2.0]), W: q, W + "_scale_inv": scale}
    fp8_to_bf16(
        _handmade(tmp_path / "ok", tensors), tmp_path / "ok-out", dtype="fp16"
    )  # inf in, inf out: fine
    name = "model.norm.weight" if case == "cast" else W
    if case == "cast":
        tensors[name] = torch.tensor([1.0, 1e5, -2.0])
    else:
        q[3, 5] = 448.0
        tensors[W + "_scale_inv"] = scale * 0 + 1000.0  # 448 * 1000 > 65504
    with pytest.raises(CheckpointError, match=f"{name} overflows float16"):
        fp8_to_bf16(_handmade(tmp_path / "bad", tensors), tmp_path / "bad-out", dtype="fp16")


# ------------------------------------------------------------------------- 5. paths from files are untrusted
@pytest.mark.parametrize("entry", ["../outside.safetensors", "ABSOLUTE", "sub/model.safetensors"])
def test_an_index_entry_outside_the_folder_is_an_error_and_nothing_is_written_outside(tmp_path, entry):
    q, scale = _fp8_pair()
    src = _handmade(tmp_path / "work" / "src", {W: q, W + "_scale_inv": scale})
    target = tmp_path / "elsewhere" / "model.safetensors" if entry == "ABSOLUTE" else src / entry
    entry = str(target) if entry == "ABSOLUTE" else entry
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(
        src / "model-00001-of-00001.safetensors", target
    )  # a real shard there: only the path is wrong
    (src / INDEX_NAME).write_text(json.dumps({"weight_map": {W: entry, W + "_scale_inv": entry}}))
    dst = tmp_path / "work" / "deep" / "dst"

    def outside() -> dict[str, str]:  # every file but the destination's own, with its content
        files = (p for p in tmp_path.rglob("*") if p.is_file() and dst not in p.parents)
        return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}

    before = outside()
    for call in (lambda: CheckpointReader(src), lambda: fp8_to_bf16(src, dst)):
        with pytest.raises(CheckpointError) as err:
            call()
        assert f"{src / INDEX_NAME}: weight_map entry {W}" in str(err.value) and repr(entry) in str(err.value)
    assert outside() == before


# ------------------------------------------------------------------------- 6. speed under contention
def test_default_conversion_uses_one_compute_thread(tmp_path, monkeypatch):
    import dsv3.convert.fp8 as fp8

    seen = []
    real = fp8.blockwise_dequant

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(fp8, "blockwise_dequant", recording)
    q, scale = _fp8_pair()
    fp8_to_bf16(_handmade(tmp_path / "src", {W: q, W + "_scale_inv": scale}), tmp_path / "dst")
    assert seen == [1]


# ------------------------------------------------------------------------- 7. umask and side files
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_every_file_written_follows_the_umask(tmp_path, umask, mode):
    q, scale = _fp8_pair()
    old = os.umask(umask)
    try:
        writer = ShardWriter(tmp_path / "src", max_shard_bytes=4096)  # the shard writer of `dsv3 tiny`
        writer.add(W, q), writer.add(W + "_scale_inv", scale), writer.add("model.norm.weight", torch.ones(8))
        writer.close()
        config = {"num_hidden_layers": 1, "quantization_config": fp8_quantization_config()}
        (tmp_path / "src" / "config.json").write_text(json.dumps(config))
        fp8_to_bf16(tmp_path / "src", tmp_path / "dst")
        install_remote_code(tmp_path / "src")
    finally:
        os.umask(old)
    files = [*(tmp_path / "src").iterdir(), *(tmp_path / "dst").iterdir()]
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert len(modes) > 10 and modes == dict.fromkeys(modes, oct(mode))


def test_an_unreadable_side_file_is_a_one_line_error_naming_it_and_leaves_no_tmp(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(), dst.mkdir()
    (src / "generation_config.json").write_text("{}")
    (src / "tokenizer.json").symlink_to(
        "/proc/self/mem"
    )  # a regular file whose read fails (EIO), even for root
    with pytest.raises(CheckpointError) as err:
        copy_side_files(src, dst)
    assert str(err.value).startswith(f"{src / 'tokenizer.json'}: cannot read") and "\n" not in str(err.value)
    assert sorted(p.name for p in dst.iterdir()) == ["generation_config.json"]


FILE_TOO_LARGE = """
import resource, signal, sys
from pathlib import Path
from dsv3.convert.checkpoint import CheckpointError, copy_side_files
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails (EFBIG), like a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    copy_side_files(Path(sys.argv[1]), Path(sys.argv[2]))
except CheckpointError as err:
    print(err)
"""


def test_a_side_file_that_cannot_be_written_is_a_one_line_error_naming_it_and_leaves_no_tmp(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(), dst.mkdir()
    (src / "tokenizer.json").write_text("x" * 20000)
    out = run_python(FILE_TOO_LARGE, str(src), str(dst)).strip()
    assert out.startswith(f"{dst / 'tokenizer.json'}: cannot write") and "\n" not in out, out
    assert not list(dst.iterdir())


# ------------------------------------------------------------------------- install-code
DEEPSEEK_CODE = (
    "from transformers.utils.import_utils import is_torch_fx_available  # gone in transformers 5\n"
)


def test_install_code_twice_keeps_deepseeks_own_file_as_the_orig(tmp_path):
    folder = tmp_path / "DeepSeek-V3"
    folder.mkdir()
    config = json.dumps({"model_type": "deepseek_v3", "auto_map": dict(AUTO_MAP)}, indent=1)  # as shipped
    (folder / "config.json").write_text(config)
    (folder / "modeling_deepseek.py").write_text(DEEPSEEK_CODE)
    install_remote_code(folder)
    install_remote_code(folder)
    assert (folder / "modeling_deepseek.py.orig").read_text() == DEEPSEEK_CODE
    assert sorted(p.name for p in folder.glob("*.orig")) == ["modeling_deepseek.py.orig"]
    assert (folder / "config.json").read_text() == config  # already has the same auto_map: untouched


def test_install_code_never_backs_up_our_own_files(tmp_path):
    ours, bare = tmp_path / "ours", tmp_path / "bare"
    ours.mkdir(), bare.mkdir()
    (ours / "config.json").write_text(json.dumps(with_auto_map({"model_type": "deepseek_v3"})))
    copy_remote_code(ours)  # a folder we wrote
    (bare / "config.json").write_text(json.dumps({"model_type": "deepseek_v3"}))  # no remote code at all
    for folder in (ours, bare, ours, bare):
        install_remote_code(folder)
    assert not list(ours.glob("*.orig"))
    assert [p.name for p in bare.glob("*.orig")] == ["config.json.orig"]  # the one real original
    assert json.loads((bare / "config.json.orig").read_text()) == {"model_type": "deepseek_v3"}
