"""Finite-sample, anytime-valid confidence sequences for bounded means, by betting.

Every quantity the gate judges is the mean of a stream of bounded observations Z_1, Z_2, ... in arrival
order whose conditional mean given the past is the target (Waudby-Smith & Ramdas 2023, "Estimating means of
bounded random variables by betting", JRSS-B):

* shadow step (paired): Z = quality(sparse) - quality(dense) per request, in [-1, 1];
* split step: Z = (q - c) * (T/p - (1-T)/(1-p)), the inverse-propensity difference with the known
  treatment share p and a predictable centre c (the running mean of earlier scores); E[Z | past] is the
  difference of the arms' means and Z lies in predictable bounds [lo, hi];
* guardrails: a 0/1 indicator (error, latency over the SLO) of the treatment arm, in [0, 1], or the
  paired / split difference of that indicator between the arms.

The betting math itself (capital, aGRAPA bets tuned to the decision's own null m0, e.g. -margin, the
confidence bound as the edge of the rejected set) is `sparse_core.betting`; this module adds the gate's
streams, their truncations, the rate ceiling's likelihood-ratio mixture and the excess check's mixture of
constant bets.
"""

from __future__ import annotations

import math

import numpy as np

from sparse_core.betting import (
    Side,
    Stream,
    bets,
    bound_where,
    confidence_bound,
    log_capital,
    rejects,
    two_sided_bets,
)

__all__ = [
    "EXCESS_MIXTURE",
    "RATE_MIXTURE",
    "TRUNCATION",
    "Side",
    "Stream",
    "bets",
    "bound_where",
    "confidence_bound",
    "excess_crosses",
    "excess_log_capital",
    "ipw_stream",
    "log_capital",
    "paired_stream",
    "rate_count_log_capital",
    "rate_factors",
    "rate_log_capital",
    "rate_peak_log_capital",
    "rate_stream",
    "rejects",
    "two_sided_bets",
]

# Largest share of the capital a bet may risk (trunc in lambda <= trunc / (m - lo)). Chosen by measured power
# (docs/gate.md): a paired stream with no losses yet needs bold bets to prove anything from ~100 requests;
# the inverse-propensity stream of a split step has a long lower tail (one bad treatment answer at a 5%
# share weighs 20x), where bold bets lose more than they gain.
TRUNCATION = {"paired": 0.9, "split": 0.75, "rate": 0.75}


def paired_stream(diff: np.ndarray) -> Stream:
    """Per-request differences treatment - control of scores in [0, 1] (or of 0/1 indicators)."""
    return Stream(np.asarray(diff, dtype=float), -1.0, 1.0, TRUNCATION["paired"])


def rate_stream(indicator: np.ndarray) -> Stream:
    """0/1 outcomes of one arm (an error, a latency over the SLO): the mean is the rate."""
    return Stream(np.asarray(indicator, dtype=float), 0.0, 1.0, TRUNCATION["rate"])


def ipw_stream(score: np.ndarray, treated: np.ndarray, share: float, prior_centre: float = 0.5) -> Stream:
    """Split step: every request in arrival order, its score in [0, 1] and whether it was treated (with
    known probability `share`). Z = (q - c)(T/share - (1-T)/(1-share)) with c the running mean of the
    earlier scores; E[Z | past] = mean(treatment) - mean(control) for hash-randomised assignment."""
    q = np.asarray(score, dtype=float)
    t = np.asarray(treated, dtype=bool)
    n = q.shape[-1]
    # in place where it can be (the same numbers as the plain expressions in the comments, to the last bit:
    # a 1M-row split step builds two of these streams per look)
    centre = np.empty_like(q)
    centre[..., 0] = prior_centre
    if n > 1:  # (prior_centre + cumsum(q[:-1])) / (2, 3, ..., n)
        rest = centre[..., 1:]
        np.cumsum(q[..., :-1], axis=-1, out=rest)
        rest += prior_centre
        rest /= np.arange(2.0, n + 1)
    z = q - centre  # (q - centre) * (1/share if treated else -1/(1 - share))
    z *= np.where(t, 1.0 / share, -1.0 / (1.0 - share))
    above = 1.0 - centre
    lo = np.divide(centre, -share)  # min(-centre / share, -(1 - centre) / (1 - share))
    np.minimum(lo, np.divide(above, -(1.0 - share)), out=lo)
    hi = np.divide(centre, 1.0 - share)  # max((1 - centre) / share, centre / (1 - share))
    above /= share
    np.maximum(above, hi, out=hi)
    return Stream(z, lo, hi, TRUNCATION["split"])


