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
pseudo-row (mean 0, variance 0.25).

**The rows are bet on in a random order** (a permutation drawn from ``seed``), never in the order given.
The guarantee is for rows that arrive in an order carrying no information (an iid sample, or any sample
shuffled). A dataset file is often sorted (by topic, by source, by prompt length, and sparse attention
loses most on the longest prompts), and with adaptive bets and "rejected at any time" the early rows can
certify before the late ones are seen. Measured before the shuffle (thirty-fifth session): 190 rows
that lose nothing followed by 10 that lose everything (mean drop 0.05) certified "drop < 0.05" at
0.05 / 7 with an upper bound of 0.029, and for 200 / 300 / 120 rows whose drops are 1 with probability
0.05 / 0.03 / 0.1 (the truth at the bound) sorted ascending, 400 of 400 samples certified; shuffled,
0.75% / 0% / 0.75% (at a level of 0.71%).

The price of validity is rows: with no drop at all on any row the bound still needs about
``log(1/alpha) / (trunc * m0)`` rows to fall below ``m0`` (`rows_to_certify`): ~170 rows for 0.02 at
95% for one test; calibration's search tests several plans and judges each at alpha / steps
(`eps_search.step_alpha`), 277 rows for 0.02 with its default 7 steps. Pure functions on plain
floats; `sparse_core.calibration` uses them for ``Budget.task_delta``, and `sparse_core.evaluation`
uses `delta_bounds` for the bounds an evaluation reports beside its mean task-score change.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from sparse_core import betting

ALPHA = 0.05
TRUNCATION = 0.9  # largest share of the capital one bet may risk
PRIOR_MEAN, PRIOR_VAR = 0.0, 0.25  # one pseudo-row: no drop expected, spread of a coin on [0, 1]


def _check(drops: Sequence[float], lo: float, hi: float, alpha: float, what: str = "drop") -> list[float]:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if not lo < hi:
        raise ValueError(f"need lo < hi, got [{lo}, {hi}]")
    out = [float(x) for x in drops]
    for i, x in enumerate(out):
        if not (math.isfinite(x) and lo - 1e-9 <= x <= hi + 1e-9):
            raise ValueError(f"row {i}: {what} {x!r} is outside [{lo}, {hi}]")
    return [min(max(x, lo), hi) for x in out]


def _stream(drops: list[float], lo: float, hi: float) -> betting.Stream:
    return betting.Stream(np.asarray(drops, dtype=float), lo, hi, TRUNCATION)


def betting_order(n_rows: int, seed: int) -> list[int]:
    """The order the test bets on n rows in: a permutation drawn from `seed` (see the module docstring).
    A caller that scores rows one by one in this order may stop as soon as `rejects(..., seed=None)`
    holds on the rows so far: a test that rejects at some time rejects (`certify_in_order`)."""
    return [int(i) for i in np.random.default_rng(seed).permutation(n_rows)]


def _shuffled(drops: list[float], seed: int | None) -> list[float]:
    """The rows in the order the test bets in: `seed`'s permutation, or as given (None: the caller
    already put them in a `betting_order`)."""
    return drops if seed is None else [drops[i] for i in betting_order(len(drops), seed)]


def rejects(
    drops: Sequence[float],
    m0: float,
    *,
    alpha: float = ALPHA,
    lo: float = -1.0,
    hi: float = 1.0,
    seed: int | None = 0,
) -> bool:
    """True when the rows reject H0: E[drop] >= m0 at level alpha (the mean drop is certified < m0). The
    rows are bet on in the order a permutation drawn from `seed` gives them (None: in the given order,
    which must be a `betting_order` the rows were drawn in)."""
    d = _check(drops, lo, hi, alpha)
    if not d:
        return False
    crossed, _ = betting.rejects(
        _stream(_shuffled(d, seed), lo, hi), m0, "upper", alpha, prior_mean=PRIOR_MEAN, prior_var=PRIOR_VAR
    )
    return bool(crossed)


def drop_upper_bound(
    drops: Sequence[float],
    *,
    m0: float,
    alpha: float = ALPHA,
    lo: float = -1.0,
    hi: float = 1.0,
    seed: int | None = 0,
) -> float:
    """The one-sided (1 - alpha) upper confidence bound on the mean drop, valid for any distribution on
    [lo, hi] and any number of rows (``hi`` when the rows reject nothing below it), the rows bet on in
    the order a permutation drawn from `seed` gives them (None: as given). ``m0``: the value
    the bets are tuned to (the bound being certified), where the bound is tightest. It must be chosen
    before the rows are seen: a tuning taken from the rows themselves (their mean + 0.05, this
    function's default until the twenty-sixth session, used by no caller) lets every bet depend on rows
    after it, and the capital is then no supermartingale. ``drop_upper_bound(d, m0=b) < b`` exactly
    when ``rejects(d, b)``, up to the root-finder's tolerance."""
    d = _check(drops, lo, hi, alpha)
    if not d:
        return hi
    return betting.confidence_bound(
        _stream(_shuffled(d, seed), lo, hi),
        m0,
        "upper",
        alpha,
        prior_mean=PRIOR_MEAN,
        prior_var=PRIOR_VAR,
        span=(lo, hi),
    )


