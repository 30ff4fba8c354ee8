"""transformers features that must behave as on the native class: config edits (RoPE), tied embeddings,
output_attentions, return_dict=False."""

import json
import math
import shutil

import pytest
import torch
from dsv3.convert.tiny import tiny_config
from dsv3.modeling_deepseek.modeling_deepseek import DeepseekV3ForCausalLM, softmax_scale
from safetensors import safe_open
from transformers import AutoModel, AutoModelForCausalLM
from transformers import DeepseekV3Config as NativeConfig
from transformers import DeepseekV3ForCausalLM as Native
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


def _load(path, impl="sdpa", **kwargs):
    return AutoModelForCausalLM.from_pretrained(
        path, trust_remote_code=True, dtype=torch.float32, attn_implementation=impl, **kwargs
    ).eval()


def _native(path, impl="sdpa", **kwargs):
    return Native.from_pretrained(path, dtype=torch.float32, attn_implementation=impl, **kwargs).eval()


def _ids(B=2, S=12, seed=1):
    return torch.randint(3, 512, (B, S), generator=torch.Generator().manual_seed(seed))


def _native_rope(rope_parameters: dict, dim: int = 64) -> tuple[torch.Tensor, float]:
    cfg = NativeConfig(qk_rope_head_dim=dim, rope_parameters=dict(rope_parameters))
    inv_freq, factor = ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](cfg, "cpu")
    return inv_freq.float(), factor


def _assert_same_logits(ours, native, tol=1e-4):
    ids = _ids()
    with torch.no_grad():
        diff = (ours(ids).logits - native(ids).logits).abs().max().item()
    assert diff <= tol, diff


# --------------------------------------------------------------------------------------------------- RoPE
def _copy_with_config(src, dst, edit):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_saved_config_holds_one_rope_spelling_and_edits_to_it_take_effect(tiny_ckpt, tmp_path):
    src = tiny_ckpt("v3")
    saved = json.loads((src / "config.json").read_text())
    assert "rope_parameters" not in saved  # only DeepSeek's spelling, as in the official config.json
    assert saved["rope_scaling"]["factor"] == 40 and saved["rope_theta"] == 10000

    def edit(config):
        config["rope_scaling"]["factor"] = 8.0
        config["rope_theta"] = 20000.0
        # A config re-saved by an older version of this code or by other tooling may also carry the transformers-5
        # spelling with the old values: the official keys win.
        config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0}

    path = _copy_with_config(src, tmp_path / "edited", edit)
    model = _load(path)
    rope = model.config.rope_parameters
    assert (rope["factor"], rope["rope_theta"]) == (8.0, 20000.0)
    inv_freq, factor = _native_rope(rope)
    assert torch.allclose(model.model.rotary_emb.inv_freq, inv_freq, rtol=1e-6)
    assert model.model.rotary_emb.attention_factor == pytest.approx(factor)  # 1.0: mscale == mscale_all_dim
    m = 0.1 * math.log(8.0) + 1
    assert model.model.layers[0].self_attn.softmax_scale == pytest.approx(128**-0.5 * m * m)
    _assert_same_logits(
        model, _native(path)
    )  # transformers' own loader gives rope_scaling the same precedence
    resaved = model.config.to_dict()
    assert resaved["rope_scaling"]["factor"] == 8.0 and "rope_parameters" not in resaved


