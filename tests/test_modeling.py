"""The model against transformers' native DeepseekV3 and against direct reference math."""

import math

import pytest
import torch
import torch.nn.functional as F
from dsv3.convert.tiny import random_tiny_model
from dsv3.modeling_deepseek.configuration_deepseek import DeepseekV3Config
from dsv3.modeling_deepseek.modeling_deepseek import (
    DeepseekV3TopkRouter,
    apply_rope_interleaved,
    rope_inv_freq,
    softmax_scale,
)
from transformers import AutoModelForCausalLM
from transformers import DeepseekV3ForCausalLM as Native

from tests.real_config import REAL_V3_ROPE_PARAMETERS, real_config_kwargs


def _load(path, impl="sdpa"):
    return AutoModelForCausalLM.from_pretrained(
        path, trust_remote_code=True, dtype=torch.float32, attn_implementation=impl
    ).eval()


@pytest.mark.parametrize("preset", ["v3", "moonlight", "kimi"])
def test_logits_and_greedy_tokens_match_transformers_native(tiny_ckpt, preset):
    path = tiny_ckpt(preset)
    ours = _load(path)
    native = Native.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(3, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(ids).logits - native(ids).logits).abs().max().item()
        assert diff <= 1e-4, diff
        a = ours.generate(ids, max_new_tokens=12, do_sample=False)
        b = native.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_decode_matches_prefill(tiny_ckpt, impl):
    model = _load(tiny_ckpt("v3"), impl)
    ids = torch.randint(3, 512, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :8], use_cache=True)
        cache, steps = out.past_key_values, [out.logits]
        for t in range(8, 20, 3):  # chunks of 3 then 1: exercises multi-token decode too
            step = model(ids[:, t : t + 3], past_key_values=cache, use_cache=True)
            steps.append(step.logits)
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-4


def test_cache_stores_only_the_latent(tiny_ckpt):
    model = _load(tiny_ckpt("v3"))
    cfg = model.config
    ids = torch.randint(3, 512, (3, 7), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        # What layer 0 should have cached: c_kv after kv_a_layernorm, and the rope key after RoPE.
        attn = model.model.layers[0].self_attn
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        c_kv, k_rope = attn._compress_kv(x)
        cos, sin = model.model.rotary_emb(torch.arange(7)[None].expand(3, 7))
        k_rope = apply_rope_interleaved(k_rope, cos, sin)
    assert len(cache.layers) == cfg.num_hidden_layers  # the MTP layer caches nothing in plain decoding
    layer = cache.layers[0]
    # One (B, 1, T, C + R) key tensor, c_kv then k_rope, and empty values.
    C, R = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    assert layer.keys.shape == (3, 1, 7, C + R) and layer.values.shape == (3, 1, 7, 0)
    assert torch.allclose(layer.keys[:, 0, :, :C], c_kv, atol=1e-6)
    assert torch.allclose(layer.keys[:, 0, :, C:], k_rope, atol=1e-6)


def test_left_padded_batch_matches_unpadded_rows(tiny_ckpt):
    model = _load(tiny_ckpt("v3"))
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randint(3, 512, (n,), generator=gen) for n in (11, 6, 9)]
    width = max(len(r) for r in rows)
    ids = torch.full((3, width), 2)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=2)
        for i, r in enumerate(rows):
            alone = model(r[None]).logits[0]
            assert (batched[i, width - len(r) :] - alone).abs().max().item() <= 1e-4
            single = model.generate(r[None], max_new_tokens=6, do_sample=False, pad_token_id=2)
            assert torch.equal(out[i, width:], single[0, len(r) :])


def test_eager_and_sdpa_agree(tiny_ckpt):
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a = _load(tiny_ckpt("v3"), "sdpa")(ids).logits
        b = _load(tiny_ckpt("v3"), "eager")(ids).logits
    assert (a - b).abs().max().item() <= 1e-4


