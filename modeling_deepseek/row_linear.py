# Linear layers on one row of bf16 activations (decode at batch 1) inside a torch.compile'd graph on a CPU.
#
# Inductor hands every matmul to an external kernel (oneDNN for bf16). For a single row that kernel costs more than
# the bytes it reads: with 2 threads on an AVX-512 BF16 / AMX CPU, compiled and weights cold in cache,
#
#   weight (out x in)   F.linear (extern mm)   sum(W * x) (generated)
#   256 x 512                46 us                  22 us
#   1024 x 384               72 us                  38 us
#   1536 x 512              106 us                  59 us
#   16384 x 512             688 us                 466 us   (a 16k-token head)
#
# Written as an elementwise product reduced over the input dimension, inductor generates one vectorised loop that
# streams the weight once, accumulating in fp32 and rounding once, as the matmul does (the summation order
# differs, so results agree to rounding, not bit for bit). fp32 gains nothing this way (both run at the same
# speed), so only bf16 takes it, and eager mode never does (there the product would be materialised).
#
# `row_linear(module, x)` is `module(x)` except in that case, and only for a plain bias-free nn.Linear without
# hooks: PEFT adapters, quantized and FP8 linears and hooked modules run their own forward.
import torch
from torch import nn


def materialized(x: torch.Tensor) -> torch.Tensor:
    """x, written to a buffer of its own inside a compiled graph (eager: x itself, or a contiguous copy).

    Inductor inlines the pointwise ops that produce a reduction's input into the reduction's loop, i.e. once per
    output row here: the final RMSNorm (and the residual adds before it) ran 16k times inside the loop of a
    16k-row head, twice as slow as the head alone. as_strided makes inductor realise its input first."""
    x = x.contiguous()
    return torch.as_strided(x, x.shape, x.stride())


def row_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if (
        torch.compiler.is_compiling()
        and x.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and x.numel() == x.shape[-1]
        and type(module) is nn.Linear
        and module.bias is None
        and module.weight.dtype == torch.bfloat16
        and not module._forward_hooks
        and not module._forward_pre_hooks
    ):
        y = (module.weight.float() * materialized(x).reshape(1, -1).float()).sum(-1)
        return y.to(x.dtype).view(*x.shape[:-1], -1)
    return module(x)
