"""`quest` (Quest-style, training-free): per key block the channel-wise min and max of K bound every
key of the block, so for a query q the largest score any key of the block can reach is

    ub(q, block) = sum_d max(q_d * kmin_d, q_d * kmax_d) = q+ . kmax + q- . kmin

(q+ / q- the positive / negative parts of q): two matmuls, no elementwise max over pairs. A block
whose keys are individually close to q scores high even when its *mean* key is not, which is what
mean pooling misses on peaky heads.

For prefill the query of a query block is its mean (the bound of the mean query's score, one
[nb x nb] score per head); softmax over the causal key blocks, with the log of the visible key count
as a prior (as the learned gate does), turns the bounds into the block-mass estimate the tau-mass
selection consumes. Cost O((S/bs)^2 D) per head plus one min/max pass over K.

`key_block_bounds` and `qk_upper_bound` are small pure functions on purpose: sparse decode scores
cached pages the same way (one query token against page bounds)."""

from __future__ import annotations

import torch

from sparse_core.estimators import EstimatorContext
from sparse_core.estimators.blocks import (
    causal_block_softmax,
    grouped_block_queries,
    num_blocks,
    softmax_scale,
)


def key_block_bounds(
    k: torch.Tensor, block_size: int, key_valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """k [B, H, S, D] -> (kmin, kmax), each float32 [B, H, nb, D]: channel-wise min / max over the
    valid positions of each block of `block_size` keys (a short last block is fine). A block with
    no valid position gets zeros (its bound is then 0; callers mask such blocks out)."""
    b, h, s, d = k.shape
    n = num_blocks(s, block_size)
    pad = n * block_size - s
    kf = k.float()
    valid = torch.ones(b, s, dtype=torch.bool, device=k.device) if key_valid is None else key_valid.bool()
    if pad:
        kf = torch.nn.functional.pad(kf, (0, 0, 0, pad))
        valid = torch.nn.functional.pad(valid, (0, pad), value=False)
    kb = kf.view(b, h, n, block_size, d)
    if key_valid is None and pad == 0:
        return kb.amin(dim=3), kb.amax(dim=3)
    w = valid.view(b, 1, n, block_size, 1)
    kmin = kb.masked_fill(~w, float("inf")).amin(dim=3)
    kmax = kb.masked_fill(~w, float("-inf")).amax(dim=3)
    empty = ~w.any(dim=3)
    return kmin.masked_fill(empty, 0.0), kmax.masked_fill(empty, 0.0)


def qk_upper_bound(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """q [..., M, D] queries, kmin/kmax [..., N, D] block bounds (same leading dims) -> [..., M, N]:
    the largest q . k any key k with kmin <= k <= kmax (channel-wise) can give, i.e.
    sum_d max(q_d kmin_d, q_d kmax_d). Exact as a bound: >= q . k for every key of the block."""
    qf = q.float()
    return torch.matmul(qf.clamp_min(0.0), kmax.transpose(-1, -2)) + torch.matmul(
        qf.clamp_max(0.0), kmin.transpose(-1, -2)
    )


def quest_scores(q: torch.Tensor, k: torch.Tensor, ctx: EstimatorContext) -> torch.Tensor:
    from sparse_core.estimators.learned_gate import visible_log_counts

    b, hq, s, d = q.shape
    bs = ctx.block_size
    qbar = grouped_block_queries(q, k.shape[1], bs, ctx.key_valid)  # [B, Hkv, G*n, D]
    kmin, kmax = key_block_bounds(k, bs, ctx.key_valid)  # [B, Hkv, n, D]
    n = kmin.shape[2]
    ub = qk_upper_bound(qbar, kmin, kmax).view(b, hq, n, n)
    logits = ub * softmax_scale(ctx.scale, d) + visible_log_counts(s, bs, q.device)
    return causal_block_softmax(logits, ctx.key_valid, bs, s)
