"""GPTQ core and the integer formats: blocked GPTQ equals a column-by-column reference, activation order round
trips, packing is exact, GPTQ beats round-to-nearest on the layer objective, degenerate Hessians fall back."""

import pytest
import torch
from dsv3.convert.gptq import HessianAccumulator, dequantize, gptq_quantize, rtn
from dsv3.modeling_deepseek.quantized import (
    GPTQLinear,
    Int8Linear,
    PackedLinear,
    dequant_groups,
    group_rtn_quant,
    int8_channel_quant,
    pack_int32,
    quantize_symmetric,
    symmetric_scale,
    unpack_int32,
)


def _reference_gptq(W, H, bits, group, act_order):
    """Column by column in fp64 with the explicit inverse-Hessian (OBS) update, no Cholesky, no blocks: after
    quantizing column j, w_k -= err * Hinv[j, k] / Hinv[j, j] for k > j, then column j is eliminated from Hinv."""
    W, H = W.double().clone(), H.double().clone()
    I = W.shape[1]
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(I)
    W, H = W[:, perm], H[perm][:, perm]
    H = H + 0.01 * H.diagonal().mean() * torch.eye(I, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    scales = []
    for j in range(I):
        if j % group == 0:
            scales.append(
                symmetric_scale(W[:, j : j + group].abs().amax(-1), bits).to(torch.bfloat16).double()
            )
        s = scales[-1]
        q = quantize_symmetric(W[:, j], s, bits).double()
        Q[:, j] = q
        err = (W[:, j] - q * s) / Hinv[j, j]
        W[:, j + 1 :] -= err[:, None] * Hinv[j, j + 1 :][None]
        Hinv = Hinv - Hinv[:, j : j + 1] @ Hinv[j : j + 1, :] / Hinv[j, j]
    inv = torch.argsort(perm)
    deq = Q * torch.stack(scales, 1).repeat_interleave(group, 1)
    return deq[:, inv]


def _problem(O=48, I=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(512, I, generator=gen, dtype=torch.float64) * torch.linspace(
        0.2, 3, I, dtype=torch.float64
    )
    acc = HessianAccumulator(I, torch.float64)
    for chunk in X.split(100):  # the running mean over uneven chunks equals the batch formula
        acc.add(chunk)
    assert torch.allclose(acc.H, 2 * X.t() @ X / len(X), rtol=1e-12, atol=1e-12)
    W = torch.randn(O, I, generator=gen, dtype=torch.float64) * 0.05
    return W, acc.H


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (8, 64)])
def test_blocked_gptq_equals_column_by_column_reference(act_order, bits, group):
    W, H = _problem()
    ours = gptq_quantize(W, H, bits, group, act_order=act_order, block=128)
    ref = _reference_gptq(W, H, bits, group, act_order)
    assert ours.method == "gptq" and ours.damp == 0.01
    assert (dequantize(ours, group, torch.float64) - ref).abs().max() <= 1e-5