def delta_bounds(
    dense: Sequence[float], sparse: Sequence[float], *, alpha: float = ALPHA, seed: int = 0
) -> tuple[float, float]:
    """One-sided (1 - alpha) lower and upper confidence bounds on the mean per-row quality change
    ``sparse - dense`` of paired task scores in [0, 1], each valid for any distribution and any number
    of rows (each side on its own, as the pilot gate reports its interval, so both hold together at
    1 - 2 alpha). A test by betting as `drop_upper_bound`, with the predictable plug-in bets of
    `betting.plug_in_bets` in place of bets tuned to one value: an evaluation certifies no particular
    bound, and bets tuned to a change of 0.03 left a true loss of 0.05 on 200 rows unbounded (-1.0) in
    one row order of five. Rows that all score alike in both arms bound the change within +-0.84 (2
    rows), +-0.19 (16), +-0.054 (60), +-0.017 (200); no rows give the scale's ends, -1 and +1.

    The rows are bet on in a random order drawn from ``seed``, not in the order given: the test holds
    for rows whose order carries no information (an iid sample, or any sample shuffled), and a dataset
    sorted by length or topic is not one. In file order, 190 rows that lose nothing followed by 10
    that lose everything gave a lower bound of -0.018 and an upper one of -0.019, an empty interval
    beside their mean of -0.05: the early rows had rejected every change below -0.018 before the losses
    came, and the losses then every change above -0.019."""
    if len(dense) != len(sparse):
        raise ValueError(f"{len(dense)} dense scores against {len(sparse)} sparse ones: the rows must pair")
    checked = (_check(dense, 0.0, 1.0, alpha, "dense score"), _check(sparse, 0.0, 1.0, alpha, "sparse score"))
    pairs = list(zip(*checked, strict=True))
    order = np.random.default_rng(seed).permutation(len(pairs))
    stream = _stream([pairs[i][1] - pairs[i][0] for i in order], -1.0, 1.0)
    if stream.n == 0:
        return -1.0, 1.0
    prior = {"prior_mean": PRIOR_MEAN, "prior_var": PRIOR_VAR}
    lam = betting.plug_in_bets(stream, alpha, **prior)
    low, high = (
        betting.confidence_bound(stream, 0.0, side, alpha, lam=lam, **prior) for side in ("lower", "upper")
    )
    return low, high


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


def certify_in_order(
    drop_of: Callable[[int], float],
    n_rows: int,
    m0: float,
    *,
    alpha: float = ALPHA,
    seed: int = 0,
    lo: float = -1.0,
    hi: float = 1.0,
) -> tuple[list[float], bool, float]:
    """Score rows one at a time, in `betting_order(n_rows, seed)`, until the test certifies "mean drop <
    m0" or the rows run out: (the drops scored, in that order; certified; the upper bound on them).
    `drop_of(i)` scores row i. The verdict is the one all n rows would give (a test that rejects at some
    time rejects, whatever rows come after), and the bound, taken at that stopping time, is as valid as
    at the end; a row that is never scored is never paid for (each one is a model forward or a
    generation per plan tried)."""
    drops: list[float] = []
    certified = False
    for i in betting_order(n_rows, seed):
        drops.append(float(drop_of(i)))
        if rejects(drops, m0, alpha=alpha, lo=lo, hi=hi, seed=None):
            certified = True
            break
    return drops, certified, drop_upper_bound(drops, m0=m0, alpha=alpha, lo=lo, hi=hi, seed=None)


def certifiable_bound(
    n_rows: int, *, alpha: float = ALPHA, lo: float = -1.0, hi: float = 1.0
) -> float | None:
    """The least bound ``n_rows`` rows can certify at all: rows that all drop exactly 0 (any real drop
    needs more), to 3 significant digits, rounded up. None when they certify nothing below ``hi``."""
    zeros = [0.0] * n_rows
    if n_rows <= 0 or not rejects(zeros, hi, alpha=alpha, lo=lo, hi=hi):
        return None
    low, high = 0.0, hi  # low certifies nothing (no bound <= 0 can be), high is certified
    while high - low > 1e-4 * high:
        mid = (low + high) / 2
        if rejects(zeros, mid, alpha=alpha, lo=lo, hi=hi):
            high = mid
        else:
            low = mid
    digits = 2 - math.floor(math.log10(high))
    return math.ceil(high * 10**digits) / 10**digits


__all__ = [
    "ALPHA",
    "betting_order",
    "certifiable_bound",
    "certify_in_order",
    "delta_bounds",
    "drop_upper_bound",
    "rejects",
    "rows_to_certify",
]
