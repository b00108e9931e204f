"""One-sided confidence bounds on a held-out fidelity measurement, by blocks of positions.

Calibration's eps search keeps the largest eps whose plan meets the budget on its held-out windows:
whatever noise lifts a plan over the line on those windows picks it, so the plan it returns sits at
the budget's edge on them and below it, on average, on text it never saw (at 8k: agreement 0.980 at
calibration, 0.978 on the bench's own window). Judging the budget on a bound instead of the point
estimate (the plan must meet it on the lower bound of agreement and the upper bounds of KL and
delta NLL) makes a plan pass only when the held-out text says it meets the budget with that
confidence.

Neighbouring next-token predictions are not independent (a passage the plan drops moves many of them
at once), so the unit of the bound is a block of consecutive scored positions of one window
(`fidelity.BLOCK_POSITIONS`), not a position. The mean over positions is a ratio of block totals;
its standard error is the cluster-robust one, from the residuals S_b - mean * n_b of the B blocks
(with the B / (B - 1) correction), and the bound is mean -/+ t(confidence, B - 1) * se. That is an
asymptotic bound (block means are near normal at 256 positions), not a guarantee for any
distribution like `task_bound`'s betting bound, and it does not correct for the search trying
several eps on the same windows; with few blocks the Student t quantile makes it wide.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

from scipy import stats

from sparse_core.fidelity import Fidelity


def block_mean_bound(blocks: Sequence[tuple[int, float]], confidence: float, *, upper: bool) -> float:
    """One-sided bound on the per-position mean of (count, sum) blocks at `confidence`: the upper
    bound if `upper`, else the lower. One block (or none) gives no spread to bound with: +-inf."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    blocks = [(n, s) for n, s in blocks if n > 0]
    total = sum(n for n, _ in blocks)
    if len(blocks) < 2:
        return math.inf if upper else -math.inf
    b = len(blocks)
    mean = sum(s for _, s in blocks) / total
    var = b / (b - 1) * sum((s - mean * n) ** 2 for n, s in blocks) / total**2
    half = float(stats.t.ppf(confidence, b - 1)) * math.sqrt(var)
    return mean + half if upper else mean - half


def fidelity_bound(fid: Fidelity, confidence: float) -> Fidelity:
    """`fid` with kl and nll_delta at their upper bounds and agree at its lower bound (from
    `fid.blocks`), what a budget is judged on when it asks for `confidence`."""
    if not fid.blocks:
        raise ValueError("fidelity_bound needs the per-block sums of measure_fidelity (fid.blocks)")
    kl = block_mean_bound([(b[0], b[1]) for b in fid.blocks], confidence, upper=True)
    agree = block_mean_bound([(b[0], b[2]) for b in fid.blocks], confidence, upper=False)
    nll_diff = block_mean_bound([(b[3], b[4]) for b in fid.blocks], confidence, upper=True)
    nll_delta = nll_diff / fid.nll_dense if fid.nll_dense > 0 else math.inf
    return replace(fid, kl=max(kl, 0.0), agree=min(agree, 1.0), nll_delta=nll_delta)


__all__ = ["block_mean_bound", "fidelity_bound"]
