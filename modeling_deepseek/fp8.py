# FP8 block format (DeepSeek-V3): weight float8_e4m3fn [out, in] + weight_scale_inv float32
# [ceil(out/128), ceil(in/128)]; W = fp32(q) * scale_inv[r // 128, c // 128]. Blocks at the bottom/right edge are
# partial and cropped (kv_a_proj_with_mqa is 576 = 4.5 blocks tall) - never "rows // scale_rows".
# One implementation shared by the model loader, the converters and the tests: `blockwise_dequant_reference`
# is the pure formula, `blockwise_dequant` the fast CPU/GPU path tested bit-exact against it.
import math

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
UE8M0_FIT = 464.0  # midpoint between 448 and the next e4m3 step (480): values up to here round to 448
SCALE_FORMATS = ("float", "ue8m0")
NEVER_FP8 = (".mlp.gate", ".embed_tokens", ".eh_proj", ".shared_head.head")


def scale_shape(shape: tuple[int, int], block: tuple[int, int] = (128, 128)) -> tuple[int, int]:
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def check_scale(name: str, weight: torch.Tensor, scale_inv: torch.Tensor, block=(128, 128)) -> None:
    """One-line errors naming the tensor for every way an FP8 weight/scale pair can be wrong."""
    if weight.dtype != FP8_DTYPE:
        raise ValueError(f"{name}: expected float8_e4m3fn, found {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"{name}: FP8 weights are 2-D, found shape {list(weight.shape)}")
    if scale_inv.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{name}_scale_inv: expected float32 scales, found {scale_inv.dtype}")
    want = scale_shape(tuple(weight.shape), block)
    if tuple(scale_inv.shape) != want:
        raise ValueError(
            f"{name}_scale_inv: shape {list(scale_inv.shape)} does not fit weight "
            f"{list(weight.shape)} (expected {list(want)} for {block[0]}x{block[1]} blocks)"
        )
    if not torch.isfinite(scale_inv).all():
        raise ValueError(f"{name}_scale_inv: contains NaN or Inf")


def _expand_scale(scale_inv: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    rows = scale_inv.float().repeat_interleave(block[0], 0)[: shape[0]]
    return rows.repeat_interleave(block[1], 1)[:, : shape[1]]  # crop the partial edge blocks


def blockwise_dequant_reference(
    q: torch.Tensor,
    scale_inv: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
    block: tuple[int, int] = (128, 128),
) -> torch.Tensor:
    return (q.float() * _expand_scale(scale_inv, tuple(q.shape), block)).to(dtype)


# e4m3 -> fp32 by bit moves: the code's sign goes to bit 31 and its 7 exponent+mantissa bits to bits 20..26.
# Read as fp32 that is q * 2^-120 exactly (e4m3 subnormals land on fp32 subnormals), so multiplying by
# scale * 2^120 gives fp32(q) * scale with the same single rounding as the reference.
_SIGN_AND_PAYLOAD = -2013265921  # 0x87FFFFFF as int32: keep bit 31 and bits 0..26 of the sign-extended code
_EXP_SHIFT = 2.0**120


def blockwise_dequant(
    q: torch.Tensor,
    scale_inv: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
    block: tuple[int, int] = (128, 128),
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bit-identical to blockwise_dequant_reference: dtype(fp32(q) * scale). On CPU it works one block row at a
    time with integer bit moves instead of the slow fp8 cast (small temporaries, ~5x faster)."""
    if q.device.type != "cpu" or scale_inv.float().abs().max() * _EXP_SHIFT == float("inf"):
        return blockwise_dequant_reference(q, scale_inv, dtype, block)
    rows, cols = q.shape
    out = torch.empty(rows, cols, dtype=dtype) if out is None else out
    codes = q.view(torch.int8)
    scale = scale_inv.float() * _EXP_SHIFT
    # e4m3fn has no inf; its NaNs are 0x7F (the int8 maximum) and 0xFF (the uint8 maximum): two cheap reductions
    # tell whether the slower masked path is needed at all.
    has_nan = q.numel() > 0 and (codes.max() == 127 or q.view(torch.uint8).max() == 255)
    for r in range(scale.shape[0]):
        lo, hi = r * block[0], min((r + 1) * block[0], rows)
        chunk = codes[lo:hi]
        bits = chunk.to(torch.int32).bitwise_left_shift_(20).bitwise_and_(_SIGN_AND_PAYLOAD)
        vals = bits.view(torch.float32).mul_(scale[r].repeat_interleave(block[1])[:cols])
        if has_nan:
            vals[(chunk.view(torch.uint8) & 0x7F) == 0x7F] = float("nan")
        out[lo:hi] = vals
    return out


def blockwise_quant(
    w: torch.Tensor, block: tuple[int, int] = (128, 128), scale_fmt: str = "float"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight per 128x128 block (edge blocks zero-padded): scale = amax / 448, q = w / scale
    in e4m3 (round to nearest even). An all-zero block gets scale 1.
    ue8m0: the smallest power of two for which every value still rounds into range, i.e. 2^ceil(log2(amax/464))
    (anything up to 464 rounds to 448). Rounding amax/448 up instead would give the same scale except when a
    block's max lands in (224, 232)*scale: it then rounds down to 224 and a second quantization halves the
    scale, so FP8 -> BF16 -> FP8 would not reproduce the bytes. This rule is idempotent."""
    if scale_fmt not in SCALE_FORMATS:
        raise ValueError(f"scale_fmt: choose from {', '.join(SCALE_FORMATS)}, got {scale_fmt!r}")
    rows, cols = w.shape
    sr, sc = scale_shape((rows, cols), block)
    padded = F.pad(w.float(), (0, sc * block[1] - cols, 0, sr * block[0] - rows))
    blocks = padded.view(sr, block[0], sc, block[1])
    amax = blocks.abs().amax(dim=(1, 3))  # (sr, sc)
    scale = amax / FP8_MAX
    if scale_fmt == "ue8m0":
        scale = torch.exp2(torch.ceil(torch.log2(amax / UE8M0_FIT)))
    scale = torch.where(amax > 0, scale, torch.ones_like(scale))
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(sr * block[0], sc * block[1])[:rows, :cols].contiguous(), scale


def is_fp8_linear(name: str, modules_to_not_convert: list[str] | tuple[str, ...] = ()) -> bool:
    """Which 2-D weights (module names) the official FP8 checkpoints store in FP8: every projection inside the
    decoder layers; never the router (mlp.gate), the MTP module's embed_tokens, eh_proj and shared_head.head,
    nor anything outside model.layers (embeddings, lm_head)."""
    if not name.startswith("model.layers.") or name.endswith(NEVER_FP8):
        return False
    return not any(skip and (name == skip or name.startswith(skip + ".")) for skip in modules_to_not_convert)


def is_fp8_weight(name: str, tensor: torch.Tensor) -> bool:
    """A checkpoint tensor the official FP8 format stores as float8 + weight_scale_inv."""
    return name.endswith(".weight") and tensor.dim() == 2 and is_fp8_linear(name.removesuffix(".weight"))


def fp8_quantization_config(block_size: int = 128, scale_fmt: str = "float") -> dict:
    """config.json's quantization_config for DeepSeek's FP8 block format (V3.1 adds scale_fmt ue8m0)."""
    quant = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [block_size, block_size],
    }
    if scale_fmt == "ue8m0":
        quant["scale_fmt"] = "ue8m0"
    return quant


# Same-size integer dtypes: module-wide dtype casts skip non-floating tensors (see FP8Linear._apply).
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


class FP8Linear(nn.Module):
    """Keeps the checkpoint's FP8 weight and block scales in memory (about half of BF16) and dequantizes per
    matmul into the activation dtype."""

    FROZEN = ("weight", "weight_scale_inv")  # the checkpoint's FP8 codes and scales: never trained or cast

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, block: tuple[int, int] = (128, 128)
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, tuple(block)
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=FP8_DTYPE), requires_grad=False
        )
        srows, scols = scale_shape((out_features, in_features), self.block)
        self.weight_scale_inv = nn.Parameter(
            torch.empty(srows, scols, dtype=torch.float32), requires_grad=False
        )
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        # The checkpoint name of a weight whose scale could not be validated at load because it was offloaded
        # (device_map "disk", or "cpu" beside a GPU: a meta tensor until accelerate's hook brings it in for this
        # module's forward). It is checked the first time it is used, then cleared.
        self.unchecked_name: str | None = None

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self.unchecked_name is not None:
            check_scale(self.unchecked_name, self.weight, self.weight_scale_inv, self.block)
            self.unchecked_name = None
        return blockwise_dequant(self.weight, self.weight_scale_inv, dtype, self.block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def _apply(self, fn, recurse: bool = True):
        # model.half() / .float() / .to(dtype) convert only floating-point tensors (float8 counts as one). The FP8
        # codes and their scales are the checkpoint, not a compute dtype: present them as same-size integer views
        # while the cast runs, so device moves still apply and dtype casts pass them by. The matmul dtype follows
        # the activations; the bias (a float parameter) follows the cast.
        frozen = {k: (self._parameters[k].dtype, self._parameters[k].requires_grad) for k in self.FROZEN}
        for key in frozen:
            p = self._parameters[key].requires_grad_(False)  # an integer tensor cannot require grad
            p.data = p.data.view(_INT_OF_SIZE[p.element_size()])
        try:
            return super()._apply(fn, recurse)
        finally:
            for key, (dtype, requires_grad) in frozen.items():
                p = self._parameters[key]
                p.data = p.data.view(dtype)
                p.requires_grad_(requires_grad)

    def to_linear(self, dtype: torch.dtype) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.dequantized_weight(dtype), requires_grad=True)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().to(dtype))
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, block={self.block}"
