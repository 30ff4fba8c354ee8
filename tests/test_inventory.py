"""The real DeepSeek-V3 config on the meta device yields exactly the real checkpoint's tensor inventory."""

import math

import torch
from dsv3.modeling_deepseek.configuration_deepseek import DeepseekV3Config
from dsv3.modeling_deepseek.modeling_deepseek import DeepseekV3ForCausalLM

from tests.real_config import real_config_kwargs

# REFERENCE.md section 2, written out by hand from the header dump (not derived from the config).
ATTENTION = {
    "self_attn.q_a_proj.weight": (1536, 7168),
    "self_attn.q_a_layernorm.weight": (1536,),
    "self_attn.q_b_proj.weight": (24576, 1536),
    "self_attn.kv_a_proj_with_mqa.weight": (576, 7168),
    "self_attn.kv_a_layernorm.weight": (512,),
    "self_attn.kv_b_proj.weight": (32768, 512),
    "self_attn.o_proj.weight": (7168, 16384),
    "input_layernorm.weight": (7168,),
    "post_attention_layernorm.weight": (7168,),
}
DENSE = {
    "mlp.gate_proj.weight": (18432, 7168),
    "mlp.up_proj.weight": (18432, 7168),
    "mlp.down_proj.weight": (7168, 18432),
}
EXPERT = {"gate_proj.weight": (2048, 7168), "up_proj.weight": (2048, 7168), "down_proj.weight": (7168, 2048)}
MTP_EXTRA = {
    "enorm.weight": (7168,),
    "hnorm.weight": (7168,),
    "eh_proj.weight": (7168, 14336),
    "shared_head.norm.weight": (7168,),
    "shared_head.head.weight": (129280, 7168),
    "embed_tokens.weight": (129280, 7168),
}
# Not FP8 on disk (no weight_scale_inv): norms, router, eh_proj, embeddings, heads.
UNQUANTIZED = ("norm", "mlp.gate.", "eh_proj", "embed_tokens", "head")


def real_inventory() -> dict[str, tuple[int, ...]]:
    inv = {
        "model.embed_tokens.weight": (129280, 7168),
        "model.norm.weight": (7168,),
        "lm_head.weight": (129280, 7168),
    }
    for i in range(62):
        p = f"model.layers.{i}."
        inv.update({p + k: v for k, v in ATTENTION.items()})
        if i < 3:
            inv.update({p + k: v for k, v in DENSE.items()})
            continue
        inv[p + "mlp.gate.weight"] = (256, 7168)
        inv[p + "mlp.gate.e_score_correction_bias"] = (256,)
        inv.update({p + "mlp.shared_experts." + k: v for k, v in EXPERT.items()})
        for e in range(256):
            inv.update({p + f"mlp.experts.{e}." + k: v for k, v in EXPERT.items()})
        if i == 61:
            inv.update({p + k: v for k, v in MTP_EXTRA.items()})
    return inv


def test_real_config_state_dict_is_exactly_the_official_inventory():
    config = DeepseekV3Config(**real_config_kwargs(quantization_config=None))
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config)
    got = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    want = real_inventory()
    assert set(got) - set(want) == set() and set(want) - set(got) == set()
    assert got == want

    fp8 = [n for n in want if len(want[n]) == 2 and not any(u in n for u in UNQUANTIZED)]
    # 91,991 tensors on disk = weights + one weight_scale_inv per FP8 weight.
    assert len(got) + len(fp8) == 91_991
    n_params = sum(math.prod(s) for s in got.values())
    assert n_params == 684_489_845_504
    mtp = sum(math.prod(s) for n, s in got.items() if n.startswith("model.layers.61."))
    assert n_params - mtp == 671_026_419_200
    scales = sum(math.ceil(want[n][0] / 128) * math.ceil(want[n][1] / 128) for n in fp8)
    assert scales == 41_540_496 and n_params + scales == 684_531_386_000
    # kv_a_proj_with_mqa is 4.5 blocks tall: its scale has 5 rows, the last block partial.
    assert math.ceil(576 / 128) == 5


def test_real_fp8_config_state_dict_is_the_full_91991_tensor_inventory_with_scales():
    config = DeepseekV3Config(**real_config_kwargs())  # with the FP8 quantization_config, as downloaded
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config)
    sd = model.state_dict()
    want = real_inventory()
    fp8 = [n for n in want if len(want[n]) == 2 and not any(u in n for u in UNQUANTIZED)]
    want.update({n + "_scale_inv": (math.ceil(want[n][0] / 128), math.ceil(want[n][1] / 128)) for n in fp8})
    assert len(sd) == len(want) == 91_991
    assert {n: tuple(t.shape) for n, t in sd.items()} == want
    assert sd["model.layers.61.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (5, 56)
    assert sd["model.layers.5.mlp.experts.7.up_proj.weight"].dtype == torch.float8_e4m3fn
    assert sd["model.layers.61.eh_proj.weight"].dtype != torch.float8_e4m3fn
    assert sum(t.numel() for t in sd.values()) == 684_531_386_000
