"""Layer-streamed GPTQ of whole checkpoints (convert/gptq_stream.py): formats, loading, the MoE calibration
semantics against the model's own decoder layer, resume, records and bad input."""

import json

import pytest
import torch
from dsv3.convert.checkpoint import CheckpointReader
from dsv3.convert.gptq_stream import (
    GPTQOptions,
    LayerQuantizer,
    _LayerSource,
    quantize_gptq,
    quantize_layer,
)
from dsv3.modeling_deepseek.configuration_deepseek import DeepseekV3Config
from dsv3.modeling_deepseek.modeling_deepseek import DeepseekV3RotaryEmbedding, attention_mask_4d
from dsv3.modeling_deepseek.quantized import dequant_groups, unpack_int32
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from dsv3.corpus import pydoc_split

FAST = dict(nsamples=4, seqlen=32, group_size=32)


def _is_quantized(module) -> bool:
    # By name: a model loaded with trust_remote_code has its own copies of our classes.
    return type(module).__name__ in ("Int8Linear", "PackedLinear", "GPTQLinear")


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(pydoc_split()[0][:40_000])
    return path


@pytest.fixture(scope="module")
def quantized(tiny_ckpt, calib, tmp_path_factory):
    """One GPTQ output per (format, targets), built once."""
    cache = {}

    def get(fmt="compressed-tensors", targets="all", act_order=False):
        key = (fmt, targets, act_order)
        if key not in cache:
            dst = tmp_path_factory.mktemp(f"gptq-{fmt}-{targets}")
            opts = GPTQOptions(bits=4, targets=targets, fmt=fmt, act_order=act_order, **FAST)
            quantize_gptq(tiny_ckpt("v3"), dst, calib, opts)
            cache[key] = dst
        return cache[key]

    return get


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()


