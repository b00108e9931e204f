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
streams, their truncations and the rate ceiling's likelihood-ratio mixture.
"""

from __future__ import annotations

import math

import numpy as np

from sparse_core.betting import Side, Stream, bets, bound_where, confidence_bound, log_capital, rejects

__all__ = [
    "RATE_ALTERNATIVES",
    "TRUNCATION",
    "Side",
    "Stream",
    "bets",
    "bound_where",
    "confidence_bound",
    "ipw_stream",
    "log_capital",
    "paired_stream",
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