def test_sampled_generate_is_reproducible_and_uses_generation_config(tiny_ckpt):
    model = _load(tiny_ckpt("v3"))
    assert model.generation_config.temperature == 0.6 and model.generation_config.top_p == 0.95
    ids = torch.randint(3, 512, (1, 5), generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    a = model.generate(ids, max_new_tokens=10, do_sample=True)
    torch.manual_seed(0)
    b = model.generate(ids, max_new_tokens=10, do_sample=True)
    assert torch.equal(a, b) and a.shape == (1, 15)


def _reference_router(x, weight, bias, cfg):
    # Straight from the report's description, per token, in fp64.
    out_idx, out_w = [], []
    for tok in x.double():
        s = torch.sigmoid(weight.double() @ tok)
        choice = s + bias.double()
        per = cfg.n_routed_experts // cfg.n_group
        groups = choice.view(cfg.n_group, per).sort(-1, descending=True).values[:, :2].sum(-1)
        keep = groups.argsort(descending=True)[: cfg.topk_group]
        allowed = torch.cat([torch.arange(g * per, (g + 1) * per) for g in keep.tolist()])
        ranked = allowed[choice[allowed].argsort(descending=True)][: cfg.num_experts_per_tok]
        w = s[ranked] / s[ranked].sum() * cfg.routed_scaling_factor
        out_idx.append(set(ranked.tolist()))
        out_w.append(dict(zip(ranked.tolist(), w.tolist(), strict=True)))
    return out_idx, out_w


def test_router_matches_reference_and_bias_only_selects_experts():
    cfg = DeepseekV3Config(
        hidden_size=32, n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4
    )
    router = DeepseekV3TopkRouter(cfg)
    gen = torch.Generator().manual_seed(6)
    router.weight.data = torch.randn(16, 32, generator=gen)
    router.e_score_correction_bias.copy_(torch.randn(16, generator=gen) * 0.5)
    x = torch.randn(64, 32, generator=gen)
    idx, w, scores = router(x)
    ref_idx, ref_w = _reference_router(x, router.weight, router.e_score_correction_bias, cfg)
    for t in range(64):
        assert set(idx[t].tolist()) == ref_idx[t]
        for e, wt in zip(idx[t].tolist(), w[t].tolist(), strict=True):
            assert abs(wt - ref_w[t][e]) < 1e-5
    # The bias changes which experts are chosen, never the weights' formula: weights stay the normalised
    # unbiased sigmoid scores of the chosen experts.
    expect = scores.gather(1, idx)
    assert torch.allclose(w, expect / expect.sum(-1, keepdim=True) * cfg.routed_scaling_factor)
    router.e_score_correction_bias.zero_()
    idx0, _, _ = router(x)
    assert not torch.equal(idx0.sort(-1).values, idx.sort(-1).values)


def test_group_mask_uses_minus_inf_not_zero():
    # With a strongly negative bias, every kept expert's choice score is negative; masking dropped groups with 0
    # (the Hub code's bug) would then pick experts from dropped groups.
    cfg = DeepseekV3Config(hidden_size=8, n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=2)
    router = DeepseekV3TopkRouter(cfg)
    router.weight.data.zero_()
    router.e_score_correction_bias.copy_(torch.tensor([-5.0, -5.0, -9, -9, -9, -9, -9, -9]))
    idx, _, _ = router(torch.randn(3, 8))
    assert sorted(idx[0].tolist()) == [0, 1]


def test_moe_dispatch_matches_dense_sum_over_experts():
    model = random_tiny_model("v3", seed=7)
    moe = model.model.layers[1].mlp
    x = torch.randn(2, 9, 256, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        got, aux, load = moe(x)
        x2 = x.view(-1, 256)
        idx, w, _ = moe.gate(x2)
        ref = moe.shared_experts(x2).double()
        for e, expert in enumerate(moe.experts):
            weight_e = (w * (idx == e)).sum(-1, keepdim=True).double()  # 0 for tokens not routed to e
            ref += weight_e * expert(x2).double()
    assert (got.view(-1, 256).double() - ref).abs().max().item() <= 1e-5
    assert aux is None  # eval mode: no balance loss
    assert torch.equal(load, torch.bincount(idx.flatten(), minlength=16))  # tokens per expert, as dispatched


def test_yarn_frequencies_and_softmax_scale_follow_the_reference():
    cfg = DeepseekV3Config(**real_config_kwargs())  # the real V3 numbers
    m = 0.1 * math.log(40) + 1
    assert abs(m - 1.3689) < 1e-4
    assert abs(softmax_scale(cfg) - 192**-0.5 * m**2) < 1e-12
    inv_freq, factor = rope_inv_freq(cfg.rope_parameters, 64)
    assert factor == 1.0
    from transformers import DeepseekV3Config as NativeConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    native_cfg = NativeConfig(rope_parameters=dict(REAL_V3_ROPE_PARAMETERS))
    native_freq, native_factor = ROPE_INIT_FUNCTIONS["yarn"](native_cfg, "cpu")
    assert torch.allclose(inv_freq, native_freq.float(), rtol=1e-6) and native_factor == factor
    # low/high ramp by the reference formula: low = floor(64 ln(4096/(32*2pi)) / (2 ln 1e4)) = 10, high = 23
    base = 10000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    assert torch.allclose(inv_freq[:10].double(), base[:10], rtol=1e-6)  # ramp 0: untouched
    assert torch.allclose(inv_freq[23:].double(), base[23:] / 40, rtol=1e-6)  # ramp 1: interpolated


def test_rope_rotates_interleaved_pairs_like_complex_multiplication():
    x = torch.randn(2, 5, 3, 8)
    angles = torch.randn(2, 5, 1, 4)
    got = apply_rope_interleaved(x, angles.cos(), angles.sin())
    ref = torch.view_as_real(
        torch.view_as_complex(x.view(2, 5, 3, 4, 2)) * torch.polar(torch.ones_like(angles), angles)
    ).flatten(-2)
    assert torch.allclose(got, ref, atol=1e-6)


def test_mtp_loss_is_cross_entropy_of_mtp_head_two_tokens_ahead():
    model = random_tiny_model("v3", seed=9)
    ids = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(10))
    out = model(ids, labels=ids, mtp_loss_weight=0.25)
    # Reference: run the MTP layer by hand: h' = eh_proj([enorm(emb(t_{i+1})); hnorm(h_i)]), block, head.
    with torch.no_grad():
        h = model.model(ids).last_hidden_state
        mtp = model.model.layers[model.config.num_hidden_layers]
        x = mtp.eh_proj(torch.cat([mtp.enorm(mtp.embed_tokens(ids[:, 1:])), mtp.hnorm(h[:, :-1])], -1))
        cos_sin = model.model.rotary_emb(torch.arange(11)[None].expand(2, 11))
        from dsv3.modeling_deepseek.modeling_deepseek import DeepseekV3DecoderLayer, attention_mask_4d

        y = DeepseekV3DecoderLayer.forward(mtp, x, cos_sin, attention_mask_4d(None, 2, 11, 0, x.device)).h_BSD
        logits = mtp.shared_head.head(mtp.shared_head.norm(y))
        # position i predicts token i + 2
        ref = F.cross_entropy(logits[:, :-1].reshape(-1, 512), ids[:, 2:].reshape(-1))
    assert abs(out.mtp_loss.item() - ref.item()) < 1e-5
    lm_ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, 512), ids[:, 1:].reshape(-1))
    assert abs(out.lm_loss.item() - lm_ref.item()) < 1e-5
    assert abs(out.loss.item() - (out.lm_loss + 0.25 * out.mtp_loss).item()) < 1e-5
    out.loss.backward()
    assert mtp.eh_proj.weight.grad is not None and mtp.eh_proj.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(3, 512, (2, 10), generator=torch.Generator().manual_seed(11))
    grads = []
    for ckpt in (False, True):
        model = random_tiny_model("v3", seed=12).train()
        if ckpt:
            model.gradient_checkpointing_enable()
        model(ids, labels=ids).loss.backward()
        grads.append(model.model.layers[0].self_attn.kv_b_proj.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_bf16_dtype_and_device_map_load(tiny_ckpt):
    model = AutoModelForCausalLM.from_pretrained(
        tiny_ckpt("v3"), trust_remote_code=True, dtype=torch.bfloat16, device_map="cpu"
    )
    assert model.model.layers[1].self_attn.kv_b_proj.weight.dtype == torch.bfloat16
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32  # selects in fp32
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()
