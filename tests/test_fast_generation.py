"""Fast generation: absorbed MLA decode, sync-free grouped MoE, static cache + torch.compile, MTP speculative
decoding. Each fast path against the reference path it replaces (and transformers' native DeepseekV3)."""

import importlib
import sys

import pytest
import torch
from dsv3.convert.tiny import random_tiny_model
from dsv3.modeling_deepseek.mla_absorbed import prefer_absorbed, set_mla_path
from dsv3.modeling_deepseek.mtp_decoding import Sampling, _verify, processed_probs
from transformers import AutoModelForCausalLM
from transformers import DeepseekV3ForCausalLM as Native


def _load(path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(
        path, trust_remote_code=True, dtype=torch.float32, **kwargs
    ).eval()


def _left_padded(lengths, seed=3, vocab=512):
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), 2)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = torch.randint(3, vocab, (n,), generator=gen)
        mask[i, width - n :] = 1
    return ids, mask


def _decode_logits(model, ids, mask, prefill):
    # Prefill `prefill` tokens, then decode the rest one token at a time; all logits (B, S, V).
    with torch.no_grad():
        out = model(ids[:, :prefill], attention_mask=mask[:, :prefill], use_cache=True)
        cache, steps = out.past_key_values, [out.logits]
        for t in range(prefill, ids.shape[1]):
            step = model(
                ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache, use_cache=True
            )
            steps.append(step.logits)
    return torch.cat(steps, 1)


# ------------------------------------------------------------------------------------------- absorbed MLA
@pytest.mark.parametrize("prefill", [1, 9, 30])
def test_absorbed_decode_equals_expanded_and_native_with_padding(tiny_ckpt, prefill):
    path = tiny_ckpt("v3")
    ours, native = _load(path), Native.from_pretrained(path, dtype=torch.float32).eval()
    ids, mask = _left_padded([34, 25, 31])
    with torch.no_grad():
        reference = native(ids, attention_mask=mask).logits
    real = mask.bool()
    for path_name in ("absorbed", "expanded"):
        set_mla_path(ours, path_name)
        logits = _decode_logits(ours, ids, mask, prefill)
        assert (logits - reference)[real].abs().max().item() <= 1e-4, path_name


def test_auto_path_absorbs_for_decode_and_expands_for_prefill(tiny_ckpt, monkeypatch):
    model = _load(tiny_ckpt("v3"))
    cfg = model.config
    dims = (
        cfg.num_attention_heads,
        cfg.qk_nope_head_dim,
        cfg.qk_rope_head_dim,
        cfg.v_head_dim,
        cfg.kv_lora_rank,
    )
    assert prefer_absorbed(1, 100, *dims) and prefer_absorbed(2, 100, *dims)  # decode, MTP verification
    assert not prefer_absorbed(100, 100, *dims)  # prefill
    seen = []
    attn_cls = type(model.model.layers[0].self_attn)
    original = attn_cls._absorbed_weights

    def spy(self, S, T, dtype):
        w = original(self, S, T, dtype)
        seen.append((S, w is not None))
        return w

    monkeypatch.setattr(attn_cls, "_absorbed_weights", spy)
    model.generate(torch.randint(3, 512, (1, 12)), max_new_tokens=3, do_sample=False)
    assert seen[0] == (12, False) and all(absorbed for S, absorbed in seen[1:] if S == 1), seen


@pytest.mark.parametrize("lengths", [[34, 25, 31], [30]])
def test_attending_over_a_bucketed_cache_length_masks_the_filler_slots(tiny_ckpt, monkeypatch, lengths):
    # bf16 on CPUs attends over the cache rounded up to a bucket (constant matmul shapes); forced here in fp32,
    # with left padding (masked) and without (no mask), and after a crop leaves stale tokens in the filler.
    model = _load(tiny_ckpt("v3"))
    set_mla_path(model, "absorbed")
    module = sys.modules[type(model.model.layers[0].self_attn).__module__]
    ids, mask = _left_padded(lengths, seed=21)
    exact = _decode_logits(model, ids, mask, 9)
    seen = []

    def bucketed(T, device, dtype):
        seen.append(T)
        return -(-T // 16) * 16

    monkeypatch.setattr(module, "attention_length", bucketed)
    padded = _decode_logits(model, ids, mask, 9)
    assert seen and any(T % 16 for T in seen)
    assert (padded - exact)[mask.bool()].abs().max().item() <= 1e-5
    with torch.no_grad():  # decode 6 tokens, crop them away, decode again: the filler now holds stale tokens
        cache = model(ids[:, :20], attention_mask=mask[:, :20], use_cache=True).past_key_values
        for t in range(20, 26):
            model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache)
        cache.crop(-6)
        layer = cache.layers[0]
        assert torch.count_nonzero(layer._buffers[0][:, :, 20:26]) > 0
        attn = model.model.layers[0].self_attn
        eager = model.config._attn_implementation
        model.config._attn_implementation = "eager"  # also returns the probabilities: T wide, not padded
        try:
            step = model(
                ids[:, 20:21],
                attention_mask=mask[:, :21],
                past_key_values=cache,
                output_attentions=True,
            )
        finally:
            model.config._attn_implementation = eager
    assert step.attentions[0].shape[-1] == 21 and attn is model.model.layers[0].self_attn
    assert (step.logits[:, -1] - exact[:, 20]).abs().max().item() <= 1e-5


