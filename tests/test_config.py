"""DeepseekV3Config accepts every real config and names the field of every invalid one."""

import pytest
from dsv3.modeling_deepseek.configuration_deepseek import DeepseekV3Config
from transformers import AutoConfig

from tests.real_config import REAL_V3_CONFIG, REAL_V3_ROPE_PARAMETERS, real_config_kwargs


def test_accepts_the_real_config_with_optional_fields_and_quantization():
    cfg = DeepseekV3Config(**real_config_kwargs())
    assert cfg.rope_parameters == REAL_V3_ROPE_PARAMETERS
    # FP8 is handled by our loader, hidden from transformers' own quantizer, and written back on save.
    assert cfg.fp8_quantization_config["weight_block_size"] == [128, 128]
    assert not hasattr(cfg, "quantization_config")
    assert cfg.to_dict()["quantization_config"] == REAL_V3_CONFIG["quantization_config"]
    assert (cfg.aux_loss_alpha, cfg.seq_aux, cfg.pretraining_tp, cfg.ep_size) == (0.001, True, 1, 1)
    assert list(cfg.mtp_layer_indices) == [61]
    assert [cfg.is_moe_layer(i) for i in (0, 2, 3, 61)] == [False, False, True, True]


def test_both_rope_scaling_spellings_and_rope_parameters_agree():
    scaling = dict(REAL_V3_CONFIG["rope_scaling"])
    a = DeepseekV3Config(**real_config_kwargs())
    scaling["rope_type"] = scaling.pop("type")
    b = DeepseekV3Config(**real_config_kwargs(rope_scaling=scaling))
    c = DeepseekV3Config(
        **real_config_kwargs(
            rope_scaling=None, rope_theta=None, rope_parameters={**scaling, "rope_theta": 10000}
        )
    )
    assert a.rope_parameters == b.rope_parameters == c.rope_parameters


def test_official_rope_keys_win_over_rope_parameters_when_both_are_given():
    # The rule: rope_scaling (as a whole) and rope_theta beat rope_parameters; rope_parameters fills what they leave.
    stale = {**REAL_V3_ROPE_PARAMETERS, "rope_theta": 50000.0}
    edited = {**REAL_V3_CONFIG["rope_scaling"], "factor": 8}
    cfg = DeepseekV3Config(**real_config_kwargs(rope_scaling=edited, rope_theta=20000, rope_parameters=stale))
    assert cfg.rope_parameters == {**REAL_V3_ROPE_PARAMETERS, "factor": 8.0, "rope_theta": 20000.0}
    cfg = DeepseekV3Config(**real_config_kwargs(rope_scaling=edited, rope_theta=None, rope_parameters=stale))
    assert cfg.rope_parameters["rope_theta"] == 50000.0  # the only theta given
    cfg = DeepseekV3Config(**real_config_kwargs(rope_scaling=None, rope_theta=None, rope_parameters=stale))
    assert cfg.rope_parameters == stale  # transformers-5 spelling alone


def test_rope_attributes_normalise_on_assignment():
    # from_pretrained(path, rope_scaling=..., rope_theta=...) assigns attributes after __init__.
    cfg = DeepseekV3Config(**real_config_kwargs())
    cfg.rope_scaling = {"type": "yarn", "factor": 2}
    assert cfg.rope_parameters == {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 2.0,
        "original_max_position_embeddings": 163840,  # max_position_embeddings, as transformers' own default
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 0.0,
    }
    cfg.rope_theta = 5e5
    assert cfg.rope_parameters["rope_theta"] == 5e5 and cfg.rope_scaling["factor"] == 2.0
    cfg.rope_scaling = None
    assert cfg.rope_parameters == {"rope_type": "default", "rope_theta": 5e5} and cfg.rope_scaling is None
    cfg.rope_parameters = {"rope_type": "yarn", "factor": 4, "rope_theta": 1e4}
    assert cfg.rope_scaling["factor"] == 4.0 and cfg.rope_scaling["mscale"] == 1.0
    with pytest.raises(ValueError, match="^rope_scaling.factor:"):
        cfg.rope_scaling = {"type": "yarn"}
    out = cfg.to_dict()
    assert "rope_parameters" not in out and out["rope_theta"] == 1e4 and out["rope_scaling"]["type"] == "yarn"


def test_config_round_trips_and_is_read_by_transformers_native(tmp_path):
    from transformers import DeepseekV3Config as NativeConfig

    DeepseekV3Config(**real_config_kwargs()).save_pretrained(tmp_path)
    again = DeepseekV3Config.from_pretrained(tmp_path)
    assert again.rope_parameters["factor"] == 40.0 and again.q_lora_rank == 1536
    native = NativeConfig.from_pretrained(tmp_path)
    assert native.rope_parameters["rope_type"] == "yarn" and native.rope_parameters["mscale_all_dim"] == 1.0


def test_moonlight_and_kimi_shapes_are_accepted():
    moon = DeepseekV3Config(
        **real_config_kwargs(
            q_lora_rank=None,
            n_group=1,
            topk_group=1,
            n_routed_experts=64,
            n_shared_experts=2,
            num_experts_per_tok=6,
            rope_scaling=None,
            num_nextn_predict_layers=0,
        )
    )
    assert moon.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    assert list(moon.mtp_layer_indices) == []
    kimi = DeepseekV3Config(
        **real_config_kwargs(
            n_routed_experts=384, n_group=1, topk_group=1, num_nextn_predict_layers=0, model_type="kimi_k2"
        )
    )
    assert kimi.n_routed_experts == 384


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"n_routed_experts": 10, "n_group": 3}, "n_group"),
        ({"topk_group": 9}, "topk_group"),
        ({"num_experts_per_tok": 129}, "num_experts_per_tok"),  # 4 kept groups x 32 experts = 128
        ({"rope_scaling": {"type": "dynamic-ntk-by-parts", "factor": 2}}, "rope_scaling.type"),
        ({"rope_scaling": {"type": "yarn"}}, "rope_scaling.factor"),
        ({"first_k_dense_replace": 62}, "first_k_dense_replace"),
        ({"num_key_value_heads": 8}, "num_key_value_heads"),
        ({"qk_rope_head_dim": 63}, "qk_rope_head_dim"),
        ({"topk_method": "greedy"}, "topk_method"),
        ({"hidden_size": 0}, "hidden_size"),
    ],
)
def test_invalid_combinations_raise_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        DeepseekV3Config(**real_config_kwargs(**overrides))


def test_auto_config_loads_through_auto_map(tiny_ckpt):
    cfg = AutoConfig.from_pretrained(tiny_ckpt("v3"), trust_remote_code=True)
    assert type(cfg).__name__ == "DeepseekV3Config" and cfg.num_nextn_predict_layers == 1
