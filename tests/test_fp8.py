"""FP8 block format: one dequant/quant implementation, loading (dequantize or keep), converters."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from dsv3.convert.checkpoint import CheckpointError
from dsv3.convert.fp8 import bf16_to_fp8, fp8_to_bf16
from dsv3.convert.tiny import random_tiny_model, write_official_layout
from dsv3.modeling_deepseek.fp8 import (
    FP8_DTYPE,
    blockwise_dequant,
    blockwise_dequant_reference,
    blockwise_quant,
    is_fp8_linear,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers import DeepseekV3ForCausalLM as Native

from tests.conftest import folder_digest, mounted_tmpfs, run_python
from tests.test_inventory import UNQUANTIZED, real_inventory


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _per_block_reference(q, scale, dtype):
    # Independent of the library's expansion: walk the blocks, crop at the edges.
    out = torch.empty(q.shape, dtype=dtype)
    for r in range(scale.shape[0]):
        for c in range(scale.shape[1]):
            blk = q[r * 128 : (r + 1) * 128, c * 128 : (c + 1) * 128]
            out[r * 128 : (r + 1) * 128, c * 128 : (c + 1) * 128] = (blk.float() * scale[r, c]).to(dtype)
    return out


@pytest.mark.parametrize("shape", [(576, 300), (192, 256), (100, 50)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fp8_dequant_crops_partial_blocks_bit_exactly(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    q = (torch.randn(shape, generator=gen) * 100).to(FP8_DTYPE)
    scale = torch.rand((-(-shape[0] // 128), -(-shape[1] // 128)), generator=gen) * 1e-3
    ref = _per_block_reference(q, scale, dtype)
    assert torch.equal(_bits(blockwise_dequant_reference(q, scale, dtype)), _bits(ref))
    assert torch.equal(_bits(blockwise_dequant(q, scale, dtype)), _bits(ref))
    if shape == (192, 256):
        # transformers 5.23's block = rows // scale_rows = 96 here: silently wrong, unlike ours.
        wrong = (q.float() * scale.repeat_interleave(96, 0).repeat_interleave(128, 1)).to(dtype)
        assert not torch.equal(wrong, ref)


def test_fast_dequant_matches_reference_on_every_fp8_code_and_extreme_scales():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).repeat(130, 2).view(FP8_DTYPE).contiguous()
    # 130 x 512: two block rows (the second partial), four block columns; tiny, subnormal-producing and huge scales
    for s in ([[0.37, 3.0, 1e-30, 200.0], [5.0, 1.0, 2.0**-20, 1e-40]], [[1e30, 1.0, 1.0, 1.0], [1.0] * 4]):
        scale = torch.tensor(s)
        for dtype in (torch.bfloat16, torch.float32):
            a, b = blockwise_dequant(codes, scale, dtype), blockwise_dequant_reference(codes, scale, dtype)
            same = (_bits(a) == _bits(b)) | (a.isnan() & b.isnan())
            assert same.all()


@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
def test_quantize_dequantize_quantize_is_idempotent(scale_fmt):
    w = (torch.randn(700, 1000, generator=torch.Generator().manual_seed(1)) * 0.02).to(torch.bfloat16)
    q, s = blockwise_quant(w, scale_fmt=scale_fmt)
    q2, s2 = blockwise_quant(blockwise_dequant(q, s), scale_fmt=scale_fmt)
    assert torch.equal(_bits(q), _bits(q2)) and torch.equal(s, s2)
    if scale_fmt == "ue8m0":
        assert torch.equal(s, torch.exp2(torch.log2(s).round()))  # powers of two
    assert (blockwise_dequant(q, s, torch.float32) - w.float()).abs().max() <= w.float().abs().max() / 16


def test_fp8_selection_is_exactly_the_official_fp8_tensors():
    inv = real_inventory()
    official = {n for n, s in inv.items() if len(s) == 2 and not any(u in n for u in UNQUANTIZED)}
    ours = {n for n, s in inv.items() if len(s) == 2 and is_fp8_linear(n.removesuffix(".weight"))}
    assert ours == official and len(official) == 91_991 - len(inv)


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
    from dsv3.convert.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny-fp8"), "v3", fp8=True)


def _tensors(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for name, shard in index.items():
        with safe_open(folder / shard, "pt") as f:
            out[name] = f.get_tensor(name)
    return out


def test_tiny_fp8_has_the_official_partial_block_layout(fp8_ckpt):
    t = _tensors(fp8_ckpt)
    assert t["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"].dtype == FP8_DTYPE
    assert t["model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (5, 2)  # 576 rows
    assert t["model.layers.1.self_attn.q_a_proj.weight_scale_inv"].shape == (2, 2)  # 192 rows
    assert t["model.layers.3.eh_proj.weight"].dtype == torch.bfloat16
    assert "model.layers.1.mlp.gate.weight_scale_inv" not in t


def test_converter_and_load_time_dequant_are_bit_identical_to_the_formula(fp8_ckpt, tmp_path):
    report = fp8_to_bf16(fp8_ckpt, tmp_path / "bf16")
    src, out = _tensors(fp8_ckpt), _tensors(tmp_path / "bf16")
    model = AutoModelForCausalLM.from_pretrained(fp8_ckpt, trust_remote_code=True, dtype=torch.bfloat16)
    loaded = model.state_dict()
    n_fp8 = 0
    for name, q in src.items():
        if q.dtype != FP8_DTYPE:
            continue
        n_fp8 += 1
        ref = (
            q.float()
            * src[name + "_scale_inv"]
            .repeat_interleave(128, 0)[: q.shape[0]]
            .repeat_interleave(128, 1)[:, : q.shape[1]]
        ).to(torch.bfloat16)
        assert torch.equal(_bits(out[name]), _bits(ref)), name
        assert torch.equal(_bits(loaded[name]), _bits(ref)), name
    assert n_fp8 > 100 and report.tensors == len(src) - n_fp8
    assert not any(k.endswith("_scale_inv") for k in out) and "model.layers.3.eh_proj.weight" in out
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert "quantization_config" not in config and config["num_nextn_predict_layers"] == 1
    index = json.loads((tmp_path / "bf16" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in out.values())
    for shard in set(index["weight_map"].values()):
        with safe_open(tmp_path / "bf16" / shard, "pt") as f:
            assert f.metadata() == {"format": "pt"}


def test_fp8_model_logits_match_native_on_dequantized_weights(fp8_ckpt, tmp_path):
    fp8_to_bf16(fp8_ckpt, tmp_path / "fp32", dtype="fp32")
    ids = torch.randint(3, 512, (2, 20), generator=torch.Generator().manual_seed(2))
    ours = AutoModelForCausalLM.from_pretrained(fp8_ckpt, trust_remote_code=True, dtype=torch.float32).eval()
    kept = AutoModelForCausalLM.from_pretrained(
        fp8_ckpt, trust_remote_code=True, dtype=torch.float32, fp8_mode="keep"
    ).eval()
    native = Native.from_pretrained(tmp_path / "fp32", dtype=torch.float32).eval()
    with torch.no_grad():
        a, b, c = ours(ids).logits, kept(ids).logits, native(ids).logits
    assert (a - c).abs().max().item() <= 1e-4
    assert torch.equal(a, b)  # keep-FP8 dequantizes per matmul to the same weights
    fp8_bytes = sum(p.numel() * p.element_size() for p in kept.parameters())
    full_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    assert fp8_bytes < 0.45 * full_bytes  # FP8 weights: 1 byte instead of 4 (fp32) for every projection


def test_keep_fp8_model_saves_back_to_the_fp8_layout(fp8_ckpt, tmp_path):
    kept = AutoModelForCausalLM.from_pretrained(fp8_ckpt, trust_remote_code=True, fp8_mode="keep")
    kept.save_pretrained(tmp_path / "again")
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "fp8" and "fp8_mode" not in config
    again = load_file(tmp_path / "again" / "model.safetensors")
    src = _tensors(fp8_ckpt)
    name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"
    assert torch.equal(_bits(again[name]), _bits(src[name]))
    assert torch.equal(again[name + "_scale_inv"], src[name + "_scale_inv"])


@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
def test_fp8_to_bf16_to_fp8_reproduces_bytes_and_scales(fp8_ckpt, tmp_path, scale_fmt):
    start = fp8_ckpt
    if scale_fmt == "ue8m0":  # an official-layout ue8m0 checkpoint (V3.1 style) to start from
        fp8_to_bf16(fp8_ckpt, tmp_path / "seed")
        bf16_to_fp8(tmp_path / "seed", tmp_path / "start", scale_fmt="ue8m0")
        start = tmp_path / "start"
        quant = json.loads((start / "config.json").read_text())["quantization_config"]
        assert quant["scale_fmt"] == "ue8m0"
    fp8_to_bf16(start, tmp_path / "bf16")
    bf16_to_fp8(tmp_path / "bf16", tmp_path / "fp8", scale_fmt=scale_fmt)
    a, b = _tensors(start), _tensors(tmp_path / "fp8")
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(_bits(a[name]), _bits(b[name])), name


def test_converted_folder_loads_in_a_fresh_process_without_weight_warnings(fp8_ckpt, tmp_path):
    fp8_to_bf16(fp8_ckpt, tmp_path / "bf16")
    code = (
        "import sys, torch, logging; from transformers import AutoModelForCausalLM as A;"
        "m = A.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32);"
        "print(sum(p.numel() for n, p in m.named_parameters() if n.startswith('model.layers.3.')))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "bf16")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for word in ("MISSING", "UNEXPECTED", "newly initialized", "not used"):
        assert word not in proc.stderr
    assert int(proc.stdout.split()[-1]) > 0  # the MTP module was loaded


def test_drop_mtp_leaves_out_layer_L_and_still_loads(fp8_ckpt, tmp_path):
    fp8_to_bf16(fp8_ckpt, tmp_path / "nomtp", drop_mtp=True)
    out = _tensors(tmp_path / "nomtp")
    assert not any(k.startswith("model.layers.3.") for k in out)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "nomtp", trust_remote_code=True)
    assert model.config.num_nextn_predict_layers == 0


def _digest(folder):
    return folder_digest(folder)


def test_refuses_non_empty_destination_and_never_modifies_the_source(fp8_ckpt, tmp_path):
    before = _digest(fp8_ckpt)
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "notes.txt").write_text("mine")
    (tmp_path / "dst" / "draft.tmp").write_text("also mine")
    with pytest.raises(CheckpointError, match="not empty"):
        fp8_to_bf16(fp8_ckpt, tmp_path / "dst")
    assert (tmp_path / "dst" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "dst" / "draft.tmp").read_text() == "also mine"  # a refused folder is left untouched
    with pytest.raises(CheckpointError, match="draft.tmp is not one"):  # --force removes only our own files
        fp8_to_bf16(fp8_ckpt, tmp_path / "dst", force=True)
    assert (tmp_path / "dst" / "notes.txt").read_text() == "mine"
    (tmp_path / "dst" / "notes.txt").unlink(), (tmp_path / "dst" / "draft.tmp").unlink()
    (tmp_path / "dst" / "config.json").write_text("{}")  # an earlier job's output: ours to replace
    fp8_to_bf16(fp8_ckpt, tmp_path / "dst", force=True)
    with pytest.raises(CheckpointError, match="must not be the source"):
        fp8_to_bf16(fp8_ckpt, fp8_ckpt / "inside")
    assert _digest(fp8_ckpt) == before


CONVERT = "import sys; from convert.fp8 import fp8_to_bf16; fp8_to_bf16(sys.argv[1], sys.argv[2], workers=1)"


def _kill_when(proc, dst, shards: int, timeout: float = 60.0) -> None:
    # Kill -9 once `shards` output shards exist (0: as soon as the job marker appears).
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        done = len(list(dst.glob("model-*.safetensors"))) if dst.exists() else 0
        if (dst / ".dsv3-job.json").exists() and done >= shards:
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_killing_the_converter_and_rerunning_gives_byte_identical_output(tmp_path):
    src = tmp_path / "src"
    write_official_layout(random_tiny_model("v3", seed=3), src, fp8=True, max_shard_bytes=32 * 1024)
    n_shards = len(list(src.glob("model-*.safetensors")))
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    run = [sys.executable, "-c", CONVERT, str(src)]
    subprocess.run([*run, str(tmp_path / "clean")], check=True, env=env)
    expect = _digest(tmp_path / "clean")
    interrupted = 0
    for i, at in enumerate((0, 1, n_shards // 4, n_shards // 2, n_shards - 2)):
        dst = tmp_path / f"killed{i}"
        _kill_when(subprocess.Popen([*run, str(dst)], env=env), dst, at)
        if (dst / ".dsv3-job.json").exists():
            interrupted += 1
            _kill_when(subprocess.Popen([*run, str(dst)], env=env), dst, at + 2)  # and again while resuming
        if not (dst / "model.safetensors.index.json").exists() or (dst / ".dsv3-job.json").exists():
            subprocess.run([*run, str(dst)], check=True, env=env)  # resume until done
        assert _digest(dst) == expect
    assert interrupted >= 4  # the kills really landed inside running conversions


def _corrupt(folder, fn):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    fn(folder, index)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", "unreadable safetensors file"),
        ("missing_shard", "listed in the index but missing"),
        (
            "missing_tensor",
            "index lists model.layers.1.self_attn.kv_b_proj.weight but the shard does not hold",
        ),
        ("no_scale", "model.layers.1.self_attn.kv_b_proj.weight is FP8 but the checkpoint has no"),
        ("bad_scale_shape", "kv_b_proj.weight_scale_inv: shape"),
        ("nan_scale", "kv_b_proj.weight_scale_inv: contains NaN or Inf"),
        ("int_tensor", "model.norm.weight has unexpected dtype torch.int32"),
    ],
)
def test_bad_input_is_one_line_error_naming_file_and_tensor(fp8_ckpt, tmp_path, damage, message):
    src = tmp_path / "src"
    shutil.copytree(fp8_ckpt, src)
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    target = name if damage not in ("int_tensor",) else "model.norm.weight"
    shard = src / index["weight_map"][target if damage != "bad_scale_shape" else name + "_scale_inv"]
    tensors = load_file(shard)
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "missing_shard":
        shard.unlink()
    elif damage == "missing_tensor":
        del tensors[name]
        save_file(tensors, shard, metadata={"format": "pt"})
    elif damage == "no_scale":
        scale_shard = src / index["weight_map"][name + "_scale_inv"]
        st = load_file(scale_shard)
        del st[name + "_scale_inv"], index["weight_map"][name + "_scale_inv"]
        save_file(st, scale_shard, metadata={"format": "pt"})
        index_path.write_text(json.dumps(index))
    elif damage == "bad_scale_shape":
        tensors[name + "_scale_inv"] = tensors[name + "_scale_inv"][:-1].clone()
        save_file(tensors, shard, metadata={"format": "pt"})
    elif damage == "nan_scale":
        scale_shard = src / index["weight_map"][name + "_scale_inv"]
        st = load_file(scale_shard)
        st[name + "_scale_inv"][0, 0] = float("nan")
        save_file(st, scale_shard, metadata={"format": "pt"})
    elif damage == "int_tensor":
        tensors[target] = tensors[target].to(torch.int32)
        save_file(tensors, shard, metadata={"format": "pt"})
    dst = tmp_path / "dst"
    proc = subprocess.run(
        [sys.executable, "-m", "dsv3.cli", "convert", "fp8-to-bf16", str(src), str(dst)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"},
    )
    assert proc.returncode == 1
    err = proc.stderr.strip()
    assert err.count("\n") == 0 and err.startswith("Error: ") and message in err, err
    assert str(src) in err
    assert not (dst / "model.safetensors.index.json").exists()  # nothing half-written looks complete


def test_fp8_load_with_nan_scale_fails_naming_the_tensor(fp8_ckpt, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(fp8_ckpt, src)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    name = "model.layers.2.mlp.experts.3.down_proj.weight_scale_inv"
    shard = src / index["weight_map"][name]
    st = load_file(shard)
    st[name][0, 0] = float("inf")
    save_file(st, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=name.replace(".", "[.]") + ": contains NaN or Inf"):
        AutoModelForCausalLM.from_pretrained(src, trust_remote_code=True)
    run_python("import torch")  # the source folder still loads nowhere else changed


def test_full_disk_is_a_one_line_error_and_leaves_nothing_that_looks_complete(fp8_ckpt, tmp_path):
    # A 3 MiB tmpfs: the 14 MB BF16 output cannot fit. Needs mount permission (root), else skipped.
    with mounted_tmpfs(tmp_path / "small", "3m", "fill the disk") as mnt:
        proc = subprocess.run(
            [sys.executable, "-m", "dsv3.cli", "convert", "fp8-to-bf16", str(fp8_ckpt), str(mnt / "out")],
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"},
        )
        assert proc.returncode == 1
        err = proc.stderr.strip()
        assert err.count("\n") == 0 and "no space left on the device" in err and str(mnt / "out") in err, err
        assert not (mnt / "out" / "model.safetensors.index.json").exists()
        assert not list((mnt / "out").glob("*.tmp"))  # the half-written shard was removed