def test_absorbed_attention_without_a_mask_ignores_slots_past_the_valid_length():
    from dsv3.modeling_deepseek.mla_absorbed import absorbed_attention

    gen = torch.Generator().manual_seed(22)
    B, S, H, N, R, U, C, T = 2, 1, 4, 8, 4, 8, 16, 11
    q_nope, q_rope = torch.randn(B, S, H, N, generator=gen), torch.randn(B, S, H, R, generator=gen)
    latent = torch.randn(B, T + 5, C + R, generator=gen)
    w_uk, w_uv = torch.randn(H, N, C, generator=gen), torch.randn(H, U, C, generator=gen)
    out, probs = absorbed_attention(q_nope, q_rope, latent[:, :T], w_uk, w_uv, None, 0.3)
    out_p, probs_p = absorbed_attention(q_nope, q_rope, latent, w_uk, w_uv, None, 0.3, valid=T)
    assert probs_p.shape == probs.shape and torch.allclose(out_p, out, atol=1e-6)


@pytest.mark.parametrize(
    "B, S, T, masked, valid, threads",
    [
        (1, 1, 37, False, None, 1),  # one decode step, one kernel call
        (3, 1, 50, True, 41, 1),  # left padding + filler slots past the valid length
        (2, 2, 29, True, None, 1),  # MTP verification: two query positions, causal among them
        (1, 1, 2048, False, 2000, 4),  # long cache split into 4 chunks merged by log-sum-exp
        (2, 1, 1024, True, 1000, 4),  # 2 chunks; row 0's padding covers all of its first chunk
        (1, 1, 2051, False, None, 4),  # 4 chunks that overlap by 3 slots (a static cache of any length)
        (1, 1, 1027, True, 1020, 2),  # 2 chunks overlapping by a slot; padding; filler past the valid length
    ],
)
def test_fused_absorbed_attention_equals_the_reference_form(B, S, T, masked, valid, threads):
    from dsv3.modeling_deepseek import mla_absorbed

    gen = torch.Generator().manual_seed(23)
    H, N, R, U, C = 4, 8, 4, 8, 16
    q_nope = torch.randn(B, S, H, N, generator=gen, dtype=torch.float64)
    q_rope = torch.randn(B, S, H, R, generator=gen, dtype=torch.float64)
    latent = torch.randn(B, T, C + R, generator=gen, dtype=torch.float64)
    w_uk = torch.randn(H, N, C, generator=gen, dtype=torch.float64)
    w_uv = torch.randn(H, U, C, generator=gen, dtype=torch.float64)
    seen = valid or T
    mask = None
    if masked:  # row b starts after 7 * b + (b > 0) * 600 padding slots (capped), causal over the S new slots
        keep = torch.ones(B, 1, S, seen, dtype=torch.bool)
        for b in range(B):
            keep[b, :, :, : min(7 * b + 600 * (b > 0), seen - S - 1)] = False
        keep[..., seen - S :] &= torch.ones(S, S, dtype=torch.bool).tril()
        mask = keep
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        chunks = mla_absorbed.kv_chunks(B, S, T)
        fused = mla_absorbed.fused_absorbed_attention(q_nope, q_rope, latent, w_uk, w_uv, mask, 0.3, valid)
    finally:
        torch.set_num_threads(threads_before)
    assert chunks == (threads // B if T >= 1024 else 1)
    reference, _ = mla_absorbed.absorbed_attention(q_nope, q_rope, latent, w_uk, w_uv, mask, 0.3, 0.0, valid)
    assert fused.shape == reference.shape == (B, S, H, U)
    assert (fused - reference).abs().max().item() <= 1e-10


def test_decode_attends_in_one_fused_kernel_call_per_layer(tiny_ckpt):
    from torch.profiler import ProfilerActivity, profile

    model = _load(tiny_ckpt("v3"))
    ids, mask = _left_padded([20, 14])
    with torch.no_grad():
        cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(ids[:, -1:], attention_mask=torch.cat([mask, mask[:, -1:]], 1), past_key_values=cache)
    counts = {event.key: event.count for event in prof.key_averages()}
    layers = model.config.num_hidden_layers
    assert counts.get("aten::_scaled_dot_product_flash_attention_for_cpu") == layers, counts
    assert "aten::_softmax" not in counts, counts  # no scores or probabilities materialised


def test_prefill_attention_runs_torchs_fused_cpu_kernel(tiny_ckpt):
    # Value heads (64) narrower than query/key heads (128) would send SDPA to its unfused math path.
    from torch.profiler import ProfilerActivity, profile

    model = _load(tiny_ckpt("v3"))
    assert model.config.v_head_dim < model.config.qk_nope_head_dim + model.config.qk_rope_head_dim
    ids, mask = _left_padded([40, 33])
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(ids, attention_mask=mask)
    names = {event.key for event in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names and "aten::_softmax" not in names, (
        names
    )


def test_blocked_prefill_attention_equals_sdpa_over_several_blocks_of_query_rows(monkeypatch):
    from dsv3.modeling_deepseek import cpu_attention
    from dsv3.modeling_deepseek.modeling_deepseek import attention_mask_4d

    gen = torch.Generator().manual_seed(5)
    B, H, S, d, U = 2, 3, 50, 16, 8
    q, k = (torch.randn(B, H, S, d, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, H, S, U, generator=gen, dtype=torch.float64)
    _, padding = _left_padded([50, 37])
    mask = attention_mask_4d(padding, B, S, 0, q.device)
    monkeypatch.setattr(cpu_attention, "SCORE_BLOCK", 16 * B * H * S)  # 16 query rows per block: 4 blocks
    out = cpu_attention.blocked_attention(q, k, v, mask, 0.3)
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    assert out.shape == (B, H, S, U)
    assert (out - reference).abs().max().item() <= 1e-12


def test_blocked_prefill_attention_is_chosen_for_16_bit_inference_on_cpus_without_amx(monkeypatch):
    from dsv3.modeling_deepseek import cpu_attention

    q = torch.zeros(1, 2, 4, 8, dtype=torch.bfloat16)
    monkeypatch.setattr(cpu_attention, "has_amx", lambda: False)
    assert cpu_attention.blocked_attention_pays(q) and cpu_attention.blocked_attention_pays(q.half())
    assert not cpu_attention.blocked_attention_pays(q.float())
    assert not cpu_attention.blocked_attention_pays(q.clone().requires_grad_())  # training keeps SDPA
    monkeypatch.setattr(cpu_attention, "has_amx", lambda: True)  # the fused kernel runs on AMX tiles
    assert not cpu_attention.blocked_attention_pays(q)


def test_bf16_prefill_with_blocked_attention_is_as_close_to_fp32_as_with_the_fused_kernel(
    tiny_ckpt, monkeypatch
):
    from torch.profiler import ProfilerActivity, profile

    ids, mask = _left_padded([40, 33])
    real = mask.bool()
    with torch.no_grad():
        reference = _load(tiny_ckpt("v3"))(ids, attention_mask=mask).logits[real]
    model = AutoModelForCausalLM.from_pretrained(
        tiny_ckpt("v3"), trust_remote_code=True, dtype=torch.bfloat16
    )
    modeling = sys.modules[type(model.eval()).__module__]
    error = {}
    for blocked in (True, False):
        monkeypatch.setattr(modeling, "blocked_attention_pays", lambda q, blocked=blocked: blocked)
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            logits = model(ids, attention_mask=mask).logits.float()[real]
        flash = "aten::_scaled_dot_product_flash_attention_for_cpu" in {e.key for e in prof.key_averages()}
        assert flash != blocked
        error[blocked] = (logits - reference).abs().max().item()
        assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9
    # bf16 rounding through a random model: both ~25% of the largest logit here; blocked is no worse.
    assert error[True] <= 1.5 * error[False], error


def test_absorbed_matrices_are_derived_never_saved_and_follow_weight_changes():
    model = random_tiny_model("v3")
    keys = set(model.state_dict())
    ids = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(5))
    attn = model.model.layers[0].self_attn

    def decode_diff():
        set_mla_path(model, "absorbed")
        a = _decode_logits(model, ids, torch.ones_like(ids), 6)
        set_mla_path(model, "expanded")
        b = _decode_logits(model, ids, torch.ones_like(ids), 6)
        return (a - b).abs().max().item()

    assert decode_diff() <= 1e-4
    with torch.no_grad():  # an optimizer-like in-place step on kv_b_proj
        attn.kv_b_proj.weight.mul_(1.5)
    assert decode_diff() <= 1e-4
    model.to(torch.float64)  # a cast: the absorbed form follows the new dtype
    assert decode_diff() <= 1e-9
    assert set(model.state_dict()) == keys


def test_absorbed_decode_on_kept_fp8_weights_uses_the_dequantized_kv_b(tmp_path):
    from dsv3.convert.tiny import build_tiny

    path = build_tiny(tmp_path / "fp8", "v3", fp8=True)
    model = _load(path, fp8_mode="keep")
    assert type(model.model.layers[0].self_attn.kv_b_proj).__name__ == "FP8Linear"
    ids = torch.randint(3, 512, (2, 14), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    set_mla_path(model, "absorbed")
    a = _decode_logits(model, ids, mask, 5)
    assert model.model.layers[0].self_attn._absorbed_cache is not None
    set_mla_path(model, "expanded")
    b = _decode_logits(model, ids, mask, 5)
    assert (a - b).abs().max().item() <= 1e-4


def test_greedy_generation_identical_on_both_attention_paths(tiny_ckpt):
    model = _load(tiny_ckpt("v3"))
    ids, mask = _left_padded([10, 6, 9], seed=4)
    outs = []
    for name in ("absorbed", "expanded"):
        set_mla_path(model, name)
        outs.append(
            model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=2)
        )
    assert torch.equal(*outs)


# ------------------------------------------------------------------------------------------- grouped MoE
def test_grouped_moe_equals_per_expert_loop_and_keeps_the_experts_as_parameters():
    model = random_tiny_model("v3")
    ids = torch.randint(3, 512, (3, 16), generator=torch.Generator().manual_seed(7))
    loop = model(ids).logits.detach()  # grad enabled: the per-expert loop (training path)
    with torch.no_grad():
        grouped = model(ids).logits
    assert (loop - grouped).abs().max().item() <= 1e-5
    moe = model.model.layers[1].mlp
    stack = moe._expert_stack.stacks[0]
    assert all(e.gate_proj.weight.data_ptr() == stack[i].data_ptr() for i, e in enumerate(moe.experts))
    assert "model.layers.1.mlp.experts.3.gate_proj.weight" in model.state_dict()
    assert not any("stack" in k for k in model.state_dict())


def test_grouped_moe_decode_step_never_reads_tensors_on_the_host(tiny_ckpt, monkeypatch):
    from torch.overrides import TorchFunctionMode

    host_reads = {"tolist", "item", "nonzero", "__bool__", "__int__", "__index__", "bincount"}

    class Spy(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls, self.in_kernel = [], False

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in host_reads and not self.in_kernel:
                self.calls.append(func.__name__)
            return func(*args, **(kwargs or {}))

    model = _load(tiny_ckpt("v3"))
    moe = model.model.layers[1].mlp
    # Routing and dispatch must not read device tensors; the expert kernel itself may, on CPUs only (it reads the
    # group offsets, already in host memory; on GPUs torch's grouped matmul keeps them on the device).
    grouped = importlib.import_module(type(model).__module__.rpartition(".")[0] + ".moe_grouped")
    kernel, kernel_calls = grouped._grouped_mlp_impl, []

    def spied_kernel(*args):
        kernel_calls.append(args[0].device.type)
        spy.in_kernel = True
        try:
            return kernel(*args)
        finally:
            spy.in_kernel = False

    monkeypatch.setattr(grouped, "_grouped_mlp_impl", spied_kernel)
    x = torch.randn(2, 1, model.config.hidden_size)
    spy = Spy()
    with torch.no_grad():
        expected = moe(x)[0]  # first call builds the stack
        with spy:
            got = moe(x)[0]
    assert spy.calls == [] and kernel_calls == ["cpu", "cpu"] and torch.allclose(got, expected)


def test_grouped_moe_restacks_after_a_cast_and_the_model_still_saves_and_reloads(tiny_ckpt, tmp_path):
    model = _load(tiny_ckpt("v3"))
    ids = torch.randint(3, 512, (2, 10), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        model(ids)
        model.to(torch.float64).to(torch.float32)  # new storages: the stack must be rebuilt, not trusted
        expected = model(ids).logits
    moe = model.model.layers[1].mlp
    assert moe.experts[5].up_proj.weight.data_ptr() == moe._expert_stack.stacks[1][5].data_ptr()
    model.save_pretrained(tmp_path / "saved")
    with torch.no_grad():
        again = _load(tmp_path / "saved")(ids).logits
    assert (again - expected).abs().max().item() <= 1e-5


def test_moe_keeps_the_per_expert_path_when_an_expert_is_hooked(tiny_ckpt):
    model = _load(tiny_ckpt("v3"))
    seen = []
    model.model.layers[1].mlp.experts[0].gate_proj.register_forward_hook(
        lambda m, i, o: seen.append(i[0].shape)
    )
    with torch.no_grad():
        model(torch.arange(3, 200).view(1, -1))
    assert seen  # calibration hooks (GPTQ) still see their expert's inputs


# ------------------------------------------------------------------------------------------- latent cache
def test_latent_cache_appends_in_place_and_survives_crop_and_reordering():
    from dsv3.modeling_deepseek.latent_cache import LatentCache

    cache, gen = LatentCache(), torch.Generator().manual_seed(16)
    steps = [torch.randn(2, 1, n, 8, generator=gen) for n in (5, 1, 1, 3)]
    for k in steps:
        keys, values = cache.update(k, k[..., :2], 0)
    expected = torch.cat(steps, 2)
    assert torch.equal(keys, expected) and torch.equal(values, expected[..., :2])
    buffer = cache.layers[0]._buffers[0]
    assert keys.data_ptr() == buffer.data_ptr()  # a view: no copy of the cached tokens per step
    cache.crop(-2)
    assert cache.get_seq_length() == 8
    cache.batch_select_indices(torch.tensor([1]))  # replaced by a new tensor: adopted on the next update
    new = torch.randn(1, 1, 1, 8, generator=gen)
    keys, _ = cache.update(new, new[..., :2], 0)
    assert torch.equal(keys, torch.cat([expected[1:, :, :8], new], 2))


def test_default_generate_cache_gives_the_same_beams_and_samples_as_a_dynamic_cache(tiny_ckpt):
    from transformers import DynamicCache

    model = _load(tiny_ckpt("v3"))
    ids, mask = _left_padded([7, 5], seed=17)
    for kwargs in (dict(num_beams=3, do_sample=False), dict(do_sample=True)):
        runs = []
        for cache in (None, DynamicCache()):
            extra = {} if cache is None else {"past_key_values": cache}
            torch.manual_seed(0)
            runs.append(
                model.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=2, **kwargs, **extra)
            )
        assert torch.equal(*runs), kwargs


# --------------------------------------------------------------------------------- static cache + compile
def test_static_cache_generation_equals_dynamic_cache(tiny_ckpt):
    model = _load(tiny_ckpt("v3"))
    ids, mask = _left_padded([9, 5], seed=9)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=2)
    dynamic = model.generate(ids, **kwargs)
    static = model.generate(ids, cache_implementation="static", **kwargs)
    assert torch.equal(dynamic, static)


def test_decode_step_on_a_static_cache_traces_without_graph_breaks(tiny_ckpt):
    from transformers import StaticCache

    model = _load(tiny_ckpt("v3"))
    ids = torch.randint(3, 512, (2, 6), generator=torch.Generator().manual_seed(10))
    cache = StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():
        tok = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        explained = torch._dynamo.explain(lambda t: model(t, past_key_values=cache, use_cache=True).logits)(
            tok
        )
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_decode_step_matches_eager(tiny_ckpt, monkeypatch, dtype):
    # Under torch.compile on a CPU, decode computes the routed experts as gathered reductions and (bf16, one row)
    # the linears as reductions (row_linear.py): the same sums in another order.
    from transformers import StaticCache

    path = tiny_ckpt("v3")
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=dtype).eval()
    moe = importlib.import_module(f"{type(model).__module__.rpartition('.')[0]}.moe_grouped")
    gathered, real = [], moe._gathered_experts

    def spy(*args):
        gathered.append(1)
        return real(*args)

    monkeypatch.setattr(moe, "_gathered_experts", spy)
    ids = torch.randint(3, 512, (1, 6), generator=torch.Generator().manual_seed(10))
    runs = []
    for m, compiled in ((model, False), (model, True), (_load(path), False)):
        cache = StaticCache(config=m.config, max_cache_len=16)
        with torch.no_grad():
            tok = m(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)

            def step(t, m=m, cache=cache):
                return m(t, past_key_values=cache, use_cache=True).logits

            runs.append((torch.compile(step) if compiled else step)(tok).float())
    eager, compiled, fp32 = runs
    assert gathered  # the compiled graph took the gathered-experts path
    if dtype == torch.float32:
        assert (compiled - eager).abs().max().item() <= 1e-4
    else:  # as close to the fp32 model as eager bf16 is
        eager_error = (eager - fp32).abs().max().item()
        assert 0 < (compiled - fp32).abs().max().item() <= 2 * eager_error, eager_error


def test_decode_over_a_static_cache_of_odd_length_splits_it_across_threads_eager_and_compiled(
    tiny_ckpt, monkeypatch
):
    # generate sizes a static cache to prompt + new tokens, whatever that is: 1027 slots do not divide into the
    # 2 chunks that 2 threads attend to (flash-decoding), so the chunks overlap by a slot only one of them attends to.
    from transformers import StaticCache

    path = tiny_ckpt("v3")
    model = _load(path)
    absorbed = importlib.import_module(f"{type(model).__module__.rpartition('.')[0]}.mla_absorbed")
    chunks, real = [], absorbed.kv_chunks
    monkeypatch.setattr(absorbed, "kv_chunks", lambda *a: chunks.append(real(*a)) or chunks[-1])
    ids = torch.randint(3, 512, (1, 600), generator=torch.Generator().manual_seed(11))  # past the overlap
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = []
        for compiled, slots in ((False, None), (False, 1027), (True, 1027)):
            cache = StaticCache(config=model.config, max_cache_len=slots) if slots else None
            with torch.no_grad():
                out = model(ids, past_key_values=cache, use_cache=True)
                cache = cache if cache is not None else out.past_key_values  # the dynamic cache it made
                tok = out.logits[:, -1:].argmax(-1)

                def step(t, cache=cache):
                    return model(t, past_key_values=cache, use_cache=True).logits

                runs.append((torch.compile(step) if compiled else step)(tok))
    finally:
        torch.set_num_threads(threads)
    dynamic, static, compiled = runs
    assert 2 in chunks  # the static cache's decode steps ran split in two
    assert (static - dynamic).abs().max().item() <= 1e-5
    assert (compiled - dynamic).abs().max().item() <= 1e-4


def test_compiled_single_row_linear_normalises_its_input_once_not_once_per_output_row():
    # Inductor would inline the RMSNorm that feeds a row_linear into the reduction that reads it, recomputing it for
    # every output row (a 16k-row head recomputed the final norm 16k times: 2x slower). row_linear.materialized
    # makes it write the normalised row to a buffer first.
    import re

    from dsv3.modeling_deepseek.modeling_deepseek import DeepseekV3RMSNorm
    from dsv3.modeling_deepseek.row_linear import row_linear
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 1024, bias=False).to(torch.bfloat16)
    norm = DeepseekV3RMSNorm(64).to(torch.bfloat16)
    x = torch.randn(1, 1, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        out, code = run_and_get_code(torch.compile(lambda x: row_linear(linear, norm(x))), x)
        expected = linear(norm(x))
    assert (out.float() - expected.float()).abs().max().item() <= 0.02
    loops = "\n".join(code).split("#pragma omp for")[1:]
    # The parallel loop over the 1024 output rows, one row per iteration (a reduction over the 64 inputs).
    rows = [
        loop
        for loop in loops
        if re.search(r"x0<static_cast<int64_t>\(1024L\); x0\+=static_cast<int64_t>\(1L\)", loop)
    ]
    assert len(rows) == 1 and "tmp_acc" in rows[0], code
    assert "sqrt" not in rows[0].split("#pragma omp")[0]


def test_eager_prefill_prepares_the_absorbed_weights_that_compiled_decode_steps_only_read(tiny_ckpt):
    # Prefill takes the expanded path; it still fills the absorbed-weights cache, so that a compiled decode step
    # reads it instead of slicing and copying W_UK / W_UV from kv_b_proj inside the graph at every step.
    from transformers import StaticCache

    model = _load(tiny_ckpt("v3"))
    attentions = [layer.self_attn for layer in model.model.layers[: model.config.num_hidden_layers]]
    ids = torch.randint(3, 512, (1, 24), generator=torch.Generator().manual_seed(10))
    cache = StaticCache(config=model.config, max_cache_len=32)
    a = attentions[0]
    assert not prefer_absorbed(24, 32, a.n_heads, a.nope_dim, a.rope_dim, a.v_dim, a.kv_rank)
    with torch.no_grad():
        tok = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        prepared = [attn._absorbed_cache[1] for attn in attentions]
        assert all(w.is_contiguous() for pair in prepared for w in pair)
        torch.compile(lambda t: model(t, past_key_values=cache, use_cache=True).logits)(tok)
    assert all(attn._absorbed_cache[1] is pair for attn, pair in zip(attentions, prepared, strict=True))


def test_compiled_generation_without_module_guards_still_reads_weights_updated_in_place(tiny_ckpt):
    # dsv3.generate.compile_config() skips Dynamo's guards on module attributes; tensors must still be read afresh
    # at every step, so an in-place weight update (an optimizer step) shows in the next compiled generation.
    from dsv3.generate import compile_config

    model = _load(tiny_ckpt("v3"))
    ids = torch.randint(3, 512, (1, 8), generator=torch.Generator().manual_seed(21))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=2, cache_implementation="static")

    def both():
        eager = model.generate(ids, **kwargs)
        compiled = model.generate(ids, compile_config=compile_config(), **kwargs)
        return eager, compiled

    with torch.no_grad():
        eager, compiled = both()
        assert torch.equal(eager, compiled) and hasattr(
            model, "_compiled_call"
        )  # transformers compiled the step
        model.lm_head.weight.copy_(model.lm_head.weight.flip(0))  # in place: same tensor, other tokens win
        eager_after, compiled_after = both()
    assert not torch.equal(eager_after, eager) and torch.equal(compiled_after, eager_after)


