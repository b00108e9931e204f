"""The valid upper bound on a mean task-score drop (sparse_core.task_bound)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from scipy import stats

from sparse_core.task_bound import delta_bounds, drop_upper_bound, rejects, rows_to_certify


def _heavy_tail(rng: random.Random, n: int) -> list[float]:
    """docs-qa's shape: most rows lose ~nothing, one in eight loses 0.34 (mean drop 0.0425)."""
    return [0.34 if rng.random() < 0.125 else rng.uniform(-0.005, 0.005) for _ in range(n)]


@pytest.mark.parametrize("n", [4, 60, 240])
def test_the_bound_covers_the_true_mean_of_a_heavy_tailed_drop(n):
    rng = random.Random(n)
    reps = 400
    misses = sum(drop_upper_bound(_heavy_tail(rng, n), m0=0.02) < 0.0425 for _ in range(reps))
    assert misses / reps <= 0.05, f"{misses}/{reps} bounds fell below the true mean"


def test_the_bound_tightens_with_rows_and_rejects_agrees_with_it():
    rng = random.Random(1)
    quiet = [rng.uniform(-0.005, 0.005) for _ in range(400)]
    b4, b60, b400 = (drop_upper_bound(quiet[:n], m0=0.02) for n in (4, 60, 400))
    assert b4 == 1.0, "4 rows can rule nothing out"
    assert 0.02 < b60 < 0.1 and b400 < 0.02 and b400 > max(0.0, sum(quiet) / 400)
    assert rejects(quiet, 0.02) and not rejects(quiet[:60], 0.02)


def test_rows_to_certify_is_the_fewest_zero_rows_that_reject():
    n = rows_to_certify(0.02)
    assert 150 <= n <= 200
    assert rejects([0.0] * n, 0.02) and not rejects([0.0] * (n - 1), 0.02)
    assert rows_to_certify(0.1) < rows_to_certify(0.03) < n
    assert rows_to_certify(0.0) is None and rows_to_certify(1e-6) is None


def test_bad_input_names_the_row():
    with pytest.raises(ValueError, match="row 1: drop 1.5"):
        drop_upper_bound([0.0, 1.5], m0=0.02)
    with pytest.raises(ValueError, match="alpha"):
        rejects([0.0], 0.1, alpha=1.0)
    assert drop_upper_bound([], m0=0.02) == 1.0


