"""Block selection: from estimated block mass to the block-index structure every kernel consumes.

Per query block keep the fewest key blocks whose estimated mass reaches tau, always keep the sink
blocks and the local (diagonal) window, honour the top-k cap and the min-density floor. Pure and
vectorised: one sort over [B, H, nb, nb]."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class BlockSelection:
    """Selected key blocks per (batch, selection head, query block).

    ``kv_indices[b, h, i, :kv_counts[b, h, i]]`` are the kept key blocks of query block i in
    ascending order; the last one is always the diagonal block i. Entries past the count are 0.
    ``heads`` is the number of selection heads: the query heads, or the KV heads when the plan
    groups heads (then every query head of a group uses its KV head's selection)."""

    block_size: int
    seq_len: int
    kv_indices: torch.Tensor  # int32 [B, H, nb, nb]
    kv_counts: torch.Tensor  # int32 [B, H, nb]
    density: float  # kept / causal blocks, over everything
    head_density: torch.Tensor  # float32 [H]: kept / causal blocks per selection head (batch mean)

    @property
    def num_blocks(self) -> int:
        return self.kv_indices.shape[-1]

    @property
    def heads(self) -> int:
        return self.kv_indices.shape[1]

    def mask(self) -> torch.Tensor:
        """Dense bool [B, H, nb, nb] of kept blocks (for tests and pictures)."""
        n = self.num_blocks
        slots = torch.arange(n, device=self.kv_indices.device)
        live = slots < self.kv_counts[..., None].long()
        idx = torch.where(live, self.kv_indices.long(), n)  # dead slots go to a spare column
        shape = (*self.kv_indices.shape[:-1], n + 1)
        out = torch.zeros(shape, dtype=torch.bool, device=idx.device).scatter_(-1, idx, True)
        return out[..., :n]


def select_blocks(
    scores: torch.Tensor,
    *,
    block_size: int,
    seq_len: int,
    tau: float | torch.Tensor,
    sink_blocks: int = 1,
    local_blocks: int = 1,
    top_k: int | None = None,
    min_density: float | None = None,
    count_levels: int | None = None,
    core: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> BlockSelection:
    """scores: float [B, H, nb, nb] estimated mass (0 above the diagonal); tau: float or [H].

    ``count_levels``: round each row's block count up to one of this many sizes per octave (the
    extra blocks are the next best by score; the cap still holds). The gather kernel runs one call
    per distinct count, so fewer distinct counts mean fewer, larger calls. ``core``: what computes
    the index tensors, `selection_tensors` or a compiled copy of it (the same function)."""
    b, h, n, n2 = scores.shape
    if n != n2:
        raise ValueError(f"scores must be square over blocks, got {tuple(scores.shape)}")
    tau_t = torch.as_tensor(tau, dtype=torch.float32, device=scores.device)
    kv_indices, count = (core or selection_tensors)(
        scores,
        tau_t,
        sink_blocks=sink_blocks,
        local_blocks=local_blocks,
        top_k=top_k,
        min_density=min_density,
        count_levels=count_levels,
    )
    kept_total = count.sum(dim=(0, 2)).cpu()  # [H], the one host synchronisation
    causal_total = float(n * (n + 1) // 2)
    head_density = kept_total.float() / (b * causal_total)
    density = float(kept_total.sum().item()) / (b * h * causal_total)
    return BlockSelection(
        block_size=block_size,
        seq_len=seq_len,
        kv_indices=kv_indices,
        kv_counts=count,
        density=density,
        head_density=head_density,
    )


def selection_tensors(
    scores: torch.Tensor,
    tau: torch.Tensor,
    *,
    sink_blocks: int,
    local_blocks: int,
    top_k: int | None,
    min_density: float | None,
    count_levels: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule itself, static-shaped tensor code with no host synchronisation (so it compiles to a few
    fused kernels): scores [B, H, nb, nb] and tau (a 0-d or [H] tensor) -> (kv_indices int32
    [B, H, nb, nb], kv_counts int32 [B, H, nb])."""
    b, h, n, _ = scores.shape
    dev = scores.device
    i = torch.arange(n, device=dev)[:, None]
    j = torch.arange(n, device=dev)[None, :]
    causal = j <= i
    forced = causal & ((j < sink_blocks) | (j > i - local_blocks))
    p = torch.where(causal, scores.float().clamp_min(0.0), torch.zeros((), device=dev))
    n_causal = (i[:, 0] + 1).view(1, 1, n)
    n_forced = forced.sum(-1).view(1, 1, n)

    tau_t = tau.view(1, h, 1) if tau.ndim == 1 else tau.view(1, 1, 1)
    # Forced blocks sort first (key >= 2), then causal blocks by mass, then non-causal (key -1).
    key = torch.where(forced, 2.0 + p, torch.where(causal, p, torch.full((), -1.0, device=dev)))
    order = torch.argsort(key, dim=-1, descending=True, stable=True)
    p_sorted = torch.gather(p, -1, order)
    before = torch.cumsum(p_sorted, dim=-1) - p_sorted
    # Mass is normalised to the estimator's row total so tau means "share of the estimated mass".
    total = p_sorted.sum(-1, keepdim=True).clamp_min(1e-30)
    need = (before < tau_t[..., None] * total).sum(-1)
    need = torch.where(tau_t >= 1.0, n_causal.expand_as(need), need)
    count = torch.maximum(need, n_forced)
    if min_density is not None and min_density > 0:
        floor = torch.ceil(n_causal.float() * min_density - 1e-6).long()
        count = torch.maximum(count, floor)
    if count_levels:
        step = torch.exp2(torch.floor(torch.log2(count.float().clamp_min(1.0)))) / count_levels
        step = step.clamp_min(1.0)
        count = (torch.ceil(count.float() / step) * step).long()
    if top_k is not None:
        count = torch.minimum(count, torch.clamp(n_forced, min=top_k))
    count = torch.minimum(count, n_causal).expand(b, h, n).contiguous()

    slots = torch.arange(n, device=dev)
    keep_sorted = slots < count[..., None]
    kept = torch.zeros(b, h, n, n, dtype=torch.bool, device=dev).scatter_(-1, order, keep_sorted)
    # Ascending block indices of the kept set: push dropped blocks past n, sort, cut.
    asc = torch.sort(torch.where(kept, j.expand(n, n), j + n), dim=-1).values
    kv_indices = torch.where(slots < count[..., None], asc, torch.zeros((), dtype=asc.dtype, device=dev))
    return kv_indices.to(torch.int32), count.to(torch.int32)


def sharpen(scores: torch.Tensor, power: float) -> torch.Tensor:
    """Estimated block mass raised to `power` (> 1 sharpens, < 1 flattens), the row order unchanged.

    Only how the selection shares blocks among rows moves: tau is a share of each row's own total, so
    a sharper row reaches it with fewer blocks and a flat row still takes many. Calibration may choose
    a power per layer (`CalibrationLimits.sharpen`); measured on SmolLM2 it kept 4-8% fewer blocks at
    equal dropped mass but none at the quality budget (docs/calibration.md)."""
    if power == 1.0:
        return scores
    return scores.float().clamp_min(0.0).pow(power)


def group_scores(scores: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, Hq, nb, nb] -> [B, Hkv, nb, nb]: the mean over each KV head's query heads."""
    b, hq, n, _ = scores.shape
    return scores.view(b, num_kv_heads, hq // num_kv_heads, n, n).mean(dim=2)
