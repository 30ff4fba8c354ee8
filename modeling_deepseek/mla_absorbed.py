# Absorbed Multi-head Latent Attention (DeepSeek-V2/V3 inference, vLLM, llama.cpp): attention computed directly
# over the cached latent, never expanding per-head keys and values for the cached tokens.
#
# kv_b_proj's weight [H * (N + U), C] is, per head, [W_UK (N x C) ; W_UV (U x C)]. The expanded form computes
#   k_nope_t = W_UK c_t, v_t = W_UV c_t                    (for every cached token t: H * (N + U) * C per token)
#   score_t = q_nope . k_nope_t + q_rope . k_rope_t,       out = sum_t p_t v_t
# and the absorbed form moves the matrices onto the query and the output (associativity, exactly the same math):
#   q_lat = W_UK^T q_nope (C values per head)   score_t = q_lat . c_t + q_rope . k_rope_t
#   out = W_UV (sum_t p_t c_t)
# so a decode step reads the C + R latent values per cached token once and does O(H * C) work per token instead
# of O(H * C * (N + U)). For prefill (S queries over S keys) the expanded form does fewer FLOPs; `prefer_absorbed`
# picks by the FLOP count of both forms.
#
# The absorbed matrices are *derived* from kv_b_proj's weight, never stored in the state dict. For a plain Linear
# they are views of its weight (zero copies, always current: training steps, load_state_dict and .to() are seen
# for free). For FP8 / integer-quantized kv_b_proj they are dequantized once into the compute dtype and cached on
# the attention module, keyed by the identity and version counter of every tensor of kv_b_proj (any in-place
# update, reload or cast changes the key). Anything else (a PEFT adapter around kv_b_proj, an offloaded module
# whose weights live on the meta device) uses the expanded path, which is always correct.
#
# Shapes: B batch, S query length, T key length, H heads, N qk_nope_head_dim, R qk_rope_head_dim, U v_head_dim,
# C kv_lora_rank, L = C + R (the cached latent: c_kv, then k_rope); h = H * S (heads folded into query rows,
# index h * S + s), M = B * S.
import torch
import torch.nn.functional as F
from torch import nn

MLA_PATHS = ("auto", "absorbed", "expanded")
LENGTH_BUCKET = 64
KV_CHUNK_MIN = 512  # slots; the fused CPU kernel walks the keys in blocks of 512
_THREADS = torch.get_num_threads()


def prefer_absorbed(S: int, T: int, H: int, N: int, R: int, U: int, C: int) -> bool:
    """True when the absorbed form needs fewer multiply-adds than the expanded one for S queries over T keys."""
    expanded = T * C * H * (N + U) + H * S * T * (N + R + U)
    absorbed = S * H * C * (N + U) + H * S * T * (2 * C + R)
    return absorbed < expanded


