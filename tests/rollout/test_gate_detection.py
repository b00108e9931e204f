"""The monitor's change detector (`rollout.gate.detection`): the formula, its guarantee by simulation, and
what it detects that the two tests it replaced could not.

Requirement, as for the gate (`gate_helpers.refuted`): false alarm <= alpha + 1 pp with the upper end of the
95% Clopper-Pearson interval <= alpha + 2 pp and its lower end <= alpha, replications doubled until the
interval decides. `pytest -s` prints the cells.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from rollout.gate import detection
from rollout.gate.sequences import rate_factors, rate_log_capital, rate_stream
from rollout.gate.simulation import simulate_monitor, simulate_monitor_excess, simulate_monitor_quality

from .gate_helpers import refuted

ALPHA = 0.05


def _brute_force(x: np.ndarray, starts: np.ndarray, ceiling: float, m: float | None = None) -> np.ndarray:
    """log M_t as the module docstring writes it: a sum over candidates and components, no recursion."""
    out = []
    for t in range(x.size):
        total = 0.0
        for k, s in enumerate(starts, start=1):
            if s > t:
                break
            for log_v, on_one, on_zero in rate_factors(ceiling, m):
                seg = x[s : t + 1]
                total += math.exp(log_v + seg.sum() * on_one + (seg.size - seg.sum()) * on_zero) / (
                    k * (k + 1)
                )
        out.append(math.log(total))
    return np.array(out)


@pytest.mark.parametrize("m", [None, 0.08])
def test_the_capital_is_the_weighted_sum_over_looks_and_components(m) -> None:
    rng = np.random.default_rng(3)
    x = (rng.random(60) < 0.15).astype(float)
    starts = np.array([0, 7, 8, 20, 41, 59])
    got = detection.change_log_capital(x, starts, 0.05, m)
    np.testing.assert_allclose(got, _brute_force(x, starts, 0.05, m), rtol=1e-10, atol=1e-10)
    # vectorised over replications: each row as on its own
    xs = (rng.random((4, 60)) < 0.1).astype(float)
    many = detection.change_log_capital(xs, starts, 0.05, m)
    for row, one in zip(xs, many, strict=True):
        np.testing.assert_allclose(one, detection.change_log_capital(row, starts, 0.05, m), rtol=1e-12)


def test_one_look_is_the_steps_rate_test_at_half_the_weight() -> None:
    x = (np.random.default_rng(1).random(300) < 0.04).astype(float)
    np.testing.assert_allclose(
        detection.change_log_capital(x, np.array([0]), 0.02),
        rate_log_capital(rate_stream(x), 0.02) - math.log(2),
        rtol=1e-12,
    )


def test_look_starts_and_bad_starts() -> None:
    np.testing.assert_array_equal(detection.look_starts(["a", "a", "b", "b", "b", "c"]), [0, 2, 5])
    assert detection.look_starts([]).size == 0
    for bad in ([1, 3], [0, 3, 3], [0, 12]):
        with pytest.raises(ValueError, match="look starts"):
            detection.change_log_capital(np.zeros(12), np.array(bad), 0.05)


def test_the_evidence_begins_where_the_change_began() -> None:
    """50 healthy looks, then a broken champion: the alarm names look 51 and bounds the rate since."""
    looks = np.repeat(np.arange(60), 20)
    x = np.zeros(looks.size)
    x[50 * 20 :: 4] = 1.0  # 25% errors from look 51 on, against a 5% ceiling
    starts = detection.look_starts(looks)
    factors = detection.rate_factors_of(x, 0.05)
    assert detection.detected(factors, starts, ALPHA)
    assert detection.evidence_start(factors, starts) == 50
    low = detection.lower_bound(factors, starts, ALPHA, rate_stream(x[1000:]), (0.0, 1.0))
    assert 0.05 < low < 0.25
    # the bound is the edge of what the detector rejects
    target = math.log(1 / ALPHA)
    assert detection.peak(factors, starts, low - 2e-3) >= target > detection.peak(factors, starts, low + 2e-3)


def test_a_quality_loss_is_detected_where_it_begins_and_a_small_one_is_not() -> None:
    """Paired losses q_dense - q_sparse: 0.005 for 30 looks (margin 0.03), then 0.15 on average (a 0/1 task
    where the champion now misses 15% of what dense gets right); the alarm points at look 31. The same
    stream shifted to a mean loss of half the margin raises none."""
    rng = np.random.default_rng(5)
    looks = np.repeat(np.arange(60), 12)
    z = np.where(rng.random(looks.size) < 0.15, 1.0, 0.0)
    z[: 30 * 12] = np.where(rng.random(30 * 12) < 0.005, 1.0, 0.0)
    starts = detection.look_starts(looks)
    factors = detection.mean_factors_of(z, 0.03)
    assert detection.detected(factors, starts, ALPHA)
    assert abs(detection.evidence_start(factors, starts) - 30) <= 2
    quiet = detection.mean_factors_of(np.where(rng.random(4000) < 0.015, 1.0, 0.0), 0.03)
    assert not detection.detected(quiet, np.arange(0, 4000, 12), ALPHA)


def _decided(cell, run, start: int = 1000) -> tuple[float, float, int]:
    """Double the replications until the interval decides (or 16,000 are spent): (share, upper, reps)."""
    reps = start
    while True:
        share, upper = run(reps)
        if upper <= ALPHA + 0.02 or share > ALPHA + 0.01 or reps >= 16_000:
            print(f"{cell}: {share:.4f} (upper {upper:.4f}, {reps} monitors)")
            return share, upper, reps
        reps *= 2


@pytest.mark.parametrize(
    ("ceiling", "batch", "before"),
    [(0.01, 12, 0.01), (0.05, 12, 0.05), (0.05, 200, 0.05), (0.02, 50, 0.005)],
)
def test_false_alarm_over_the_monitors_life_is_at_most_alpha(ceiling, batch, before) -> None:
    """At the ceiling (the null's edge) or below it, 200 looks: the detector's false alarm is bounded."""

    def run(reps: int) -> tuple[float, float]:
        r = simulate_monitor(
            ceiling,
            batch=batch,
            looks=200,
            before=before,
            after=before,
            replications=reps,
            methods=("detector",),
        )
        return r.alarm_by_look["detector"][-1], r.upper95["detector"][-1]

    share, upper, reps = _decided((ceiling, batch, before), run)
    assert upper <= ALPHA + 0.02 and not refuted(round(share * reps), reps, ALPHA)


def test_a_fresh_test_per_look_was_no_bound() -> None:
    """Why the monitor changed: the step's rate test run afresh on each batch rolls back a champion whose
    rate sits at its ceiling in most monitors by 200 looks, and a batch of 12 rows cannot show a 2.5x
    breach of a 1% ceiling at all."""
    at_ceiling = simulate_monitor(0.05, batch=200, looks=200, before=0.05, after=0.05, replications=400)
    per_look = at_ceiling.alarm_by_look["per_look"]
    assert per_look[29] > 0.4 and per_look[-1] > 0.9  # exact (power.py): 57.8% and 99.7%
    assert at_ceiling.alarm_by_look["detector"][-1] <= ALPHA + 0.03
    breach = simulate_monitor(0.01, batch=12, looks=200, before=0.025, after=0.025, replications=400)
    assert breach.alarm_by_look["per_look"][-1] < 0.02
    # 90% by ~70 looks (840 rows): the step's own test needs 1,083 rows for 95% at this ceiling
    ninety = breach.looks_to_detect("detector", 0.9)
    assert ninety is not None and ninety <= 100


@pytest.mark.parametrize(("ceiling", "batch"), [(0.05, 200), (0.05, 12)])
def test_a_late_breach_is_caught_without_paying_for_the_healthy_history(ceiling, batch) -> None:
    """A breach at 2.5x the ceiling after 100 healthy looks (rate c/2): the detector pays log k(k+1) for
    the history, the one test since the promotion pays for every healthy row."""
    r = simulate_monitor(
        ceiling,
        batch=batch,
        looks=200,
        before=ceiling / 2,
        after=2.5 * ceiling,
        change_look=101,
        replications=400,
        methods=("detector", "since_promotion"),
    )
    fast, slow = r.looks_to_detect("detector"), r.looks_to_detect("since_promotion")
    print(f"c={ceiling} batch={batch}: median looks to detect {fast} vs {slow}")
    assert fast is not None and (slow is None or 2.5 * fast <= slow)
    assert r.alarm_by_look["detector"][99] <= ALPHA + 0.03  # no alarm before the change beyond chance


def test_simulation_rejects_unknown_methods_and_looks() -> None:
    with pytest.raises(ValueError, match="change_look"):
        simulate_monitor(0.05, batch=10, looks=5, before=0.05, after=0.1, change_look=6, replications=10)
    with pytest.raises(ValueError, match="unknown method"):
        simulate_monitor(0.05, batch=10, looks=5, before=0.05, after=0.1, replications=10, methods=("bogus",))


def test_weights_sum_to_one() -> None:
    w = np.exp(detection.start_log_weights(100_000))
    assert w.sum() == pytest.approx(1 - 1 / 100_001, rel=1e-9)
    assert all(a > b for a, b in itertools.pairwise(w[:50]))


def test_score_models_refuse_a_shift_they_cannot_express() -> None:
    """0/1 answers differing on 7% of requests cannot lose 0.1 on average: said, not silently capped."""
    with pytest.raises(ValueError, match="cannot shift the mean by -0.1"):
        simulate_monitor_quality(
            "binary80", margin=0.05, batch=10, looks=2, before=0.1, after=0.1, replications=5
        )
    with pytest.raises(ValueError, match="cannot shift the mean by -0.1"):
        simulate_monitor_quality(
            "beta8_2", margin=0.05, batch=10, looks=2, before=0.1, after=0.1, replications=5
        )


def test_the_quality_checks_false_alarm_at_the_margin_is_at_most_alpha() -> None:
    """docs/gate.md (the monitor's quality check): "a champion that loses exactly the margin raises a false
    alarm in at most alpha of monitors over its whole life". 200 looks of 8 / 50 pairs, 0/1 at 80% correct,
    rare losses (identical but sparse fails), Beta(8, 2) (skewed) and noisy 0/1 (20% differ), the champion
    losing the margin at every look; 600 monitors a cell, doubled until the interval decides."""
    for scores in ("binary80", "losses", "beta8_2", "noisy20"):
        for batch in (8, 50):

            def run(reps: int, scores=scores, batch=batch) -> tuple[float, float]:
                r = simulate_monitor_quality(
                    scores, margin=0.03, batch=batch, looks=200, before=0.03, after=0.03, replications=reps
                )
                return r.alarm_by_look["loss"][-1], r.upper95["loss"][-1]

            share, _, reps = _decided(f"quality_loss {scores} {batch}/look", run, start=600)
            assert not refuted(round(share * reps), reps, ALPHA), (scores, batch, share, reps)


def test_the_excess_checks_false_alarm_at_the_ceiling_is_at_most_alpha() -> None:
    """docs/gate.md (the monitor's error_rate_increase check): false alarm at most alpha over the monitor's
    life with the excess exactly at the ceiling (0.01): dense error rate 0.5% and 2%, the arms failing
    independently or together (half of dense's failures shared), 12 / 50 pairs a look, 200 looks, 1,000
    monitors a cell."""
    rows = []
    for dense in (0.005, 0.02):
        for correlated in (False, True):
            for batch in (12, 50):
                r = simulate_monitor_excess(
                    0.01,
                    dense=dense,
                    correlated=correlated,
                    batch=batch,
                    looks=200,
                    excess=0.01,
                    replications=1000,
                    seed=batch,
                )
                rows.append((dense, correlated, batch, r.alarm_by_look["detector"][-1], r.replications))
                print(f"{r.check} {batch:3}/look: alarm by look 200 {100 * rows[-1][3]:.2f}%")
    assert not [c for c in rows if refuted(round(c[3] * c[4]), c[4], ALPHA)], rows
