"""INT8 W8A8 checkpoints (compressed-tensors int-quantized): written shard by shard from FP8 or BF16 sources, loaded
with int8 weights kept in memory, and read the same way by transformers' own compressed-tensors path."""

import json

import pytest
import torch
from dsv3.convert.checkpoint import CheckpointError, CheckpointReader
from dsv3.convert.quantize import quantize_int8
from dsv3.convert.tiny import build_tiny
from dsv3.modeling_deepseek.fp8 import FP8_DTYPE, blockwise_dequant, is_fp8_linear
from dsv3.modeling_deepseek.quantized import int8_channel_quant
from transformers import AutoConfig, AutoModelForCausalLM


def _is_int8_linear(module) -> bool:
    # Remote code runs from the checkpoint's copy of quantized.py: a different class object than ours.
    return type(module).__name__ == "Int8Linear"


@pytest.fixture(scope="module")
def int8_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    out = {}
    for kind in ("bf16", "fp8"):
        src = build_tiny(root / f"src-{kind}", "v3", fp8=kind == "fp8")
        out[kind] = (src, quantize_int8(src, root / f"int8-from-{kind}").dst)
    return out


@pytest.mark.parametrize("kind", ["bf16", "fp8"])
def test_int8_checkpoint_quantizes_each_projection_per_channel_and_passes_the_rest_through(int8_pair, kind):
    src_dir, dst_dir = int8_pair[kind]
    src, dst = CheckpointReader(src_dir), CheckpointReader(dst_dir)
    quantized = 0
    for name in src:
        t = src.get(name)
        if name.endswith("_scale_inv"):
            assert name not in dst
            continue
        if name.endswith(".weight") and is_fp8_linear(name.removesuffix(".weight")) and t.dim() == 2:
            w = (
                blockwise_dequant(t, src.get(name + "_scale_inv"), torch.float32)
                if t.dtype == FP8_DTYPE
                else t
            )
            q, scale = int8_channel_quant(w)
            assert torch.equal(dst.get(name), q), name
            assert torch.equal(dst.get(name.removesuffix("weight") + "weight_scale"), scale), name
            quantized += 1
        else:  # router, norms, embeddings, lm_head, eh_proj, the MTP head, the fp32 bias: byte-identical
            out = dst.get(name)
            assert out.dtype == t.dtype and torch.equal(out.view(torch.uint8), t.view(torch.uint8)), name
    assert quantized == 176  # every projection of the 3 decoder layers and the MTP block
    config = json.loads((dst_dir / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors" and quant["format"] == "int-quantized"
    group = quant["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == "channel" and group["input_activations"]["dynamic"] is True
    assert "re:.*mlp\\.gate$" in quant["ignore"] and "lm_head" in quant["ignore"]


def test_int8_model_keeps_int8_weights_in_memory_and_stays_close_to_bf16(int8_pair):
    src_dir, dst_dir = int8_pair["bf16"]
    ref = AutoModelForCausalLM.from_pretrained(src_dir, trust_remote_code=True, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(dst_dir, trust_remote_code=True, dtype=torch.float32)
    linears = [m for m in model.modules() if _is_int8_linear(m)]
    assert len(linears) == 176 and all(m.weight.dtype == torch.int8 for m in linears)
    assert not model.model.layers[1].mlp.gate.weight.dtype == torch.int8  # the router stays as it was
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(ids).logits, model(ids).logits
    # A random MoE is the worst case (a rounding step can flip an expert choice); still the argmax mostly agrees.
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.8
    assert (a - b).abs().mean() < 0.1 * a.abs().mean()


def test_int8_checkpoint_loads_the_same_through_transformers_compressed_tensors(int8_pair):
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is an optional dependency")
    _, dst_dir = int8_pair["fp8"]
    ours = AutoModelForCausalLM.from_pretrained(dst_dir, trust_remote_code=True, dtype=torch.float32)
    # Hand the quantization config to transformers' own quantizer: it decompresses into plain Linears and
    # fake-quantizes activations per token with compressed-tensors' code.
    config = AutoConfig.from_pretrained(dst_dir, trust_remote_code=True)
    config.quantization_config, config.int_quantization_config = config.int_quantization_config, None
    theirs = AutoModelForCausalLM.from_pretrained(
        dst_dir, config=config, trust_remote_code=True, dtype=torch.float32
    )
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs(ids)  # compressed-tensors decompresses on the first forward
        gen = torch.Generator().manual_seed(2)
        checked = 0
        for name, module in ours.named_modules():
            if _is_int8_linear(module):
                checked += 1
                other = theirs.get_submodule(name)
                assert torch.equal(other.weight.float(), module.dequantized_weight(torch.float32)), name
                x = torch.randn(2, 3, module.in_features, generator=gen)  # (B, S, in), as in the model
                y, y_ref = module(x), other(x)
                assert (y - y_ref).abs().max() <= 1e-5 * y_ref.abs().max(), name
    assert checked == 176


def test_int8_refuses_an_already_quantized_source_and_nan_weights(int8_pair, tmp_path):
    _, dst_dir = int8_pair["bf16"]
    with pytest.raises(CheckpointError, match="already quantized \\(compressed-tensors\\)"):
        quantize_int8(dst_dir, tmp_path / "again")
    src = build_tiny(tmp_path / "nan", "moonlight")
    from safetensors.torch import load_file, save_file

    reader = CheckpointReader(src)
    name = "model.layers.1.mlp.experts.0.up_proj.weight"
    shard = src / reader.weight_map[name]
    tensors = load_file(shard)
    tensors[name][3, 5] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"{name} contains NaN or Inf"):
        quantize_int8(src, tmp_path / "out")
    # A BF16 weight that carries an FP8 scale is ambiguous: refused, never quantized without its scale.
    tensors[name][3, 5] = 0.0
    tensors[name + "_scale_inv"] = torch.ones(1, 1)
    save_file(tensors, shard, metadata={"format": "pt"})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"][name + "_scale_inv"] = shard.name
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"{name}_scale_inv scales no float8_e4m3fn weight"):
        quantize_int8(src, tmp_path / "out2")


def _write_kimi_style_w4a16(tmp_path, group: int = 32):
    """A tiny checkpoint in exactly the layout of Kimi-K2-Thinking's INT4 release: routed experts int4 group-32
    pack-quantized, attention / shared experts / dense MLP / lm_head in BF16 (regex ignore list); plus the same
    model with the experts replaced by their dequantized weights, the exact reference."""
    from dsv3.convert.tiny import random_tiny_model, write_official_layout
    from dsv3.modeling_deepseek.quantized import dequant_groups, group_rtn_quant, pack_int32

    # BF16 values held in fp32, so that the reference can hold q * scale exactly (bf16 could not).
    model = random_tiny_model("kimi", seed=3).to(torch.bfloat16).float()
    packed: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if ".mlp.experts." in name and isinstance(module, torch.nn.Linear):
                q, scale = group_rtn_quant(module.weight, 4, group)
                packed[name + ".weight_packed"] = pack_int32(q, 4)
                packed[name + ".weight_scale"] = scale
                packed[name + ".weight_shape"] = torch.tensor(module.weight.shape)
                module.weight.copy_(dequant_groups(q, scale))
    ref_dir, q_dir = tmp_path / "dequantized", tmp_path / "w4a16"
    write_official_layout(model, ref_dir, dtype=torch.float32)
    config = model.config.to_dict()
    config["model_type"] = "kimi_k2"
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 4,
                    "type": "int",
                    "symmetric": True,
                    "strategy": "group",
                    "group_size": group,
                    "dynamic": False,
                    "actorder": None,
                },
                "input_activations": None,
            }
        },
        "ignore": [
            "lm_head",
            "re:.*self_attn.*",
            "re:.*shared_experts.*",
            "re:.*mlp\\.(gate|up|gate_up|down)_proj.*",
            "re:.*eh_proj$",
            "re:.*shared_head\\.head$",
        ],
    }
    from dsv3.convert.checkpoint import ShardWriter, atomic_write_json, copy_remote_code, with_auto_map

    writer = ShardWriter(q_dir, max_shard_bytes=2**20)
    for name, t in model.state_dict().items():
        module = name.removesuffix(".weight")
        if module + ".weight_packed" in packed:
            for suffix in ("weight_packed", "weight_scale", "weight_shape"):
                writer.add(f"{module}.{suffix}", packed[f"{module}.{suffix}"])
        else:
            writer.add(name, t if name.endswith("e_score_correction_bias") else t.to(torch.bfloat16))
    writer.close()
    atomic_write_json(q_dir / "config.json", with_auto_map(config))
    copy_remote_code(q_dir)
    return ref_dir, q_dir