def _tensor_key(module: nn.Module, dtype: torch.dtype) -> tuple:
    # Identity + version counter of every tensor: in-place updates (optimizer steps, load_state_dict, copy_) bump
    # the version, replacements and casts change the data pointer, dtype or device.
    tensors = [*module.parameters(), *module.buffers()]
    return (dtype, *((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors))


def absorbed_weights(
    kv_b_proj: nn.Module, n_heads: int, nope_dim: int, dtype: torch.dtype, owner: nn.Module
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(W_UK (H, N, C), W_UV (H, U, C)) from kv_b_proj's weight [H * (N + U), C] in `dtype`, or None when they
    cannot be had exactly (callers then use the expanded path).

    When a gradient must reach kv_b_proj they are views of its weight. Otherwise they are contiguous copies in
    `dtype`, cached on `owner` (a plain attribute: never saved or moved): as views they are strided per head, and
    a batched matmul copies a strided operand at every call."""
    if type(kv_b_proj) is nn.Linear:
        weight = kv_b_proj.weight
        if weight.is_meta or kv_b_proj.bias is not None:
            return None
        if weight.dtype == dtype and weight.requires_grad and torch.is_grad_enabled():
            w_HdC = weight.view(n_heads, -1, weight.shape[-1])
            return w_HdC[:, :nope_dim], w_HdC[:, nope_dim:]
    elif hasattr(kv_b_proj, "dequantized_weight") and getattr(kv_b_proj, "bias", None) is None:
        # FP8Linear and the integer-quantized linears (quantized.py) all expose the dense weight this way.
        if any(t.is_meta for t in kv_b_proj.parameters()):
            return None  # offloaded: accelerate only brings the weight in for kv_b_proj's own forward
    else:
        return None
    if torch.compiler.is_compiling():
        # Under torch.compile the cache is read as it is (the eager warm-up step filled it); recomputing it in
        # the graph would copy or dequantize at every step.
        cached = getattr(owner, "_absorbed_cache", None)
        if cached is not None:
            return cached[1]
    key = _tensor_key(kv_b_proj, dtype)
    cached = getattr(owner, "_absorbed_cache", None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            if type(kv_b_proj) is nn.Linear:
                weight = kv_b_proj.weight.detach().to(dtype)
            else:
                weight = kv_b_proj.dequantized_weight(dtype)
            w_HdC = weight.view(n_heads, -1, weight.shape[-1])
            split = (w_HdC[:, :nope_dim].contiguous(), w_HdC[:, nope_dim:].contiguous())
        cached = (key, split)
        owner._absorbed_cache = cached
    return cached[1]


def attention_length(T: int, device: torch.device, dtype: torch.dtype) -> int:
    """How many cache slots a decode step should attend over on a CPU: T rounded up to a multiple of
    LENGTH_BUCKET for 16-bit types, else T. For 16-bit types torch's matmuls go through oneDNN, which builds a
    kernel per shape: a length that grows by one every step costs a fresh build (~0.2-0.7 ms) at every step. The
    extra slots are masked. Other devices: T."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return T
    return -(-T // LENGTH_BUCKET) * LENGTH_BUCKET


def _query_latent(q_nope_BSHN: torch.Tensor, w_uk_HNC: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W_UK folded into the query, per head: q_lat[h] = q_nope[h] W_UK[h] ((B*S) x N times N x C). (H, B, S, C)."""
    B, S, H, N = q_nope_BSHN.shape
    q_HMN = q_nope_BSHN.to(dtype).permute(2, 0, 1, 3).reshape(H, B * S, N)
    return torch.bmm(q_HMN, w_uk_HNC).view(H, B, S, -1)


def _output_heads(o_lat_HCBS: torch.Tensor, w_uv_HUC: torch.Tensor) -> torch.Tensor:
    """W_UV per head on the attended latent (H, C, B, S): out[b, s, h] = W_UV[h] o[h, :, b, s]. (B, S, H, U).
    W_UV is the row-major left operand (U x C times C x (B*S)): bf16 kernels are ~3x faster that way round."""
    H, C, B, S = o_lat_HCBS.shape
    out_HUM = torch.bmm(w_uv_HUC, o_lat_HCBS.reshape(H, C, B * S))
    return out_HUM.view(H, -1, B, S).permute(2, 3, 0, 1)


def absorbed_attention(
    q_nope_BSHN: torch.Tensor,
    q_rope_BSHR: torch.Tensor,
    latent_BTL: torch.Tensor,
    w_uk_HNC: torch.Tensor,
    w_uv_HUC: torch.Tensor,
    mask_B1ST: torch.Tensor | None,
    scale: float,
    dropout: float = 0.0,
    valid: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the latent cache (B, T, L = C + R: c_kv, then k_rope). Returns (out (B, S, H, U),
    probabilities (B, H, S, T)). With `valid`, only the first `valid` of the T cached slots are attended to (the
    rest get probability exactly 0; they must hold finite values); the mask, if any, then covers only those."""
    B, S, H, N = q_nope_BSHN.shape
    T, C = latent_BTL.shape[1], w_uk_HNC.shape[-1]
    dtype = latent_BTL.dtype
    # W_UK folded into the query (_query_latent). Heads then become extra query columns (index h * S + s), and the rope part of the query joins them: one T x (H * S) matmul per
    # row of the batch against the whole latent, the cache as the tall left operand (with the cache on the right,
    # small-M kernels run ~2x slower).
    q_lat_BhC = _query_latent(q_nope_BSHN, w_uk_HNC, dtype).transpose(0, 1).reshape(B, H * S, C)
    q_rope_BhR = q_rope_BSHR.to(dtype).transpose(1, 2).reshape(B, H * S, -1)
    q_BhL = torch.cat([q_lat_BhC, q_rope_BhR], dim=-1)
    scores_BTh = torch.bmm(latent_BTL, q_BhL.transpose(1, 2))
    # Softmax over T in fp32 (or wider, for an fp64 model), T as the contiguous last axis (a softmax over the
    # strided T axis of (B, T, h) costs more than both matmuls at 4096 slots). Row h * S + s is (head h, query s).
    acc = torch.promote_types(dtype, torch.float32)
    scores_BhT = torch.empty(B, H * S, T, dtype=acc, device=latent_BTL.device)
    scores_BhT.copy_(scores_BTh.transpose(1, 2)).mul_(scale)
    if mask_B1ST is not None:
        keep_B1ST = mask_B1ST
        if valid is not None and valid < T:
            keep_B1ST = F.pad(keep_B1ST, (0, T - valid), value=False)
        scores_BhT = scores_BhT.view(B, H, S, T).masked_fill(~keep_B1ST, float("-inf")).view(B, H * S, T)
    elif valid is not None and valid < T:
        scores_BhT[..., valid:] = float("-inf")
    probs_BhT = F.softmax(scores_BhT, dim=-1).to(dtype)
    if dropout:
        probs_BhT = F.dropout(probs_BhT, p=dropout, training=True)
    # Attend over the latent, then W_UV per head: out[b, s, h] = W_UV[h] (sum_t p[b, h, s, t] c[b, t]). The matmul
    # runs over all L columns of the cache (a strided c-only view would be copied); the R rope columns are dropped.
    o_BhL = torch.bmm(probs_BhT, latent_BTL)
    out_BSHU = _output_heads(o_BhL[..., :C].view(B, H, S, C).permute(1, 3, 0, 2), w_uv_HUC)
    probs_BHST = probs_BhT.view(B, H, S, T)
    if valid is not None:
        probs_BHST = probs_BHST[..., :valid]
    return out_BSHU, probs_BHST


def _additive_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # torch's fused CPU attention takes an additive mask (0 or -inf) in the query's dtype.
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, float("-inf"))


def fused_attention_available(device: torch.device, dtype: torch.dtype) -> bool:
    """True where `fused_absorbed_attention` pays: on CPUs, with torch's fused CPU attention kernel, for 32- and
    64-bit types. There it reads the latent once instead of twice (fp32, 4096 slots, 8 heads: ~0.7 ms per layer
    against ~1.0 ms for the two matmuls); in bf16 its small per-block matmuls run at a fraction of oneDNN's rate
    for the whole-cache matmuls (~0.8 ms against ~0.4 ms), and inductor fuses those matmuls' softmax for
    compiled steps, so 16-bit types keep `absorbed_attention`."""
    return (
        device.type == "cpu"
        and dtype not in (torch.bfloat16, torch.float16)
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    )


def kv_chunks(B: int, S: int, T: int) -> int:
    """How many chunks of the cache one decode step attends over in parallel (flash-decoding): torch's fused CPU
    attention parallelises over batch rows x query "heads" only, so a single-sequence decode step would run on one
    thread. A power of two <= threads / (B * S), with chunks of at least KV_CHUNK_MIN slots (any T: when P does not
    divide T, the chunks overlap by T % P slots, see `fused_absorbed_attention`); 1 for S > 1 (the query rows then
    stand on their own parallel axis)."""
    if S > 1:
        return 1
    global _THREADS
    if not torch.compiler.is_compiling():  # (not traceable: compiled steps use the last eager call's count)
        _THREADS = torch.get_num_threads()
    chunks = 1
    while chunks * 2 * B <= _THREADS and T // (chunks * 2) >= KV_CHUNK_MIN:
        chunks *= 2
    return chunks


def fused_absorbed_attention(
    q_nope_BSHN: torch.Tensor,
    q_rope_BSHR: torch.Tensor,
    latent_BTL: torch.Tensor,
    w_uk_HNC: torch.Tensor,
    w_uv_HUC: torch.Tensor,
    mask_B1ST: torch.Tensor | None,
    scale: float,
    valid: int | None = None,
) -> torch.Tensor:
    """`absorbed_attention` (same arguments and output; no probabilities, no dropout) in one fused attention
    kernel: torch's CPU flash attention with the latent as both keys and values, the query rows of the heads side
    by side and the S query positions as its "heads" (the latent broadcast to them, stride 0). Scores and
    probabilities are never materialised and the latent is streamed once per step, not twice (scores, then
    output); the output's last R columns (the rope part of the latent) are dropped. When the batch has fewer rows
    than there are threads, the cache is split into `kv_chunks` chunks attended in parallel and merged by their
    log-sum-exp (flash-decoding)."""
    B, S, H, N = q_nope_BSHN.shape
    T, L = latent_BTL.shape[1:]
    C = w_uk_HNC.shape[-1]
    dtype = latent_BTL.dtype
    q_lat_BSHC = _query_latent(q_nope_BSHN, w_uk_HNC, dtype).permute(1, 2, 0, 3)
    q_BSHL = torch.cat([q_lat_BSHC, q_rope_BSHR.to(dtype)], dim=-1)
    # Slots to attend to, broadcast over the H query rows.
    keep_BS1T = None
    if mask_B1ST is not None:
        keep_BS1T = mask_B1ST.transpose(1, 2)
    if valid is not None and valid < T:
        if keep_BS1T is None:
            keep_BS1T = torch.ones(B, S, 1, valid, dtype=torch.bool, device=latent_BTL.device)
        keep_BS1T = F.pad(keep_BS1T, (0, T - valid), value=False)
    P = kv_chunks(B, S, T)
    if P == 1:
        bias_BS1T = None if keep_BS1T is None else _additive_mask(keep_BS1T, dtype)
        kv_BSTL = latent_BTL[:, None].expand(B, S, T, L)
        o_BSHL, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q_BSHL, kv_BSTL, kv_BSTL, attn_mask=bias_BS1T, scale=scale
        )
    else:  # S == 1: chunk p of the cache as "head" p, the query broadcast to every chunk
        # Chunk p holds slots p * step ... p * step + n - 1 (views, no copy). When P does not divide T (a static
        # cache's length is whatever generate asked for) the last n - step = T % P slots of each chunk but the last
        # are also the first slots of the next one: only the next one attends to them.
        step = T // P
        n = T - (P - 1) * step
        kv_BPnL = latent_BTL.unfold(1, n, step).transpose(-1, -2)
        keep_BPn = None if keep_BS1T is None else keep_BS1T.reshape(B, T).unfold(1, n, step)
        if n > step:
            slot_n = torch.arange(n, device=latent_BTL.device)
            last_P1 = torch.arange(P, device=latent_BTL.device)[:, None] == P - 1
            owned_Pn = (slot_n < step) | last_P1
            keep_BPn = owned_Pn.expand(B, P, n) if keep_BPn is None else keep_BPn & owned_Pn
        bias_BP1n = None if keep_BPn is None else _additive_mask(keep_BPn[:, :, None], dtype)
        o_BPHL, lse_BPH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q_BSHL.expand(B, P, H, L), kv_BPnL, kv_BPnL, attn_mask=bias_BP1n, scale=scale
        )
        if keep_BPn is not None:  # a chunk with no visible slot returns lse 0 and output 0: weight it 0
            lse_BPH = lse_BPH.masked_fill(~keep_BPn.any(-1, keepdim=True), float("-inf"))
        w_BPH1 = torch.softmax(lse_BPH, dim=1)[..., None]
        acc = torch.promote_types(dtype, torch.float32)
        o_BSHL = (o_BPHL.to(acc) * w_BPH1).sum(1, keepdim=True).to(dtype)
    return _output_heads(o_BSHL[..., :C].permute(2, 3, 0, 1), w_uv_HUC)


def set_mla_path(model: nn.Module, path: str) -> None:
    """Choose the attention form of every MLA module: "auto" (absorbed where it needs fewer FLOPs, i.e. decode),
    "absorbed" (always, where the weight allows) or "expanded" (always; the reference)."""
    if path not in MLA_PATHS:
        raise ValueError(f"mla path: choose from {', '.join(MLA_PATHS)}, got {path!r}")
    for module in model.modules():
        if hasattr(module, "mla_path"):
            module.mla_path = path