# ------------------------------------------------------------------------------------ MTP speculative decoding
def _by_position(sequences, mask):
    # Each row's tokens by RoPE position (the prompt without its padding, then the continuation), zero-padded at
    # the end to a common width plus room for drafts past the end.
    W = mask.shape[1]
    rows = [torch.cat([r[:W][m.bool()], r[W:]]) for r, m in zip(sequences, mask, strict=True)]
    return torch.nn.functional.pad(torch.nn.utils.rnn.pad_sequence(rows, batch_first=True), (0, 4))


def _oracle_drafter(monkeypatch, model, truth_BN, wrong_every):
    """Replace the MTP drafter's output by the true next-next token of each row (from a plain greedy run), except
    at every `wrong_every`-th (position + row), where it drafts a wrong token: accepts and rejects mix across rows
    and steps, as a trained MTP head's would, while the real drafter's cache bookkeeping still runs."""
    # The model runs its checkpoint's copy of the remote code: patch that copy's mtp_decoding.
    package = type(model).__module__.rpartition(".")[0]
    drafter = importlib.import_module(f"{package}.mtp_decoding")._Drafter
    real_call = drafter.__call__

    def call(self, h_BSD, next_ids_BS, pos_BS, mask_BT):
        if h_BSD.shape[-1] == 2:  # a chained draft step gets the position carrier below back as its input
            h_BSD = h_BSD.new_zeros(*h_BSD.shape[:2], model.config.hidden_size)
        real_call(self, h_BSD, next_ids_BS, pos_BS, mask_BT)
        return pos_BS[..., None].float().expand(*pos_BS.shape, 2)  # carries the position to `logits`

    def logits(self, h_BD):
        pos_B = h_BD[:, 0].long()
        rows = torch.arange(len(pos_B))
        want = truth_BN[rows, (pos_B + 2).clamp(max=truth_BN.shape[1] - 1)]
        wrong = (pos_B + rows) % wrong_every == 0
        out = torch.full((len(pos_B), 512), -1e4)
        out[rows, torch.where(wrong, (want + 1) % 512, want)] = 0.0
        return out

    monkeypatch.setattr(drafter, "__call__", call)
    monkeypatch.setattr(drafter, "logits", logits)


