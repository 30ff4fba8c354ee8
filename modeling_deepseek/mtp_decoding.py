# MTP speculative decoding (DeepSeek-V3 report, section 5.4.3): the MTP module drafts the token after next, the
# main model verifies the drafts in the same forward that produces the next token, so accepted drafts yield up to
# K + 1 tokens per main-model forward. K = num_speculative_tokens (default 1, the report's setting); K > 1 chains
# the MTP module on its own output (its hidden state stands in for the main model's, as vLLM and SGLang do). Any
# batch size, left padding allowed; rows accept independently.
#
# One step, for every row (slot = position in the caches, p = the row's next RoPE position, J = K + 1):
#   main model on [last, d_1 .. d_K] at slots s .. s+K, positions p .. p+K  -> target distributions P_0 .. P_K
#   greedy: d_j is accepted iff it is argmax P_{j-1} and d_1 .. d_{j-1} were;  sampling: accept d_j with
#   probability min(1, P_{j-1}(d_j) / Q_j(d_j)), at the first rejection draw the correction from
#   max(0, P_{j-1} - Q_j) renormalised (standard speculative sampling, Leviathan et al. 2023 / Chen et al. 2023:
#   the emitted tokens follow the main model's distribution exactly).
#   a accepted: emit [d_1 .. d_a, final] where final is the correction, or after a = K a bonus token ~ P_K.
#   MTP module on the pairs (h_{s+j}, token after slot s+j) for j = 0 .. a  -> d'_1 from the row's last real slot,
#   then d'_2 .. d'_K by chaining (speculative MTP slots, dropped again before the next step).
# The MTP module at slot i sees (h_i, t_{i+1}) only once both are final, so its cache never needs a rollback beyond
# the chained slots and always holds the same slots as the main cache. Rejected drafts leave their slots behind:
# the slots no row accepted are cropped from both caches (exact rollback; always all of them at batch 1); the rest
# stay as holes that each row's attention mask hides (its RoPE positions stay contiguous), so rows may accept
# different numbers of tokens without ragged caches.
#
# Shapes: B batch, S new slots, J = K + 1 verified slots, K drafts, V vocab, D hidden.
import copy
import dataclasses

import torch

from .latent_cache import LatentCache

# GenerationConfig fields that change the output or the cache and that this loop does not implement, with their
# neutral values (None is always accepted).
UNSUPPORTED = {
    "num_beams": 1,
    "num_return_sequences": 1,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "force_words_ids": None,
    "min_new_tokens": None,
    "min_length": 0,
    "min_p": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "sequence_bias": None,
    "guidance_scale": None,
    "return_dict_in_generate": False,
    "cache_implementation": "dynamic",  # MTP decoding runs eagerly on its own preallocated latent cache
}
MODEL_KWARGS = ("attention_mask", "input_ids", "use_cache", "generation_config", "logits_to_keep")


