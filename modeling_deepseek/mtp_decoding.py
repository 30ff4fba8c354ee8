# MTP speculative decoding (DeepSeek-V3 report, section 5.4.3): the MTP module drafts the token after next, the
# main model verifies it in the same forward that produces the next token, so an accepted draft yields two tokens
# per main-model forward. Any batch size, left padding allowed; rows accept independently.
#
# One step, for every row (slot = position in the caches, p = the row's next RoPE position):
#   main model on [last, draft] at slots (s, s+1), positions (p, p+1)  -> target distributions P0, P1
#   greedy: accept iff argmax P0 == draft;  sampling: accept with probability min(1, P0(draft) / Q(draft)), else
#   draw the correction from max(0, P0 - Q) renormalised (standard speculative sampling, Leviathan et al. 2023 /
#   Chen et al. 2023: the emitted tokens follow the main model's distribution exactly).
#   accepted: emit [draft, bonus ~ P1];  rejected: emit [correction].
#   MTP module on the pairs (h_s, token after slot s) [and (h_{s+1}, bonus)]  -> the next draft.
# The MTP module at slot i sees (h_i, t_{i+1}) only once both are final, so its cache never needs a rollback and
# always holds the same slots as the main cache. A rejected draft leaves its slot s+1 behind: when every row
# rejected, both caches are cropped by one slot (exact rollback; always so at batch 1); otherwise that slot stays
# as a hole that the row's attention mask hides (its RoPE positions stay contiguous), so rows may accept different
# numbers of tokens without ragged caches.
#
# Shapes: B batch, S new slots, V vocab, D hidden.
import copy
import dataclasses

import torch

from .latent_cache import LatentCache

# GenerationConfig fields that change the output and that this loop does not implement, with their neutral values.
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
}
MODEL_KWARGS = ("attention_mask", "input_ids", "use_cache", "generation_config", "logits_to_keep")