@pytest.mark.parametrize("lengths", [[13], [13, 6, 9, 11]])
def test_mtp_greedy_output_is_identical_to_plain_greedy(tiny_ckpt, monkeypatch, lengths):
    model = _load(tiny_ckpt("v3"))
    model.generation_config.eos_token_id = None  # random weights: run the full length
    ids, mask = _left_padded(lengths, seed=11)
    kwargs = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=2)
    plain = model.generate(ids, **kwargs)
    assert torch.equal(model.generate(ids, use_mtp=True, **kwargs), plain)  # the real (untrained) head
    _oracle_drafter(monkeypatch, model, _by_position(plain, mask), wrong_every=3)
    drafter = importlib.import_module(f"{type(model).__module__.rpartition('.')[0]}.mtp_decoding")._Drafter
    real_drafts, drafted = drafter.drafts, []

    def counted(self, *args):
        drafted.append(1)
        return real_drafts(self, *args)

    monkeypatch.setattr(drafter, "drafts", counted)
    assert torch.equal(model.generate(ids, use_mtp=True, **kwargs), plain)
    stats = model.last_mtp_stats
    assert 0.4 < stats.acceptance < 0.9 and stats.steps < 16, stats
    assert len(drafted) == stats.steps  # one set of drafts per verification, none after the last one


