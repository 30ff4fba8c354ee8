# Prefill attention in 16-bit types on CPUs without AMX tiles.
#
# torch's fused CPU attention (flash) kernel runs its bf16 block matmuls through AMX tiles where the CPU has them;
# on AVX-512 BF16 CPUs without AMX it is ~2x slower than oneDNN's bf16 matmuls over the whole scores (8 heads of
# 128, 2 threads: 512 tokens 6.4 ms vs ~3 ms, 4096 tokens 384 ms vs ~190 ms). `blocked_attention` computes the
# scores with those matmuls, a block of query rows at a time so that a block's fp32 scores stay within
# SCORE_BLOCK elements (~2 MiB: cache-resident, and no multi-GiB scores for long prompts or many heads), softmax
# in fp32 as the kernel does.
#
# Shapes: B batch, H heads, S query rows, T keys, d query/key width, U value width.
import functools

import torch

SCORE_BLOCK = 2**19


@functools.cache
def has_amx() -> bool:
    """Whether this CPU has AMX tiles (torch's flash kernel then runs its bf16 matmuls on them)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe()) if probe is not None else False


def blocked_attention_pays(q_BHSd: torch.Tensor) -> bool:
    """True for inference (no gradient) in bf16/fp16 on a CPU without AMX tiles."""
    return (
        q_BHSd.device.type == "cpu"
        and q_BHSd.dtype in (torch.bfloat16, torch.float16)
        and not (torch.is_grad_enabled() and q_BHSd.requires_grad)
        and not has_amx()
    )


def blocked_attention(
    q_BHSd: torch.Tensor,
    k_BHTd: torch.Tensor,
    v_BHTU: torch.Tensor,
    mask_B1ST: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v, as SDPA computes it (a boolean mask: True = attend; rows with no visible
    key give NaN, as SDPA's math path does), in blocks of query rows. Returns (B, H, S, U)."""
    B, H, S, d = q_BHSd.shape
    T, U = k_BHTd.shape[2], v_BHTU.shape[-1]
    q_MSd = q_BHSd.reshape(B * H, S, d)
    k_MdT = k_BHTd.reshape(B * H, T, d).transpose(1, 2)
    v_MTU = v_BHTU.reshape(B * H, T, U).contiguous()  # (a strided operand would be copied for every block)
    rows = max(16, SCORE_BLOCK // (B * H * T))
    acc = torch.promote_types(q_BHSd.dtype, torch.float32)
    outs = []
    for i in range(0, S, rows):
        scores_BHsT = torch.bmm(q_MSd[:, i : i + rows], k_MdT).to(acc).mul_(scale).view(B, H, -1, T)
        if mask_B1ST is not None:
            scores_BHsT.masked_fill_(~mask_B1ST[:, :, i : i + rows], float("-inf"))
        probs_MsT = scores_BHsT.softmax(-1).to(q_BHSd.dtype).view(B * H, -1, T)
        outs.append(torch.bmm(probs_MsT, v_MTU))
    return torch.cat(outs, 1).view(B, H, S, U)