def _paired(kind: str, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(dense, sparse) task scores of n rows; the true mean change of each kind is in TRUE_CHANGE."""
    if kind == "0/1, sparse loses 7%":  # 95% correct dense; the sparse arm fails on 7% of the rows
        dense = (rng.random(n) < 0.95).astype(float)
        return dense, np.where(rng.random(n) < 0.07, 0.0, dense)
    if kind == "0/1 independent, 80% vs 78%":
        return (rng.random(n) < 0.8).astype(float), (rng.random(n) < 0.78).astype(float)
    if kind == "Beta(0.5, 0.5), 12% degraded by 0.3":
        dense = rng.beta(0.5, 0.5, n)
        return dense, np.where(rng.random(n) < 0.12, np.clip(dense - 0.3, 0.0, 1.0), dense)
    dense = np.full(n, 0.8)  # docs-qa's shape: one row in eight loses 0.34
    return dense, dense - np.where(rng.random(n) < 0.125, 0.34, 0.0)


def _beta_degraded_change() -> float:
    x = np.random.default_rng(99).beta(0.5, 0.5, 4_000_000)
    return -0.12 * float(np.minimum(x, 0.3).mean())


TRUE_CHANGE = {
    "0/1, sparse loses 7%": -0.95 * 0.07,
    "0/1 independent, 80% vs 78%": -0.02,
    "Beta(0.5, 0.5), 12% degraded by 0.3": _beta_degraded_change(),
    "heavy tail": -0.125 * 0.34,
}


def _crossed_at(z: np.ndarray, truth: float, side: str, lam: np.ndarray, alpha: float) -> np.ndarray:
    """Per row of `z` (replications x rows, in betting order): is H0 at `truth` rejected on `side`, i.e.
    does that side's bound exclude `truth` (the rejected set is an interval ending at the bound,
    sparse_core.betting)."""
    from sparse_core import betting
    from sparse_core.task_bound import PRIOR_MEAN, PRIOR_VAR, TRUNCATION

    stream = betting.Stream(z, -1.0, 1.0, TRUNCATION)
    crossed, _ = betting.rejects(
        stream, truth, side, alpha, lam=lam, prior_mean=PRIOR_MEAN, prior_var=PRIOR_VAR
    )
    return crossed


@pytest.mark.parametrize("kind", list(TRUE_CHANGE))
def test_each_evaluation_bound_misses_the_true_change_at_most_5_percent_at_any_rows(kind):
    """delta_bounds, what an evaluation reports beside its mean task-score change: each side is a
    one-sided 95% bound for 8 to 200 rows of skewed, 0/1 or rarely-losing scores. 4,000 draws a cell,
    judged as the pilot gate's guarantee is: a miss rate at most 6% (alpha + 1 point) with the upper end
    of its 95% binomial (Clopper-Pearson) interval at most 7%. (The worst cell, 0/1 scores losing on 7%
    of 200 rows, missed 4.55% of 4,000 draws on its lower side: the bound is valid, and close to exact
    there; 40,000 draws: 4.68%.) A side misses when it excludes the truth, which is its test rejecting H0
    at the truth: all draws of a cell are judged at once on that test (the same bets and rows in the same
    order as delta_bounds, the same numbers: 0 disagreements in 2,000 draws of that worst cell), and
    delta_bounds itself is asked on every draw counted as a miss and on 50 others, and must agree with
    it. (Until the 51st session each draw was its own delta_bounds call: 2,000 draws a cell, 30 s.)"""
    from sparse_core import betting
    from sparse_core.task_bound import PRIOR_MEAN, PRIOR_VAR, TRUNCATION

    rng = np.random.default_rng(len(kind))
    truth, reps, alpha = TRUE_CHANGE[kind], 4000, 0.05
    for n in (8, 20, 50, 200):
        dense, sparse = _paired(kind, rng, reps * n)
        dense, sparse = dense.reshape(reps, n), sparse.reshape(reps, n)
        z = (sparse - dense)[:, np.random.default_rng(0).permutation(n)]  # delta_bounds' order (seed 0)
        stream = betting.Stream(z, -1.0, 1.0, TRUNCATION)
        lam = betting.plug_in_bets(stream, alpha, prior_mean=PRIOR_MEAN, prior_var=PRIOR_VAR)
        miss = np.stack([_crossed_at(z, truth, side, lam, alpha) for side in ("lower", "upper")], axis=1)
        for r in sorted(set(np.flatnonzero(miss.any(axis=1))) | set(range(50))):
            low, high = delta_bounds(dense[r].tolist(), sparse[r].tolist())
            for k, (bound, said) in enumerate(((low, low > truth), (high, high < truth))):
                near = abs(bound - truth) < 1e-3  # within the bound's root-finder tolerance of the truth
                assert near or said == miss[r, k], (kind, n, r, ("lower", "upper")[k], bound, truth)
        misses = miss.sum(axis=0)
        upper = stats.beta.ppf(0.975, misses + 1, reps - misses)
        ok = (misses / reps <= 0.06).all() and (upper <= 0.07).all()
        assert ok, f"{kind}, {n} rows: the lower / upper bound missed {misses} of {reps}"


def test_evaluation_bounds_tighten_with_rows_and_refuse_bad_scores():
    widths = [np.subtract(*delta_bounds([1.0] * n, [1.0] * n)[::-1]) for n in (2, 16, 60, 200)]
    assert widths[0] > 1.5 and 0.3 < widths[1] < 0.45 and 0.09 < widths[2] < 0.12 and widths[3] < 0.04
    # sparse lost the last 10 of 200 rows: the rows are bet on in a seeded random order, so the file's
    # order (190 quiet rows first) cannot exclude the rows' own mean, whatever the seed
    for seed in range(5):
        low, high = delta_bounds([1.0] * 200, [1.0] * 190 + [0.0] * 10, seed=seed)
        assert low < -0.05 < high < 0.0
    with pytest.raises(ValueError, match="row 1: sparse score 1.5"):
        delta_bounds([0.5, 0.5], [0.5, 1.5])
    with pytest.raises(ValueError, match="row 0: dense score nan"):
        delta_bounds([float("nan")], [0.5])
    with pytest.raises(ValueError, match="must pair"):
        delta_bounds([0.5], [0.5, 0.5])


@pytest.mark.parametrize(
    "n, bound, order",
    [
        (60, 0.2, "losses last"),
        (120, 0.1, "losses last"),
        (200, 0.05, "losses last"),
        (300, 0.03, "losses last"),
        (200, 0.05, "drops growing down the file"),
    ],
)
def test_a_sorted_file_cannot_certify_a_bound_its_rows_do_not_meet(n: int, bound: float, order: str) -> None:
    """The truth at the bound, the rows in the worst order a dataset file can hold them: the rows that
    lose last (0/1 losses with probability `bound`), or drops that grow down the file (a file sorted by
    prompt length: Beta drops with mean `bound`, sorted). Taken in that order, adaptive bets certified
    "drop < bound" in every sample (checked here too); bet in a random order (each sample its own
    seed, as each use case's spec has), at most alpha of them, the 95% binomial interval deciding."""
    rng = np.random.default_rng(n)
    reps, alpha = 8000, 0.05
    if order == "losses last":
        samples = np.sort((rng.random((reps, n)) < bound).astype(float), axis=1)
    else:
        samples = np.sort(rng.beta(0.5, 0.5 * (1 - bound) / bound, (reps, n)), axis=1)
    from sparse_core import betting
    from sparse_core.task_bound import PRIOR_MEAN, PRIOR_VAR, TRUNCATION, betting_order

    # each sample bet in its own seed's order (betting_order(n, r)), all samples at once on the same test;
    # `rejects` itself is asked on every sample counted as certified and on 50 others, and must agree
    shuffled = np.stack([s[np.random.default_rng(r).permutation(n)] for r, s in enumerate(samples)])
    assert [shuffled[r].tolist() for r in (0, 1)] == [
        samples[r][betting_order(n, r)].tolist() for r in (0, 1)
    ]
    certified, _ = betting.rejects(
        betting.Stream(shuffled, -1.0, 1.0, TRUNCATION),
        bound,
        "upper",
        alpha,
        prior_mean=PRIOR_MEAN,
        prior_var=PRIOR_VAR,
    )
    for r in sorted(set(np.flatnonzero(certified)) | set(range(50))):
        assert rejects(samples[r].tolist(), bound, alpha=alpha, seed=r) == certified[r], r
    hits = int(certified.sum())
    high = stats.binomtest(hits, reps).proportion_ci(0.95).high
    assert high <= alpha + 0.01, f"{hits}/{reps} certified (upper 95% end {high:.3f})"

    in_file_order = betting.Stream(samples[:200], -1.0, 1.0, TRUNCATION)
    crossed, _ = betting.rejects(
        in_file_order, bound, "upper", alpha, prior_mean=PRIOR_MEAN, prior_var=PRIOR_VAR
    )
    assert crossed.mean() > 0.5  # what the file's own order did: the shuffle is what holds the level


def test_certifiable_bound_is_the_least_bound_n_rows_certify():
    from sparse_core.task_bound import certifiable_bound

    alpha = 0.05 / 7
    for n in (9, 40, 109, 277, 1000):
        b = certifiable_bound(n, alpha=alpha)
        unit = 10.0 ** (np.floor(np.log10(b)) - 2)  # 3 significant digits, rounded up
        assert rejects([0.0] * n, b, alpha=alpha) and not rejects([0.0] * n, b - unit, alpha=alpha)
        assert rows_to_certify(b, alpha=alpha) <= n
    assert certifiable_bound(277, alpha=alpha) == 0.02 and certifiable_bound(40, alpha=alpha) == 0.13
    assert certifiable_bound(4, alpha=alpha) is None and certifiable_bound(0) is None


def test_scoring_in_betting_order_stops_at_certification_with_the_verdict_all_rows_give():
    """`certify_in_order` scores rows one by one and stops once the bound is certified: its verdict is
    the one every row would give (`rejects` on all of them, same seed), and rows that lose nothing
    cost about `rows_to_certify` scored rows, not all of them."""
    from sparse_core.task_bound import betting_order, certify_in_order

    rng = np.random.default_rng(5)
    for trial in range(300):
        n = int(rng.integers(5, 120))
        drops = np.where(rng.random(n) < rng.uniform(0, 0.3), rng.uniform(-0.2, 1.0, n), 0.0).tolist()
        asked: list[int] = []

        def drop_of(i: int, asked: list[int] = asked, drops: list[float] = drops) -> float:
            asked.append(i)
            return drops[i]

        scored, certified, upper = certify_in_order(drop_of, n, 0.1, alpha=0.05, seed=trial)
        assert certified == rejects(drops, 0.1, alpha=0.05, seed=trial)
        assert asked == betting_order(n, trial)[: len(scored)] and len(set(asked)) == len(asked)
        assert (upper < 0.1 if certified else upper > 0.1 - 1e-3) and (certified or len(scored) == n)
    quiet, certified, upper = certify_in_order(lambda i: 0.0, 500, 0.1, alpha=0.05)
    assert certified and len(quiet) == rows_to_certify(0.1, alpha=0.05) and upper < 0.1