@pytest.mark.parametrize("lengths", [[13], [13, 6, 9, 11]])
def test_chained_mtp_drafts_keep_greedy_output_identical(tiny_ckpt, monkeypatch, lengths):
    # Three drafts per step, the MTP module chained on its own output: accepted prefixes of every length 0..3
    # across rows and steps (the oracle is wrong at every 5th position), holes of different widths per row.
    model = _load(tiny_ckpt("v3"))
    model.generation_config.eos_token_id = None
    ids, mask = _left_padded(lengths, seed=16)
    kwargs = dict(attention_mask=mask, max_new_tokens=17, do_sample=False, pad_token_id=2)
    plain = model.generate(ids, **kwargs)
    assert torch.equal(model.generate(ids, use_mtp=True, num_speculative_tokens=3, **kwargs), plain)
    _oracle_drafter(monkeypatch, model, _by_position(plain, mask), wrong_every=5)
    assert torch.equal(model.generate(ids, use_mtp=True, num_speculative_tokens=3, **kwargs), plain)
    stats = model.last_mtp_stats
    assert stats.draft_tokens == 3 and 1.5 < stats.accepted_per_step < 3 and stats.steps < 9, stats
    with pytest.raises(ValueError, match="num_speculative_tokens must be an integer >= 1"):
        model.generate(ids, use_mtp=True, num_speculative_tokens=0, **kwargs)


