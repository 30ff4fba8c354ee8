"""GPTQ (Frantar et al. 2022) as a few pure functions: accumulate a Hessian from calibration inputs, factorize it,
quantize a weight column by column with error feedback (blocked, "lazy batch" updates), optionally in
activation order. Symmetric integers, per-group scales, the storage dtype of the scale respected.

Shapes: W [O, I] (out, in), H [I, I], X [M, I] calibration rows, q int8 [O, I], scale [O, G] with G = I / group.
"""

from dataclasses import dataclass, field

import torch
from dsv3.modeling_deepseek.quantized import quantize_symmetric, symmetric_scale

DAMP_STEPS = (0.01, 0.1, 1.0)  # fractions of mean(diag H) tried in order before falling back to RTN


@dataclass
class HessianAccumulator:
    """H = 2/n * sum x x^T over every calibration row seen, kept as a running mean (fp32 by default)."""

    in_features: int
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"
    n: int = 0
    H: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.H = torch.zeros(self.in_features, self.in_features, dtype=self.dtype, device=self.device)

    def add(self, x: torch.Tensor) -> None:
        x_MI = x.reshape(-1, self.in_features).to(self.dtype)
        m = x_MI.shape[0]
        if m == 0:
            return
        self.H.mul_(self.n / (self.n + m))
        self.n += m
        x_MI = x_MI * (2.0 / self.n) ** 0.5
        self.H.addmm_(x_MI.t(), x_MI)


@dataclass
class GPTQResult:
    q: torch.Tensor  # int8 [O, I], original column order
    scale: torch.Tensor  # [O, G], storage dtype
    g_idx: torch.Tensor | None  # int32 [I]: group of each column (only with act_order)
    method: str  # "gptq", or "rtn" when the Hessian could not be factorized at any dampening
    damp: float  # dampening fraction that was used
    dead_columns: int  # inputs that were always zero in calibration (weight zeroed, as in the paper)


def _inverse_cholesky(H: torch.Tensor) -> tuple[torch.Tensor, float] | None:
    # Upper Cholesky factor of H^-1: row j holds the OBS update for column j given columns < j are fixed.
    mean_diag = H.diagonal().mean().item()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for frac in DAMP_STEPS:
        L, info = torch.linalg.cholesky_ex(H + frac * mean_diag * eye)
        if info.item() != 0:
            continue
        Hinv = torch.cholesky_inverse(L)
        U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
        if info.item() == 0 and torch.isfinite(U).all():
            return U, frac
    return None


def rtn(
    W: torch.Tensor, bits: int, group: int, scale_dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest with the same scales GPTQ would start from: (q int8 [O, I], scale [O, G])."""
    O, I = W.shape
    W_OGg = W.float().view(O, I // group, group)
    scale_OG = symmetric_scale(W_OGg.abs().amax(-1), bits).to(scale_dtype)
    return quantize_symmetric(W_OGg, scale_OG[..., None], bits).view(O, I), scale_OG


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group: int,
    act_order: bool = False,
    block: int = 128,
    scale_dtype: torch.dtype = torch.bfloat16,
    static_groups: bool = False,
) -> GPTQResult:
    """Quantize W [O, I] against Hessian H [I, I]. Computes in H's dtype (fp64 for reference tests). Each group's
    scale is chosen when its first column is reached, from the error-updated weights, and rounded to
    `scale_dtype` before use. Blocks hold whole groups, so the blocked result equals the column-by-column one."""
    O, I = W.shape
    if group <= 0 or I % group:
        raise ValueError(f"group_size: {group} does not divide the input dimension {I}")
    dtype = H.dtype
    W = W.to(H.device, dtype).clone()
    H = H.clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0  # never-activated inputs: any weight works; zero it like the reference GPTQ does
    W[:, dead] = 0.0
    perm = (
        torch.argsort(H.diagonal(), descending=True, stable=True)
        if act_order
        else torch.arange(I, device=H.device)
    )
    if static_groups:
        # compressed-tensors' actorder "weight": columns are visited in activation order, but every column keeps
        # its original contiguous group, whose scale is fixed up front from the original weights: no g_idx.
        scale_OG = symmetric_scale(W.view(O, I // group, group).abs().amax(-1), bits).to(scale_dtype)
        group_of = perm // group
    else:
        scale_OG = torch.zeros(O, I // group, dtype=scale_dtype, device=W.device)
        group_of = torch.arange(I, device=W.device) // group
    W, H = W[:, perm], H[perm][:, perm]
    factor = _inverse_cholesky(H)
    if factor is None:  # degenerate beyond repair: round to nearest, and say so
        q, scale = rtn(W[:, torch.argsort(perm)], bits, group, scale_dtype)
        return GPTQResult(q, scale, None, "rtn", float("nan"), int(dead.sum()))
    U, damp = factor
    block = max(group, block // group * group)
    Q = torch.zeros(O, I, dtype=torch.int8, device=W.device)
    for i1 in range(0, I, block):
        i2 = min(i1 + block, I)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if (
                col % group == 0 and not static_groups
            ):  # a new group: its scale from the weights as they are now
                scale_OG[:, col // group] = symmetric_scale(W1[:, i : i + group].abs().amax(-1), bits).to(
                    scale_dtype
                )
            s_O = scale_OG[:, group_of[col]].to(dtype)
            w_O = W1[:, i]
            q_O = quantize_symmetric(w_O, s_O, bits)
            Q[:, col] = q_O
            err_O = (w_O - q_O.to(dtype) * s_O) / U1[i, i]
            W1[:, i:] -= err_O[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err_O
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # the lazy batch update of everything right of the block
    inv = torch.argsort(perm)
    g_idx = (inv // group).to(torch.int32) if act_order and not static_groups else None
    return GPTQResult(Q[:, inv].contiguous(), scale_OG, g_idx, "gptq", damp, int(dead.sum()))


def dequantize(result: GPTQResult, group: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    O, I = result.q.shape
    g_idx = (
        result.g_idx.long() if result.g_idx is not None else torch.arange(I, device=result.q.device) // group
    )
    return (result.q.to(dtype) * result.scale.to(dtype)[:, g_idx]).to(dtype)
