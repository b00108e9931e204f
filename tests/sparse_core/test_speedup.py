"""sparse_core.speedup: the paired speed-up and its interval. The coverage claims are checked by
simulation of a busy host (vectorised numpy, through the same `t_interval` that `paired_speedup` uses),
with enough replications that the 95% Clopper-Pearson interval of the coverage decides."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from sparse_core.speedup import pair_order, paired_speedup, t_interval, weighted_pairs

TRUE = 1.25  # the sparse arm's speed-up in every simulated world


def _busy_host(rng, reps: int, n: int, *, order: float = 0.03, spikes: float = 0.05, drift: float = 0.3):
    """Log timings of `reps` evaluations of `n` pairs each on a shared host: a load factor shared by a
    pair (lognormal, sd `drift`: another job starting and stopping between pairs), independent noise per
    timing (sd 0.04), a share `spikes` of timings 1.5x slower (a burst landing on one timing only), and
    the arm timed second `order` faster (warm caches), in alternating order (`pair_order`)."""
    load = rng.normal(0.0, drift, (reps, n))
    dense_first = np.array([pair_order(i)[0] == "dense" for i in range(n)])
    burst = math.log(1.5)
    log_d = load + rng.normal(0, 0.04, (reps, n)) - np.where(dense_first, 0.0, order)
    log_d += burst * (rng.random((reps, n)) < spikes)
    log_s = load - math.log(TRUE) + rng.normal(0, 0.04, (reps, n)) - np.where(dense_first, order, 0.0)
    log_s += burst * (rng.random((reps, n)) < spikes)
    return log_d, log_s


def _coverage(lo: np.ndarray, hi: np.ndarray) -> tuple[float, float, float]:
    """Share of intervals holding the true speed-up, with its 95% Clopper-Pearson interval."""
    hit = (lo <= math.log(TRUE)) & (math.log(TRUE) <= hi)
    ci = stats.binomtest(int(hit.sum()), hit.size).proportion_ci(0.95)
    return float(hit.mean()), ci.low, ci.high


def test_paired_speedup_is_the_geometric_mean_of_the_pairs_ratios() -> None:
    s = paired_speedup([2.0, 2.2, 1.8], [1.0, 1.0, 1.0], confidence=0.9)
    r = np.log([2.0, 2.2, 1.8])
    half = stats.t.ppf(0.95, 2) * r.std(ddof=1) / math.sqrt(3)
    assert s.estimate == pytest.approx(math.exp(r.mean()))
    assert s.interval == pytest.approx((math.exp(r.mean() - half), math.exp(r.mean() + half)))
    assert (s.pairs, s.confidence) == (3, 0.9)
    assert s.to_dict()["estimate"] == s.estimate
    # the host's swings between pairs hit both arms of a pair: they cancel
    assert paired_speedup([1.0, 3.0, 0.5], [0.5, 1.5, 0.25]).interval == pytest.approx((2.0, 2.0))
    one = paired_speedup([1.0], [0.8])
    assert one.interval == (one.estimate, one.estimate) == (1.25, 1.25)


def test_bad_timings_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="sparse timings must be finite"):
        paired_speedup([1.0, 1.0], [0.5, float("nan")])
    with pytest.raises(ValueError, match="dense timings must be finite and > 0"):
        paired_speedup([0.0, 1.0], [0.5, 0.5])
    with pytest.raises(ValueError, match="as many dense as sparse"):
        paired_speedup([1.0, 1.0], [0.5])
    with pytest.raises(ValueError, match="at least one pair"):
        paired_speedup([], [])
    with pytest.raises(ValueError, match="confidence"):
        paired_speedup([1.0, 1.1], [0.5, 0.5], confidence=1.0)


def test_the_order_alternates_and_a_mix_pairs_by_round() -> None:
    assert [pair_order(i)[0] for i in range(4)] == ["dense", "sparse", "dense", "sparse"]
    assert all(sorted(pair_order(i)) == ["dense", "sparse"] for i in range(4))
    d, s = weighted_pairs([(0.25, [4.0, 8.0, 99.0], [2.0, 4.0, 99.0]), (0.75, [1.0, 2.0], [1.0, 1.0])])
    assert d == pytest.approx([1.75, 3.5]) and s == pytest.approx([1.25, 1.75])  # the rounds all rows have


@pytest.mark.parametrize("confidence", [0.90, 0.95])
@pytest.mark.parametrize("pairs", [2, 3, 4, 5, 8])
@pytest.mark.parametrize(
    "host",
    [
        {"order": 0.0, "spikes": 0.0},  # only noise: the t interval is exact
        {},  # the default busy host: drift, bursts, a warm-cache order effect
        {"order": 0.08},  # a strong order effect
        {"spikes": 0.15},  # frequent bursts
    ],
    ids=["quiet", "busy", "order-effect", "bursts"],
)
def test_the_interval_holds_its_confidence_at_small_samples_on_a_busy_host(
    confidence: float, pairs: int, host: dict
) -> None:
    rng = np.random.default_rng(pairs * 100 + int(confidence * 100))
    log_d, log_s = _busy_host(rng, 20_000, pairs, **host)
    _, lo, hi = t_interval(log_d - log_s, confidence)
    cover, low, high = _coverage(lo, hi)
    # at or above its confidence, up to chance (the Clopper-Pearson upper end reaches it, less 0.5 pp)
    assert high >= confidence - 0.005, (cover, low, high)


def test_a_decode_step_is_not_a_pair_a_run_is() -> None:
    """A run's steps share the run's load: an interval over steps (as if each were drawn afresh) claims
    90% and covers far less once the load differs between runs; over runs (their mean step times, what
    compare_decode pairs) it holds."""
    rng = np.random.default_rng(7)
    reps, runs, steps = 20_000, 4, 31
    run_load_d = rng.normal(0, 0.08, (reps, runs, 1))  # the host during each run
    run_load_s = 0.5 * run_load_d + math.sqrt(0.75) * rng.normal(0, 0.08, (reps, runs, 1))
    d = np.exp(run_load_d + rng.normal(0, 0.05, (reps, runs, steps)))
    s = np.exp(run_load_s - math.log(TRUE) + rng.normal(0, 0.05, (reps, runs, steps)))
    _, lo, hi = t_interval(np.log(d.mean(-1)) - np.log(s.mean(-1)), 0.90)
    assert _coverage(lo, hi)[2] >= 0.895
    # steps as if independent: a two-sample t on all steps' log times
    ld, ls = np.log(d).reshape(reps, -1), np.log(s).reshape(reps, -1)
    se = np.sqrt(ld.var(-1, ddof=1) / ld.shape[-1] + ls.var(-1, ddof=1) / ls.shape[-1])
    diff = ld.mean(-1) - ls.mean(-1)
    q = stats.norm.ppf(0.95)
    assert _coverage(diff - q * se, diff + q * se)[2] < 0.6
