# A growing cache whose append is O(new tokens), not O(cached tokens). transformers' DynamicLayer appends with
# torch.cat, i.e. copies every cached token at every decode step: at 4096 tokens of context that copy alone costs
# more than the absorbed attention reads. Here `keys` / `values` are views of preallocated buffers; appending
# writes the new slots and, when the buffer is full, moves to one 1.5x larger (amortised O(1) per token). A
# capacity hint (prompt + new tokens, known to generate) avoids any regrowth.
#
# The layer is a DynamicLayer (same public attributes, so crop, batch_select_indices, reorder_cache and friends
# keep working): whenever one of those replaced `keys` by a tensor that is not a prefix of the buffer, the next
# update adopts it into a fresh buffer. MLA stores its whole latent as `keys` (B, 1, T, C + R: c_kv, then k_rope)
# and empty `values` (B, 1, T, 0).
#
# Buffers start zeroed and their capacity is a multiple of BUCKET, so `padded(n)` can hand out views longer than
# what is held, whose extra slots hold finite values (zeros, or tokens cropped away): absorbed attention masks them
# and keeps its shapes constant for BUCKET steps (mla_absorbed.attention_length).
import functools

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

GROWTH = 1.5
MIN_CAPACITY = 256
BUCKET = 64


class LatentCacheLayer(DynamicLayer):
    def __init__(self, capacity_hint: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.capacity_hint = capacity_hint
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def _used(self) -> int:
        # Tokens held, if keys/values are still prefixes of the buffers; -1 when someone replaced them.
        if self._buffers is None or self.keys is None or self.values is None:
            return -1
        kbuf, vbuf = self._buffers
        for t, buf in ((self.keys, kbuf), (self.values, vbuf)):
            if t.data_ptr() != buf.data_ptr() or t.shape[:2] != buf.shape[:2] or t.stride() != buf.stride():
                return -1
        return self.keys.shape[-2]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        used = self._used()
        if used < 0:  # first update, or keys/values were replaced (reorder, select, ...): adopt them
            used = self.keys.shape[-2] if self.keys.numel() else 0
            held = (self.keys, self.values) if used else None
            self._buffers = None
        else:
            held = None
        need = used + key_states.shape[-2]
        if self._buffers is None or need > self._buffers[0].shape[-2]:
            capacity = max(need, MIN_CAPACITY, self.capacity_hint, int(GROWTH * used))
            capacity = -(-capacity // BUCKET) * BUCKET
            old = held or (self.keys, self.values)
            self._buffers = tuple(
                s.new_zeros((*s.shape[:2], capacity, s.shape[-1])) for s in (key_states, value_states)
            )
            if used:
                self._buffers[0][:, :, :used] = old[0]
                self._buffers[1][:, :, :used] = old[1]
        kbuf, vbuf = self._buffers
        kbuf[:, :, used:need] = key_states
        vbuf[:, :, used:need] = value_states
        self.keys, self.values = kbuf[:, :, :need], vbuf[:, :, :need]
        return self.keys, self.values

    def padded(self, length: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Views of the first `length` slots of the buffers (the held tokens, then finite filler), or None when
        keys/values are not prefixes of the buffers or the buffers are shorter."""
        if self._used() < 0 or length > self._buffers[0].shape[-2]:
            return None
        kbuf, vbuf = self._buffers
        return kbuf[:, :, :length], vbuf[:, :, :length]

    def reset(self) -> None:
        self._buffers = None
        super().reset()


class LatentCache(DynamicCache):
    """DynamicCache with LatentCacheLayer layers (created lazily, one per layer index that updates)."""

    def __init__(self, capacity_hint: int = 0) -> None:
        super().__init__()
        self.layer_class_to_replicate = functools.partial(LatentCacheLayer, capacity_hint=capacity_hint)
