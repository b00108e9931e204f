"""Change detection for the monitor: is the champion's rate above its ceiling now, after any number of looks?

A pilot step is short and judged on all its rows: one test of "rate <= ceiling" along the step's stream
(`guardrails.judge`). The monitor is not: it looks at the champion's traffic batch after batch for as long
as the champion serves. Two ways of reusing the step's test fail there (docs/gate.md "The monitor"):

* a fresh test on each batch restarts the false-stop budget at every look: a champion whose rate sits at
  its ceiling is rolled back with probability -> 1 as the looks pile up (exact, `power`: 5% ceiling,
  200-row batches, 58% by 30 looks), while a batch of 8-12 rows can almost never show a breach of a
  1% ceiling at all;
* one test over all rows since the promotion keeps the budget, but a long healthy history drags its
  capital down linearly, so a breach that starts late is caught late or never.

The detector here is the e-detector of Shin, Ramdas & Rinaldo (2024, "E-detectors: a nonparametric
framework for sequential change detection") with a *weighted* sum over start times, so that the guarantee
is the gate's own: P(ever a false alarm) <= alpha over the monitor's whole life. A candidate change point
is the first row of each look (batch), in order k = 1, 2, ...; candidate k runs the rate test's own
likelihood-ratio components (`sequences.rate_factors`) from its first row on, and

    M_t = sum_k w_k sum_j v_j prod_{i = s_k}^{t} f_j(X_i),   w_k = 1 / (k (k + 1))   (sum_k w_k = 1).

Under "the rate is at most m on every row" each product is a non-negative supermartingale that starts at 1
(`rate_factors`: the constant bets keep each factor's conditional mean <= 1 at any rate <= m), so is their
fixed-weight sum (the candidates not yet started count as their weight; leaving them out only lowers M),
and Ville's inequality gives P(exists t: M_t >= 1/alpha) <= alpha. A breach that starts with look k needs
log(1/(alpha w_k)) = log(1/alpha) + log(k (k + 1)) of evidence from its own rows: log 2 more than the
step's test for a champion bad from the start, ~log k^2 more after k healthy looks -- a logarithmic, not
linear, price for the history. Pure functions on numpy arrays, vectorised over leading axes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from rollout.gate.sequences import TRUNCATION, Stream, bound_where, rate_factors, rate_stream


def look_starts(labels: Sequence[object] | np.ndarray) -> np.ndarray:
    """The row where each look begins: the first row of each label (a batch id), in order of first
    appearance (rows in arrival order). Always starts at row 0 for a non-empty sequence."""
    labels = np.asarray(labels, dtype=object)
    if labels.size == 0:
        return np.zeros(0, dtype=np.int64)
    _, first = np.unique(labels.astype(str), return_index=True)
    return np.sort(first).astype(np.int64)


def start_log_weights(looks: int) -> np.ndarray:
    """log w_k = -log(k (k + 1)) for k = 1..looks: the prior weight of "the change began with look k"."""
    k = np.arange(1, looks + 1, dtype=float)
    return -(np.log(k) + np.log1p(k))


def change_log_capital(
    x: np.ndarray, starts: np.ndarray, ceiling: float, m: float | None = None
) -> np.ndarray:
    """log M_t (module docstring) over the rows of 0/1 outcomes `x` (last axis; leading axes are
    independent replications sharing the looks `starts`), testing "the rate is at most m (default: the
    ceiling) on every row". Each component and candidate is accumulated once: M_t's candidate sum for
    component j is P_j(t) * sum_{k started} w_k / P_j(s_k - 1), with P_j the running product."""
    x = np.asarray(x, dtype=float)
    n = x.shape[-1]
    starts = _checked_starts(starts, n)
    log_w = start_log_weights(starts.size)
    latest = np.searchsorted(starts, np.arange(n), side="right") - 1  # the last look begun by row t
    total = None
    for log_v, on_one, on_zero in rate_factors(ceiling, m, truncation=TRUNCATION["rate"]):
        path = np.cumsum(on_zero + x * (on_one - on_zero), axis=-1)
        before = np.concatenate((np.zeros(x.shape[:-1] + (1,)), path[..., :-1]), axis=-1)[..., starts]
        reach = np.logaddexp.accumulate(log_w - before, axis=-1)
        part = log_v + path + reach[..., latest]
        total = part if total is None else np.logaddexp(total, part)
    return total


def change_peak(x: np.ndarray, starts: np.ndarray, ceiling: float, m: float | None = None) -> float:
    """max over time of `change_log_capital` for one (1-D) sequence of 0/1 outcomes."""
    return float(change_log_capital(x, starts, ceiling, m).max())


def detected(x: np.ndarray, starts: np.ndarray, ceiling: float, alpha: float) -> bool:
    """Whether the detector has ever crossed log(1/alpha): the evidence says the rate is above the ceiling
    now or was at some stretch since a look began (false alarm <= alpha over the monitor's life)."""
    return change_peak(x, starts, ceiling) >= math.log(1 / alpha)


def evidence_start(x: np.ndarray, starts: np.ndarray, ceiling: float) -> int:
    """The look (0-based) whose candidate carries the most weight at the detector's peak: where the
    evidence of a breach begins, which the explanation quotes."""
    x = np.asarray(x, dtype=float)
    starts = _checked_starts(starts, x.size)
    peak_row = int(np.argmax(change_log_capital(x, starts, ceiling)))
    begun = int(np.searchsorted(starts, peak_row, side="right"))
    log_w = start_log_weights(begun)
    best, where = -math.inf, 0
    for log_v, on_one, on_zero in rate_factors(ceiling, truncation=TRUNCATION["rate"]):
        path = np.concatenate(([0.0], np.cumsum(on_zero + x[: peak_row + 1] * (on_one - on_zero))))
        weight = log_v + log_w + path[peak_row + 1] - path[starts[:begun]]
        k = int(np.argmax(weight))
        if weight[k] > best:
            best, where = float(weight[k]), k
    return where


def lower_bound(x: np.ndarray, starts: np.ndarray, ceiling: float, alpha: float) -> float:
    """The anytime-valid lower confidence bound behind an alarm: the largest m the detector rejects ("the
    rate has stayed at or below m"), i.e. some stretch since a look began ran above m."""
    x = np.asarray(x, dtype=float)
    starts = _checked_starts(starts, x.size)
    stream: Stream = rate_stream(x[starts[evidence_start(x, starts, ceiling)] :])
    return bound_where(lambda m: change_peak(x, starts, ceiling, m), stream, "lower", alpha, (0.0, 1.0))


def _checked_starts(starts: np.ndarray, n: int) -> np.ndarray:
    starts = np.asarray(starts, dtype=np.int64)
    if n == 0:
        raise ValueError("no rows to judge")
    if starts.size == 0 or starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= n:
        raise ValueError(f"look starts must rise strictly from row 0 within {n} rows, got {starts[:8]}")
    return starts
