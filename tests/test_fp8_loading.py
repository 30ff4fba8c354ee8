"""FP8 checkpoints under accelerate offload (device_map with "disk" layers) and kept-FP8 models under dtype casts."""

import json
import shutil

import pytest
import torch
from dsv3.modeling_deepseek.fp8 import FP8_DTYPE, FP8Linear
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

# Layer 1 (the first MoE layer: FP8 attention, shared and routed experts) and the MTP layer 3 live on "disk":
# accelerate brings their weights in from the checkpoint's shards for each forward. The rest stays resident on
# "cpu" (the execution device on a machine without GPU).
DEVICE_MAP = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "cpu",
    "model.layers.3": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}
BAD_SCALE = "model.layers.1.self_attn.kv_b_proj.weight_scale_inv"  # runs for every token


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
    from dsv3.convert.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny-fp8"), "v3", fp8=True)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 512, (2, 20), generator=torch.Generator().manual_seed(2))


def _load(path, dtype=torch.float32, **kw):
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=dtype, **kw).eval()


def _run(model, ids):
    with torch.no_grad():
        out = model(ids, labels=ids)  # labels: the MTP layer (offloaded) runs too
    return out.logits, out.mtp_loss


def _fp8_tensors(folder):
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        for name, t in load_file(shard).items():
            if t.dtype == FP8_DTYPE or name.endswith("_scale_inv"):
                out[name] = t
    return out


def _is_fp8_linear(module: nn.Module) -> bool:
    return type(module).__name__ == "FP8Linear"  # loaded as remote code: a copy of our class, not ours


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("mode", ["dequantize", "keep"])
def test_offloaded_fp8_layers_give_the_same_logits_as_resident_ones(fp8_ckpt, ids, tmp_path, mode):
    resident = _load(fp8_ckpt, fp8_mode=mode)
    offloaded = _load(fp8_ckpt, fp8_mode=mode, device_map=DEVICE_MAP, offload_folder=tmp_path / "offload")
    kv_b = offloaded.model.layers[1].self_attn.kv_b_proj
    assert _is_fp8_linear(kv_b) and kv_b.weight.is_meta  # really offloaded, and still FP8 in both modes
    resident_fp8 = _is_fp8_linear(offloaded.model.layers[0].mlp.gate_proj)
    assert resident_fp8 == (mode == "keep")  # resident layers are dequantized at load as usual
    (a, a_mtp), (b, b_mtp) = _run(resident, ids), _run(offloaded, ids)
    print(f"{mode}: max |logit diff| offloaded vs resident = {(a - b).abs().max().item()}")
    assert torch.equal(a, b) and torch.equal(a_mtp, b_mtp)
    assert kv_b.weight.is_meta  # back in the offload store after the forward