@pytest.mark.parametrize(
    "fmt,act_order", [("compressed-tensors", False), ("compressed-tensors", True), ("gptq", True)]
)
@pytest.mark.parametrize("targets", ["all", "experts"])
def test_gptq_output_loads_packed_with_every_tensor_accounted_for(
    quantized, tiny_ckpt, fmt, act_order, targets
):
    dst = quantized(fmt, targets, act_order)
    model, info = AutoModelForCausalLM.from_pretrained(
        dst, trust_remote_code=True, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info
    config = model.config
    L, E = config.num_hidden_layers, config.n_routed_experts
    packed = {n for n, m in model.named_modules() if _is_quantized(m)}
    experts = {n for n in packed if ".mlp.experts." in n}
    # Every routed expert of every MoE layer, the MTP layer's included, is quantized.
    moe_layers = [i for i in range(L + config.num_nextn_predict_layers) if config.is_moe_layer(i)]
    assert len(experts) == 3 * E * len(moe_layers)
    assert any(n.startswith(f"model.layers.{L}.") for n in experts)
    others = packed - experts
    if targets == "experts":
        assert not others
    else:
        assert any(".self_attn." in n for n in others) and any("shared_experts" in n for n in others)
    # Never quantized: router, embeddings, lm_head, norms, eh_proj, the MTP shared head.
    for name in ("lm_head", f"model.layers.{L}.eh_proj", f"model.layers.{L}.shared_head.head"):
        assert type(model.get_submodule(name)) is torch.nn.Linear, name
    src = CheckpointReader(tiny_ckpt("v3"))
    out = CheckpointReader(dst)
    for name in src:
        if name.endswith(
            ("norm.weight", "mlp.gate.weight", "e_score_correction_bias", "embed_tokens.weight")
        ):
            assert torch.equal(src.get(name), out.get(name)) and src.get(name).dtype == out.get(name).dtype, (
                name
            )
    weights = [n for n in out if n.endswith((".weight_packed", ".qweight"))]
    assert len(weights) == len(packed)


def test_packed_checkpoint_logits_equal_the_model_with_its_dequantized_weights(quantized, tiny_ckpt):
    dst = quantized("compressed-tensors", "all", True)
    model, ref = _load(dst), _load(tiny_ckpt("v3"))
    with torch.no_grad():
        for name, module in model.named_modules():
            if _is_quantized(module):
                ref.get_submodule(name).weight.copy_(module.dequantized_weight(torch.float32))
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
    # The packed bytes of the quantized projections: 4-bit codes + one bf16 scale per 32 columns.
    q_bytes = sum(
        t.numel() * t.element_size()
        for m in model.modules()
        if _is_quantized(m)
        for t in (m.weight_packed, m.weight_scale)
    )
    bf16_bytes = sum(2 * m.in_features * m.out_features for m in model.modules() if _is_quantized(m))
    assert q_bytes <= 0.3 * bf16_bytes


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_both_formats_store_exactly_the_gptq_result(bits, act_order):
    from dsv3.convert.gptq import gptq_quantize
    from dsv3.convert.gptq_stream import packed_tensors
    from dsv3.modeling_deepseek.quantized import GPTQLinear, PackedLinear

    gen = torch.Generator().manual_seed(bits)
    O, I, group = 64, 128, 32
    W, X = torch.randn(O, I, generator=gen), torch.randn(256, I, generator=gen)
    for fmt, scale_dtype, cls in (
        ("compressed-tensors", torch.bfloat16, PackedLinear),
        ("gptq", torch.float16, GPTQLinear),
    ):
        result = gptq_quantize(
            W, X.t() @ X, bits, group, act_order, scale_dtype=scale_dtype, static_groups=fmt != "gptq"
        )
        # compressed-tensors' act order ("weight") keeps contiguous groups: no g_idx to store.
        assert (result.g_idx is not None) == (act_order and fmt == "gptq")
        tensors = packed_tensors(
            "m", result, GPTQOptions(bits=bits, group_size=group, fmt=fmt, act_order=act_order)
        )
        module = (
            cls(I, O, False, bits, group, result.g_idx is not None)
            if cls is PackedLinear
            else cls(I, O, False, bits, group)
        )
        module.load_state_dict({k.removeprefix("m."): v for k, v in tensors.items()}, strict=True)
        g_idx = result.g_idx.long() if result.g_idx is not None else torch.arange(I) // group
        expected = result.q.float() * result.scale.float()[:, g_idx]
        assert torch.equal(module.dequantized_weight(torch.float32), expected), fmt


def _held_out_error(model, ref, tokenizer) -> float:
    ids = tokenizer(pydoc_split()[1][:4000], return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        return (model(ids).logits - ref(ids).logits).pow(2).mean().item()


def test_gptq_reconstructs_the_model_better_than_round_to_nearest(tiny_ckpt, calib, tmp_path):
    from transformers import AutoTokenizer

    src = tiny_ckpt("v3")
    errors = {}
    for method in ("gptq", "rtn"):
        dst = tmp_path / method
        quantize_gptq(
            src, dst, calib, GPTQOptions(bits=4, method=method, nsamples=8, seqlen=64, group_size=32)
        )
        errors[method] = _held_out_error(_load(dst), _load(src), AutoTokenizer.from_pretrained(src))
    assert errors["gptq"] < 0.8 * errors["rtn"], errors


def test_streamed_layer_equals_the_models_decoder_layer_with_the_quantized_weights(tiny_ckpt):
    """quantize_layer's MoE semantics (all experts calibrated, only routed experts in the output, shared expert,
    router in fp32) against the model's own DeepseekV3DecoderLayer on the same input."""
    src = tiny_ckpt("v3")
    config = DeepseekV3Config.from_pretrained(src)
    layer_idx = config.first_k_dense_replace  # the first MoE layer
    assert config.is_moe_layer(layer_idx)
    N, S, D = 3, 16, config.hidden_size
    h = torch.randn(N, S, D, generator=torch.Generator().manual_seed(0))
    out, x = torch.zeros(N, S, D), torch.zeros(N, S, D)
    opts = GPTQOptions(bits=4, group_size=32, nsamples=N, seqlen=S)
    lq = LayerQuantizer(opts, config, f"model.layers.{layer_idx}.")
    rotary = DeepseekV3RotaryEmbedding(config)
    cos, sin = rotary(torch.arange(S)[None])
    quantize_layer(
        _LayerSource(CheckpointReader(src), None, torch.float32, "cpu"),
        config,
        layer_idx,
        (h, out, x),
        S,
        lq,
        lambda b: (cos.expand(b, -1, -1), sin.expand(b, -1, -1)),
        lambda b: attention_mask_4d(None, b, S, 0, torch.device("cpu")),
        chunk=2,
    )
    model = _load(src)
    layer = model.model.layers[layer_idx]
    with torch.no_grad():
        for name in lq.quantized:
            rel = name.removeprefix(f"model.layers.{layer_idx}.")
            q = unpack_int32(lq.packed[name + ".weight_packed"], 4)
            layer.get_submodule(rel).weight.copy_(
                dequant_groups(q, lq.packed[name + ".weight_scale"], None, torch.float32)
            )
        ref = layer(
            h, (cos.expand(N, -1, -1), sin.expand(N, -1, -1)), attention_mask_4d(None, N, S, 0, h.device)
        )
    assert len(lq.quantized) == 5 + 3 * (config.n_routed_experts + 1)
    torch.testing.assert_close(out, ref.h_BSD, rtol=1e-5, atol=1e-5)


def test_interrupted_gptq_resumes_to_the_same_bytes(tiny_ckpt, calib, tmp_path, monkeypatch):
    import dsv3.convert.gptq_stream as gs

    src = tiny_ckpt("v3")
    opts = GPTQOptions(bits=4, **FAST)
    quantize_gptq(src, tmp_path / "straight", calib, opts)
    real, calls = gs.write_shard, []

    def dying(path, tensors):
        calls.append(path.name)
        if len(calls) == 3:  # shard 1 (embeddings) and layer 0 written, killed while writing layer 1
            raise KeyboardInterrupt
        real(path, tensors)

    monkeypatch.setattr(gs, "write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        quantize_gptq(src, tmp_path / "resumed", calib, opts)
    monkeypatch.setattr(gs, "write_shard", real)
    report = quantize_gptq(src, tmp_path / "resumed", calib, opts)
    assert report.layers_resumed == 1 and report.layers == 3
    for a in sorted((tmp_path / "straight").glob("*.safetensors")):
        assert a.read_bytes() == (tmp_path / "resumed" / a.name).read_bytes(), a.name
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == sorted(
        p.name for p in (tmp_path / "straight").iterdir()
    )
    again = quantize_gptq(src, tmp_path / "resumed", calib, opts)
    assert again.already_complete


def test_gptq_records_what_it_did(quantized, calib):
    import hashlib

    dst = quantized("compressed-tensors", "experts", False)
    record = json.loads((dst / "dsv3_record.json").read_text())
    op = record["operation"]
    assert op["name"] == "quantize-gptq"
    params = op["params"]
    assert (params["bits"], params["group_size"], params["targets"], params["fmt"]) == (
        4,
        32,
        "experts",
        "compressed-tensors",
    )
    assert (params["nsamples"], params["seqlen"], params["calib"]) == (4, 32, "calib.txt")
    assert params["calib_sha256"] == hashlib.sha256(calib.read_bytes()).hexdigest()
    assert op["results"]["fallback_counts"] == {"rtn": 0, "extra_dampening": 0}
    assert record["lineage"][0]["name"] == "tiny"  # the source's own record travels along
    config = json.loads((dst / "config.json").read_text())
    group = config["quantization_config"]["config_groups"]["group_0"]
    assert group["targets"] == [r"re:.*mlp\.experts\.\d+\.(gate|up|down)_proj$"]
    assert group["weights"]["group_size"] == 32 and group["format"] == "pack-quantized"


@pytest.mark.parametrize(
    "opts,message",
    [
        (dict(bits=3), "--bits"),
        (dict(group_size=48), "--group-size: 48 does not divide"),
        (dict(nsamples=1000, seqlen=512), "fewer than --nsamples x --seqlen"),
        (dict(targets="attention"), "--targets"),
        (dict(fmt="awq"), "--format"),
    ],
)
def test_gptq_refuses_bad_options_with_one_line_naming_them(tiny_ckpt, calib, tmp_path, opts, message):
    with pytest.raises(ValueError, match=message) as err:
        quantize_gptq(tiny_ckpt("v3"), tmp_path / "out", calib, GPTQOptions(**{**FAST, **opts}))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_gptq_refuses_a_quantized_source_a_busy_destination_and_no_calibration_file(
    quantized, tiny_ckpt, calib, tmp_path
):
    with pytest.raises(ValueError, match="already quantized"):
        quantize_gptq(quantized(), tmp_path / "again", calib, GPTQOptions(**FAST))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        quantize_gptq(tiny_ckpt("v3"), busy, calib, GPTQOptions(**FAST))
    assert (busy / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="no such file"):
        quantize_gptq(tiny_ckpt("v3"), tmp_path / "x", tmp_path / "missing.txt", GPTQOptions(**FAST))


def test_w4a16_output_loads_the_same_through_transformers_compressed_tensors(quantized):
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is an optional dependency")
    dst = quantized("compressed-tensors", "all", True)
    ours = _load(dst)
    config = AutoConfig.from_pretrained(dst, trust_remote_code=True)
    config.quantization_config, config.int_quantization_config = config.int_quantization_config, None
    theirs = AutoModelForCausalLM.from_pretrained(
        dst, config=config, trust_remote_code=True, dtype=torch.float32
    )
    ids = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
        checked = 0
        for name, module in ours.named_modules():
            if _is_quantized(module):
                checked += 1
                other = theirs.get_submodule(name)
                w = getattr(other, "weight", None)
                assert w is not None and torch.equal(w.float(), module.dequantized_weight(torch.float32)), (
                    name
                )
    assert checked > 100
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_gptq_shards_name_their_tensors_in_the_index(quantized):
    dst = quantized("gptq", "all", True)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        with safe_open(dst / shard, framework="pt") as f:
            assert set(f.keys()) == {n for n, s in index["weight_map"].items() if s == shard}
