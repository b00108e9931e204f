"""Sparse decode inside the retrofit's attention function (sparse_core.retrofit).

Every attention call of a sparsified model whose plan has a `decode` section passes through
`decode_attention_forward` first: it keeps the layer's page summaries in step with the cache's keys
(a prefill builds them in one pass; each later call appends only the new tokens), and for a cached
decode step (one query token against a longer cache) scores the pages, selects per KV head and runs
the decode kernel. It returns None for everything else, and the caller carries on as before
(sparse prefill or dense SDPA). Below the plan's `break_even_tokens` a call does nothing at all (no
summaries either: they are built in one pass when the cache first reaches it), so a short cache
decodes exactly as the dense model does, at its cost."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from sparse_core.decode.pages import PageSummaries, summarize, sync
from sparse_core.decode.plan import DecodeLayerParams
from sparse_core.decode.scoring import (
    group_page_scores,
    local_start,
    page_logits,
    page_mass,
    select_pages,
    select_pages_forced,
)
from sparse_core.kernels.decode import decode_attention, decode_attention_pages, paged_rows


@dataclass
class DecodeStats:
    """What sparse decode did: per-layer decode calls, tokens read vs tokens cached, timings."""

    calls: int = 0
    dense_calls: int = 0  # decode calls that read the whole cache (dense layer, short cache, unsupported)
    short_calls: int = 0  # of those, calls below the plan's break-even cache length
    kept_tokens: int = 0
    cached_tokens: int = 0
    estimator_seconds: float = 0.0
    kernel_seconds: float = 0.0

    def reset(self) -> None:
        self.calls = self.dense_calls = self.short_calls = self.kept_tokens = self.cached_tokens = 0
        self.estimator_seconds = self.kernel_seconds = 0.0

    @property
    def density(self) -> float:
        """Share of cached tokens the decode steps read (NaN before any decode step)."""
        return self.kept_tokens / self.cached_tokens if self.cached_tokens else float("nan")


def _key_valid(attention_mask: torch.Tensor | None, kv_len: int) -> torch.Tensor | None | bool:
    """[B, L] bool for a decode step's mask (None: no padding; False: a mask we do not handle)."""
    if attention_mask is None:
        return None
    m = attention_mask
    if m.ndim != 4 or m.shape[-1] != kv_len:
        return False
    row = m[:, 0, -1, :]
    kv = row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2
    return None if bool(kv.all()) else kv


def _page_valid(key_valid: torch.Tensor, page_size: int) -> torch.Tensor:
    b, n = key_valid.shape
    pages = -(-n // page_size)
    kv = torch.nn.functional.pad(key_valid, (0, pages * page_size - n), value=False)
    return kv.view(b, pages, page_size).any(-1)


def _count_dense(stats: DecodeStats, kv_len: int) -> None:
    stats.calls += 1
    stats.dense_calls += 1
    stats.kept_tokens += kv_len
    stats.cached_tokens += kv_len


def decode_attention_forward(
    layer_state: Any,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    dropout: float,
    kwargs: dict,
) -> tuple[torch.Tensor, None] | None:
    state = layer_state.model_state
    plan = state.plan
    params = plan.decode.layer_params(layer_state.layer_idx, plan.block_size)
    q_len, kv_len = query.shape[2], key.shape[2]
    stats: DecodeStats = state.decode_stats
    short = kv_len < params.break_even_tokens
    if params.dense or short:
        if q_len == 1 and kv_len > 1:
            _count_dense(stats, kv_len)
            stats.short_calls += short and not params.dense
        elif short and q_len == kv_len:  # a new sequence: summaries of an old one must not linger
            layer_state.pages = None
        return None
    ps = params.page_size
    t0 = time.perf_counter()
    if q_len == kv_len:
        layer_state.pages = summarize(key, ps)
        return None
    pages = layer_state.pages = sync(layer_state.pages, key, ps)
    window = kwargs.get("sliding_window")
    # A sliding-window cache never hands a layer more than `window` keys (transformers keeps the last
    # window - 1 and appends the new one), so "beyond its window" is a full window, not a longer cache:
    # from there the oldest keys slide out each step and the layer decodes densely, as documented.
    if q_len != 1:
        return None
    key_valid = _key_valid(attention_mask, kv_len)
    if (
        (dropout > 0.0 and module.training)
        or (window is not None and kv_len >= window)
        or kwargs.get("softcap") is not None
        or key_valid is False
    ):
        _count_dense(stats, kv_len)  # a decode step the caller runs densely counts, as a dense layer's does
        return None
    stats.calls += 1
    stats.cached_tokens += kv_len
    start = local_start(kv_len, ps, params.local_pages)
    n_pages = pages.n_pages
    keep = params.keep_pages(n_pages)
    if start == 0 or (keep is not None and keep >= n_pages and params.tau is None):
        stats.dense_calls += 1
        stats.kept_tokens += kv_len
        return None  # nothing to skip: the caller's dense path is exact and cheaper
    out, kept, t1 = sparse_decode_step(
        plan, params, pages, query, key, value, start, key_valid=key_valid, scaling=scaling
    )
    t2 = time.perf_counter()
    stats.kept_tokens += kept
    stats.estimator_seconds += t1 - t0
    stats.kernel_seconds += t2 - t1
    return out.transpose(1, 2).contiguous(), None


def sparse_decode_step(
    plan: Any,
    params: DecodeLayerParams,
    pages: PageSummaries,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    start: int,
    *,
    key_valid: torch.Tensor | None = None,
    scaling: float | None = None,
) -> tuple[torch.Tensor, int, float]:
    """Score the pages, select per KV head, attend: (out [B, Hq, 1, D], cached tokens read per
    (batch, KV head), the time scoring and selection ended).

    The fast path -- a page budget, no key padding, K/V pages laid out as rows (PagedCache) -- is one
    topk over the pages with the sink and local pages forced, one gather of whole pages for K and V
    each, and one attention call over them. Otherwise (tau, padding, transformers' DynamicCache)
    the selected pages and the local window are attended apart and merged by log-sum-exp."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    logits = page_logits(
        params.estimator, plan, params.layer_idx, query.select(2, 0), key, pages, scale, key_valid
    )
    ps, length = params.page_size, key.shape[2]
    keep = params.keep_pages(pages.n_pages)
    rows = paged_rows(key, value, ps) if key_valid is None and params.tau is None else None
    if rows is not None and keep is not None:
        sel = select_pages_forced(
            group_page_scores(logits, key.shape[1]),
            sink_pages=params.sink_pages,
            local_pages=params.local_pages,
            keep_pages=keep,
        )
        t1 = time.perf_counter()
        out = decode_attention_pages(query, rows, sel, ps, length, scale=scaling)
        return out, sel.shape[-1] * ps - (-length % ps), t1
    pv = _page_valid(key_valid, ps) if key_valid is not None else None
    mass = page_mass(logits, key.shape[1], pv)
    sel = select_pages(
        mass,
        sink_pages=params.sink_pages,
        local_pages=params.local_pages,
        keep_pages=keep,
        tau=params.tau,
    )
    t1 = time.perf_counter()
    out = decode_attention(query, key, value, sel, ps, start, key_valid=key_valid, scale=scaling)
    return out, sel.shape[-1] * ps + (length - start), t1
