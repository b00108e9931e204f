"""Finite-sample, anytime-valid confidence bounds for bounded means, by betting (Waudby-Smith & Ramdas
2023, "Estimating means of bounded random variables by betting", JRSS-B). The one implementation of the
math behind the pilot's gate (`rollout.gate.sequences` builds its streams on it) and calibration's task
bound (`sparse_core.task_bound`).

To test H0: mean <= m (the "lower" side), bet lambda_t >= 0 on Z_t exceeding m: the capital
K_t(m) = prod_i (1 + lambda_i (Z_i - m)) is a non-negative supermartingale under H0 when lambda_i is
predictable and lambda_i <= trunc / (m - lo_i) with trunc < 1 (so no factor can be negative). Ville's
inequality: P(sup_t K_t(m) >= 1/alpha) <= alpha, at every sample size, for any bounded distribution, however
often one looks. The lower confidence bound is the largest m rejected at some time so far; because the bets
lambda~_t do not depend on m and the truncation only shrinks as m grows, K_t(m) falls as m rises, so the
rejected values form an interval and a root-finder finds its end. The upper side mirrors it.

The bets are the approximate growth-rate-adaptive ("aGRAPA") bets, tuned to the decision's own null m0:
lambda~_t = (mu_t - m0) / (var_t + (mu_t - m0)^2), clipped at 0, from the running mean and variance of the
earlier observations (with one pseudo-observation of a prior). Where no m0 is being decided (an
evaluation's bounds on its task-score change), `plug_in_bets` gives the fixed-n predictable plug-in bets,
which do not depend on m. Vectorised over leading axes (the gate's simulation tests run the very same code
as its decisions). Pure numpy/scipy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import optimize

Side = Literal["lower", "upper"]


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


def bets(stream: Stream, m0: float, side: Side, *, prior_mean: float, prior_var: float) -> np.ndarray:
    """Predictable aGRAPA bets tuned to the null m0 (lambda~ >= 0), one per observation."""
    return two_sided_bets(stream, m0, prior_mean=prior_mean, prior_var=prior_var, sides=(side,))[side]


def two_sided_bets(
    stream: Stream,
    m0: float,
    *,
    prior_mean: float,
    prior_var: float,
    sides: tuple[Side, ...] = ("lower", "upper"),
) -> dict[Side, np.ndarray]:
    """`bets` for each side, from one pass over the running mean and variance (which the sides share)."""
    mean, var = running_moments(stream, prior_mean=prior_mean, prior_var=prior_var)
    out = {}
    for side in sides:
        edge = mean - m0 if side == "lower" else m0 - mean  # max(edge / (var + edge^2), 0)
        room = edge * edge
        room += var
        edge /= room
        out[side] = np.maximum(edge, 0.0, out=edge)
    return out


def plug_in_bets(stream: Stream, alpha: float, *, prior_mean: float, prior_var: float) -> np.ndarray:
    """Predictable plug-in bets for a confidence bound at a fixed number of observations n (Waudby-Smith &
    Ramdas 2023, section 3, the fixed-n form of their PrPl bets): lambda~_t = sqrt(2 log(1/alpha) / (n
    var_t)), var_t the running variance of the earlier observations with one prior pseudo-observation.
    They do not depend on the null m, so they suit a bound wherever the mean lies, where aGRAPA bets tuned
    to one m0 bound sharply near m0 only (`task_bound.delta_bounds` says what that cost). One-sided:
    `alpha` is each side's own level. The capital applies the truncation at trunc / (m - lo), as for
    any bets."""
    _, var = running_moments(stream, prior_mean=prior_mean, prior_var=prior_var)
    return np.sqrt(2.0 * math.log(1.0 / alpha) / (max(stream.n, 1) * var))


def running_moments(stream: Stream, *, prior_mean: float, prior_var: float) -> tuple[np.ndarray, np.ndarray]:
    """The mean and variance of the observations before each one (predictable), with one pseudo-observation
    of the prior (mean `prior_mean`, variance `prior_var`); the variance floored at 1e-12."""
    z = np.asarray(stream.z, dtype=float)
    n = z.shape[-1]
    # In place where it can be; the plain expressions are in the comments (the same numbers to the last bit)
    mean = np.empty_like(z)  # (prior_mean + cumsum(z[:-1])) / (1 + k), k = 1, 2, ...
    var = np.empty_like(z)  # max((prior_var + prior_mean^2 + cumsum(z[:-1]^2)) / (1 + k) - mean^2, 1e-12)
    mean[..., 0] = prior_mean
    var[..., 0] = prior_var + prior_mean**2
    if n > 1:
        count = 1.0 + np.arange(1, n, dtype=float)
        np.cumsum(z[..., :-1], axis=-1, out=mean[..., 1:])
        mean[..., 1:] += prior_mean
        mean[..., 1:] /= count
        np.cumsum(z[..., :-1] ** 2, axis=-1, out=var[..., 1:])
        var[..., 1:] += prior_var + prior_mean**2
        var[..., 1:] /= count
    var -= mean**2
    np.maximum(var, 1e-12, out=var)
    return mean, var


def log_capital(stream: Stream, lam: np.ndarray, m: float | np.ndarray, side: Side) -> np.ndarray:
    """log K_t(m) at every time t (last axis). m may broadcast against the leading axes (e.g. one m per
    replication)."""
    m = np.asarray(m, dtype=float)[..., None] if np.ndim(m) else float(m)
    step = _log_factors(stream, lam, m, side, slice(None))
    return np.cumsum(step, axis=-1, out=step)


# Observations per block of `peak_log_capital` (a few 256 KiB arrays: they stay in a core's cache)
PEAK_BLOCK = 1 << 15


def peak_log_capital(stream: Stream, lam: np.ndarray, m: float, side: Side) -> float:
    """max over time of `log_capital` for one (1-D) stream, a block of observations at a time (what the
    bound's root-finder asks ~10 times a look; on 1M rows the arrays stay in cache). The same number: each
    block's running sum starts from the last one's (its first factor plus the sum so far, as `cumsum` adds
    them), and the peak is the largest of the blocks' peaks."""
    m = float(m)
    best, carry = -math.inf, None
    for start in range(0, stream.n, PEAK_BLOCK):
        step = _log_factors(stream, lam, m, side, slice(start, start + PEAK_BLOCK))
        if carry is not None:
            step[0] += carry
        np.cumsum(step, out=step)
        carry = step[-1]
        best = max(best, float(step.max()))
    return best


def _log_factors(stream: Stream, lam: np.ndarray, m, side: Side, rows: slice) -> np.ndarray:
    """log(1 + lambda_t (Z_t - m)) (lower side; the upper side bets against it) for the observations
    `rows` (last axis), each bet truncated at trunc / (m - lo_t) (upper: trunc / (hi_t - m)); a new array."""

    def part(x):
        return x if np.ndim(x) == 0 else x[..., rows]

    lam = part(lam)
    room = np.subtract(m, part(stream.lo)) if side == "lower" else np.subtract(part(stream.hi), m)
    if np.shape(room) == np.shape(lam):  # a bound per row (a split step): work in place on `room`
        np.maximum(room, 1e-12, out=room)
        np.divide(stream.truncation, room, out=room)
        bet = np.minimum(lam, room, out=room)
    else:
        bet = np.minimum(lam, stream.truncation / np.maximum(room, 1e-12))
    # lower: bet x (Z - m); upper: bet x (m - Z), which is -(bet x (Z - m)) to the last bit. In place on
    # the fresh `step` array where the shapes allow.
    z = part(stream.z)
    step = np.subtract(z, m, dtype=float) if side == "lower" else np.subtract(m, z, dtype=float)
    if np.broadcast_shapes(step.shape, np.shape(bet)) == step.shape:
        step *= bet
    else:
        step = step * bet
    return np.log1p(step, out=step)


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
    return bound_where(lambda m: peak_log_capital(stream, lam, m, side), stream, side, alpha, span)


def bound_where(peak, stream: Stream, side: Side, alpha: float, span=(-1.0, 1.0)) -> float:
    """The edge of the rejected set {m : peak(m) >= log(1/alpha)}, peak(m) = max_t log K_t(m), of a
    capital that falls as m rises (lower side) or rises with m (upper side). The root is bracketed near
    the mean first (a few capital evaluations instead of ~15 over the whole span): the bound lies on the
    far side of the mean, within a few standard errors unless the sample is tiny."""
    target = math.log(1.0 / alpha)
    seen: dict[float, float] = {}  # the bracket's ends are evaluated again by brentq: once is enough

    def excess(m: float) -> float:
        if m not in seen:
            seen[m] = peak(m) - target
        return seen[m]

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