# The likelihood-ratio mixture that tests a rate ceiling c: (alternative as a multiple of c, weight).
# Chosen by exact power (`rollout.gate.bench.rate_mixture_search`, docs/gate.md "Guardrails"): the most
# power at 2.5 c by 200 rows over ceilings 0.03-0.10 among the mixtures that stop 95% at c = 0.05 and 0.10
# while keeping the slow breaches (1.5 c) and the gross ones (4 c).
RATE_MIXTURE: tuple[tuple[float, float], ...] = ((1.5, 0.2), (2.0, 0.1), (2.25, 0.7))


def rate_count_log_capital(
    ones: np.ndarray | float,
    rows: np.ndarray | float,
    ceiling: float,
    m: float | None = None,
    *,
    mixture: tuple[tuple[float, float], ...] = RATE_MIXTURE,
    truncation: float = TRUNCATION["rate"],
) -> np.ndarray:
    """log of the mixture capital testing H0: rate <= m (default: the ceiling) after `rows` 0/1 outcomes of
    which `ones` were 1 (arrays broadcast): the capital of a 0/1 stream depends on nothing else.

    Component j bets the constant lambda_j = (p_j - c) / (c (1 - c)) with p_j = multiple_j x c, which makes
    its capital at m = c exactly the likelihood ratio of Bernoulli(p_j) to Bernoulli(c) -- the Kelly bet for
    that alternative. p_j is held to (1 + c) / 2, halfway from the ceiling to 1 (it binds for c > 2/7 at 2.25
    c): p_j stays a probability, a zero costs a component at most half its capital, and the bet stays below
    its truncation at m = c, so the component is that likelihood ratio at every ceiling. Any fixed weights
    (summing to 1) keep the mixture a non-negative martingale at rate c and a supermartingale below it, so
    Ville's inequality bounds the time-uniform false stop by alpha whatever the weights are: the weights and
    alternatives only move power between breach sizes. For m != c the same bets are truncated to trunc / m, so
    the capital still falls as m rises and the lower bound is the edge of the rejected set."""
    ones = np.asarray(ones, dtype=float)
    zeros = np.asarray(rows, dtype=float) - ones
    # the components' logaddexp one after another, as np.logaddexp.reduce over their stack adds them (the
    # same numbers, without the stack's copy of every component)
    total = None
    for log_w, on_one, on_zero in rate_factors(ceiling, m, mixture=mixture, truncation=truncation):
        part = log_w + ones * on_one + zeros * on_zero
        if total is None:
            total = part
        elif isinstance(total, np.ndarray) and total.shape == np.shape(part) and total.ndim:
            np.logaddexp(total, part, out=total)
        else:
            total = np.logaddexp(total, part)
    return total


def rate_factors(
    ceiling: float,
    m: float | None = None,
    *,
    mixture: tuple[tuple[float, float], ...] = RATE_MIXTURE,
    truncation: float = TRUNCATION["rate"],
) -> list[tuple[float, float, float]]:
    """Per component of the rate mixture: (log weight, log of its capital's factor on a one, on a zero)
    when testing H0: rate <= m (default: the ceiling) -- the constant bets `rate_count_log_capital`
    describes. The monitor's change detector (`rollout.gate.detection`) restarts these same components."""
    m = ceiling if m is None else m
    out = []
    for multiple, weight in mixture:
        p = min(multiple * ceiling, (1 + ceiling) / 2)
        lam = min((p - ceiling) / (ceiling * (1 - ceiling)), truncation / max(m, 1e-12))
        out.append((math.log(weight), math.log1p(lam * (1 - m)), math.log1p(-lam * m)))
    return out


def rate_log_capital(stream: Stream, ceiling: float, m: float | None = None) -> np.ndarray:
    """log of the mixture capital (`rate_count_log_capital`) over time for a 0/1 stream (vectorised over
    leading axes). For rare events the likelihood-ratio mixture is far more powerful than the adaptive
    bets, which learn too slowly from a handful of errors (measured in docs/gate.md)."""
    ones = np.cumsum(stream.z, axis=-1)
    rows = np.arange(1, stream.n + 1)
    return rate_count_log_capital(ones, rows, ceiling, m, truncation=stream.truncation)


def rate_peak_log_capital(stream: Stream, ceiling: float, m: float | None = None) -> float:
    """max over time of `rate_log_capital` for one (1-D) 0/1 stream, from its first row and the rows where
    a one arrived only: every component bets lambda > 0, so at m >= 0 a zero row never raises its capital
    and the peak is on one of those rows. The capital there is the same number as on the full path (the
    count of ones is exact), computed on ~(ones + 1) rows instead of all of them."""
    if (ceiling if m is None else m) < 0 or stream.z.ndim != 1:
        return float(rate_log_capital(stream, ceiling, m).max())
    at = np.flatnonzero(stream.z)
    ones = np.concatenate((stream.z[:1], np.arange(1, at.size + 1, dtype=float)))
    rows = np.concatenate(([1.0], at + 1.0))
    return float(rate_count_log_capital(ones, rows, ceiling, m, truncation=stream.truncation).max())