def test_mtp_stops_rows_at_end_of_sequence_like_plain_generate(tiny_ckpt, monkeypatch):
    model = _load(tiny_ckpt("v3"))
    ids, mask = _left_padded([8, 5, 7], seed=12)
    model.generation_config.eos_token_id = None
    free = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=2)
    eos = int(free[1, ids.shape[1] + 4])  # row 1 produces this token at step 5: make it the end of sequence
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=2, eos_token_id=eos)
    plain = model.generate(ids, **kwargs)
    _oracle_drafter(monkeypatch, model, _by_position(free, mask), wrong_every=4)
    assert torch.equal(model.generate(ids, use_mtp=True, **kwargs), plain)
    # With chained drafts the end of sequence can sit inside an accepted run: nothing after it is emitted.
    assert torch.equal(model.generate(ids, use_mtp=True, num_speculative_tokens=3, **kwargs), plain)


def test_speculative_sampling_emits_the_target_distribution():
    # Standard speculative sampling: whatever the draft distribution Q, the first emitted token follows P.
    gen = torch.Generator().manual_seed(13)
    V, N = 6, 200_000
    p_logits, q_logits = torch.randn(V, generator=gen) * 2, torch.randn(V, generator=gen) * 2
    s = Sampling(do_sample=True)
    q = processed_probs(q_logits[None], s).expand(N, V)
    torch.manual_seed(0)
    draft = torch.multinomial(q, 1)[:, 0]
    logits = torch.stack([p_logits, p_logits], 0)[None].expand(N, 2, V)
    accepted, final = _verify(logits, draft[:, None], q[:, None], s)
    first = torch.where(accepted == 1, draft, final)
    empirical = torch.bincount(first, minlength=V).float() / N
    assert (empirical - processed_probs(p_logits[None], s)[0]).abs().max().item() < 0.006
    expected_acceptance = torch.minimum(q[0], processed_probs(p_logits[None], s)[0]).sum().item()
    assert abs(accepted.float().mean().item() - expected_acceptance) < 0.006


