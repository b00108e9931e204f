"""Change detection for the monitor: is a check breached now, after any number of looks?

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
linear, price for the history.

The same construction serves any bounded stream with constant bets (`mean_factors_of`): the monitor's
excess error over dense and its quality loss beyond the margin, on the requests both models answered.
Pure functions on numpy arrays, vectorised over leading axes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from rollout.gate.sequences import TRUNCATION, Stream, bound_where, rate_factors

# The components a detector restarts at every look, as a function of the tested value m (None: the
# check's threshold): (log weight, log of each row's capital factor), the factors' last axis the rows.
Factors = Callable[[float | None], list[tuple[float, np.ndarray]]]

# The monitor's quality check tests "the champion loses at most the margin to dense" on the paired loss
# q_dense - q_sparse in [-1, 1] by a mixture of constant bets (gain g, weight): a component's capital
# grows by 1 + g on a request the champion gets wholly wrong and dense wholly right. Chosen by simulated
# detection delay (docs/gate.md "The monitor"): small gains for noisy scores, bold ones for rare losses.
LOSS_MIXTURE: tuple[tuple[float, float], ...] = ((0.1, 0.25), (0.2, 0.25), (0.4, 0.25), (0.8, 0.25))


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


def rate_factors_of(x: np.ndarray, ceiling: float) -> Factors:
    """A rate check's components on 0/1 outcomes `x`: the step's likelihood-ratio mixture
    (`sequences.rate_factors`), testing "the rate is at most m"."""
    x = np.asarray(x, dtype=float)

    def factors(m: float | None) -> list[tuple[float, np.ndarray]]:
        return [
            (log_v, on_zero + x * (on_one - on_zero))
            for log_v, on_one, on_zero in rate_factors(ceiling, m, truncation=TRUNCATION["rate"])
        ]

    return factors


def mean_factors_of(
    z: np.ndarray,
    threshold: float,
    *,
    lo: float = -1.0,
    hi: float = 1.0,
    mixture: tuple[tuple[float, float], ...] = LOSS_MIXTURE,
    truncation: float = TRUNCATION["paired"],
) -> Factors:
    """Components testing "the mean of `z` (in [lo, hi]) is at most m" by constant bets: component j bets
    lambda_j = g_j / (hi - threshold), truncated at truncation / (m - lo), so every factor 1 + lambda (z - m)
    is positive with conditional mean <= 1 whenever the mean is at most m, and the capital falls as m
    rises (lambda (m - z) grows with m for every z >= lo)."""
    z = np.asarray(z, dtype=float)

    def factors(m: float | None) -> list[tuple[float, np.ndarray]]:
        m = threshold if m is None else m
        cap = truncation / max(m - lo, 1e-12)
        return [
            (math.log(weight), np.log1p(min(gain / (hi - threshold), cap) * (z - m)))
            for gain, weight in mixture
        ]

    return factors


def log_capital(parts: list[tuple[float, np.ndarray]], starts: np.ndarray) -> np.ndarray:
    """log M_t (module docstring) over the rows, for components already evaluated at one m. Each component
    and candidate is accumulated once: M_t's candidate sum for component j is
    P_j(t) * sum_{k started} w_k / P_j(s_k - 1), with P_j the running product."""
    n = parts[0][1].shape[-1]
    starts = _checked_starts(starts, n)
    log_w = start_log_weights(starts.size)
    # each look's rows take its candidates' sum: a repeat of the looks' values (`latest` read in order)
    rows_per_look = np.diff(np.append(starts, n))
    total = None
    for log_v, steps in parts:
        path = np.cumsum(steps, axis=-1)  # worked in place from here: log_v + path + reach at the row
        before = np.zeros(steps.shape[:-1] + (starts.size,))  # the path before each look's first row
        before[..., 1:] = path[..., starts[1:] - 1]
        reach = np.logaddexp.accumulate(log_w - before, axis=-1)
        path += log_v
        path += np.repeat(reach, rows_per_look, axis=-1)
        total = path if total is None else np.logaddexp(total, path, out=total)
    return total


def change_log_capital(
    x: np.ndarray, starts: np.ndarray, ceiling: float, m: float | None = None
) -> np.ndarray:
    """log M_t of a rate check over the rows of 0/1 outcomes `x` (last axis; leading axes are independent
    replications sharing the looks `starts`), testing "the rate is at most m (default: the ceiling) on
    every row"."""
    return log_capital(rate_factors_of(x, ceiling)(m), starts)


def peak(factors: Factors, starts: np.ndarray, m: float | None = None) -> float:
    """max over time of the detector's log-capital for one (1-D) sequence."""
    return float(log_capital(factors(m), starts).max())


def detected(factors: Factors, starts: np.ndarray, alpha: float) -> bool:
    """Whether the detector has ever crossed log(1/alpha): the evidence says the check is breached now, or
    was at some stretch since a look began (false alarm <= alpha over the monitor's life)."""
    return peak(factors, starts) >= math.log(1 / alpha)


def evidence_start(factors: Factors, starts: np.ndarray) -> int:
    """The look (0-based) where the evidence of a breach begins, which the explanation quotes: the
    candidate start from which a component's capital has grown the most by the detector's peak (the
    CUSUM estimate of the change point; the weights w_k set the alarm, not this estimate)."""
    parts = factors(None)
    starts = np.asarray(starts, dtype=np.int64)
    peak_row = int(np.argmax(log_capital(parts, starts)))
    begun = int(np.searchsorted(starts, peak_row, side="right"))
    best, where = -math.inf, 0
    for _, steps in parts:
        path = np.concatenate(([0.0], np.cumsum(steps[: peak_row + 1])))
        growth = path[peak_row + 1] - path[starts[:begun]]
        k = int(np.argmax(growth))
        if growth[k] > best:
            best, where = float(growth[k]), k
    return where


def lower_bound(
    factors: Factors, starts: np.ndarray, alpha: float, since: Stream, span: tuple[float, float]
) -> float:
    """The anytime-valid lower confidence bound behind an alarm: the largest m the detector rejects ("the
    mean has stayed at or below m"), i.e. some stretch since a look began ran above m. `since`: the
    stream from where the evidence begins (it brackets the root)."""
    return bound_where(lambda m: peak(factors, starts, m), since, "lower", alpha, span)


def _checked_starts(starts: np.ndarray, n: int) -> np.ndarray:
    starts = np.asarray(starts, dtype=np.int64)
    if n == 0:
        raise ValueError("no rows to judge")
    if starts.size == 0 or starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= n:
        raise ValueError(f"look starts must rise strictly from row 0 within {n} rows, got {starts[:8]}")
    return starts