# The mixture of constant bets that tests an excess ceiling (sparse minus dense rate <= c): (gain g, weight),
# a component's capital growing by the factor 1 + g on an error in the sparse arm only. Chosen by simulated
# power (docs/gate.md "The excess over control, measured"): against the adaptive bets it stops more breaches
# at 2.5c and 4c by 200 and by 1,000 treatment rows in every design (shadow, split 50% / 10% / 5%) and
# dense-arm rate (0.5-2%) measured.
EXCESS_MIXTURE: tuple[tuple[float, float], ...] = ((0.45, 0.5), (0.8, 0.5))


def excess_log_capital(
    stream: Stream,
    ceiling: float,
    m: float | None = None,
    *,
    mixture: tuple[tuple[float, float], ...] = EXCESS_MIXTURE,
) -> np.ndarray:
    """log of the mixture capital testing H0: mean <= m (default: the ceiling) over time, for the excess
    check's paired or inverse-propensity stream (vectorised over leading axes).

    Component j bets lambda_j,t = g_j / (hi_t - c): the factor on the observation most against H0 (an error
    in the sparse arm only, Z = hi_t) is 1 + g_j, so one g serves a shadow step (hi = 1) and a split step at
    any share (hi ~ 1 / share). hi_t is predictable and the bets do not depend on m; truncated at
    trunc / (m - lo_t) every factor stays positive with conditional mean 1 + lambda (mean - m) <= 1 under
    H0, for every pair of arm rates: each component is a non-negative supermartingale, so is any fixed
    mixture, and Ville's inequality bounds the time-uniform false stop by alpha. As for the adaptive bets,
    the capital falls as m rises, so the lower bound is the edge of the rejected set."""
    return _excess_mixed(_excess_components(stream, ceiling, m, mixture))


def excess_crosses(
    stream: Stream,
    ceiling: float,
    target: float,
    *,
    mixture: tuple[tuple[float, float], ...] = EXCESS_MIXTURE,
) -> bool:
    """Whether `excess_log_capital` of one (1-D) stream at the ceiling reaches `target` at some time. The
    mixture lies between its best weighted component and its best component plus log(sum of weights), so
    it is formed over time (a logaddexp per row, most of the cost on 1M rows) only when those bounds do
    not settle it."""
    parts = _excess_components(stream, ceiling, None, mixture)
    peaks = [float(part.max(axis=None)) for part, _ in parts]
    spread = math.log(sum(weight for _, weight in mixture))
    if max(peaks) + spread < target - 1e-9:
        return False
    if max(peak + log_w for peak, (_, log_w) in zip(peaks, parts, strict=True)) >= target + 1e-9:
        return True
    return bool(_excess_mixed(parts).max() >= target)


def _excess_components(
    stream: Stream, ceiling: float, m: float | None, mixture: tuple[tuple[float, float], ...]
) -> list[tuple[np.ndarray, float]]:
    """Each component's log-capital over time (without its weight) and the log of its weight."""
    m = ceiling if m is None else m
    # `log_capital`'s lower-side factor, with the truncation and Z - m computed once for all components
    # (1M-row steps: half the time of one log_capital call per component); arrays are worked in place
    room = _at_least(np.subtract(stream.hi, ceiling), 1e-12)
    cap = np.divide(stream.truncation, _at_least(np.subtract(m, stream.lo), 1e-12))
    diff = stream.z - m
    parts = []
    for gain, weight in mixture:
        step = np.minimum(np.divide(gain, room), cap)  # cumsum(log1p(min(gain / room, cap) * diff))
        if np.shape(step) == diff.shape:
            step *= diff
        else:
            step = step * diff
        np.log1p(step, out=step)
        parts.append((np.cumsum(step, axis=-1, out=step), math.log(weight)))
    return parts


def _at_least(x: np.ndarray | float, floor: float) -> np.ndarray | float:
    """np.maximum(x, floor), in place for an array."""
    return np.maximum(x, floor, out=x) if isinstance(x, np.ndarray) and x.ndim else np.maximum(x, floor)


def _excess_mixed(parts: list[tuple[np.ndarray, float]]) -> np.ndarray:
    """The weighted components' logaddexp, worked in place on the components (their last use)."""
    total = None
    for part, log_w in parts:
        part += log_w
        total = part if total is None else np.logaddexp(total, part, out=total)
    return total
