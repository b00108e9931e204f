"""`PagedCache`: a transformers `DynamicCache` whose layers append into preallocated buffers.

transformers' `DynamicLayer` concatenates the whole K and V cache with every new token, so a decode
step at 8k tokens copies ~6 MB per layer before attention reads anything -- work that grows with the
context exactly like attention does, and that sparse decode cannot skip. `PagedLayer` writes new
tokens into a buffer that grows by doubling (amortised O(new tokens) per step) and hands attention a
view of the filled part. Dense SDPA reads the view as it is; the decode kernel addresses rows in the
buffer (sparse_core.kernels.decode), so a sparse step touches only the pages it selects.

Use: ``model.generate(ids, cache=PagedCache())`` (``cache=`` in a forward too). Works with
full-attention layers; for models with sliding-window layers keep transformers' own cache:
`paged_cache_kwargs(model)` is ``{"cache": PagedCache()}`` where it applies and ``{}`` otherwise (what
`sparse_core.tasks.score_request` and the served pyfunc pass to the model)."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

MIN_CAPACITY = 256


class PagedLayer(DynamicLayer):
    """A full-attention cache layer backed by capacity-doubling buffers [B, H, capacity, D]."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._kbuf: torch.Tensor | None = None
        self._vbuf: torch.Tensor | None = None
        self._len = 0

    def _ensure(self, key_states: torch.Tensor, value_states: torch.Tensor, need: int) -> None:
        cap = 0 if self._kbuf is None else self._kbuf.shape[2]
        if need <= cap:
            return
        new = max(MIN_CAPACITY, 2 * cap, need)
        new = -(-new // MIN_CAPACITY) * MIN_CAPACITY  # whole pages per row: one gather (kernels.decode)
        b, h, _, d = key_states.shape
        # zero-filled: the decode kernel reads the newest page whole and masks the rows past the end,
        # which must be finite (0 * NaN is NaN)
        kb = torch.zeros(b, h, new, d, dtype=key_states.dtype, device=key_states.device)
        vb = torch.zeros(
            b, h, new, value_states.shape[-1], dtype=value_states.dtype, device=value_states.device
        )
        if self._len:
            kb[:, :, : self._len] = self._kbuf[:, :, : self._len]
            vb[:, :, : self._len] = self._vbuf[:, :, : self._len]
        self._kbuf, self._vbuf = kb, vb

    def _publish(self) -> None:
        self.keys = self._kbuf[:, :, : self._len]
        self.values = self._vbuf[:, :, : self._len]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[2]
        self._ensure(key_states, value_states, self._len + n)
        self._kbuf[:, :, self._len : self._len + n] = key_states
        self._vbuf[:, :, self._len : self._len + n] = value_states
        self._len += n
        self._publish()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._len if self.is_initialized else 0

    def reset(self) -> None:
        self._kbuf = self._vbuf = None
        self._len = 0
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self._len = max(0, self._len + tokens_to_remove)
        self._publish()

    def _rebuild(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self._kbuf = self._vbuf = None
        self._len = 0
        self._ensure(keys, values, keys.shape[2])
        self._kbuf[:, :, : keys.shape[2]] = keys
        self._vbuf[:, :, : values.shape[2]] = values
        self._len = keys.shape[2]
        self._publish()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.get_seq_length() > 0:
            idx = beam_idx.to(self.keys.device)
            self._rebuild(self.keys.index_select(0, idx), self.values.index_select(0, idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            self._rebuild(self.keys.repeat_interleave(repeats, 0), self.values.repeat_interleave(repeats, 0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self._rebuild(self.keys[indices], self.values[indices])


def paged_buffer(x: torch.Tensor, capacity: int | None = None) -> torch.Tensor:
    """A zero-filled buffer laid out as a `PagedLayer`'s ([B, H, capacity, D], capacity a multiple of
    MIN_CAPACITY) holding `x` [B, H, L, D] at its start: `buf[:, :, :n]` is what the layer hands
    attention at n cached tokens (benchmarks time decode steps on it)."""
    b, h, length, d = x.shape
    cap = -(-max(capacity or 0, length, 1) // MIN_CAPACITY) * MIN_CAPACITY
    buf = torch.zeros(b, h, cap, d, dtype=x.dtype, device=x.device)
    buf[:, :, :length] = x
    return buf


class PagedCache(DynamicCache):
    """A `DynamicCache` of `PagedLayer`s (layers are added as the model's layers first write)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer_class_to_replicate = PagedLayer


def full_attention_only(config) -> bool:
    """True when every attention layer of the model reads the whole cache (no sliding window)."""
    types = getattr(config, "layer_types", None)
    if types:
        return all(t == "full_attention" for t in types)
    return not getattr(config, "use_sliding_window", False) and not getattr(config, "sliding_window", None)


def paged_cache_kwargs(model) -> dict:
    """``{"cache": PagedCache()}`` for a model whose layers all attend to the whole cache, else ``{}``
    (transformers' own cache, which knows sliding windows)."""
    return {"cache": PagedCache()} if full_attention_only(model.config) else {}
