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

To test H0: mean <= m (the "lower" side), bet lambda_t >= 0 on Z_t exceeding m: the capital
K_t(m) = prod_i (1 + lambda_i (Z_i - m)) is a non-negative supermartingale under H0 when lambda_i is
predictable and lambda_i <= trunc / (m - lo_i) with trunc < 1 (so no factor can be negative). Ville's
inequality: P(sup_t K_t(m) >= 1/alpha) <= alpha, at every sample size, for any bounded distribution, however
often one looks. The lower confidence bound is the largest m rejected at some time so far; because the bets
lambda~_t do not depend on m and the truncation only shrinks as m grows, K_t(m) falls as m rises, so the
rejected values form an interval and a root-finder finds its end. The upper side mirrors it.

The bets are the approximate growth-rate-adaptive ("aGRAPA") bets of Waudby-Smith & Ramdas, tuned to the
decision's own null m0 (e.g. -margin): lambda~_t = (mu_t - m0) / (var_t + (mu_t - m0)^2), clipped at 0,
from the running mean and variance of the earlier observations (with one pseudo-observation of a prior).
Everything here is vectorised over leading axes, so the simulation tests run the very same code as
`decide`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import optimize

Side = Literal["lower", "upper"]

# Largest share of the capital a bet may risk (trunc in lambda <= trunc / (m - lo)). Chosen by measured power
# (docs/gate.md): a paired stream with no losses yet needs bold bets to prove anything from ~100 requests;
# the inverse-propensity stream of a split step has a long lower tail (one bad treatment answer at a 5%
# share weighs 20x), where bold bets lose more than they gain.
TRUNCATION = {"paired": 0.9, "split": 0.75, "rate": 0.75}


@dataclass(frozen=True)
class Stream:
    """Observations in arrival order (last axis) and their predictable bounds lo <= Z <= hi."""

    z: np.ndarray
    lo: np.ndarray | float
    hi: np.ndarray | float
    truncation: float

    @property
    def n(self) -> int:
        return int(self.z.shape[-1])


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
    centre = np.empty_like(q)
    centre[..., 0] = prior_centre
    if n > 1:
        centre[..., 1:] = (prior_centre + np.cumsum(q[..., :-1], axis=-1)) / np.arange(2, n + 1)
    weight = np.where(t, 1.0 / share, -1.0 / (1.0 - share))
    z = (q - centre) * weight
    lo = np.minimum(-centre / share, -(1.0 - centre) / (1.0 - share))
    hi = np.maximum((1.0 - centre) / share, centre / (1.0 - share))
    return Stream(z, lo, hi, TRUNCATION["split"])


def bets(stream: Stream, m0: float, side: Side, *, prior_mean: float, prior_var: float) -> np.ndarray:
    """Predictable aGRAPA bets tuned to the null m0 (lambda~ >= 0), one per observation."""
    z = stream.z
    n = z.shape[-1]
    k = np.arange(1, n, dtype=float)
    mean = np.empty_like(z)
    second = np.empty_like(z)
    mean[..., 0] = prior_mean
    second[..., 0] = prior_var + prior_mean**2
    if n > 1:
        mean[..., 1:] = (prior_mean + np.cumsum(z[..., :-1], axis=-1)) / (1.0 + k)
        second[..., 1:] = (prior_var + prior_mean**2 + np.cumsum(z[..., :-1] ** 2, axis=-1)) / (1.0 + k)
    var = np.maximum(second - mean**2, 1e-12)
    edge = mean - m0 if side == "lower" else m0 - mean
    return np.maximum(edge / (var + edge * edge), 0.0)


def log_capital(stream: Stream, lam: np.ndarray, m: float | np.ndarray, side: Side) -> np.ndarray:
    """log K_t(m) at every time t (last axis). m may broadcast against the leading axes (e.g. one m per
    replication)."""
    m = np.asarray(m, dtype=float)[..., None] if np.ndim(m) else float(m)
    if side == "lower":
        room = np.maximum(m - stream.lo, 1e-12)
        step = np.minimum(lam, stream.truncation / room) * (stream.z - m)
    else:
        room = np.maximum(stream.hi - m, 1e-12)
        step = -np.minimum(lam, stream.truncation / room) * (stream.z - m)
    return np.cumsum(np.log1p(step), axis=-1)