@dataclasses.dataclass
class MTPStats:
    """What one speculative `generate` did: main-model verification steps, draft tokens proposed to rows still
    generating (draft_tokens per row per step), how many of them verification accepted (drafts the output then
    cuts, after an end of sequence or past max_new_tokens, included: acceptance measures the drafter), and the
    tokens emitted (all rows)."""

    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    new_tokens: int = 0
    draft_tokens: int = 1

    @property
    def acceptance(self) -> float:
        """Accepted / proposed draft tokens."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def accepted_per_step(self) -> float:
        """Mean accepted draft tokens per row per verification step (0 .. draft_tokens)."""
        return self.acceptance * self.draft_tokens

    def __str__(self) -> str:
        return (
            f"MTP acceptance {self.acceptance:.1%} ({self.accepted}/{self.drafted} drafts, {self.draft_tokens} per "
            f"step, {self.steps} steps, {1 + self.accepted_per_step:.2f} tokens per row per step)"
        )


@dataclasses.dataclass(frozen=True)
class Sampling:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0


def processed_probs(logits_BV: torch.Tensor, s: Sampling) -> torch.Tensor:
    """The distribution a sampling step draws from: temperature, then top-k, then top-p (transformers' order and
    rules: top-p keeps the smallest set whose mass exceeds top_p, at least one token), softmax in fp32."""
    scores = logits_BV.float() / s.temperature
    if s.top_k:
        kth = scores.topk(min(s.top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_scores, sorted_idx = scores.sort(dim=-1, descending=False)
        remove = sorted_scores.softmax(-1).cumsum(-1) <= (1 - s.top_p)
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(-1, sorted_idx, remove), float("-inf"))
    return scores.softmax(-1)


def _choose(logits_BV: torch.Tensor, s: Sampling) -> tuple[torch.Tensor, torch.Tensor | None]:
    # (token (B,), its distribution (B, V) when sampling)
    if not s.do_sample:
        return logits_BV.argmax(-1), None
    probs_BV = processed_probs(logits_BV, s)
    return torch.multinomial(probs_BV, 1)[:, 0], probs_BV


def _verify(
    logits_BJV: torch.Tensor, drafts_BK: torch.Tensor, q_BKV: torch.Tensor | None, s: Sampling
) -> tuple[torch.Tensor, torch.Tensor]:
    """(accepted drafts per row (B,) in 0..K: the length of the accepted prefix, the token after them (B,): the
    correction at the first rejection, or the bonus token after K accepted drafts)."""
    B, J, V = logits_BJV.shape
    K = J - 1
    if not s.do_sample:
        target_BJ = logits_BJV.argmax(-1)
        accepted_B = (drafts_BK == target_BJ[:, :K]).long().cumprod(-1).sum(-1)
        return accepted_B, target_BJ.gather(1, accepted_B[:, None])[:, 0]
    p_BJV = processed_probs(logits_BJV.reshape(B * J, V), s).view(B, J, V)
    p_draft_BK = p_BJV[:, :K].gather(2, drafts_BK[..., None])[..., 0]
    q_draft_BK = q_BKV.gather(2, drafts_BK[..., None])[..., 0]
    ok_BK = torch.rand_like(q_draft_BK) * q_draft_BK <= p_draft_BK  # u < p/q without dividing by zero
    accepted_B = ok_BK.long().cumprod(-1).sum(-1)
    # What to draw from after j accepted drafts: the residual max(0, P_j - Q_{j+1}) for j < K, P_K itself.
    residual_BKV = (p_BJV[:, :K] - q_BKV).clamp(min=0)
    mass_BK1 = residual_BKV.sum(-1, keepdim=True)
    # P_j == Q_{j+1} leaves no residual mass; the draft is then always accepted, so any valid row will do here.
    residual_BKV = torch.where(mass_BK1 > 0, residual_BKV / mass_BK1.clamp(min=1e-30), p_BJV[:, :K])
    after_BJV = torch.cat([residual_BKV, p_BJV[:, K:]], 1)
    final_BJ = torch.multinomial(after_BJV.reshape(B * J, V), 1).view(B, J)
    return accepted_B, final_BJ.gather(1, accepted_B[:, None])[:, 0]


class _Drafter:
    """The first MTP module with its own latent cache, fed (h_i, t_{i+1}) pairs slot by slot."""

    def __init__(self, base, capacity: int) -> None:
        self.base, self.layer = base, base.mtp_layers[0]
        self.cache = LatentCache(capacity)
        self.slots = 0

    def __call__(
        self, h_BSD: torch.Tensor, next_ids_BS: torch.Tensor, pos_BS: torch.Tensor, mask_BT: torch.Tensor
    ) -> torch.Tensor:
        from .modeling_deepseek import attention_mask_4d  # deferred: that module imports this one

        B, S = next_ids_BS.shape
        mask_B1ST = attention_mask_4d(mask_BT, B, S, self.slots, h_BSD.device)
        out = self.layer(next_ids_BS, h_BSD, self.base.rotary_emb(pos_BS), mask_B1ST, self.cache)
        self.slots += S
        return out.h_BSD  # shared_head of it: the logits of the token after next

    def logits(self, h_BD: torch.Tensor) -> torch.Tensor:
        return self.layer.shared_head(h_BD).float()

    def drafts(
        self, g_BD: torch.Tensor, pos_B: torch.Tensor, mask_BT: torch.Tensor, K: int, s: Sampling
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """K draft tokens (B, K) and, when sampling, their distributions (B, K, V). g_BD: the module's output at
        each row's last real slot; pos_B: the RoPE position of the row's last token (the one after that slot, not
        yet in the caches). Drafts 2..K chain the module on its own output at speculative slots, which are
        cropped again, so the cache keeps only final pairs."""
        tokens, probs = [], []
        token_B, q_BV = _choose(self.logits(g_BD), s)
        tokens.append(token_B)
        probs.append(q_BV)
        for j in range(1, K):
            ones_BJ = torch.ones(mask_BT.shape[0], j, dtype=mask_BT.dtype, device=mask_BT.device)
            g_BD = self(
                g_BD[:, None], token_B[:, None], (pos_B + j - 1)[:, None], torch.cat([mask_BT, ones_BJ], 1)
            )[:, 0]
            token_B, q_BV = _choose(self.logits(g_BD), s)
            tokens.append(token_B)
            probs.append(q_BV)
        if K > 1:  # only the MTP layer's slot of the cache holds anything (crop() would visit them all)
            self.cache.layers[self.layer.self_attn.layer_idx].crop(-(K - 1))
            self.slots -= K - 1
        return torch.stack(tokens, 1), torch.stack(probs, 1) if s.do_sample else None


def _generation_settings(model, generation_config, kwargs: dict) -> tuple:
    config = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
    model_kwargs = config.update(**kwargs)
    unknown = sorted(k for k in model_kwargs if k not in MODEL_KWARGS)
    if unknown:
        raise ValueError(f"generate(use_mtp=True): unsupported argument(s) {', '.join(unknown)}")
    for field, neutral in UNSUPPORTED.items():
        value = getattr(config, field, neutral)
        if value not in (neutral, None):
            raise ValueError(f"generate(use_mtp=True): {field}={value!r} is not supported (only {neutral!r})")
    sampling = Sampling(
        bool(config.do_sample),
        float(config.temperature if config.temperature is not None else 1.0),
        config.top_k,
        float(config.top_p if config.top_p is not None else 1.0),
    )
    eos = config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    return config, model_kwargs, sampling, eos, pad


@torch.no_grad()
def mtp_generate(model, inputs: torch.Tensor | None = None, generation_config=None, **kwargs):
    """Speculative generation with the MTP module as drafter. Returns (sequences (B, prompt + new), MTPStats).
    Greedy output equals plain greedy decoding; sampled output follows the same distribution.
    `num_speculative_tokens` (K, default 1): draft tokens per step, drafts 2..K by chaining the MTP module."""
    if not model.config.num_nextn_predict_layers:
        raise ValueError(
            "use_mtp=True needs an MTP module, and this model has none (num_nextn_predict_layers = 0)"
        )
    K = kwargs.pop("num_speculative_tokens", None)
    K = 1 if K is None else K
    if not isinstance(K, int) or isinstance(K, bool) or K < 1:
        raise ValueError(f"generate(use_mtp=True): num_speculative_tokens must be an integer >= 1, got {K!r}")
    config, model_kwargs, sampling, eos, pad = _generation_settings(model, generation_config, kwargs)
    input_ids = inputs if inputs is not None else model_kwargs.get("input_ids")
    if input_ids is None:
        raise ValueError("generate(use_mtp=True): pass input_ids")
    B, P = input_ids.shape
    J = K + 1
    device = input_ids.device
    mask_BT = model_kwargs.get("attention_mask")
    mask_BT = torch.ones_like(input_ids) if mask_BT is None else mask_BT.to(device=device, dtype=torch.long)
    max_new = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - P
    if max_new < 1:
        raise ValueError(f"generate(use_mtp=True): nothing to generate (max_new_tokens = {max_new})")
    base, head = model.model, model.lm_head
    rows = torch.arange(B, device=device)
    steps_J = torch.arange(J, device=device)
    eos_t = torch.tensor(eos, device=device, dtype=torch.long)
    emitted_BN = torch.full((B, max_new + J), pad, dtype=torch.long, device=device)

    # Prefill: the main model over the prompt, the first token, the MTP module over the prompt's pairs.
    # Slots: the prompt, then up to J per step (rejected drafts may stay as holes), K - 1 chained MTP slots.
    capacity = P + J * max_new + J
    cache = LatentCache(capacity)
    pos_BT = (mask_BT.cumsum(-1) - 1).clamp(min=0)
    h_BTD = base(
        input_ids, attention_mask=mask_BT, position_ids=pos_BT, past_key_values=cache, use_cache=True
    )[0]
    first_B, _ = _choose(head(h_BTD[:, -1]).float(), sampling)
    drafter = _Drafter(base, capacity + K)
    g_BTD = drafter(h_BTD, torch.cat([input_ids[:, 1:], first_B[:, None]], 1), pos_BT, mask_BT)
    last_B, next_pos_B = first_B, mask_BT.sum(-1)
    drafts_BK, q_BKV = drafter.drafts(g_BTD[:, -1], next_pos_B, mask_BT, K, sampling)
    emitted_BN[:, 0] = first_B
    n_B = torch.ones(B, dtype=torch.long, device=device)
    done_B = torch.isin(first_B, eos_t) | (n_B >= max_new)
    stats = torch.zeros(2, dtype=torch.long, device=device)  # drafts proposed, drafts accepted
    steps = 0

    while not bool(done_B.all()):
        steps += 1
        active_B = ~done_B
        pos_BJ = next_pos_B[:, None] + steps_J
        step_mask_BT = torch.cat([mask_BT, torch.ones(B, J, dtype=torch.long, device=device)], 1)
        ids_BJ = torch.cat([last_B[:, None], drafts_BK], 1)
        h_BJD = base(
            ids_BJ, attention_mask=step_mask_BT, position_ids=pos_BJ, past_key_values=cache, use_cache=True
        )[0]
        accepted_B, final_B = _verify(head(h_BJD).float(), drafts_BK, q_BKV, sampling)
        accepted_B = torch.where(active_B, accepted_B, 0)
        stats += torch.stack([active_B.sum() * K, accepted_B.sum()])

        # Emit [d_1 .. d_a, final], cut after an end-of-sequence token.
        tokens_BJ = torch.cat([drafts_BK, final_B[:, None]], 1)
        tokens_BJ[rows, accepted_B] = final_B
        real_BJ = steps_J <= accepted_B[:, None]
        eos_BJ = torch.isin(tokens_BJ, eos_t) & real_BJ
        ended_B = eos_BJ.any(-1)
        count_B = torch.where(ended_B, eos_BJ.long().argmax(-1) + 1, accepted_B + 1)
        count_B = torch.where(active_B, count_B, 0)
        # (Rows already done only ever write padding, past their end; columns are clamped to the buffer.)
        cols_BJ = (n_B[:, None] + steps_J).clamp(max=max_new + K)
        emitted_BN[rows[:, None], cols_BJ] = torch.where(steps_J < count_B[:, None], tokens_BJ, pad)
        n_B = n_B + count_B
        done_B = done_B | (active_B & ended_B) | (n_B >= max_new)

        # Roll back: crop the slots no row accepted, hide the others per row.
        S = int(accepted_B.max()) + 1
        if S < J:
            cache.crop(S - J)
        mask_BT = torch.cat([mask_BT, real_BJ[:, :S].long()], 1)
        next_pos_B = next_pos_B + accepted_B + 1
        last_B = final_B
        if bool(done_B.all()):
            break  # no drafts after the last verification step

        # The MTP module over the new real pairs, then draft from each row's last real slot.
        g_BSD = drafter(h_BJD[:, :S], tokens_BJ[:, :S], pos_BJ[:, :S], mask_BT)
        drafts_BK, q_BKV = drafter.drafts(g_BSD[rows, accepted_B], next_pos_B, mask_BT, K, sampling)

    width = int(n_B.clamp(max=max_new).max())
    drafted, accepted = stats.tolist()
    result = MTPStats(steps, drafted, accepted, int(n_B.clamp(max=max_new).sum()), K)
    return torch.cat([input_ids, emitted_BN[:, :width]], 1), result
