"""The speed-up of sparse over dense from interleaved timings on a shared host, with an interval that
holds at the 2-5 timings an evaluation can afford.

The unit is a **pair**: one dense and one sparse timing of the same work, taken back to back. Whatever the
host does on a scale longer than a pair (another job starting or stopping, the clock changing) then
multiplies both timings of the pair alike and cancels in their ratio. So the evidence is the pairs' log
ratios r_i = log(dense_i / sparse_i): the estimate is their mean, exp(mean r) (the geometric mean of the
pairs' speed-ups), and the interval is Student's t on r with n - 1 degrees of freedom, exact when the
r_i are independent and normal with a common mean. Timings of the two arms taken apart and compared as two
samples (a Welch interval on the means, or a bootstrap of the median ratio) ignore the pairing: on a busy
host they mix the host's swings into the comparison, and at 2-3 timings a percentile bootstrap of the
median covers far less often than it says (docs/sparse_core.md, "Speed-up intervals on a busy host").

What is **not** a pair: two steps of the same decode run. They share the run's load, so the steps of a
run are one observation, not many: a decode comparison's pair is a dense run and a sparse run (their mean
step times). An interval over steps treats a whole run's luck as if it had been drawn afresh at every step.

**Order.** Within a pair the arm timed second may run on warmer caches, or later in a ramp of the host's
load. `pair_order(i)` alternates which arm goes first (dense first on even pairs), so such an effect enters
the pairs with opposite signs: it cancels from the estimate over an even number of pairs and widens the
interval rather than biasing it.

Pure functions (numpy/scipy); vectorised over leading axes where a simulation needs it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

CONFIDENCE = 0.90  # a row's interval (a length, a decode comparison); the ROI's uses its own, 0.95
ARMS = ("dense", "sparse")


@dataclass(frozen=True)
class Speedup:
    """`estimate` = exp(mean log(dense / sparse)) over `pairs` pairs, with a two-sided `confidence`
    interval [low, high] (equal to the estimate when there is no spread to measure, or one pair)."""

    estimate: float
    low: float
    high: float
    pairs: int
    confidence: float

    @property
    def interval(self) -> tuple[float, float]:
        return self.low, self.high

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pair_order(i: int) -> tuple[str, str]:
    """Which arm pair `i` times first: dense on even pairs, sparse on odd ones."""
    return ARMS if i % 2 == 0 else ARMS[::-1]


def log_ratios(dense: Sequence[float], sparse: Sequence[float]) -> np.ndarray:
    """log(dense_i / sparse_i) per pair; raises ValueError (naming the arm) for a timing that is not
    finite and positive, or arms of different lengths."""
    d = np.asarray(dense, dtype=float)
    s = np.asarray(sparse, dtype=float)
    if d.shape != s.shape:
        raise ValueError(
            f"paired timings need as many dense as sparse ones, got {d.shape[-1]} and {s.shape[-1]}"
        )
    for name, x in (("dense", d), ("sparse", s)):
        if not np.all(np.isfinite(x) & (x > 0)):
            raise ValueError(f"{name} timings must be finite and > 0")
    return np.log(d) - np.log(s)


def t_interval(r: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, low, high) of the log ratios on the last axis: Student's t with n - 1 degrees of freedom.
    With one pair, or no spread, low = high = mean."""
    n = r.shape[-1]
    m = r.mean(axis=-1)
    if n < 2:
        return m, m, m
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * r.std(axis=-1, ddof=1) / math.sqrt(n)
    return m, m - half, m + half


def paired_speedup(
    dense: Sequence[float], sparse: Sequence[float], confidence: float = CONFIDENCE
) -> Speedup:
    """The speed-up of sparse over dense from paired timings (`dense[i]` and `sparse[i]` back to back)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    r = log_ratios(dense, sparse)
    if r.size == 0:
        raise ValueError("no timings: a speed-up needs at least one pair")
    m, lo, hi = t_interval(r, confidence)
    return Speedup(float(np.exp(m)), float(np.exp(lo)), float(np.exp(hi)), int(r.size), confidence)


def weighted_pairs(
    rows: Sequence[tuple[float, Sequence[float], Sequence[float]]],
) -> tuple[list[float], list[float]]:
    """Per pair index i, the weighted totals sum_L w_L * dense_L[i] and sum_L w_L * sparse_L[i] over the
    rows (weight, dense timings, sparse timings) of a length mix: what one request of the mix costs in
    each arm. Each total is made of back-to-back pairs, one per length, so the totals are pairs too,
    independent across i. Uses the pairs every row has."""
    n = min((len(d) for _, d, _ in rows), default=0)
    dense = [sum(w * d[i] for w, d, _ in rows) for i in range(n)]
    sparse = [sum(w * s[i] for w, _, s in rows) for i in range(n)]
    return dense, sparse