def test_chained_speculative_sampling_emits_the_target_distribution_at_every_depth():
    # Two drafts per step: the first emitted token follows P_0 and, when the first draft was accepted, the second
    # follows P_1 (the draft d_2 if it was accepted too, else the correction), whatever Q_1 and Q_2 are.
    gen = torch.Generator().manual_seed(21)
    V, N = 5, 200_000
    p_logits = torch.randn(3, V, generator=gen) * 2  # P_0, P_1, P_2 (the bonus distribution)
    q_logits = torch.randn(2, V, generator=gen) * 2
    s = Sampling(do_sample=True)
    q_KV = processed_probs(q_logits, s)
    torch.manual_seed(1)
    drafts = torch.stack([torch.multinomial(q_KV[k].expand(N, V), 1)[:, 0] for k in range(2)], 1)
    accepted, final = _verify(p_logits[None].expand(N, 3, V), drafts, q_KV[None].expand(N, 2, V), s)
    p_JV = processed_probs(p_logits, s)
    first = torch.where(accepted >= 1, drafts[:, 0], final)
    assert (torch.bincount(first, minlength=V).float() / N - p_JV[0]).abs().max().item() < 0.006
    deeper = accepted >= 1
    second = torch.where(accepted[deeper] == 2, drafts[deeper, 1], final[deeper])
    assert (torch.bincount(second, minlength=V).float() / deeper.sum() - p_JV[1]).abs().max().item() < 0.01
    assert 0 < (accepted == 2).float().mean() < (accepted >= 1).float().mean() < 1


def test_processed_probs_match_transformers_warpers():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(14)) * 3
    scores = TemperatureLogitsWarper(0.7)(None, logits.clone())
    scores = TopPLogitsWarper(0.8)(None, TopKLogitsWarper(20)(None, scores))
    ours = processed_probs(logits, Sampling(True, 0.7, 20, 0.8))
    assert torch.allclose(ours, scores.softmax(-1), atol=1e-6)