@dataclasses.dataclass
class MTPStats:
    """What one speculative `generate` did: main-model verification steps, draft tokens proposed to rows still
    generating, how many of them were accepted, and the tokens emitted (all rows)."""

    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    new_tokens: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def accepted_per_step(self) -> float:
        """Mean accepted draft tokens per row per verification step (0..1 with one MTP module)."""
        return self.acceptance

    def __str__(self) -> str:
        return (
            f"MTP acceptance {self.acceptance:.1%} ({self.accepted}/{self.drafted} drafts, {self.steps} steps, "
            f"{1 + self.acceptance:.2f} tokens per row per step)"
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
    logits_B2V: torch.Tensor, draft_B: torch.Tensor, q_BV: torch.Tensor | None, s: Sampling
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(accepted (B,) bool, first token (B,): the draft or the correction, bonus token (B,) after an accepted
    draft)."""
    if not s.do_sample:
        target_B2 = logits_B2V.argmax(-1)
        return target_B2[:, 0] == draft_B, target_B2[:, 0], target_B2[:, 1]
    p0_BV, p1_BV = processed_probs(logits_B2V[:, 0], s), processed_probs(logits_B2V[:, 1], s)
    p_draft, q_draft = p0_BV.gather(1, draft_B[:, None])[:, 0], q_BV.gather(1, draft_B[:, None])[:, 0]
    accepted_B = torch.rand_like(q_draft) * q_draft <= p_draft  # u < p/q without dividing by zero
    residual_BV = (p0_BV - q_BV).clamp(min=0)
    mass_B1 = residual_BV.sum(-1, keepdim=True)
    # P0 == Q leaves no residual mass; the draft is then always accepted, so any valid row will do here.
    residual_BV = torch.where(mass_B1 > 0, residual_BV / mass_B1.clamp(min=1e-30), p0_BV)
    correction_B = torch.multinomial(residual_BV, 1)[:, 0]
    bonus_B = torch.multinomial(p1_BV, 1)[:, 0]
    return accepted_B, torch.where(accepted_B, draft_B, correction_B), bonus_B


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


def _generation_settings(model, generation_config, kwargs: dict) -> tuple:
    config = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
    model_kwargs = config.update(**kwargs)
    unknown = sorted(k for k in model_kwargs if k not in MODEL_KWARGS)
    if unknown:
        raise ValueError(f"generate(use_mtp=True): unsupported argument(s) {', '.join(unknown)}")
    for field, neutral in UNSUPPORTED.items():
        value = getattr(config, field, neutral)
        if value not in (neutral, None) and not (field == "no_repeat_ngram_size" and value == 0):
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
    Greedy output equals plain greedy decoding; sampled output follows the same distribution."""
    if not model.config.num_nextn_predict_layers:
        raise ValueError(
            "use_mtp=True needs an MTP module, and this model has none (num_nextn_predict_layers = 0)"
        )
    config, model_kwargs, sampling, eos, pad = _generation_settings(model, generation_config, kwargs)
    input_ids = inputs if inputs is not None else model_kwargs.get("input_ids")
    if input_ids is None:
        raise ValueError("generate(use_mtp=True): pass input_ids")
    B, P = input_ids.shape
    device = input_ids.device
    mask_BT = model_kwargs.get("attention_mask")
    mask_BT = torch.ones_like(input_ids) if mask_BT is None else mask_BT.to(device=device, dtype=torch.long)
    max_new = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - P
    if max_new < 1:
        raise ValueError(f"generate(use_mtp=True): nothing to generate (max_new_tokens = {max_new})")
    base, head = model.model, model.lm_head
    rows = torch.arange(B, device=device)
    eos_t = torch.tensor(eos, device=device, dtype=torch.long)
    emitted_BN = torch.full((B, max_new + 2), pad, dtype=torch.long, device=device)

    # Prefill: the main model over the prompt, the first token, the MTP module over the prompt's pairs.
    # Slots: the prompt, then up to two per step (a rejected draft may stay as a hole).
    capacity = P + 2 * max_new + 2
    cache = LatentCache(capacity)
    pos_BT = (mask_BT.cumsum(-1) - 1).clamp(min=0)
    h_BTD = base(
        input_ids, attention_mask=mask_BT, position_ids=pos_BT, past_key_values=cache, use_cache=True
    )[0]
    first_B, _ = _choose(head(h_BTD[:, -1]).float(), sampling)
    drafter = _Drafter(base, capacity)
    g_BTD = drafter(h_BTD, torch.cat([input_ids[:, 1:], first_B[:, None]], 1), pos_BT, mask_BT)
    draft_B, q_BV = _choose(drafter.logits(g_BTD[:, -1]), sampling)
    emitted_BN[:, 0] = first_B
    n_B = torch.ones(B, dtype=torch.long, device=device)
    done_B = torch.isin(first_B, eos_t) | (n_B >= max_new)
    last_B, next_pos_B = first_B, mask_BT.sum(-1)
    stats = torch.zeros(2, dtype=torch.long, device=device)  # drafts proposed, drafts accepted
    steps = 0

    while not bool(done_B.all()):
        steps += 1
        active_B = ~done_B
        pos_B2 = next_pos_B[:, None] + torch.arange(2, device=device)
        step_mask_BT = torch.cat([mask_BT, torch.ones(B, 2, dtype=torch.long, device=device)], 1)
        ids_B2 = torch.stack([last_B, draft_B], 1)
        h_B2D = base(
            ids_B2, attention_mask=step_mask_BT, position_ids=pos_B2, past_key_values=cache, use_cache=True
        )[0]
        accepted_B, tok0_B, tok1_B = _verify(head(h_B2D).float(), draft_B, q_BV, sampling)
        accepted_B &= active_B
        stats += torch.stack([active_B.sum(), accepted_B.sum()])

        # Emit [tok0] or [tok0, tok1]; nothing after an end-of-sequence token.
        two_B = accepted_B & ~torch.isin(tok0_B, eos_t)
        # (Rows already done only ever write padding, at clamped slots past their end.)
        emitted_BN[rows, n_B.clamp(max=max_new + 1)] = torch.where(active_B, tok0_B, pad)
        emitted_BN[rows, (n_B + 1).clamp(max=max_new + 1)] = torch.where(two_B, tok1_B, pad)
        ended_B = torch.isin(tok0_B, eos_t) | (two_B & torch.isin(tok1_B, eos_t))
        n_B = n_B + active_B.long() + two_B.long()
        done_B = done_B | (active_B & ended_B) | (n_B >= max_new)

        # Roll back the rejected slot: exactly when no row accepted, as a masked hole otherwise.
        any_accepted = bool(accepted_B.any())
        S = 2 if any_accepted else 1
        if not any_accepted:
            cache.crop(-1)
        mask_BT = torch.cat([mask_BT, torch.ones_like(accepted_B, dtype=torch.long)[:, None]], 1)
        if any_accepted:
            mask_BT = torch.cat([mask_BT, accepted_B.long()[:, None]], 1)
        next_pos_B = next_pos_B + 1 + accepted_B.long()
        last_B = torch.where(accepted_B, tok1_B, tok0_B)

        # Draft the next token from the slot that is now the row's last one.
        g_BSD = drafter(h_B2D[:, :S], torch.stack([tok0_B, tok1_B], 1)[:, :S], pos_B2[:, :S], mask_BT)
        pick_B = accepted_B.long() if S == 2 else torch.zeros_like(accepted_B, dtype=torch.long)
        draft_B, q_BV = _choose(drafter.logits(g_BSD[rows, pick_B]), sampling)

    width = int(n_B.clamp(max=max_new).max())
    drafted, accepted = stats.tolist()
    result = MTPStats(steps, drafted, accepted, int(n_B.clamp(max=max_new).sum()))
    return torch.cat([input_ids, emitted_BN[:, :width]], 1), result