def test_act_order_round_trips_through_g_idx():
    W, H = _problem(seed=1)
    res = gptq_quantize(W, H, 4, 32, act_order=True)
    perm = torch.argsort(H.diagonal(), descending=True, stable=True)
    # Columns in activation order fill groups 0, 1, ... in turn; g_idx maps every original column to its group.
    assert torch.equal(res.g_idx[perm].long(), torch.arange(256) // 32)
    layer = PackedLinear(256, 48, False, 4, 32, act_order=True)
    layer.weight_packed.data = pack_int32(res.q, 4)
    layer.weight_scale.data = res.scale
    layer.weight_g_idx.data = res.g_idx
    assert torch.equal(layer.dequantized_weight(torch.float64), dequantize(res, 32, torch.float64))


def test_gptq_beats_round_to_nearest_on_the_layer_objective():
    # Correlated inputs, as real activations are: that correlation is what GPTQ's error feedback exploits.
    gen = torch.Generator().manual_seed(2)
    X = (
        torch.randn(1024, 32, generator=gen, dtype=torch.float64)
        @ torch.randn(32, 256, generator=gen).double()
    )
    X = X + 0.1 * torch.randn(1024, 256, generator=gen, dtype=torch.float64)
    H = 2 * X.t() @ X / len(X)
    W = torch.randn(48, 256, generator=gen, dtype=torch.float64) * 0.05

    def loss(Wq):  # tr((W - Wq) H (W - Wq)^T): the expected squared output error on the calibration inputs
        D = W - Wq
        return torch.einsum("oi,ij,oj->", D, H, D).item()

    q, s = rtn(W, 4, 32)
    rtn_loss = loss(dequant_groups(q, s, dtype=torch.float64))
    gptq_loss = loss(dequantize(gptq_quantize(W, H, 4, 32), 32, torch.float64))
    assert gptq_loss < 0.5 * rtn_loss, (gptq_loss, rtn_loss)


def test_degenerate_hessian_falls_back_and_says_so():
    W, H = _problem(seed=3)
    H = torch.full_like(H, float("nan"))
    res = gptq_quantize(W, H, 4, 32)
    q, s = rtn(W, 4, 32)
    assert res.method == "rtn" and torch.equal(res.q, q) and torch.equal(res.scale, s)
    # Never-activated inputs are zeroed (any value is optimal for them), the rest still quantized by GPTQ.
    W, H = _problem(seed=4)
    H[:, :32] = 0
    H[:32, :] = 0
    res = gptq_quantize(W, H, 4, 32)
    assert res.method == "gptq" and res.dead_columns == 32 and (res.q[:, :32] == 0).all()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_pack_unpack_is_exact_for_every_code(bits, dim):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = torch.randint(lo, hi + 1, (64, 128), dtype=torch.int8)
    q.view(-1)[: hi - lo + 1] = torch.arange(lo, hi + 1, dtype=torch.int8)  # every code appears
    packed = pack_int32(q, bits, dim)
    assert packed.dtype == torch.int32
    assert packed.shape == ((64 * bits // 32, 128) if dim == 0 else (64, 128 * bits // 32))
    assert torch.equal(unpack_int32(packed, bits, dim), q)


def test_pack_matches_compressed_tensors_bit_layout():
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers", reason="optional")
    q = torch.randint(-8, 8, (16, 64), dtype=torch.int8)
    assert torch.equal(pack_int32(q, 4), ct.pack_to_int32(q, 4))


def test_int8_linear_matches_its_dequantized_weights_with_int8_activations():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(96, 64, generator=gen)
    q, scale = int8_channel_quant(w)
    assert (q.float() * scale - w).abs().max() <= scale.max() / 2 + 1e-7  # round to nearest: half a step
    layer = Int8Linear(64, 96)
    layer.weight.data, layer.weight_scale.data = q, scale
    x = torch.randn(3, 5, 64, generator=gen)
    y = layer(x)
    # Reference: the same per-token int8 activation quantization, then an fp64 matmul.
    xs = symmetric_scale(x.abs().amax(-1, keepdim=True), 8)
    xq = quantize_symmetric(x, xs, 8).double() * xs.double()
    ref = xq @ (q.double() * scale.double()).t()
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5)
    assert (y - x @ w.t()).abs().max() < 0.05 * (x @ w.t()).abs().max()
    # Dtype casts leave integer weights as they are.
    layer.half()
    assert layer.weight.dtype == torch.int8


def test_gptq_v1_linear_reads_the_minus_one_zero_points():
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(64, 128, generator=gen)
    q, scale = group_rtn_quant(w, 4, 32, torch.float16)
    layer = GPTQLinear(128, 64, False, 4, 32)
    layer.qweight.data = pack_int32(q.t().contiguous(), 4, dim=0)
    zeros = torch.full((4, 64), 8 - 1 - 8, dtype=torch.int8)  # stored zero point 7 = 8 - 1, as signed code
    layer.qzeros.data = pack_int32(zeros, 4, dim=1)
    layer.scales.data = scale.t().contiguous()
    layer.g_idx.data = (torch.arange(128) // 32).to(torch.int32)
    assert torch.equal(layer.dequantized_weight(torch.float32), dequant_groups(q, scale))
