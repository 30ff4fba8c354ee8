# Integer-quantized linears that stay quantized in memory, for the formats transformers + compressed-tensors and
# vLLM read (REFERENCE.md section 5):
#   compressed-tensors int-quantized (W8A8): weight int8 [out, in] + weight_scale fp32 [out, 1]; activations are
#       quantized per token at run time (dynamic, symmetric int8), the matmul is int8 x int8 -> int32.
#   compressed-tensors pack-quantized (W4A16 / W8A16): weight_packed int32 [out, in * bits / 32] + weight_scale
#       [out, in / group] + weight_shape int64 [2] (+ weight_g_idx int32 [in] with activation ordering).
#   GPTQ v1: qweight int32 [in * bits / 32, out], qzeros int32 [in / group, out * bits / 32] (stored minus 1),
#       scales fp16 [in / group, out], g_idx int32 [in].
# Integers are symmetric: q in [-2^(b-1), 2^(b-1) - 1], w = q * scale; packed formats store q + 2^(b-1)
# (unsigned), element j of a 32-bit word in bits [j*b, (j+1)*b).
# This file is remote code: flat sibling, relative imports only, no compressed-tensors import.
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PACK_BITS = (4, 8)
INT_QUANT_METHODS = ("compressed-tensors", "gptq")
COMPRESSED_FORMATS = ("int-quantized", "pack-quantized")