def test_mtp_sampling_is_reproducible_and_rejects_unsupported_settings(tiny_ckpt):
    model = _load(tiny_ckpt("v3"))
    ids, mask = _left_padded([7, 4], seed=15)
    for k in (1, 3):
        runs = []
        for _ in range(2):
            torch.manual_seed(0)
            kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=20)
            runs.append(model.generate(ids, use_mtp=True, num_speculative_tokens=k, **kwargs))
        assert torch.equal(*runs) and runs[0].shape == (2, ids.shape[1] + 6)
        assert model.last_mtp_stats.draft_tokens == k
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=2, use_mtp=True)
    with pytest.raises(ValueError, match="cache_implementation='static' is not supported"):
        model.generate(
            ids, attention_mask=mask, max_new_tokens=4, cache_implementation="static", use_mtp=True
        )


def test_mtp_without_an_mtp_module_is_a_clear_error(tiny_ckpt):
    model = _load(tiny_ckpt("moonlight"))
    with pytest.raises(ValueError, match="num_nextn_predict_layers"):
        model.generate(torch.randint(3, 512, (1, 5)), max_new_tokens=3, use_mtp=True)


def test_generate_command_with_chained_mtp_drafts_prints_the_plain_greedy_text(tiny_ckpt):
    from dsv3.generate import run_generation

    path = tiny_ckpt("v3")
    plain = run_generation(path, "The quick brown fox", max_new_tokens=9)
    mtp = run_generation(path, "The quick brown fox", max_new_tokens=9, mtp=True, draft_tokens=2)
    assert mtp.text == plain.text and mtp.mtp.draft_tokens == 2
    assert "2 per step" in mtp.summary() and "tokens per row per step" in mtp.summary()
    with pytest.raises(ValueError, match="--draft-tokens: must be at least 1, got 0"):
        run_generation(path, "hi", mtp=True, draft_tokens=0)


def test_generate_command_compiled_prints_the_eager_text_and_times_only_the_second_run(tiny_ckpt):
    from typer.testing import CliRunner

    from dsv3.cli import app
    from dsv3.generate import run_generation

    path = tiny_ckpt("v3")
    plain = run_generation(path, "The quick brown fox", max_new_tokens=7)
    result = CliRunner().invoke(
        app, ["generate", str(path), "--prompt", "The quick brown fox", "--max-new-tokens", "7", "--compile"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == plain.text.strip()
    assert "static cache, compiled: warm-up and compilation took" in result.stderr
    with pytest.raises(ValueError, match="--compile: MTP decoding does not run on the static cache yet"):
        run_generation(path, "hi", mtp=True, compile=True)


# ------------------------------------------------------------------------------------------------------ memory
def _mapped_rss(path) -> int:
    # Resident bytes of this process's mappings of `path` (kB lines of /proc/self/smaps).
    total, current = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and ":" not in head[0]:
                current = line.rstrip("\n").endswith(str(path))
            elif current and line.startswith("Rss:"):
                total += int(head[1]) * 1024
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_dropping_file_pages_releases_clean_ones_keeps_written_ones_and_never_touches_anonymous_memory(
    tmp_path,
):
    from dsv3.modeling_deepseek.moe_grouped import drop_file_pages

    data = torch.randint(0, 256, (64 * 4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "blob.bin"
    path.write_bytes(data.numpy().tobytes())
    mapped = torch.from_file(str(path), shared=False, size=data.numel(), dtype=torch.uint8)
    assert int(mapped.sum()) == int(data.sum())  # every page read
    before = _mapped_rss(path)
    assert before >= 60 * 4096
    with torch.no_grad():
        mapped[: 8 * 4096] += 1  # a write: those pages become private copies, which must survive
    expected = data.clone()
    expected[: 8 * 4096] += 1
    released = drop_file_pages([(mapped.data_ptr(), mapped.data_ptr() + mapped.nbytes)])
    assert 48 * 4096 <= released <= 57 * 4096 and _mapped_rss(path) <= before - released + 4096
    assert torch.equal(mapped, expected)  # the rest read back from the file
    heap = data.clone()
    assert drop_file_pages([(heap.data_ptr(), heap.data_ptr() + heap.nbytes)]) == 0
    assert torch.equal(heap, data)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_converted_loads_and_stacked_experts_release_their_shard_pages_but_never_another_models(tmp_path):
    from dsv3.convert.tiny import build_tiny

    src = build_tiny(tmp_path / "bf16", "v3", fp8=False)
    shards = sorted(src.glob("*.safetensors"))
    ids = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(5))
    # A zero-copy BF16 model, changed in place after loading (its changed pages are private copies).
    first = AutoModelForCausalLM.from_pretrained(src, trust_remote_code=True, dtype=torch.bfloat16).eval()
    router = first.model.layers[1].mlp.gate.weight
    assert not router.untyped_storage().resizable()  # a view of the mapped shard
    with torch.no_grad():
        router.add_(1.0)
    changed = router.detach().clone()
    # An fp32 load of the same files converts every tensor: its own mappings are released, the first model's not.
    second = AutoModelForCausalLM.from_pretrained(src, trust_remote_code=True, dtype=torch.float32).eval()
    assert torch.equal(first.model.layers[1].mlp.gate.weight, changed)
    resident = sum(_mapped_rss(s) for s in shards)
    with torch.no_grad():
        first(ids)  # stacks the first model's experts and releases their pages in the mapping
        assert sum(_mapped_rss(s) for s in shards) <= resident
        assert torch.equal(first.model.layers[1].mlp.gate.weight, changed)
        third = AutoModelForCausalLM.from_pretrained(src, trust_remote_code=True, dtype=torch.float32).eval()
        assert torch.equal(second(ids).logits, third(ids).logits)
