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

from sparse_core.betting import Side, Stream, bets, bound_where, confidence_bound, log_capital, rejects

__all__ = [
    "EXCESS_MIXTURE",
    "RATE_MIXTURE",
    "TRUNCATION",
    "Side",
    "Stream",
    "bets",
    "bound_where",
    "confidence_bound",
    "excess_log_capital",
    "ipw_stream",
    "log_capital",
    "paired_stream",
    "rate_count_log_capital",
    "rate_log_capital",
    "rate_stream",
    "rejects",
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
    centre = np.empty_like(q)
    centre[..., 0] = prior_centre
    if n > 1:
        centre[..., 1:] = (prior_centre + np.cumsum(q[..., :-1], axis=-1)) / np.arange(2, n + 1)
    weight = np.where(t, 1.0 / share, -1.0 / (1.0 - share))
    z = (q - centre) * weight
    lo = np.minimum(-centre / share, -(1.0 - centre) / (1.0 - share))
    hi = np.maximum((1.0 - centre) / share, centre / (1.0 - share))
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
    that alternative. Any fixed weights (summing to 1) keep the mixture a non-negative martingale at rate c
    and a supermartingale below it, so Ville's inequality bounds the time-uniform false stop by alpha
    whatever the weights are: the weights and alternatives only move power between breach sizes. For
    m != c the same bets are truncated to trunc / m, so the capital still falls as m rises and the lower
    bound is the edge of the rejected set."""
    m = ceiling if m is None else m
    ones = np.asarray(ones, dtype=float)
    zeros = np.asarray(rows, dtype=float) - ones
    parts = []
    for multiple, weight in mixture:
        p = min(multiple * ceiling, (1 + ceiling) / 2)
        lam = min((p - ceiling) / (ceiling * (1 - ceiling)), truncation / max(m, 1e-12))
        parts.append(math.log(weight) + ones * math.log1p(lam * (1 - m)) + zeros * math.log1p(-lam * m))
    return np.logaddexp.reduce(np.stack(np.broadcast_arrays(*parts)), axis=0)


def rate_log_capital(stream: Stream, ceiling: float, m: float | None = None) -> np.ndarray:
    """log of the mixture capital (`rate_count_log_capital`) over time for a 0/1 stream (vectorised over
    leading axes). For rare events the likelihood-ratio mixture is far more powerful than the adaptive
    bets, which learn too slowly from a handful of errors (measured in docs/gate.md)."""
    ones = np.cumsum(stream.z, axis=-1)
    rows = np.arange(1, stream.n + 1)
    return rate_count_log_capital(ones, rows, ceiling, m, truncation=stream.truncation)


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
    m = ceiling if m is None else m
    room = np.maximum(stream.hi - ceiling, 1e-12)
    # `log_capital`'s lower-side factor, with the truncation and Z - m computed once for all components
    # (1M-row steps: half the time of one log_capital call per component)
    cap = stream.truncation / np.maximum(m - stream.lo, 1e-12)
    diff = stream.z - m
    total = None
    for gain, weight in mixture:
        part = np.cumsum(np.log1p(np.minimum(gain / room, cap) * diff), axis=-1) + math.log(weight)
        total = part if total is None else np.logaddexp(total, part)
    return total