def test_from_pretrained_rope_scaling_none_means_plain_rope(tiny_ckpt):
    path = tiny_ckpt("v3")
    model = _load(path, rope_scaling=None)
    assert model.config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    assert model.config.rope_scaling is None
    base = 10000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    assert torch.allclose(model.model.rotary_emb.inv_freq.double(), base, rtol=1e-6)
    assert model.model.rotary_emb.attention_factor == 1.0
    assert model.model.layers[0].self_attn.softmax_scale == 128**-0.5
    native = _native(path, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    _assert_same_logits(model, native)


def test_partial_yarn_rope_scaling_gets_the_official_defaults(tiny_ckpt):
    path = tiny_ckpt("v3")
    partial = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
    model = _load(path, rope_scaling=dict(partial))
    rope = model.config.rope_parameters
    assert {k: rope[k] for k in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim")} == {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 0.0,
    }
    inv_freq, factor = _native_rope({"rope_type": "yarn", "rope_theta": 10000.0, **partial})
    assert torch.allclose(model.model.rotary_emb.inv_freq, inv_freq, rtol=1e-6)
    # Without mscale_all_dim: cos/sin carry 0.1 ln(factor) + 1 and the softmax scale stays qk_head_dim^-0.5.
    assert (
        model.model.rotary_emb.attention_factor
        == pytest.approx(0.1 * math.log(4.0) + 1)
        == pytest.approx(factor)
    )
    assert softmax_scale(model.config) == 128**-0.5
    # (native's own from_pretrained(rope_scaling=partial) loses rope_theta, so it gets the full spelling)
    native_rope = {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 4096,
    }
    _assert_same_logits(model, _native(path, rope_parameters=native_rope))
    # rope_theta from from_pretrained takes effect too (it used to be stored beside rope_parameters, unused).
    model = _load(path, rope_theta=50000.0)
    assert (
        model.config.rope_parameters["rope_theta"] == 50000.0 and model.config.rope_scaling["factor"] == 40.0
    )
    inv_freq, _ = _native_rope(model.config.rope_parameters)
    assert torch.allclose(model.model.rotary_emb.inv_freq, inv_freq, rtol=1e-6)


# ---------------------------------------------------------------------------------------- tied embeddings
def _safetensors_keys(folder) -> set[str]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return set(f.keys())


def test_tied_checkpoint_without_lm_head_loads_tied_like_native(tmp_path):
    # A tied checkpoint as transformers writes one: the embedding only, no lm_head.weight (and no MTP layer).
    fields = tiny_config("v3").to_dict()
    for key in ("auto_map", "architectures", "model_type", "transformers_version", "tie_word_embeddings"):
        fields.pop(key, None)
    torch.manual_seed(0)
    native = Native(NativeConfig(**fields, tie_word_embeddings=True)).eval()
    native.save_pretrained(tmp_path / "native")
    keys = _safetensors_keys(tmp_path / "native")
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    model = DeepseekV3ForCausalLM.from_pretrained(
        tmp_path / "native", num_nextn_predict_layers=0, dtype=torch.float32
    ).eval()  # strict loading: a missing tensor would raise
    assert model.lm_head.weight is model.model.embed_tokens.weight
    _assert_same_logits(model, native)
    # Our own save writes the shared tensor once and reloads tied through the Auto classes.
    model.save_pretrained(tmp_path / "ours")
    assert "lm_head.weight" not in _safetensors_keys(tmp_path / "ours")
    again = _load(tmp_path / "ours")
    assert again.config.tie_word_embeddings is True
    assert again.lm_head.weight is again.model.embed_tokens.weight
    _assert_same_logits(again, native)


def test_untied_default_keeps_a_separate_lm_head(tiny_ckpt):
    model = _load(tiny_ckpt("v3"))
    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


# ------------------------------------------------------------------------------------------ attentions
def test_output_attentions_returns_eager_probabilities_like_native(tiny_ckpt):
    path = tiny_ckpt("v3")
    ours, native = _load(path, "eager"), _native(path, "eager")
    ids = _ids(2, 9)
    with torch.no_grad():
        a = ours(ids, output_attentions=True).attentions
        b = native(ids, output_attentions=True).attentions
    assert len(a) == len(b) == ours.config.num_hidden_layers
    for x, y in zip(a, b, strict=True):
        assert x.shape == (2, 4, 9, 9)  # (B, H, S, T)
        assert (x - y).abs().max().item() <= 1e-5
        assert torch.allclose(x.sum(-1), torch.ones(2, 4, 9), atol=1e-5)
        assert (x.triu(1) == 0).all()  # causal
    with torch.no_grad():
        assert ours(ids).attentions is None
        step = ours(ids, use_cache=True)
        nxt = ours(ids[:, :1], past_key_values=step.past_key_values, output_attentions=True).attentions
        assert nxt[0].shape == (2, 4, 1, 10)
        gen = ours.generate(
            ids, max_new_tokens=2, do_sample=False, output_attentions=True, return_dict_in_generate=True
        )
    assert len(gen.attentions) == 2 and gen.attentions[0][0].shape == (2, 4, 9, 9)


def test_output_attentions_on_sdpa_raises_naming_eager(tiny_ckpt):
    # transformers 5.23's native class only logs a warning here and hands back no attentions.
    model = _load(tiny_ckpt("v3"), "sdpa")
    with pytest.raises(
        ValueError, match='^output_attentions=True needs eager .* attn_implementation="eager"$'
    ):
        model(_ids(), output_attentions=True)


# ---------------------------------------------------------------------------------------- return_dict
def test_return_dict_false_returns_tuples_like_transformers(tiny_ckpt):
    path = tiny_ckpt("v3")
    model, native = _load(path), _native(path)
    ids = _ids()
    with torch.no_grad():
        as_dict = model(ids, labels=ids)
        as_tuple = model(ids, labels=ids, return_dict=False)
        native_tuple = native(ids, labels=ids, return_dict=False)
        assert isinstance(as_tuple, tuple)
        assert torch.equal(as_tuple[0], as_dict.loss) and torch.equal(as_tuple[1], as_dict.logits)
        assert (as_tuple[1] - native_tuple[1]).abs().max().item() <= 1e-4
        plain = model(ids, return_dict=False)
        assert torch.equal(plain[0], as_dict.logits) and plain[1] is not None  # logits, past_key_values
        model.config.return_dict = False  # the config's setting is honoured too
        assert isinstance(model(ids), tuple) and torch.equal(model(ids)[0], as_dict.logits)
        base = AutoModel.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
        hidden = base(ids).last_hidden_state
        as_tuple = base(ids, return_dict=False)
        assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], hidden)
