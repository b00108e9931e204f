"""Exact power of the guardrails' rate test: what a ceiling can detect, with no simulation noise.

The rate test's capital after n rows depends only on the count k of ones among them
(`sequences.rate_count_log_capital`), and it rises with k. So for each n there is a smallest count k*(n)
that rejects ("stop"), and the test stops by row N exactly when the count path S_t crosses k*(t) at some
t <= N. For i.i.d. Bernoulli(p) rows, P(exists t <= N: S_t >= k*(t)) is computed exactly by dynamic
programming over the distribution of S_t on the paths that have not stopped yet: one vectorised update per
row, over the counts below the boundary only. At p = the ceiling this is the time-uniform false stop
(<= alpha by Ville's inequality); above it, the power.

`neyman_pearson_power` is the ceiling no test can beat: the most powerful fixed-sample test at level alpha
(randomised at the critical count) of "rate = c" against "rate = p" after n rows. A sequential test that
stops by row n with false stop <= alpha is such a fixed-sample test, so its power by row n is at most this.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy import stats

from rollout.gate.sequences import RATE_MIXTURE, rate_count_log_capital

Mixture = tuple[tuple[float, float], ...]
MAX_ROWS = 1 << 20  # rows_to_detect gives up beyond this (None)
# What a guardrail ceiling is expected to catch: a true rate of DETECT_FACTOR x the ceiling stopped with
# probability DETECT_POWER (issue 10: 2.5x, 95%); the spec validator warns when the planned rows fall short.
DETECT_FACTOR = 2.5
DETECT_POWER = 0.95


def stop_boundary(ceiling: float, rows: int, alpha: float, mixture: Mixture = RATE_MIXTURE) -> np.ndarray:
    """k*(n) for n = 1..rows: the smallest count of ones among n rows at which the test of "rate <=
    ceiling" rejects (log-capital >= log 1/alpha); n + 1 where no count can (int array of length rows)."""
    if not 0 < ceiling < 1:
        raise ValueError(f"ceiling must be in (0, 1), got {ceiling!r}")
    n = np.arange(1, rows + 1)
    target = math.log(1 / alpha)
    # bisection on the count, vectorised over n (the capital rises with k): lo never rejects, hi does
    # (n + 1 stands for "no count can")
    lo, hi = np.full(rows, -1, dtype=np.int64), n + 1
    while np.any(hi - lo > 1):
        mid = (lo + hi) // 2
        rejects = rate_count_log_capital(mid, n, ceiling, mixture=mixture) >= target
        hi, lo = np.where(rejects, mid, hi), np.where(rejects, lo, mid)
    return hi


def stop_probability(boundary: np.ndarray, rate: float | np.ndarray) -> np.ndarray:
    """P(the test has stopped by row t), t = 1..N, for i.i.d. Bernoulli(rate) rows and a boundary k*(t)
    (last axis; leading axes broadcast against `rate`'s). Exact: dynamic programming over the count."""
    boundary = np.asarray(boundary, dtype=np.int64)
    rate = np.asarray(rate, dtype=float)
    shape = np.broadcast_shapes(boundary.shape[:-1], rate.shape)
    bound = np.broadcast_to(boundary, (*shape, boundary.shape[-1]))
    p = np.broadcast_to(rate, shape)[..., None]
    width = int(min(bound.max(), boundary.shape[-1] + 1)) + 1  # counts that can still be running
    alive = np.zeros((*shape, width))
    alive[..., 0] = 1.0
    counts = np.arange(width)
    stopped = np.zeros((*shape, boundary.shape[-1]))
    done = np.zeros(shape)
    for t in range(boundary.shape[-1]):
        moved = alive * (1 - p)
        moved[..., 1:] += alive[..., :-1] * p
        over = counts >= bound[..., t, None]
        done = done + np.where(over, moved, 0.0).sum(axis=-1)
        alive = np.where(over, 0.0, moved)
        stopped[..., t] = done
    return stopped


def power_by(
    ceiling: float,
    rate: float | np.ndarray,
    rows: int,
    alpha: float = 0.05,
    mixture: Mixture = RATE_MIXTURE,
) -> np.ndarray | float:
    """P(stopped by `rows` rows) at a true rate (exact). At rate = ceiling: the time-uniform false stop."""
    out = stop_probability(stop_boundary(ceiling, rows, alpha, mixture), rate)[..., -1]
    return float(out) if np.ndim(out) == 0 else out


@lru_cache(maxsize=256)
def rows_to_detect(
    ceiling: float,
    factor: float = 2.5,
    power: float = 0.95,
    alpha: float = 0.05,
    mixture: Mixture = RATE_MIXTURE,
) -> int | None:
    """Treatment rows by which a true rate of factor x ceiling is stopped with probability >= `power`
    (exact); None beyond MAX_ROWS."""
    if not 0 < factor * ceiling < 1:
        raise ValueError(f"factor x ceiling must be a rate in (0, 1), got {factor * ceiling!r}")
    rows = max(64, 2 ** math.ceil(math.log2(30 / (factor * ceiling))))
    while rows <= MAX_ROWS:
        reached = stop_probability(stop_boundary(ceiling, rows, alpha, mixture), factor * ceiling) >= power
        if reached.any():
            return int(reached.argmax()) + 1
        rows *= 4
    return None


def neyman_pearson_power(ceiling: float, rate: float, rows: int, alpha: float = 0.05) -> float:
    """Power of the most powerful level-alpha test of Bernoulli(ceiling) against Bernoulli(rate > ceiling)
    after a fixed number of rows: reject above the critical count, and at it with the probability that
    makes the level exactly alpha. No test, sequential or not, stops more often by that row."""
    null, alt = stats.binom(rows, ceiling), stats.binom(rows, rate)
    crit = int(null.isf(alpha))  # smallest k with P0(S > k) <= alpha
    while crit > 0 and null.sf(crit - 1) <= alpha:
        crit -= 1
    gamma = (alpha - null.sf(crit)) / null.pmf(crit) if null.pmf(crit) > 0 else 0.0
    return float(alt.sf(crit) + min(max(gamma, 0.0), 1.0) * alt.pmf(crit))


@lru_cache(maxsize=256)  # pure, and asked again at every spec read (rollout.spec.spec_warnings): ~0.1 s
def neyman_pearson_rows(ceiling: float, factor: float = 2.5, power: float = 0.95, alpha: float = 0.05) -> int:
    """The fewest rows after which any level-alpha test (the most powerful fixed-sample one) can stop a
    true rate of factor x ceiling with probability `power`: a floor under `rows_to_detect`."""
    lo, hi = 0, 16  # no rows: power alpha; the randomised test's power rises with the rows
    while neyman_pearson_power(ceiling, factor * ceiling, hi, alpha) < power:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (
            (lo, mid) if neyman_pearson_power(ceiling, factor * ceiling, mid, alpha) >= power else (mid, hi)
        )
    return hi