@pytest.mark.parametrize("mode", ["dequantize", "keep"])
def test_nan_scale_in_an_offloaded_layer_fails_naming_the_tensor_when_the_layer_runs(
    fp8_ckpt, ids, tmp_path, mode
):
    src = tmp_path / "src"
    shutil.copytree(fp8_ckpt, src)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = src / index["weight_map"][BAD_SCALE]
    tensors = load_file(shard)
    tensors[BAD_SCALE][0, 0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    model = _load(src, fp8_mode=mode, device_map=DEVICE_MAP, offload_folder=tmp_path / "offload")
    with pytest.raises(ValueError) as err:
        _run(model, ids)
    assert str(err.value) == f"{BAD_SCALE}: contains NaN or Inf"


def test_dequantized_model_with_offloaded_layers_saves_a_folder_that_reloads_to_it(fp8_ckpt, ids, tmp_path):
    offloaded = _load(fp8_ckpt, device_map=DEVICE_MAP, offload_folder=tmp_path / "offload")
    expect = _run(offloaded, ids)
    with pytest.warns(UserWarning, match="offloaded modules"):
        offloaded.save_pretrained(tmp_path / "saved")
    quant = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    # Resident layers were saved dequantized (fp32), offloaded ones as the checkpoint's FP8: the config says which.
    assert quant["modules_to_not_convert"] == ["model.layers.0", "model.layers.2"]
    saved, src = _fp8_tensors(tmp_path / "saved"), _fp8_tensors(fp8_ckpt)
    assert saved and all(n.startswith(("model.layers.1.", "model.layers.3.")) for n in saved)
    assert all(torch.equal(_bits(t), _bits(src[n])) for n, t in saved.items())
    again = _load(tmp_path / "saved")
    assert all(torch.equal(x, y) for x, y in zip(_run(again, ids), expect, strict=True))


CASTS = {
    "half": lambda m: m.half(),
    "to_fp16": lambda m: m.to(torch.float16),
    "to_bf16": lambda m: m.to(torch.bfloat16),
    "float": lambda m: m.float(),
}


@pytest.mark.parametrize("cast", list(CASTS))
def test_keep_fp8_model_keeps_fp8_weights_and_fp32_scales_under_dtype_casts(fp8_ckpt, ids, cast):
    kept = _load(fp8_ckpt, torch.bfloat16 if cast == "float" else torch.float32, fp8_mode="keep")
    before = {n: _bits(t).clone() for n, t in kept.state_dict().items() if t.dtype == FP8_DTYPE}
    CASTS[cast](kept)
    fp8 = [m for m in kept.modules() if _is_fp8_linear(m)]
    assert fp8 and all(m.weight.dtype == FP8_DTYPE and m.weight_scale_inv.dtype == torch.float32 for m in fp8)
    assert all(torch.equal(_bits(t), before[n]) for n, t in kept.state_dict().items() if n in before)
    compute = kept.get_input_embeddings().weight.dtype
    assert compute == {"float": torch.float32, "to_bf16": torch.bfloat16}.get(cast, torch.float16)
    with torch.no_grad():
        logits = kept(ids).logits
    assert logits.dtype == compute and logits.isfinite().all()


def test_fp8_linear_moves_devices_but_ignores_dtype_casts():
    layer = FP8Linear(300, 200, bias=True)
    layer.to("meta", torch.float16)
    assert layer.weight.is_meta and layer.weight.dtype == FP8_DTYPE
    assert layer.weight_scale_inv.is_meta and layer.weight_scale_inv.dtype == torch.float32
    assert layer.bias.is_meta and layer.bias.dtype == torch.float16  # the bias follows the cast
    assert isinstance(layer.weight, nn.Parameter) and not layer.weight.requires_grad


def test_keep_fp8_model_after_half_matches_the_dequantized_model_and_saves_the_fp8_layout(
    fp8_ckpt, ids, tmp_path
):
    kept = _load(fp8_ckpt, fp8_mode="keep").half().to("cpu")
    with torch.no_grad():
        a = kept(ids).logits.float()
        b = _load(fp8_ckpt).half()(ids).logits.float()
        c = _load(fp8_ckpt, torch.float16)(ids).logits.float()
    # Dequantizing per matmul into fp16 rounds fp32(q) * scale once, as casting the fp32 dequantized weights does.
    assert torch.equal(a, b)
    # Loaded in fp16 the router bias stays fp32, which .half() casts: close, not equal.
    print(f"keep.half() vs loaded as fp16: max |logit diff| = {(a - c).abs().max().item()}")
    assert (a - c).abs().max().item() <= 1e-2 * c.abs().max().item()
    kept.save_pretrained(tmp_path / "saved")
    quant = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "fp8" and "modules_to_not_convert" not in quant
    src, saved = _fp8_tensors(fp8_ckpt), _fp8_tensors(tmp_path / "saved")
    assert all(saved[n].dtype == t.dtype and torch.equal(_bits(saved[n]), _bits(t)) for n, t in src.items())
    again = _load(tmp_path / "saved", fp8_mode="keep")
    assert all(
        torch.equal(_bits(again.state_dict()[n]), _bits(t)) for n, t in src.items()
    )  # reloads to the same FP8 bytes