def test_kimi_style_int4_checkpoint_stays_packed_and_matches_its_dequantized_weights(tmp_path):
    ref_dir, q_dir = _write_kimi_style_w4a16(tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, trust_remote_code=True, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(q_dir, trust_remote_code=True, dtype=torch.float32)
    packed = {n: m for n, m in model.named_modules() if type(m).__name__ == "PackedLinear"}
    assert packed and all(".mlp.experts." in n for n in packed)  # the ignore regexes kept the rest dense
    assert len(packed) == 3 * 12  # 1 MoE layer x 12 experts x gate/up/down
    assert type(model.model.layers[1].self_attn.q_b_proj).__name__ == "Linear"
    quant_bytes = sum(p.numel() * p.element_size() for m in packed.values() for p in m.parameters())
    bf16_bytes = sum(m.in_features * m.out_features * 2 for m in packed.values())
    assert quant_bytes <= 0.3 * bf16_bytes, (quant_bytes, bf16_bytes)
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert json.loads((q_dir / "config.json").read_text())["model_type"] == "kimi_k2"


def _poison(folder, tensor: str) -> None:
    # Rewrite the shard holding `tensor` with its first element set to NaN.
    from safetensors.torch import load_file, save_file

    shard = folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][tensor]
    tensors = load_file(shard)
    tensors[tensor] = tensors[tensor].clone()
    tensors[tensor].view(-1)[0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})


def test_a_nan_quantization_scale_is_a_load_error_naming_the_tensor(tmp_path, int8_pair):
    # llm-compressor leaves modules it never calibrated (the MTP layer) with uninitialised scales; such a file must
    # not load into a model that silently computes NaN.
    _, q_dir = _write_kimi_style_w4a16(tmp_path)
    _poison(q_dir, "model.layers.1.mlp.experts.3.down_proj.weight_scale")
    with pytest.raises(
        ValueError, match=r"^model\.layers\.1\.mlp\.experts\.3\.down_proj\.weight_scale: contains NaN"
    ):
        AutoModelForCausalLM.from_pretrained(q_dir, trust_remote_code=True, dtype=torch.float32)
    import shutil

    int8 = tmp_path / "int8"
    shutil.copytree(int8_pair["bf16"][1], int8)
    _poison(int8, "model.layers.0.self_attn.o_proj.weight_scale")
    with pytest.raises(ValueError, match=r"^model\.layers\.0\.self_attn\.o_proj\.weight_scale: contains NaN"):
        AutoModelForCausalLM.from_pretrained(int8, trust_remote_code=True, dtype=torch.float32)