def rejects(
    stream: Stream, m0: float, side: Side, alpha: float, *, prior_mean: float, prior_var: float, lam=None
):
    """(crossed, log-capital over time): has the test of H0 (lower: mean <= m0; upper: mean >= m0) crossed
    log(1/alpha) at any time so far? Arrays over the leading axes / the time axis. `lam`: the bets, when
    the caller already has them."""
    if lam is None:
        lam = bets(stream, m0, side, prior_mean=prior_mean, prior_var=prior_var)
    logk = log_capital(stream, lam, m0, side)
    return logk.max(axis=-1) >= math.log(1.0 / alpha), logk


def confidence_bound(
    stream: Stream,
    m0: float,
    side: Side,
    alpha: float,
    *,
    prior_mean: float,
    prior_var: float,
    span=(-1.0, 1.0),
    lam=None,
) -> float:
    """The one-sided (1 - alpha) confidence bound after all observations (one stream, 1-D): lower side, the
    largest m whose H0 (mean <= m) was rejected at some time; upper side, the smallest m with mean >= m
    rejected. The bets are the ones tuned to m0, so the bound is tightest near the decision's threshold.
    Returns the edge of `span` when nothing in it is rejected."""
    if stream.n == 0:
        return span[0] if side == "lower" else span[1]
    if lam is None:
        lam = bets(stream, m0, side, prior_mean=prior_mean, prior_var=prior_var)
    return bound_where(lambda m: float(log_capital(stream, lam, m, side).max()), stream, side, alpha, span)


def bound_where(peak_log_capital, stream: Stream, side: Side, alpha: float, span=(-1.0, 1.0)) -> float:
    """The edge of the rejected set {m : max_t log K_t(m) >= log(1/alpha)} of a capital that falls as m
    rises (lower side) or rises with m (upper side). The root is bracketed near the mean first (a few
    capital evaluations instead of ~15 over the whole span): the bound lies on the far side of the mean,
    within a few standard errors unless the sample is tiny."""
    target = math.log(1.0 / alpha)

    def excess(m: float) -> float:
        return peak_log_capital(m) - target

    # On the upper side excess rises with m: mirror it (x = -m) so that it falls as x rises on both sides.
    sign = 1.0 if side == "lower" else -1.0

    def falling(x: float) -> float:
        return excess(sign * x)

    lo, hi = sorted((sign * span[0], sign * span[1]))
    z = stream.z
    centre = sign * float(np.clip(np.mean(z), min(span), max(span)))
    near = max(lo, centre - 6.0 * float(np.std(z)) / math.sqrt(stream.n) - 0.05)
    if falling(near) < 0:  # the root is below `near`
        if falling(lo) < 0:
            return sign * lo
        hi = near
    elif falling(centre) < 0:
        lo, hi = near, centre
    elif falling(hi) >= 0:
        return sign * hi
    else:
        lo = centre
    return sign * float(optimize.brentq(falling, lo, hi, xtol=2e-4))


# Alternatives (multiples of the ceiling) of the likelihood-ratio mixture that tests a rate ceiling.
RATE_ALTERNATIVES = (1.5, 2.5, 4.0)


def rate_log_capital(stream: Stream, ceiling: float, m: float | None = None) -> np.ndarray:
    """log of the mixture capital testing H0: rate <= m (default: the ceiling) for a 0/1 stream.

    Each component bets the constant lambda_j = (p_j - c) / (c (1 - c)), which makes its capital exactly
    the likelihood ratio of Bernoulli(p_j) to Bernoulli(c) -- the Kelly bet for that alternative; their
    average is a non-negative supermartingale under H0 (Ville applies as above). For rare events this is
    far more powerful than the adaptive bets, which learn too slowly from a handful of errors (measured in
    docs/gate.md). For m != c the same bets are truncated to trunc / m, so the capital still falls as m
    rises and the lower bound is the edge of the rejected set."""
    m = ceiling if m is None else m
    alts = [min(k * ceiling, (1 + ceiling) / 2) for k in RATE_ALTERNATIVES]
    lams = np.array([(p - ceiling) / (ceiling * (1 - ceiling)) for p in alts])
    lams = np.minimum(lams, stream.truncation / max(m, 1e-12))
    # The stream is 0/1, so each component's log-capital is (ones so far) x log(1 + lam (1 - m)) +
    # (zeros so far) x log(1 - lam m): one cumulative count serves every component.
    ones = np.cumsum(stream.z, axis=-1)
    zeros = np.arange(1, stream.n + 1) - ones
    parts = [ones * math.log1p(lam * (1 - m)) + zeros * math.log1p(-lam * m) for lam in lams]
    return np.logaddexp.reduce(np.stack(parts), axis=0) - math.log(len(lams))
