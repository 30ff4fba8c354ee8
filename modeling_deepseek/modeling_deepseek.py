# DeepSeek-V3 (V3 / R1 / V3.1, Kimi-K2, Moonlight) for transformers >= 5, written bottom-up:
# RMSNorm -> rotary (YaRN, interleaved) -> MLA attention -> MLP -> router -> MoE -> decoder layer -> MTP layer
# -> PreTrainedModel -> Model -> ForCausalLM.
#
# This file is copied into every checkpoint we write and loaded as remote code: it may import flat siblings by
# relative import only, and uses only stable transformers API (PreTrainedModel, GenerationMixin, Cache.update).
#
# Shape legend (suffixes on tensor names):
#   B batch   S query length   T key length (cache + new)   D hidden_size   V vocab
#   H heads   N qk_nope_head_dim   R qk_rope_head_dim   U v_head_dim   C kv_lora_rank   L = C + R (cached latent)
#   E routed experts   K experts per token   M tokens (B*S flattened)
#
# The state dict uses the official names (model.layers.{i}.mlp.experts.{e}.gate_proj.weight, the MTP module at
# model.layers.{num_hidden_layers + k}); fast paths are derived from these weights, never stored beside them.
import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_deepseek import AUTO_MAP, IN_MEMORY_MODEL_TYPE, DeepseekV3Config, layer_index
from .cpu_attention import blocked_attention, blocked_attention_pays
from .fp8 import FP8Linear, check_scale, is_fp8_linear
from .latent_cache import LatentCache
from .mla_absorbed import (
    absorbed_attention,
    absorbed_weights,
    attention_length,
    fused_absorbed_attention,
    fused_attention_available,
    prefer_absorbed,
)
from .moe_grouped import drop_file_pages, expert_stack, file_mappings, grouped_experts
from .mtp_decoding import mtp_generate
from .quantized import QUANTIZED_LINEARS, make_quantized_linear
from .row_linear import row_linear

IGNORE_INDEX = -100
# The name transformers gives the KV cache, in model inputs and outputs: "cache" from 5.25 on (generate passes it
# so and reads it back from the outputs), "past_key_values" before. Our forwards accept both names.
CACHE_NAME = (
    "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"
)