# ----------------------------------------------------------------------------------------------- the math
def qrange(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def symmetric_scale(amax: torch.Tensor, bits: int) -> torch.Tensor:
    # amax maps to half the integer span (127.5 for int8, 7.5 for int4), as compressed-tensors and GPTQ do; an
    # all-zero row/group gets scale 1 so that dequantization never divides by zero.
    scale = amax.float() / ((2**bits - 1) / 2)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_symmetric(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    lo, hi = qrange(bits)
    return torch.round(w.float() / scale.float()).clamp_(lo, hi).to(torch.int8)


def int8_channel_quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: (q int8 [out, in], scale fp32 [out, 1])."""
    scale = symmetric_scale(w.float().abs().amax(dim=1, keepdim=True), 8)
    return quantize_symmetric(w, scale, 8), scale


def group_rtn_quant(
    w: torch.Tensor, bits: int, group: int, scale_dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest per group of `group` input columns: (q int8 [out, in], scale [out, in / group]). The
    scale is rounded to its storage dtype *before* the integers are chosen, so q * stored_scale is what was meant."""
    out_f, in_f = w.shape
    w_OGg = w.float().view(out_f, in_f // group, group)
    scale_OG = symmetric_scale(w_OGg.abs().amax(-1), bits).to(scale_dtype)
    q = quantize_symmetric(w_OGg, scale_OG[..., None], bits)
    return q.view(out_f, in_f), scale_OG


def dequant_groups(
    q: torch.Tensor, scale_OG: torch.Tensor, g_idx: torch.Tensor | None = None, dtype=torch.float32
) -> torch.Tensor:
    """w[o, i] = q[o, i] * scale[o, g_idx[i]] (g_idx defaults to i // group)."""
    out_f, in_f = q.shape
    if g_idx is None:
        group = in_f // scale_OG.shape[1]
        return (q.view(out_f, -1, group).float() * scale_OG.float()[..., None]).view(out_f, in_f).to(dtype)
    return (q.float() * scale_OG.float()[:, g_idx.long()]).to(dtype)


def pack_int32(q: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack signed b-bit integers (int8 storage) 32 / b to an int32 along `dim` (0 or 1); the packed dim must be
    a multiple of 32 / b."""
    if bits not in PACK_BITS:
        raise ValueError(f"bits: packing supports {PACK_BITS}, got {bits}")
    per = 32 // bits
    u = q.to(torch.int64) + (1 << (bits - 1))  # unsigned codes
    if dim == 0:
        u = u.t()
    rows, cols = u.shape
    if cols % per:
        raise ValueError(f"pack_int32: dimension {cols} is not a multiple of {per}")
    shifts = torch.arange(per, dtype=torch.int64) * bits
    words = (u.view(rows, cols // per, per) << shifts).sum(-1)  # < 2^32
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # same bits, as int32
    return words.t().contiguous() if dim == 0 else words


def unpack_int32(words: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Inverse of pack_int32: int8 tensor with the packed dim expanded 32 / b times."""
    per = 32 // bits
    w = words.t() if dim == 0 else words
    shifts = torch.arange(per, dtype=torch.int64, device=w.device) * bits
    u = (w.to(torch.int64)[..., None] & 0xFFFFFFFF) >> shifts & ((1 << bits) - 1)
    q = (u - (1 << (bits - 1))).to(torch.int8).flatten(-2)
    return q.t().contiguous() if dim == 0 else q


def quantize_per_token_int8(x_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-token int8 activations (what int-quantized W8A8 prescribes)."""
    scale_M1 = symmetric_scale(x_MK.float().abs().amax(-1, keepdim=True), 8)
    return quantize_symmetric(x_MK, scale_M1, 8), scale_M1


def int8_matmul(xq_MK: torch.Tensor, wq_NK: torch.Tensor) -> torch.Tensor:
    """Exact int8 x int8 -> int32 (torch._int_mm where it exists: CPU and CUDA; else exact int64 matmul)."""
    if hasattr(torch, "_int_mm") and xq_MK.device.type in ("cpu", "cuda"):
        try:
            return torch._int_mm(xq_MK.contiguous(), wq_NK.t())
        except RuntimeError:  # shape limits of some backends (e.g. M <= 16 on older CUDA builds)
            pass
    return (xq_MK.to(torch.int64) @ wq_NK.t().to(torch.int64)).to(torch.int32)


# ------------------------------------------------------------------------------------------ the modules
def _check_packing(bits: int, group: int, in_features: int) -> tuple[int, int]:
    if bits not in PACK_BITS:
        raise ValueError(f"num_bits: packed formats support {PACK_BITS}, got {bits}")
    if group <= 0 or in_features % group:
        raise ValueError(f"group_size: {group} does not divide the input dimension {in_features}")
    return bits, group


class _QuantizedLinear(nn.Module):
    """Common parts: quantized tensors are parameters without gradient (so `state_dict` writes the on-disk
    layout and the loader fills them); module dtype casts (`.half()`, `.to(bf16)`) leave integer tensors alone
    (torch only casts floating tensors) - only float scales follow, like any float parameter."""

    SCALES: tuple[str, ...] = ()  # the float scale tensors, checked finite at load

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def _frozen(self, *shape: int, dtype: torch.dtype) -> nn.Parameter:
        return nn.Parameter(torch.zeros(*shape, dtype=dtype), requires_grad=False)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Int8Linear(_QuantizedLinear):
    """compressed-tensors int-quantized W8A8: int8 weights per output channel, int8 activations per token."""

    SCALES = ("weight_scale",)

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias)
        self.weight = self._frozen(out_features, in_features, dtype=torch.int8)
        self.weight_scale = self._frozen(out_features, 1, dtype=torch.float32)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale.float()).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:  # training through a frozen int8 layer (e.g. LoRA on top): differentiable path
            return super().forward(x)
        x_MK = x.reshape(-1, self.in_features)
        xq_MK, xscale_M1 = quantize_per_token_int8(x_MK)
        acc_MN = int8_matmul(xq_MK, self.weight)
        y_MN = acc_MN.float() * xscale_M1 * self.weight_scale.float().t()
        if self.bias is not None:
            y_MN = y_MN + self.bias.float()
        return y_MN.to(x.dtype).view(*x.shape[:-1], self.out_features)


class PackedLinear(_QuantizedLinear):
    """compressed-tensors pack-quantized (W4A16 / W8A16): packed integers + per-group scales, dequantized per
    matmul into the activation dtype (weights never exist densely between calls)."""

    SCALES = ("weight_scale",)

    def __init__(
        self, in_features: int, out_features: int, bias: bool, bits: int, group: int, act_order: bool = False
    ) -> None:
        super().__init__(in_features, out_features, bias)
        self.bits, self.group = _check_packing(bits, group, in_features)
        self.weight_packed = self._frozen(out_features, in_features * bits // 32, dtype=torch.int32)
        self.weight_scale = self._frozen(out_features, in_features // group, dtype=torch.bfloat16)
        self.weight_shape = self._frozen(2, dtype=torch.int64)
        self.weight_g_idx = self._frozen(in_features, dtype=torch.int32) if act_order else None

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        q = unpack_int32(self.weight_packed, self.bits)[:, : self.in_features]
        return dequant_groups(q, self.weight_scale, self.weight_g_idx, dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, group={self.group}"


class GPTQLinear(_QuantizedLinear):
    """GPTQ v1 (`checkpoint_format: gptq`), symmetric: qweight packed along the input dim, zero points stored
    minus one (the v1 convention), fp16 scales per group, g_idx per input column."""

    SCALES = ("scales",)

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group: int) -> None:
        super().__init__(in_features, out_features, bias)
        self.bits, self.group = _check_packing(bits, group, in_features)
        self.qweight = self._frozen(in_features * bits // 32, out_features, dtype=torch.int32)
        self.qzeros = self._frozen(in_features // group, out_features * bits // 32, dtype=torch.int32)
        self.scales = self._frozen(in_features // group, out_features, dtype=torch.float16)
        self.g_idx = self._frozen(in_features, dtype=torch.int32)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        # Codes are unsigned (q + 2^(b-1)); unpack_int32 already subtracts 2^(b-1), and the stored zero point is
        # (2^(b-1) - 1): the v1 minus-one convention. Any other zero point is an asymmetric checkpoint.
        offset = 1 << (self.bits - 1)
        q_IO = unpack_int32(self.qweight, self.bits, dim=0).to(torch.int32)
        zeros_GO = unpack_int32(self.qzeros, self.bits, dim=1).to(torch.int32) + offset + 1
        q_IO = q_IO + offset - zeros_GO[self.g_idx.long()]
        return (q_IO.float() * self.scales.float()[self.g_idx.long()]).t().to(dtype)


# ------------------------------------------------------------------------------- reading the configs
def _matches(name: str, module: nn.Module | None, target: str) -> bool:
    # compressed-tensors targets: "re:<regex>" (re.match, anchored at the start), an exact module name, or a
    # class name ("Linear").
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or (module is not None and target == "Linear" and isinstance(module, nn.Linear))


def compressed_tensors_scheme(quant: dict[str, Any], name: str, module: nn.Module | None) -> dict | None:
    """The config group that quantizes module `name` (with its format filled in), or None when the module is
    ignored or targeted by no group."""
    if any(_matches(name, module, t) for t in quant.get("ignore") or ()):
        return None
    for group in (quant.get("config_groups") or {}).values():
        if any(_matches(name, module, t) for t in group.get("targets") or ()):
            return {**group, "format": group.get("format") or quant.get("format")}
    return None


def validate_quant_config(quant: dict[str, Any]) -> dict[str, Any]:
    """One-line errors naming the field for the integer formats this model runs."""
    method = quant.get("quant_method")
    if method == "gptq":
        if quant.get("bits") not in PACK_BITS:
            raise ValueError(
                f"quantization_config.bits: GPTQ supports {PACK_BITS}, got {quant.get('bits')!r}"
            )
        if not quant.get("sym", True):
            raise ValueError("quantization_config.sym: only symmetric GPTQ checkpoints are supported")
        if quant.get("checkpoint_format", "gptq") != "gptq":
            raise ValueError(
                f"quantization_config.checkpoint_format: only 'gptq' (v1), got {quant.get('checkpoint_format')!r}"
            )
        return quant
    for key, group in (quant.get("config_groups") or {}).items():
        fmt = group.get("format") or quant.get("format")
        if fmt not in COMPRESSED_FORMATS:
            raise ValueError(
                f"quantization_config.format: supported {COMPRESSED_FORMATS}, got {fmt!r} ({key})"
            )
        weights = group.get("weights") or {}
        if weights.get("type", "int") != "int" or not weights.get("symmetric", True):
            raise ValueError(
                f"quantization_config.config_groups.{key}.weights: only symmetric int is supported"
            )
        bits, strategy = weights.get("num_bits"), weights.get("strategy")
        if fmt == "int-quantized" and (bits != 8 or strategy != "channel"):
            raise ValueError(
                f"quantization_config.config_groups.{key}.weights: int-quantized needs 8-bit channel "
                f"weights, got {bits}-bit {strategy}"
            )
        if fmt == "pack-quantized" and (bits not in PACK_BITS or strategy not in ("group", "channel")):
            raise ValueError(
                f"quantization_config.config_groups.{key}.weights: pack-quantized needs 4/8-bit group or "
                f"channel weights, got {bits}-bit {strategy}"
            )
    return quant


def make_quantized_linear(quant: dict[str, Any], name: str, linear: nn.Linear) -> nn.Module | None:
    """The quantized module that replaces `linear` under `quant` (None: it stays a plain Linear)."""
    in_f, out_f, bias = linear.in_features, linear.out_features, linear.bias is not None
    if quant.get("quant_method") == "gptq":
        if any(name == m or name.startswith(m + ".") for m in quant.get("modules_to_not_convert") or ()):
            return None
        group = quant.get("group_size", -1)
        return GPTQLinear(in_f, out_f, bias, quant["bits"], in_f if group == -1 else group)  # -1: per channel
    scheme = compressed_tensors_scheme(quant, name, linear)
    if scheme is None:
        return None
    if scheme["format"] == "int-quantized":
        return Int8Linear(in_f, out_f, bias)
    weights = scheme["weights"]
    group = weights.get("group_size") if weights.get("strategy") == "group" else in_f
    act_order = weights.get("actorder") in ("group", "dynamic")
    try:
        return PackedLinear(in_f, out_f, bias, weights["num_bits"], group, act_order)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None


QUANTIZED_LINEARS = (Int8Linear, PackedLinear, GPTQLinear)
