"""A valid upper confidence bound on the mean per-row task-score drop, from a handful of rows.

Calibration bounds what a plan costs on the use case's task with the rows of the calibration split:
per row the drop ``d = dense - sparse`` of a task score in [0, 1], so ``d`` lies in [-1, 1]. A Student
t limit over 4 rows is no 95% bound for such drops: most rows lose nothing and a few lose a lot (a
retrieval answer in a dropped passage), and a sample of quiet rows has a tiny spread, so the limit sits
next to the mean (measured on docs-qa: calibration rows -0.0002, t limit 0.0064, held-out rows 0.098).

This module tests H0: E[d] >= m by betting (Waudby-Smith & Ramdas 2023, "Estimating means of bounded
random variables by betting"; the math is `sparse_core.betting`, the same code as the pilot's gate):
the capital ``K_t(m) = prod_i (1 + lambda_i (m - d_i))`` with
predictable bets ``0 <= lambda_i <= trunc / (hi - m)`` is a non-negative supermartingale under H0, so
by Ville's inequality ``P(max_t K_t(m) >= 1/alpha) <= alpha`` for every distribution on [lo, hi]. The
upper bound is the smallest m whose H0 is rejected. The bets are the aGRAPA bets tuned to the bound
being certified (``m0``), from the running mean and variance of the earlier rows plus one prior
pseudo-row (mean 0, variance 0.25). The rows are taken in their given order (the calibration split's).

The price of validity is rows: with no drop at all on any row the bound still needs about
``log(1/alpha) / (trunc * m0)`` rows to fall below ``m0`` (`rows_to_certify`): ~170 rows for 0.02 at
95% for one test; calibration's search tests several plans and judges each at alpha / steps
(`eps_search.step_alpha`), 277 rows for 0.02 with its default 7 steps. Pure functions on plain
floats; `sparse_core.calibration` uses them for ``Budget.task_delta``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from sparse_core import betting

ALPHA = 0.05
TRUNCATION = 0.9  # largest share of the capital one bet may risk
PRIOR_MEAN, PRIOR_VAR = 0.0, 0.25  # one pseudo-row: no drop expected, spread of a coin on [0, 1]


def _check(drops: Sequence[float], lo: float, hi: float, alpha: float) -> list[float]:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if not lo < hi:
        raise ValueError(f"need lo < hi, got [{lo}, {hi}]")
    out = [float(x) for x in drops]
    for i, x in enumerate(out):
        if not (math.isfinite(x) and lo - 1e-9 <= x <= hi + 1e-9):
            raise ValueError(f"row {i}: drop {x!r} is outside [{lo}, {hi}]")
    return [min(max(x, lo), hi) for x in out]


def _stream(drops: list[float], lo: float, hi: float) -> betting.Stream:
    return betting.Stream(np.asarray(drops, dtype=float), lo, hi, TRUNCATION)


def rejects(
    drops: Sequence[float], m0: float, *, alpha: float = ALPHA, lo: float = -1.0, hi: float = 1.0
) -> bool:
    """True when the rows reject H0: E[drop] >= m0 at level alpha (the mean drop is certified < m0)."""
    d = _check(drops, lo, hi, alpha)
    if not d:
        return False
    crossed, _ = betting.rejects(
        _stream(d, lo, hi), m0, "upper", alpha, prior_mean=PRIOR_MEAN, prior_var=PRIOR_VAR
    )
    return bool(crossed)


def drop_upper_bound(
    drops: Sequence[float],
    *,
    alpha: float = ALPHA,
    m0: float | None = None,
    lo: float = -1.0,
    hi: float = 1.0,
) -> float:
    """The one-sided (1 - alpha) upper confidence bound on the mean drop, valid for any distribution on
    [lo, hi] and any number of rows (``hi`` when the rows reject nothing below it). ``m0``: the value
    the bets are tuned to (the bound being certified; default: the rows' mean + 0.05), where the bound
    is tightest. ``drop_upper_bound(d, m0=b) < b`` exactly when ``rejects(d, b)``, up to the
    root-finder's tolerance."""
    d = _check(drops, lo, hi, alpha)
    if not d:
        return hi
    if m0 is None:
        m0 = min(hi, sum(d) / len(d) + 0.05)
    return betting.confidence_bound(
        _stream(d, lo, hi), m0, "upper", alpha, prior_mean=PRIOR_MEAN, prior_var=PRIOR_VAR, span=(lo, hi)
    )


def rows_to_certify(
    bound: float, *, alpha: float = ALPHA, lo: float = -1.0, hi: float = 1.0, limit: int = 100_000
) -> int | None:
    """The fewest rows that can certify ``mean drop < bound`` at all: rows that all drop exactly 0 (any
    real drop needs more). None when even ``limit`` such rows cannot (e.g. bound <= 0)."""
    if bound <= 0 or not rejects([0.0] * limit, bound, alpha=alpha, lo=lo, hi=hi):
        return None
    a, b = 0, 1  # every factor exceeds 1 on a zero row, so the capital only grows with the rows
    while not rejects([0.0] * b, bound, alpha=alpha, lo=lo, hi=hi):
        a, b = b, min(2 * b, limit)
    while b - a > 1:  # a rows do not certify, b rows do
        mid = (a + b) // 2
        if rejects([0.0] * mid, bound, alpha=alpha, lo=lo, hi=hi):
            b = mid
        else:
            a = mid
    return b


__all__ = ["ALPHA", "drop_upper_bound", "rejects", "rows_to_certify"]