# ----------------------------------------------------------------------------------------------------- norms
class DeepseekV3RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, cast back, then scale: the official order of operations.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# ---------------------------------------------------------------------------------------------------- rotary
def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_inv_freq(rope: dict, dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (R/2,) and the cos/sin attention factor for a normalised `rope_parameters` dict."""
    base = rope["rope_theta"]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if rope["rope_type"] != "yarn":
        return inv_freq.float(), 1.0
    factor, orig = rope["factor"], rope["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rope["beta_fast"])), 0)
    high = min(math.ceil(correction_dim(rope["beta_slow"])), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    # ramp = 0 keeps the original (high) frequencies, ramp = 1 interpolates them by `factor`.
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    mscale, mscale_all_dim = rope["mscale"], rope["mscale_all_dim"]
    if mscale and mscale_all_dim:
        attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)  # 1.0 for V3
    else:
        attention_factor = yarn_mscale(factor)
    return inv_freq.float(), attention_factor


def softmax_scale(config: DeepseekV3Config) -> float:
    # qk_head_dim^-0.5, times mscale^2 under YaRN (V3: m = 0.1 * 1.0 * ln 40 + 1 = 1.3689).
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    rope = config.rope_parameters
    if rope["rope_type"] == "yarn" and rope["mscale_all_dim"]:
        scale *= yarn_mscale(rope["factor"], rope["mscale_all_dim"]) ** 2
    return scale


class DeepseekV3RotaryEmbedding(nn.Module):
    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        inv_freq, self.attention_factor = rope_inv_freq(config.rope_parameters, config.qk_rope_head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, position_ids_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Angles in fp32 whatever the model dtype: positions up to 163840 need the mantissa.
        angles_BSr = position_ids_BS[..., None].float() * self.inv_freq.float()  # r = R/2
        return angles_BSr.cos() * self.attention_factor, angles_BSr.sin() * self.attention_factor


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # The official weights rotate interleaved pairs (x0, x1), (x2, x3), ... as complex numbers; the output keeps
    # that layout. cos/sin are (B, S, R/2) and must already be broadcastable to x[..., ::2].
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.flatten(-2).to(x.dtype)


# ------------------------------------------------------------------------------------------------- attention
class DeepseekV3Attention(nn.Module):
    """Multi-head Latent Attention. Only the latent (c_kv after its norm, k_rope after RoPE; C + R values per
    token) is cached. Two equal forms (mla_absorbed.py): expanded (keys and values rebuilt from the latent through
    kv_b_proj; fewer FLOPs for prefill) and absorbed (kv_b_proj folded into the query and the output; decode
    reads only the latent). `mla_path` picks one: "auto" (by FLOP count), "absorbed" or "expanded"."""

    def __init__(self, config: DeepseekV3Config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.kv_rank = config.v_head_dim, config.kv_lora_rank
        self.dropout = config.attention_dropout
        self.softmax_scale = softmax_scale(config)
        D, H, bias = config.hidden_size, self.n_heads, config.attention_bias
        qk_dim = self.nope_dim + self.rope_dim
        if config.q_lora_rank is None:  # Moonlight / V2-Lite: plain query projection
            self.q_proj = nn.Linear(D, H * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, config.q_lora_rank, bias=bias)
            self.q_a_layernorm = DeepseekV3RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, H * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.kv_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = DeepseekV3RMSNorm(self.kv_rank, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, D, bias=bias)
        self.mla_path = "auto"  # runtime choice, not config: see mla_absorbed.set_mla_path

    def _project_q(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, _ = x_BSD.shape
        if self.config.q_lora_rank is None:
            q = row_linear(self.q_proj, x_BSD)
        else:
            q = row_linear(self.q_b_proj, self.q_a_layernorm(row_linear(self.q_a_proj, x_BSD)))
        q_BSHd = q.view(B, S, self.n_heads, self.nope_dim + self.rope_dim)
        return q_BSHd.split([self.nope_dim, self.rope_dim], dim=-1)  # q_nope_BSHN, q_rope_BSHR

    def _compress_kv(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c_kv_BSC, k_rope_BSR = row_linear(self.kv_a_proj_with_mqa, x_BSD).split(
            [self.kv_rank, self.rope_dim], dim=-1
        )
        return self.kv_a_layernorm(c_kv_BSC), k_rope_BSR  # k_rope is one head shared by all heads

    def _expand_kv(self, c_kv_BTC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, _ = c_kv_BTC.shape
        # The cache hands out views of a larger buffer (latent_cache.py); Linear kernels may round a strided
        # batch differently from a dense one, so the projection always sees a dense input.
        kv_BTHd = self.kv_b_proj(c_kv_BTC.contiguous()).view(B, T, self.n_heads, self.nope_dim + self.v_dim)
        k_nope_BTHN, v_BTHU = kv_BTHd.split([self.nope_dim, self.v_dim], dim=-1)
        return k_nope_BTHN.transpose(1, 2), v_BTHU.transpose(1, 2)  # (B, H, T, N), (B, H, T, U)

    def _attend(
        self, q_BHSd: torch.Tensor, k_BHTd: torch.Tensor, v_BHTU: torch.Tensor, mask_B1ST: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Returns the output and, on the eager path only, the attention probabilities (after dropout, as
        # transformers' eager attention returns them). SDPA never materialises them.
        dropout = self.dropout if self.training else 0.0
        if self.config._attn_implementation == "eager":
            scores_BHST = torch.matmul(q_BHSd, k_BHTd.transpose(-1, -2)) * self.softmax_scale
            if mask_B1ST is not None:
                scores_BHST = scores_BHST.masked_fill(~mask_B1ST, float("-inf"))
            probs_BHST = F.softmax(scores_BHST, dim=-1, dtype=torch.float32).to(
                q_BHSd.dtype
            )  # softmax in fp32
            probs_BHST = F.dropout(probs_BHST, p=dropout, training=self.training)
            return torch.matmul(probs_BHST, v_BHTU), probs_BHST
        if not dropout and blocked_attention_pays(q_BHSd):  # 16-bit, CPU without AMX (cpu_attention.py)
            return blocked_attention(q_BHSd, k_BHTd, v_BHTU, mask_B1ST, self.softmax_scale), None
        U, d = v_BHTU.shape[-1], q_BHSd.shape[-1]
        if U < d and v_BHTU.device.type == "cpu":
            # torch's fused CPU kernel (flash attention) needs value heads as wide as query/key heads, else SDPA
            # falls back to its unfused math path (scores materialised, ~5x slower for 512 tokens in bf16, ~2.5x
            # in fp32): pad the values with zeros and drop the extra output columns, which are exactly zero.
            v_BHTU = F.pad(v_BHTU, (0, d - U))
        out_BHSd = F.scaled_dot_product_attention(
            q_BHSd, k_BHTd, v_BHTU, attn_mask=mask_B1ST, dropout_p=dropout, scale=self.softmax_scale
        )
        return out_BHSd[..., :U], None

    def forward(
        self,
        x_BSD: torch.Tensor,
        rope_cos_sin: tuple[torch.Tensor, torch.Tensor],
        mask_B1ST: torch.Tensor | None,
        past_key_values: Cache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (output (B, S, D), attention probabilities (B, H, S, T) on the eager path, else None)."""
        B, S, _ = x_BSD.shape
        cos_BSr, sin_BSr = rope_cos_sin
        q_nope_BSHN, q_rope_BSHR = self._project_q(x_BSD)
        q_rope_BSHR = apply_rope_interleaved(q_rope_BSHR, cos_BSr[:, :, None], sin_BSr[:, :, None])
        c_kv_BSC, k_rope_BSR = self._compress_kv(x_BSD)
        k_rope_BSR = apply_rope_interleaved(k_rope_BSR, cos_BSr, sin_BSr)
        # L = C + R values per token: all that is cached.
        latent_BSL = torch.cat([c_kv_BSC, k_rope_BSR], dim=-1)
        if past_key_values is not None:
            # The cache holds the latent as one single-"head" key tensor (B, 1, T, C + R), c_kv then k_rope (the
            # layout of FlashMLA, vLLM and llama.cpp: one matmul scores both parts); its values are empty.
            latent_B1TL, _ = past_key_values.update(
                latent_BSL[:, None], latent_BSL[:, None, :, :0], self.layer_idx
            )
            latent_BTL = latent_B1TL[:, 0]
        else:
            latent_BTL = latent_BSL
        T = latent_BTL.shape[1]
        weights = self._absorbed_weights(S, T, q_nope_BSHN.dtype)
        if weights is not None:
            dropout = self.dropout if self.training else 0.0
            valid = None
            padded = self._padded_latent(
                past_key_values, attention_length(T, latent_BTL.device, latent_BTL.dtype)
            )
            if padded is not None:
                latent_BTL, valid = padded, T
            eager = self.config._attn_implementation == "eager"
            args = (q_nope_BSHN, q_rope_BSHR, latent_BTL, *weights, mask_B1ST, self.softmax_scale)
            if eager or dropout or not fused_attention_available(latent_BTL.device, latent_BTL.dtype):
                out_BSHU, probs_BHST = absorbed_attention(*args, dropout, valid)
            else:  # one fused kernel; no probabilities to return
                out_BSHU, probs_BHST = fused_absorbed_attention(*args, valid), None
            out_BSd = out_BSHU.reshape(B, S, self.n_heads * self.v_dim).to(x_BSD.dtype)
            return row_linear(self.o_proj, out_BSd), probs_BHST if eager else None
        c_kv_BTC, k_rope_BTR = latent_BTL.split([self.kv_rank, self.rope_dim], dim=-1)
        k_nope_BHTN, v_BHTU = self._expand_kv(c_kv_BTC)
        k_BHTd = torch.cat(
            [k_nope_BHTN, k_rope_BTR[:, None].expand(B, self.n_heads, T, self.rope_dim)], dim=-1
        )
        q_BHSd = torch.cat([q_nope_BSHN, q_rope_BSHR], dim=-1).transpose(1, 2)
        out_BHSU, probs_BHST = self._attend(q_BHSd, k_BHTd, v_BHTU, mask_B1ST)
        return self.o_proj(out_BHSU.transpose(1, 2).reshape(B, S, self.n_heads * self.v_dim)), probs_BHST

    def _absorbed_weights(
        self, S: int, T: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        # (W_UK, W_UV) when the absorbed form is to be used, else None (expanded form).
        if self.mla_path == "expanded":
            return None
        dims = (self.n_heads, self.nope_dim, self.rope_dim, self.v_dim, self.kv_rank)
        if self.mla_path == "auto" and not prefer_absorbed(S, T, *dims):
            if not torch.compiler.is_compiling():
                # An eager prefill fills the cache of absorbed weights for the decode steps that follow: a compiled
                # decode step only reads it (else it would slice and copy W_UK / W_UV inside the graph, every step).
                absorbed_weights(self.kv_b_proj, self.n_heads, self.nope_dim, dtype, self)
            return None
        return absorbed_weights(self.kv_b_proj, self.n_heads, self.nope_dim, dtype, self)

    def _padded_latent(self, cache: Cache | None, length: int) -> torch.Tensor | None:
        # The cached latent (B, length, C + R), lengthened to `length` slots (finite filler after the held tokens),
        # when the cache can hand that out without copying (latent_cache.py) and it is longer than what is held.
        layers = getattr(cache, "layers", None)
        if layers is None or self.layer_idx >= len(layers) or not hasattr(layers[self.layer_idx], "padded"):
            return None
        if length <= layers[self.layer_idx].keys.shape[-2]:
            return None
        views = layers[self.layer_idx].padded(length)
        return None if views is None else views[0][:, 0]


# ------------------------------------------------------------------------------------------------------- MLP
class DeepseekV3MLP(nn.Module):
    def __init__(self, config: DeepseekV3Config, intermediate_size: int | None = None) -> None:
        super().__init__()
        inner = intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.down_proj = nn.Linear(inner, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return row_linear(self.down_proj, F.silu(row_linear(self.gate_proj, x)) * row_linear(self.up_proj, x))


# ---------------------------------------------------------------------------------------------------- router
class DeepseekV3TopkRouter(nn.Module):
    """noaux_tc routing: sigmoid scores; the correction bias selects experts but never weights them."""

    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        self.top_k, self.n_experts = config.num_experts_per_tok, config.n_routed_experts
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.norm_topk_prob, self.scaling = config.norm_topk_prob, config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))
        # Tokens routed to each expert since the last reset (feeds update_expert_bias); not saved. Filled by
        # DeepseekV3Model from the counts each MoE layer returns, in training forwards only (see _count_load).
        self.register_buffer("expert_load", torch.zeros(self.n_experts, dtype=torch.int64), persistent=False)

    def forward(self, x_MD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        M = x_MD.shape[0]
        # The router runs in fp32 (the official code uses bf16 logits; fp32 is the documented choice here).
        scores_ME = F.linear(x_MD.float(), self.weight.float()).sigmoid()
        choice_ME = scores_ME.detach() + self.e_score_correction_bias.float()
        if self.n_group > 1:
            # Group score = sum of the top-2 choice scores in each group; keep topk_group groups, -inf the rest.
            choice_MGe = choice_ME.view(M, self.n_group, -1)
            group_MG = choice_MGe.topk(2, dim=-1).values.sum(-1)
            keep_MG = torch.zeros_like(group_MG, dtype=torch.bool)
            keep_MG.scatter_(1, group_MG.topk(self.topk_group, dim=-1).indices, True)
            choice_ME = choice_MGe.masked_fill(~keep_MG[..., None], float("-inf")).view(M, -1)
        idx_MK = choice_ME.topk(self.top_k, dim=-1).indices
        weight_MK = scores_ME.gather(1, idx_MK)  # unbiased scores
        if self.norm_topk_prob:
            weight_MK = weight_MK / (weight_MK.sum(-1, keepdim=True) + 1e-20)
        return idx_MK, weight_MK * self.scaling, scores_ME


# ------------------------------------------------------------------------------------------------------- MoE
class DeepseekV3MoE(nn.Module):
    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        self.gate = DeepseekV3TopkRouter(config)
        self.seq_aux, self.aux_loss_alpha = config.seq_aux, config.aux_loss_alpha
        self.experts = nn.ModuleList(
            DeepseekV3MLP(config, config.moe_intermediate_size) for _ in range(config.n_routed_experts)
        )
        self.shared_experts = (
            DeepseekV3MLP(config, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )

    def _dispatch(
        self, x_MD: torch.Tensor, idx_MK: torch.Tensor, weight_MK: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Sort the M*K (token, expert) pairs by expert, run each expert that got tokens once on its contiguous
        # slice, scatter back weighted. Python loops only over the experts that were hit (<= M*K of them).
        # Also returns the per-expert token counts (E,) it needs anyway: the load statistics. Inference with
        # plain expert Linears takes the grouped, sync-free path instead (moe_grouped.py), same numbers.
        stack = expert_stack(self, self.experts, DeepseekV3MLP)
        if stack is not None:
            return grouped_experts(stack, x_MD, idx_MK, weight_MK)
        M, K = idx_MK.shape
        flat_idx = idx_MK.flatten()
        order = flat_idx.argsort(stable=True)
        token_of = order // K
        counts = torch.bincount(flat_idx, minlength=len(self.experts))
        active = counts.nonzero().flatten().tolist()
        x_sorted = x_MD[token_of]
        chunks = x_sorted.split(counts[active].tolist())
        y_sorted = torch.cat([self.experts[e](chunk) for e, chunk in zip(active, chunks, strict=True)])
        y_sorted = y_sorted.float() * weight_MK.flatten()[order, None]
        # Accumulate the K expert outputs of each token in fp32, no token dropping, no capacity limit.
        y_MD = torch.zeros(M, x_MD.shape[-1], dtype=torch.float32, device=x_MD.device)
        return y_MD.index_add(0, token_of, y_sorted).to(x_MD.dtype), counts

    def _sequence_aux_loss(self, scores_ME: torch.Tensor, idx_MK: torch.Tensor, B: int) -> torch.Tensor:
        # DeepSeek-V3's complementary sequence-wise balance loss: per sequence, alpha * sum_e f_e * P_e with
        # f_e = E / (K * S) * (tokens routed to e) and P_e = mean over tokens of the normalised affinity s / sum(s).
        E, K = scores_ME.shape[-1], idx_MK.shape[-1]
        scores_BSE = scores_ME.view(B, -1, E)
        S = scores_BSE.shape[1]
        routed_BE = torch.zeros(B, E, device=scores_ME.device).scatter_add_(
            1, idx_MK.view(B, S * K), torch.ones(B, S * K, device=scores_ME.device)
        )
        f_BE = routed_BE * E / (K * S)
        p_BE = (scores_BSE / scores_BSE.sum(-1, keepdim=True)).mean(1)
        # Per sequence: the CausalLM normalises over the batch (sequence_aux_loss).
        return self.aux_loss_alpha * (f_BE * p_BE).sum(-1)

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Returns (y (B, S, D), sequence-wise balance loss per sequence (B,) or None, tokens per expert (E,)).
        The loss and counts are outputs, not module state: under gradient checkpointing a value stored on the
        module would come from a no-grad (reentrant) or repeated (recomputation) pass."""
        x_MD = x_BSD.reshape(-1, x_BSD.shape[-1])
        idx_MK, weight_MK, scores_ME = self.gate(x_MD)
        aux_B = None  # only while training, when the config asks for it (seq_aux with aux_loss_alpha > 0)
        if self.training and self.seq_aux and self.aux_loss_alpha > 0:
            aux_B = self._sequence_aux_loss(scores_ME, idx_MK, x_BSD.shape[0])
        y_MD, load_E = self._dispatch(x_MD, idx_MK, weight_MK)
        if self.shared_experts is not None:
            y_MD = y_MD + self.shared_experts(x_MD)
        return y_MD.view_as(x_BSD), aux_B, load_E


# --------------------------------------------------------------------------------------------- decoder layer
class LayerOutput(NamedTuple):
    # A flat tuple of tensors, so reentrant gradient checkpointing (which returns a plain tuple: rebuild with
    # LayerOutput(*out)) carries every output, and the aux loss's gradient, across the checkpointed region.
    h_BSD: torch.Tensor
    aux_B: torch.Tensor | None  # sequence-wise balance loss per sequence (MoE layers, training only)
    load_E: torch.Tensor | None  # tokens routed to each expert (MoE layers)
    attn_BHST: torch.Tensor | None  # attention probabilities (eager attention, output_attentions only)


class DeepseekV3DecoderLayer(nn.Module):
    def __init__(self, config: DeepseekV3Config, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = DeepseekV3Attention(config, layer_idx)
        self.mlp = DeepseekV3MoE(config) if config.is_moe_layer(layer_idx) else DeepseekV3MLP(config)
        self.input_layernorm = DeepseekV3RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = DeepseekV3RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        h_BSD: torch.Tensor,
        rope_cos_sin: tuple[torch.Tensor, torch.Tensor],
        mask_B1ST: torch.Tensor | None,
        past_key_values: Cache | None = None,
        output_attentions: bool = False,
    ) -> LayerOutput:
        x_BSD = self.input_layernorm(h_BSD)
        attn_BSD, probs_BHST = self.self_attn(x_BSD, rope_cos_sin, mask_B1ST, past_key_values)
        h_BSD = h_BSD + attn_BSD
        x_BSD = self.post_attention_layernorm(h_BSD)
        if isinstance(self.mlp, DeepseekV3MoE):
            mlp_BSD, aux_B, load_E = self.mlp(x_BSD)
        else:
            mlp_BSD, aux_B, load_E = self.mlp(x_BSD), None, None
        return LayerOutput(h_BSD + mlp_BSD, aux_B, load_E, probs_BHST if output_attentions else None)


# ------------------------------------------------------------------------------------------------- MTP layer
class DeepseekV3MTPHead(nn.Module):
    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        self.norm = DeepseekV3RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, h_BSD: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(h_BSD))


class DeepseekV3MTPLayer(DeepseekV3DecoderLayer):
    """MTP module k, stored at model.layers.{L + k - 1}: at position i it combines the embedding of t_{i+k}
    with the hidden state h_i and predicts t_{i+k+1}. It owns copies of the embedding and head, as on disk."""

    def __init__(self, config: DeepseekV3Config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        D = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, D)
        self.enorm = DeepseekV3RMSNorm(D, config.rms_norm_eps)
        self.hnorm = DeepseekV3RMSNorm(D, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        self.shared_head = DeepseekV3MTPHead(config)

    def forward(
        self,
        next_ids_BS: torch.Tensor,
        h_BSD: torch.Tensor,
        rope_cos_sin: tuple[torch.Tensor, torch.Tensor],
        mask_B1ST: torch.Tensor | None,
        past_key_values: Cache | None = None,
        output_attentions: bool = False,
    ) -> LayerOutput:
        # h' = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h_i)]) - embedding first, as in the official layout. The
        # logits are self.shared_head(out.h_BSD), taken by the caller.
        x_BSD = self.eh_proj(
            torch.cat([self.enorm(self.embed_tokens(next_ids_BS)), self.hnorm(h_BSD)], dim=-1)
        )
        return super().forward(x_BSD, rope_cos_sin, mask_B1ST, past_key_values, output_attentions)


# ----------------------------------------------------------------------------------------------- base class
def _swap_in_fp8_linears(root: nn.Module, prefix: str, config: DeepseekV3Config) -> None:
    # Build-time: the projections the checkpoint stores as FP8 become FP8Linear, so the loader fills their
    # float8 `weight` and fp32 `weight_scale_inv` unchanged (transformers keeps a parameter's own dtype).
    quant = config.fp8_quantization_config
    skip = quant.get("modules_to_not_convert") or ()
    for name, module in list(root.named_modules()):
        if isinstance(module, nn.Linear) and is_fp8_linear(prefix + name, skip):
            parent, _, child = name.rpartition(".")
            fp8 = FP8Linear(
                module.in_features,
                module.out_features,
                module.bias is not None,
                tuple(quant["weight_block_size"]),
            )
            setattr(root.get_submodule(parent), child, fp8)


def _swap_in_int_linears(root: nn.Module, prefix: str, config: DeepseekV3Config) -> None:
    # Build-time, like the FP8 swap: each Linear the quantization config targets becomes the quantized module of
    # its format (a dispatch in quantized.make_quantized_linear), so the loader fills the packed tensors as stored.
    for name, module in list(root.named_modules()):
        if isinstance(module, nn.Linear):
            quantized = make_quantized_linear(config.int_quantization_config, prefix + name, module)
            if quantized is not None:
                parent, _, child = name.rpartition(".")
                setattr(root.get_submodule(parent), child, quantized)


@torch.no_grad()
def _finish_int_load(model: nn.Module) -> None:
    # transformers marks every loaded tensor trainable; integer weights and their scales are the checkpoint. A
    # non-finite scale (a corrupt file, or a module its quantizer never calibrated) is an error naming the tensor,
    # not NaN logits later.
    for name, module in model.named_modules():
        if isinstance(module, QUANTIZED_LINEARS):
            for key, p in module.named_parameters(recurse=False):
                if key != "bias":
                    p.requires_grad_(False)
            for key in module.SCALES:
                scale = getattr(module, key)
                if not scale.is_meta and not torch.isfinite(scale).all():
                    raise ValueError(
                        f"{name}.{key}: contains NaN or Inf (a quantization scale: the checkpoint is corrupt, or "
                        "its quantizer never calibrated this module)"
                    )


@torch.no_grad()
def _finish_fp8_load(model: nn.Module) -> None:
    # Load-time: validate every scale, then (fp8_mode "dequantize") replace each FP8Linear by a plain Linear in
    # the model's dtype, one module at a time so peak memory stays near the final model size.
    config = model.config
    if config.fp8_quantization_config is None:
        return
    prefix = "" if hasattr(model, "lm_head") else "model."
    dtype = model.get_input_embeddings().weight.dtype
    if config.fp8_mode == "dequantize":
        # transformers hands out zero-copy views of the mmap'd shards. Copy the few non-FP8 tensors out first, so
        # that each shard's mapping (and its resident pages) goes away as soon as its last FP8 weight is replaced.
        for module in model.modules():
            if isinstance(module, FP8Linear):
                continue
            for key, p in module._parameters.items():
                if p is not None and not p.untyped_storage().resizable():
                    module._parameters[key] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
            for key, b in module._buffers.items():
                if b is not None and not b.untyped_storage().resizable():
                    module._buffers[key] = b.clone()
    # Offloaded modules (device_map "disk", or "cpu" beside a GPU) hold meta tensors here: accelerate's hook
    # brings their weights in from the offload store (for "disk" the checkpoint's own shards) only for the
    # module's own forward. They stay FP8Linear in both modes: the store keeps serving FP8 (half the bytes of
    # BF16 per forward, and no dequantized copy of the offloaded weights written at every load), each forward
    # dequantizes into the activation dtype (the model dtype, so the numbers are those of the dequantized Linear)
    # and the scale is checked the first time the module runs (FP8Linear.unchecked_name).
    dequantized, offloaded = [], []
    # By name, not over a list of modules: that list would keep every replaced FP8Linear (and its mapping) alive.
    for name in [n for n, m in model.named_modules() if isinstance(m, FP8Linear)]:
        module = model.get_submodule(name)
        for key in FP8Linear.FROZEN:  # the loader hands every tensor out as trainable
            getattr(module, key).requires_grad_(False)
        if module.weight.is_meta or module.weight_scale_inv.is_meta:
            module.unchecked_name = prefix + name + ".weight"
            offloaded.append(prefix + name)
        else:
            check_scale(prefix + name + ".weight", module.weight, module.weight_scale_inv, module.block)
            if config.fp8_mode == "dequantize":
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, module.to_linear(dtype))
                dequantized.append(prefix + name)
        del module
    if config.fp8_mode == "dequantize" and not offloaded:
        # The model in memory is no longer quantized; saving it writes a plain checkpoint.
        config.fp8_quantization_config = None
    elif dequantized:
        # Saving writes what is in memory: plain weights for the dequantized modules, FP8 for the offloaded ones.
        # modules_to_not_convert names the plain ones by the shortest prefixes holding no FP8Linear (whole layers
        # when whole layers are offloaded), so the saved folder reloads to this model.
        holds_fp8 = {n.rsplit(".", i)[0] for n in offloaded for i in range(n.count(".") + 1)}
        quant = config.fp8_quantization_config
        plain = set(quant.get("modules_to_not_convert") or ())
        for n in dequantized:
            parts = n.split(".")
            prefixes = (".".join(parts[:i]) for i in range(1, len(parts) + 1))
            plain.add(next(p for p in prefixes if p not in holds_fp8))
        config.fp8_quantization_config = {**quant, "modules_to_not_convert": sorted(plain)}


def _is_safetensors(path: str) -> bool:
    # By content, not name: a Hub cache maps shards through their blob files (no suffix).
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1


def _release_idle_shard_pages(model: nn.Module, before: set[tuple[int, int]]) -> None:
    # Shard mappings this load created stay mapped after loading; the pages of every tensor that was converted (an
    # fp32 load of BF16 shards, FP8 dequantized) were read, and stay counted in RSS beside the converted copy.
    # Release the parts of those mappings that no tensor of the model views (the files are untouched; see
    # moe_grouped.drop_file_pages). Mappings that existed before this load may belong to another model: left alone.
    new = [m for m in file_mappings() if (m[0], m[1]) not in before and _is_safetensors(m[2])]
    if not new:
        return
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.device.type == "cpu" and not t.is_meta]
    used = sorted((t.data_ptr(), t.data_ptr() + t.nbytes) for t in tensors)
    idle = []
    for start, end, _ in new:
        cursor = start
        for lo, hi in used:
            if hi <= cursor or lo >= end:
                continue
            if lo > cursor:
                idle.append((cursor, lo))
            cursor = max(cursor, hi)
        if cursor < end:
            idle.append((cursor, end))
    drop_file_pages(idle, new)


def _check_loading_info(source, model: nn.Module, info: dict) -> None:
    config = model.config
    last = config.num_hidden_layers + config.num_nextn_predict_layers

    def beyond_model(name: str) -> bool:
        if name.startswith("lm_head.") and not hasattr(model, "lm_head"):
            return True  # AutoModel on a causal-LM checkpoint: the head is legitimately unused
        # MTP layers the config chose not to build (num_nextn_predict_layers lowered to drop them).
        index = layer_index(name) if name.startswith("model.layers.") else None
        return index is not None and index >= last

    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(k for k in info.get("unexpected_keys") or [] if not beyond_model(k))
    mismatched = sorted(
        f"{m[0]} (checkpoint {list(m[1])} vs model {list(m[2])})"
        if isinstance(m, tuple) and len(m) == 3
        else str(m)
        for m in info.get("mismatched_keys") or []
    )
    for kind, names in (("missing", missing), ("unexpected", unexpected), ("misshaped", mismatched)):
        if names:
            more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
            raise ValueError(f"{source}: {kind} tensor(s) {', '.join(names[:3])}{more}")
    for msg in info.get("error_msgs") or []:
        raise ValueError(f"{source}: {msg}")


def _init_tensor(tensor: torch.Tensor, fill: str, std: float = 0.0) -> None:
    # transformers >= 5 marks tensors loaded from the checkpoint; never overwrite those.
    if getattr(tensor, "_is_hf_initialized", False):
        return
    with torch.no_grad():
        if fill == "normal":
            tensor.normal_(0.0, std)
        elif fill == "ones":
            tensor.fill_(1.0)
        else:
            tensor.zero_()


class DeepseekV3PreTrainedModel(PreTrainedModel):
    config_class = DeepseekV3Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DeepseekV3DecoderLayer", "DeepseekV3MTPLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _keep_in_fp32_modules_strict = ["e_score_correction_bias"]

    def __init__(self, config: DeepseekV3Config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        config.auto_map = dict(AUTO_MAP)
        # PEFT (>= 0.18 on transformers 5) reads `model.config.model_type` and, for "deepseek_v3", rewrites LoRA
        # targets gate_proj/up_proj/down_proj into transformers' fused expert parameters, which this model (the
        # official per-expert layout) does not have: LoRA would silently skip every MLP. transformers itself skips
        # that conversion for remote code; PEFT does not. So the model's in-memory config reports its own type.
        # Saved configs still say "deepseek_v3" (to_dict writes the class attribute), and so does a config read
        # with AutoConfig (quantization tools key their model tables on that).
        if config.model_type == DeepseekV3Config.model_type:
            config.model_type = IN_MEMORY_MODEL_TYPE

    # ---- expert load and auxiliary-loss-free balancing (DeepSeek-V3 report, section 2.1.2) ----
    def routers(self) -> dict[int, "DeepseekV3TopkRouter"]:
        """The router of every MoE layer (MTP layers included), by layer index."""
        return {
            layer_index(name): module
            for name, module in self.named_modules()
            if isinstance(module, DeepseekV3TopkRouter)
        }

    def expert_load(self) -> dict[int, torch.Tensor]:
        """Tokens routed to each expert, per layer, since the last reset (counts, shape (E,))."""
        return {i: r.expert_load.clone() for i, r in self.routers().items()}

    def reset_expert_load(self) -> None:
        for router in self.routers().values():
            router.expert_load.zero_()

    @contextlib.contextmanager
    def measuring_expert_load(self):
        """Count expert load in every forward inside the block, e.g. to measure balance on held-out data in eval
        mode. Outside it only training forwards count (they feed update_expert_bias)."""
        base = self.base_model
        before, base.count_every_forward = base.count_every_forward, True
        try:
            yield self
        finally:
            base.count_every_forward = before

    @torch.no_grad()
    def update_expert_bias(self, gamma: float = 0.001) -> None:
        """Call after each optimizer step: bias_e += gamma * sign(mean_load - load_e) in every MoE layer, from
        the loads counted since the previous call (then reset). Overloaded experts become less likely to be
        selected; the routing weights never see the bias."""
        for router in self.routers().values():
            load = router.expert_load.float()
            if load.sum() > 0:
                router.e_score_correction_bias += gamma * torch.sign(load.mean() - load)
            router.expert_load.zero_()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        # transformers only warns about missing weights and initialises them randomly; for a checkpoint that is
        # a silent corruption, so any missing, unexpected or misshaped tensor is an error that names it.
        want_info = kwargs.pop("output_loading_info", False)
        allow_mismatch = kwargs.pop("ignore_mismatched_sizes", False)
        shards_before = {(start, end) for start, end, _ in file_mappings()}
        model, info = super().from_pretrained(
            pretrained_model_name_or_path,
            *args,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
            **kwargs,
        )
        if allow_mismatch:
            info = {**info, "mismatched_keys": []}
        _check_loading_info(pretrained_model_name_or_path, model, info)
        _finish_fp8_load(model)
        _finish_int_load(model)
        _release_idle_shard_pages(model, shards_before)
        return (model, info) if want_info else model

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            _init_tensor(module.weight, "normal", std)
            if getattr(module, "bias", None) is not None:
                _init_tensor(module.bias, "zeros")
        elif isinstance(module, FP8Linear):
            if not getattr(module.weight, "_is_hf_initialized", False):
                module.weight.data.view(torch.uint8).zero_()
            _init_tensor(module.weight_scale_inv, "ones")
        elif isinstance(module, DeepseekV3RMSNorm):
            _init_tensor(module.weight, "ones")
        elif isinstance(module, DeepseekV3TopkRouter):
            _init_tensor(module.weight, "normal", std)
            _init_tensor(module.e_score_correction_bias, "zeros")
            module.expert_load.zero_()  # non-persistent: never loaded
        elif isinstance(module, DeepseekV3RotaryEmbedding):
            inv_freq, _ = rope_inv_freq(self.config.rope_parameters, self.config.qk_rope_head_dim)
            module.inv_freq.copy_(inv_freq)  # non-persistent: rebuilt after meta-device init


# ----------------------------------------------------------------------------------------------------- model
def attention_mask_4d(
    attention_mask: torch.Tensor | None,
    B: int,
    S: int,
    past: int | torch.Tensor,
    device: torch.device,
    kv_len: int | None = None,
) -> torch.Tensor:
    """Boolean (B, 1, S, T) mask, True = may attend: causal, and padding from a 2-D (B, past + S) mask. T is
    past + S, or `kv_len` when the cache hands back more slots than it holds (a static cache returns all of its
    max_cache_len slots; the unfilled ones lie after the queries and are masked as future). `past` may be a
    0-d tensor (a static cache's length), so that compiled decode steps do not specialise on it."""
    if attention_mask is not None and attention_mask.dim() == 4:
        # A prepared 4-D mask: boolean, or additive (0 = attend, large negative = masked).
        mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    else:
        T = kv_len if kv_len is not None else past + S
        q_pos = torch.arange(S, device=device) + past
        k_pos = torch.arange(T, device=device)
        mask = (k_pos[None, :] <= q_pos[:, None])[None, None]
        if attention_mask is not None:
            L = attention_mask.shape[-1]
            if (
                attention_mask.dim() != 2
                or attention_mask.shape[0] != B
                or not (L == T or (kv_len is not None and L <= T))
            ):
                raise ValueError(
                    f"attention_mask: expected shape {(B, past + S)} (past + new tokens), "
                    f"got {tuple(attention_mask.shape)}"
                )
            keep_BT = attention_mask.bool()
            if L < T:
                keep_BT = F.pad(keep_BT, (0, T - L), value=False)
            mask = mask & keep_BT[:, None, None, :]
        mask = mask.expand(B, 1, S, T)
    # A left-padding query row sees no key at all; let it attend everywhere (its output is never used) so that
    # softmax stays finite and gradients stay clean.
    return mask | ~mask.any(-1, keepdim=True)


def _cache_sizes(cache: Cache | None, S: int) -> tuple[int | torch.Tensor, int | None]:
    """(tokens already cached, key slots the attention will see after adding S), the latter None when it is simply
    past + S. A static cache returns all of its preallocated slots."""
    if cache is None:
        return 0, None
    past = cache.get_seq_length()
    # get_max_length: -1 for growing caches; layers are created lazily, so an empty cache has none to ask.
    max_len = cache.get_max_length() if getattr(cache, "layers", None) else -1
    return past, (max_len if max_len is not None and max_len > 0 else None)


def _one_cache(past_key_values: Cache | None, cache: Cache | None) -> Cache | None:
    # The cache under either of its names (CACHE_NAME).
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise ValueError(
            "cache / past_key_values: two different caches given; pass one (`cache` from transformers 5.25)"
        )
    return past_key_values if past_key_values is not None else cache


def _sum_optional(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a + b


@dataclass
class DeepseekV3ModelOutputWithPast(BaseModelOutputWithPast):
    # Sequence-wise balance loss per sequence (B,), summed over the main stack's MoE layers (training only); the
    # CausalLM normalises it over the batch like the lm loss (sequence_aux_loss).
    aux_loss_per_seq: torch.FloatTensor | None = None


class DeepseekV3Model(DeepseekV3PreTrainedModel):
    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__(config)
        self.count_every_forward = False  # expert load: see _count_load and measuring_expert_load
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        # Main stack 0..L-1, then the MTP module(s) at L..L+n-1 (official layout: layer 61 for V3).
        self.layers = nn.ModuleList(
            [DeepseekV3DecoderLayer(config, i) for i in range(config.num_hidden_layers)]
            + [DeepseekV3MTPLayer(config, i) for i in config.mtp_layer_indices]
        )
        self.norm = DeepseekV3RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = DeepseekV3RotaryEmbedding(config)
        self.gradient_checkpointing = False
        if config.fp8_quantization_config is not None:
            _swap_in_fp8_linears(self, "model.", config)
        if config.int_quantization_config is not None:
            _swap_in_int_linears(self, "model.", config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    @property
    def mtp_layers(self) -> list[DeepseekV3MTPLayer]:
        return [self.layers[i] for i in self.config.mtp_layer_indices]

    def _run_layer(self, layer: nn.Module, *args) -> LayerOutput:
        if self.gradient_checkpointing and self.training:
            # Reentrant checkpointing hands back a plain tuple.
            return LayerOutput(*self._gradient_checkpointing_func(layer.__call__, *args))
        return layer(*args)

    def _count_load(self, layer: nn.Module, load_E: torch.Tensor | None) -> None:
        # The counts feed the next update_expert_bias, so only training forwards count (not eval, not generate,
        # which runs without grad), and each forward once: here, outside any checkpointed region, never in the
        # recomputation (reentrant checkpointing runs the first pass without grad, so the layer cannot tell).
        if load_E is not None and (self.count_every_forward or (self.training and torch.is_grad_enabled())):
            layer.mlp.gate.expert_load += load_E

    def _want_attentions(self, output_attentions: bool | None) -> bool:
        want = self.config.output_attentions if output_attentions is None else output_attentions
        impl = self.config._attn_implementation
        if want and impl != "eager":
            # transformers 5.23's own DeepseekV3 only warns here and returns no attentions; we refuse instead.
            raise ValueError(
                f"output_attentions=True needs eager attention ({impl!r} never materialises the probabilities): "
                'load the model with attn_implementation="eager"'
            )
        return bool(want)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> DeepseekV3ModelOutputWithPast | tuple:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("input_ids / inputs_embeds: pass exactly one of them")
        output_attentions = self._want_attentions(output_attentions)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        return_dict = self.config.return_dict if return_dict is None else return_dict
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False  # recomputation would write the cache twice
        past_key_values = _one_cache(past_key_values, cache)
        if use_cache and past_key_values is None:
            past_key_values = LatentCache()
        h_BSD = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, S, _ = h_BSD.shape
        past, kv_len = _cache_sizes(past_key_values, S)
        if position_ids is None:
            position_ids = self._position_ids(attention_mask, B, S, past, h_BSD.device)
        mask_B1ST = attention_mask_4d(attention_mask, B, S, past, h_BSD.device, kv_len)
        rope_cos_sin = self.rotary_emb(position_ids)
        all_hidden, all_attn, aux_B = [], [], None
        for layer in self.layers[: self.config.num_hidden_layers]:
            if output_hidden_states:
                all_hidden.append(h_BSD)
            out = self._run_layer(layer, h_BSD, rope_cos_sin, mask_B1ST, past_key_values, output_attentions)
            h_BSD, aux_B = out.h_BSD, _sum_optional(aux_B, out.aux_B)
            self._count_load(layer, out.load_E)
            all_attn.append(out.attn_BHST)
        h_BSD = self.norm(h_BSD)
        if output_hidden_states:
            all_hidden.append(h_BSD)
        result = DeepseekV3ModelOutputWithPast(
            last_hidden_state=h_BSD,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attn) if output_attentions else None,
            aux_loss_per_seq=aux_B,
            **{CACHE_NAME: past_key_values if use_cache else None},
        )
        return result if return_dict else result.to_tuple()

    @staticmethod
    def _position_ids(
        attention_mask: torch.Tensor | None, B: int, S: int, past: int, device: torch.device
    ) -> torch.Tensor:
        if attention_mask is not None and attention_mask.dim() == 2:
            # Left padding: the first real token of every row sits at position 0.
            return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -S:]
        return (torch.arange(S, device=device) + past)[None].expand(B, S)

    def mtp_forward(
        self,
        input_ids: torch.LongTensor,
        h_BSD: torch.Tensor,
        position_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Logits of every MTP depth k = 1..n over a full sequence (no cache): depth k at position i predicts
        t_{i+k+1}; its logits have length S - k. `h_BSD` is the main model's last hidden state after its norm.
        Also returns the MTP layers' sequence-wise balance loss per sequence (B,) (training only, else None)."""
        B, S = input_ids.shape
        if position_ids is None:
            position_ids = self._position_ids(attention_mask, B, S, 0, input_ids.device)
        logits, aux_B = [], None
        for k, layer in enumerate(self.mtp_layers, start=1):
            if S - k <= 0:
                break
            h_BSD = h_BSD[:, : S - k]
            pair_mask = None
            if attention_mask is not None and attention_mask.dim() == 2:
                # (h_i, t_{i+k}) is a real pair only when both positions are real tokens.
                pair_mask = attention_mask[:, : S - k].bool() & attention_mask[:, k:].bool()
            mask_B1ST = attention_mask_4d(pair_mask, B, S - k, 0, input_ids.device)
            rope_cos_sin = self.rotary_emb(position_ids[:, : S - k])
            out = self._run_layer(layer, input_ids[:, k:], h_BSD, rope_cos_sin, mask_B1ST, None, False)
            h_BSD, aux_B = out.h_BSD, _sum_optional(aux_B, out.aux_B)
            self._count_load(layer, out.load_E)
            logits.append(layer.shared_head(h_BSD))
        return logits, aux_B


@dataclass
class DeepseekV3CausalLMOutputWithPast(CausalLMOutputWithPast):
    # transformers' fields (loss, logits, the cache under CACHE_NAME, hidden_states, attentions), then ours.
    lm_loss: torch.FloatTensor | None = None
    mtp_loss: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    mtp_logits: tuple[torch.FloatTensor, ...] | None = None


def causal_lm_loss(
    logits_BSV: torch.Tensor, labels_BS: torch.Tensor, num_items: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy of logits at position i against labels[i + 1] (labels unshifted, -100 ignored): the mean
    over targets, or the sum / num_items (transformers.Trainer's `num_items_in_batch`: the targets of all the
    micro-batches of one optimizer step, so that their losses add up to the full batch's mean)."""
    logits = logits_BSV[:, :-1].float().flatten(0, 1)
    target = labels_BS[:, 1:].flatten().to(logits.device)
    if num_items is None:
        return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
    return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum") / num_items


def mtp_lm_loss(
    logits_per_depth: list[torch.Tensor], labels_BS: torch.Tensor, num_items: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over MTP depths of each depth's cross-entropy (depth k's logits at i predict labels[i + k + 1]), each
    normalised by its own number of targets: depth k has fewer (labels[:, k + 1:]). With `num_items` (the main
    loss's targets over all micro-batches) depth k's total is taken as num_items * n_k / n_1 from this
    micro-batch's counts: the micro-batches then add up to the full batch's loss whenever they hold the same
    share of targets at every depth (rows without padding or ignored labels; otherwise approximately)."""
    labels_BS = labels_BS.to(logits_per_depth[0].device)
    n_1 = (labels_BS[:, 1:] != IGNORE_INDEX).sum().clamp(min=1)
    per_depth = []
    for k, logits_BSV in enumerate(logits_per_depth, start=1):
        if num_items is None:
            per_depth.append(causal_lm_loss(logits_BSV, labels_BS[:, k:]))
        else:
            n_k = (labels_BS[:, k + 1 :] != IGNORE_INDEX).sum().clamp(min=1)
            per_depth.append(causal_lm_loss(logits_BSV, labels_BS[:, k:], num_items * n_k / n_1))
    return torch.stack(per_depth).mean()


def sequence_aux_loss(
    aux_B: torch.Tensor, labels_BS: torch.Tensor | None, num_items: int | torch.Tensor | None = None
) -> torch.Tensor:
    """The batch's sequence-wise balance loss from its per-sequence values, normalised like the lm loss so that
    it accumulates the same way: each sequence weighted by its number of next-token targets, over the batch's
    total (`num_items` under gradient accumulation), so k micro-batches add up to the full batch's value. With
    the same number of targets in every sequence this is the report's mean over sequences; without labels too."""
    if labels_BS is None:
        return aux_B.mean()
    n_B = (labels_BS[:, 1:] != IGNORE_INDEX).sum(-1).to(aux_B)
    total = n_B.sum().clamp(min=1) if num_items is None else num_items
    return (aux_B * n_B).sum() / total


class DeepseekV3ForCausalLM(DeepseekV3PreTrainedModel, GenerationMixin):
    # Applied only when config.tie_word_embeddings is true (transformers reads this map); a tied checkpoint then
    # needs no lm_head.weight. The MTP module's head and embedding are separate tensors on disk, never tied.
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__(config)
        self.model = DeepseekV3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.last_mtp_stats = None  # MTPStats of the last generate(use_mtp=True)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def _moe_blocks(self) -> list[DeepseekV3MoE]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, DeepseekV3MoE)]

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mtp_loss_weight: float | None = None,
        output_mtp_logits: bool = False,
        cache: Cache | None = None,
        **kwargs,
    ) -> DeepseekV3CausalLMOutputWithPast | tuple:
        """With `labels`: loss = lm_loss + mtp_loss_weight * mtp_loss (weight from the argument, else
        config.mtp_loss_weight; mtp_loss is the mean over MTP depths) + aux_loss (training only, when the config
        has seq_aux and aux_loss_alpha > 0). `lm_loss` alone is the perplexity loss. Every term is normalised
        per target token, by `num_items_in_batch` when transformers.Trainer passes it (gradient accumulation)."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=_one_cache(past_key_values, cache),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        h_BSD = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = row_linear(self.lm_head, h_BSD[:, keep])
        num_items = kwargs.get("num_items_in_batch")
        lm_loss = loss = mtp_loss = mtp_logits = aux_loss = None
        aux_B = out.aux_loss_per_seq
        if labels is not None:
            lm_loss = loss = causal_lm_loss(logits, labels, num_items)
        want_mtp = (labels is not None or output_mtp_logits) and input_ids is not None
        if want_mtp and self.config.num_nextn_predict_layers > 0:
            mtp_logits, mtp_aux_B = self.model.mtp_forward(input_ids, h_BSD, position_ids, attention_mask)
            aux_B = _sum_optional(aux_B, mtp_aux_B)
            if labels is not None and mtp_logits:
                mtp_loss = mtp_lm_loss(mtp_logits, labels, num_items)
                weight = self.config.mtp_loss_weight if mtp_loss_weight is None else mtp_loss_weight
                loss = lm_loss + weight * mtp_loss
        if aux_B is not None:
            aux_loss = sequence_aux_loss(aux_B, labels, num_items)
            loss = loss + aux_loss if loss is not None else None
        result = DeepseekV3CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            lm_loss=lm_loss,
            mtp_loss=mtp_loss,
            aux_loss=aux_loss,
            mtp_logits=tuple(mtp_logits) if mtp_logits is not None else None,
            **{CACHE_NAME: getattr(out, CACHE_NAME)},
        )
        return result if return_dict else result.to_tuple()

    def generate(self, inputs: torch.Tensor | None = None, generation_config=None, **kwargs):
        """transformers' generate, plus `use_mtp=True`: speculative decoding with the MTP module as drafter (any
        batch size, left padding; mtp_decoding.py). Greedy output is identical to plain greedy decoding; sampling
        keeps the model's distribution. The run's acceptance is left in `self.last_mtp_stats`."""
        config = generation_config or self.generation_config
        use_mtp = kwargs.pop("use_mtp", None)
        if use_mtp is None:
            use_mtp = bool(getattr(config, "use_mtp", False))
        if not use_mtp:
            static = kwargs.get("cache_implementation", getattr(config, "cache_implementation", None))
            if kwargs.get("past_key_values") is None and kwargs.get("cache") is None and static is None:
                # The default cache, but appending in place (latent_cache.py), sized for the whole generation.
                ids = inputs if inputs is not None else kwargs.get("input_ids")
                new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None)) or 0
                kwargs[CACHE_NAME] = LatentCache(ids.shape[-1] + new if ids is not None else 0)
            return super().generate(inputs, generation_config=generation_config, **kwargs)
        sequences, self.last_mtp_stats = mtp_generate(self, inputs, generation_config, **kwargs)
        return sequences


DeepseekV3Config.register_for_auto_class()
DeepseekV3Model.register_for_auto_class("AutoModel")
DeepseekV3ForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["DeepseekV3PreTrainedModel", "DeepseekV3Model", "DeepseekV3ForCausalLM", "DeepseekV3Config"]
