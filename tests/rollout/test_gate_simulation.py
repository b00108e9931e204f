"""Monte-Carlo checks of the gate's promise "false GO <= alpha at any number of looks" at the sample sizes
pilots really have, through the vectorised functions `decide` uses (`rollout.gate.simulation`), with a
replay of simulated pilots through `decide` itself to prove both paths agree.

Grid (issue: gate valid at real sample sizes): designs paired (shadow) and split at 50% / 10% / 5%
treatment share; scores 0/1 at 80% and 95% correct, Beta(0.5, 0.5), Beta(8, 2), and "identical except the
sparse arm fails on a few % of requests"; 8 / 12 / 20 / 50 / 200 requests (pairs, or treatment rows) per
look; GO by look 1, 5 and 10; truth at -margin and -1.2 x margin. Replications grow until the binomial
interval decides (upper end of the 95% Clopper-Pearson interval <= alpha + 2 pp); a cell fails when the
rate is above alpha + 1 pp or the interval's lower end above alpha (`gate_helpers.refuted`).

False NO-GO (the futility test, a crossing included, as `decide` ends a step) on the grid of
`rollout.gate.bench.nogo_table`: at or below alpha at -margin and at 0, the interval deciding, with its
own replay through `decide`."""

from __future__ import annotations

import os
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

import numpy as np
import pytest

from rollout.gate import GateSettings, guardrail_checks
from rollout.gate.bench import NOGO_DESIGNS, NOGO_PER_LOOK, NOGO_SCORES, NOGO_SETTINGS
from rollout.gate.power import neyman_pearson_power, neyman_pearson_rows, power_by, rows_to_detect
from rollout.gate.simulation import (
    DESIGNS,
    SCORE_MODELS,
    Result,
    clopper_pearson_lower,
    clopper_pearson_upper,
    requests,
    simulate,
    simulate_until,
)
from rollout.spec import parse_spec, spec_warnings

from .gate_helpers import REPLAY_SETTINGS, REPORT_LOOKS, by_look, replay, too_high
from .usecase_helpers import example_spec

SETTINGS = GateSettings(alpha=0.05, margin=0.03, min_samples_per_arm=2, guardrail_min_samples=1)
PER_LOOK = (8, 12, 20, 50, 200)
LOOKS = 10
GRID = [(d, s, n) for d in DESIGNS for s in SCORE_MODELS for n in PER_LOOK]


def decided(result: Result) -> bool:
    a = SETTINGS.alpha
    return all(result.upper95[k - 1] <= a + 0.02 for k in REPORT_LOOKS) or any(
        result.go_by_look[k - 1] > a + 0.02 for k in REPORT_LOOKS
    )


def adaptive(args: tuple[str, str, int, float, int]) -> Result:
    """Double the replications until the interval decides (or 6,400 pilots); the pilots a size shares
    with the next are simulated once (`simulate_until`)."""
    design, scores, per_look, truth, reps = args
    seed = zlib.crc32(repr((design, scores, per_look, truth)).encode())
    cell = {"design": design, "scores": scores, "per_look": per_look, "looks": LOOKS, "truth": truth}
    return simulate_until(SETTINGS, decided, **cell, replications=reps, max_replications=6400, seed=seed)


def run_grid(truth: float, reps: int) -> list[Result]:
    """Every cell, the costliest first (requests per pilot), one at a time to each worker, so neither
    worker is left with the longest cells at the end; the results in the grid's order."""
    jobs = [(d, s, n, truth, reps) for d, s, n in GRID]
    order = sorted(range(len(jobs)), key=lambda i: -requests(DESIGNS[jobs[i][0]], jobs[i][2], LOOKS))
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        done = dict(zip(order, pool.map(adaptive, [jobs[i] for i in order]), strict=True))
    return [done[i] for i in range(len(jobs))]


def table(results: list[Result]) -> str:
    lines = ["design   scores    per-look  reps   GO by look 1 / 5 / 10 (upper 95%)"]
    for r in results:
        lines.append(
            f"{r.design:8} {r.scores:9} {r.per_look:8} {r.replications:5}  {by_look(r.go_by_look, r.upper95)}"
        )
    return "\n".join(lines)


def assert_valid(results: list[Result]) -> None:
    a = SETTINGS.alpha
    bad = [r for r in results if too_high(r.go_by_look, r.upper95, a, r.replications)]
    print(table(results))
    assert not bad, (
        "false GO above alpha + 1 pp, its interval above alpha + 2 pp, or its lower end above alpha:\n"
        + table(bad)
    )


@pytest.mark.parametrize(
    ("go", "reps", "fails"),
    [(236, 4000, True), (1900, 32000, True), (220, 4000, False), (200, 4000, False), (300, 4000, True)],
)
def test_the_pass_rule_fails_a_rate_the_simulation_shows_above_alpha(go: int, reps: int, fails: bool) -> None:
    """docs/gate.md promises false GO <= alpha, not alpha + 1 pp: a cell whose 95% Clopper-Pearson interval
    lies above alpha (236 of 4,000 = 5.9%, upper end 6.7%; 1,900 of 32,000) fails, though within the old
    tolerance (rate <= alpha + 1 pp, upper end <= alpha + 2 pp); a rate whose interval still holds alpha
    passes (220 of 4,000: 5.5%, lower end 4.8%), and one above alpha + 1 pp fails as before."""
    rate = go / reps
    looks = (rate,) * LOOKS
    upper = (clopper_pearson_upper(go, reps),) * LOOKS
    assert too_high(looks, upper, SETTINGS.alpha, reps) is fails


@pytest.mark.parametrize("nogo", [False, True])
def test_doubling_gives_at_each_size_what_simulate_gives(nogo: bool) -> None:
    """`simulate_until` judges the pilots a size shares with the next once, yet each size's result is
    `simulate`'s for it, to the last bit (same seed, same pilots; the last, smaller chunk of a size is
    drawn again in full by the next), so the doubling tests decide exactly as when each size ran anew."""
    cell = {"design": "split10", "scores": "beta0.5", "per_look": 8, "looks": 4, "truth": -0.03}
    seen: list[Result] = []
    kw = {"seed": 3, "chunk_elements": 2000, "nogo": nogo}
    last = simulate_until(
        SETTINGS, lambda r: seen.append(r) or False, **cell, replications=25, max_replications=200, **kw
    )
    assert [r.replications for r in seen] == [25, 50, 100, 200] and last == seen[-1]
    for r in seen:
        assert r == simulate(SETTINGS, **cell, replications=r.replications, **kw), r.replications
    assert simulate_until(SETTINGS, lambda r: r.replications >= 50, **cell, replications=25,
                          max_replications=200, **kw) == seen[1]  # fmt: skip


@pytest.mark.slow  # 157 s and 92 s at -n 0 on a host at load 12, in two processes of its own
@pytest.mark.parametrize("factor", [1.0, 1.2])
def test_false_go_at_and_beyond_the_margin(factor: float) -> None:
    assert_valid(run_grid(-factor * SETTINGS.margin, 400 if factor == 1.0 else 200))


def test_power_and_sample_size_at_no_true_loss_are_reported() -> None:
    """Power at a true difference of 0 (reported; docs/gate.md carries the table). The bounded-score
    nonparametric guarantee has a price: nothing can be proven from a handful of requests. The test checks
    the shape that must hold: more requests per look never lose power, and a shadow step whose sparse arm
    never fails reaches GO within 10 looks of 20 pairs (200 pairs: 0.9 x log(20) / log(1 + 0.9 x 0.03 / 0.97)
    is about 109)."""
    results = {
        (d, s, n): simulate(
            SETTINGS, design=d, scores=s, per_look=n, looks=LOOKS, truth=0.0, replications=200, seed=7
        )
        for d in ("paired", "split50")
        for s in ("losses", "binary95")
        for n in (20, 50, 200)
    }
    for (d, s, n), r in results.items():
        print(
            f"{d:8} {s:9} {n:4}/look: GO by look 10 {100 * r.go_by_look[-1]:.0f}%, "
            f"mean requests to GO {r.mean_units_to_go:.0f}"
        )
    assert results[("paired", "losses", 20)].go_by_look[-1] >= 0.95
    for d in ("paired", "split50"):
        for s in ("losses", "binary95"):
            powers = [results[(d, s, n)].go_by_look[-1] for n in (20, 50, 200)]
            assert powers == sorted(powers), (d, s, powers)


@pytest.mark.parametrize(
    ("design", "scores", "per_look", "truth"),
    [
        ("paired", "losses", 20, 0.0),
        ("paired", "binary95", 40, 0.0),
        ("split50", "losses", 60, 0.0),
        ("split10", "beta8_2", 40, 0.0),
        ("paired", "beta0.5", 40, -0.01),
    ],
)
def test_decide_agrees_with_the_simulation(design: str, scores: str, per_look: int, truth: float) -> None:
    """Replay simulated pilots look by look through `decide` (history carried, as the gate flow does):
    the look of the first GO equals the simulation's, pilot by pilot (the cases are chosen so that some
    pilots reach GO and some do not)."""
    cell = {"design": design, "scores": scores, "per_look": per_look, "looks": 6, "truth": truth}
    firsts = []
    for seed in range(8):
        sim = simulate(REPLAY_SETTINGS, **cell, replications=1, seed=seed, keep_runs=True)
        first, _ = replay(**cell, seed=seed, hit=lambda d: d.outcome == "GO")
        assert first == sim.first_go_look[0], (seed, first, sim.first_go_look[0])
        firsts.append(first)
    assert any(firsts), "no simulated pilot reached GO: the replay proves nothing"


@pytest.mark.parametrize(
    ("design", "scores", "per_look", "truth", "min_n"),
    [
        ("paired", "losses", 20, 0.0, 2),  # steps end GO: a NO-GO after a GO is not counted
        ("paired", "losses", 20, -0.09, 50),  # looks 1-2 below the minimum of 50 pairs
        ("split50", "losses", 40, -0.12, 40),  # the smaller arm reaches 40 rows at look 1 or 2
        ("split50", "beta8_2", 40, -0.08, 60),
        ("split10", "losses", 40, -0.15, 30),
    ],
)
def test_decide_agrees_with_the_simulation_on_nogo(
    design: str, scores: str, per_look: int, truth: float, min_n: int
) -> None:
    """Replay simulated pilots look by look through `decide` until the step ends (GO or NO-GO, as the gate
    flow stops there): the look of a NO-GO equals the simulation's (`nogo_look`, 0 where the step ends GO
    or not at all), pilot by pilot, the step's minimum sample held as `decide` holds it."""
    cell = {"design": design, "scores": scores, "per_look": per_look, "looks": 6, "truth": truth}
    settings = replace(REPLAY_SETTINGS, min_samples_per_arm=min_n)
    ends = []
    for seed in range(8):
        sim = simulate(settings, **cell, replications=1, seed=seed, keep_runs=True, nogo=True)
        look, d = replay(**cell, seed=seed, hit=lambda d: d.outcome in ("GO", "NO-GO"), settings=settings)
        nogo = look if d is not None and d.outcome == "NO-GO" else 0
        assert nogo == sim.nogo_look[0], (seed, look, d and d.reasons, sim.nogo_look[0])
        if nogo:
            assert d.reasons[0] == "futility", d.reasons
        ends.append(d and d.outcome)
    expected = "GO" if truth == 0 else "NO-GO"
    assert expected in ends, f"no simulated step ended {expected}: the replay proves nothing ({ends})"


def nogo_decided(result: Result) -> bool:
    """The interval has decided: its upper end at or below alpha at every reported look, or its lower end
    above alpha at one (then no more replications can save it)."""
    a, n = NOGO_SETTINGS.alpha, result.replications
    lower = [clopper_pearson_lower(round(result.nogo_by_look[k - 1] * n), n) for k in REPORT_LOOKS]
    return all(result.nogo_upper95[k - 1] <= a for k in REPORT_LOOKS) or max(lower) > a


def adaptive_nogo(args: tuple[str, str, int, float]) -> Result:
    """Double the replications from 400 until the NO-GO interval decides (or 6,400 pilots)."""
    design, scores, per_look, truth = args
    seed = zlib.crc32(repr(("nogo", design, scores, per_look, truth)).encode())
    cell = {"design": design, "scores": scores, "per_look": per_look, "looks": LOOKS, "truth": truth}
    return simulate_until(
        NOGO_SETTINGS, nogo_decided, **cell, replications=400, max_replications=6400, seed=seed, nogo=True
    )


def test_false_nogo_at_the_margin_and_at_no_loss() -> None:
    """False NO-GO (futility, or a crossing whose futility test rejects, as `decide` ends a step) at or
    below the futility test's alpha by look 1, 5 and 10 when the truth is exactly -margin (the futility
    test's null, its worst case) and at 0 (no loss), where it must be rarer; the upper end of the 95%
    Clopper-Pearson interval decides. docs/gate.md's table is `sparsepilot bench gate --nogo`."""
    jobs = [
        (d, s, n, t)
        for t in (-NOGO_SETTINGS.margin, 0.0)
        for d in NOGO_DESIGNS
        for s in NOGO_SCORES
        for n in NOGO_PER_LOOK
    ]
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        results = list(pool.map(adaptive_nogo, jobs, chunksize=3))
    lines = ["truth   design   scores    per-look  reps   NO-GO by look 1 / 5 / 10 (upper 95%)"]
    lines += [
        f"{r.truth:+.2f}   {r.design:8} {r.scores:9} {r.per_look:8} {r.replications:5}  "
        f"{by_look(r.nogo_by_look, r.nogo_upper95, 2)}"
        for r in results
    ]
    print("\n".join(lines))
    a = NOGO_SETTINGS.alpha
    bad = [r for r in results if any(r.nogo_upper95[k - 1] > a for k in REPORT_LOOKS)]
    assert not bad, f"false NO-GO not shown <= alpha {a}: " + "; ".join(
        f"{r.truth:+.2f} {r.design} {r.scores} {r.per_look}/look {r.nogo_by_look[-1]:.2%} "
        f"(upper {r.nogo_upper95[-1]:.2%}, {r.replications} pilots)"
        for r in bad
    )
    # rarer at no loss, design by design over its scores and sizes (cell by cell the two rates are within
    # each other's noise in a split step, whose inverse-propensity stream is noisy next to the margin)
    for design in NOGO_DESIGNS:
        mean = {
            t: np.mean([r.nogo_by_look[-1] for r in results if r.design == design and r.truth == t])
            for t in (-NOGO_SETTINGS.margin, 0.0)
        }
        assert mean[0.0] < mean[-NOGO_SETTINGS.margin] or mean[0.0] == 0, (design, mean)


# ---------------------------------------------------------------- guardrails


@pytest.mark.parametrize(
    ("metric", "ceiling"),
    [("error", 0.01), ("error", 0.02), ("error", 0.05), ("error", 0.10), ("latency", 0.05)],
)
def test_guardrail_stops_breaches_and_spares_healthy_arms(metric: str, ceiling: float) -> None:
    """Exact (`rollout.gate.power`, checked against simulation in test_gate_power.py), for the test the
    settings' check runs: false stop <= alpha at half the ceiling and at the ceiling itself over 1,000 rows
    (time-uniform); a true rate at 2.5 x the ceiling stopped >= 95% by 200 rows wherever the most powerful
    fixed-sample test at level alpha (Neyman-Pearson) can reach 95% at all. Below that (ceilings 0.01,
    0.02) no test can, and the spec validator says so instead."""
    settings = GateSettings(max_error_rate=ceiling, max_latency_exceedance=ceiling, latency_slo_ms=1000.0)
    checks = {c.metric: c for c in guardrail_checks(settings, with_control=False)}
    check = checks["error" if metric == "error" else "latency_over_slo"]
    assert check.comparison == "rate" and check.threshold == ceiling
    alpha = settings.alpha
    false_stop = power_by(ceiling, np.array([ceiling / 2, ceiling]), 1000, alpha)
    power = power_by(ceiling, 2.5 * ceiling, 200, alpha)
    bound = neyman_pearson_power(ceiling, 2.5 * ceiling, 200, alpha)
    print(
        f"{metric} ceiling {ceiling}: false stop in 1k rows at c/2 {false_stop[0]:.3%}, at c "
        f"{false_stop[1]:.2%}; 2.5x stopped by 200 rows {power:.1%} (Neyman-Pearson bound {bound:.1%})"
    )
    assert np.all(false_stop <= alpha)
    assert false_stop[0] <= 0.01  # half the ceiling is stopped almost never
    assert power <= bound
    if bound >= 0.95:
        assert power >= 0.95
    else:
        # 20-30 points below the fixed-n bound at 200 rows (the price of a test valid at every row), but
        # within 40% of the fewest rows any level-alpha test needs for 95%
        assert rows_to_detect(ceiling) <= 1.4 * neyman_pearson_rows(ceiling)
        # the validator warns, naming the field, for a pilot whose steps plan 200 treatment rows
        field = "max_error_rate" if metric == "error" else "max_latency_exceedance"
        data = example_spec("docs-qa")
        data["rollout"] = {
            "shadow": {"min_samples": 200},
            "steps": [{"traffic_pct": 50, "min_samples": 200}],
            "batch_size": 20,
        }
        data["gate"]["guardrails"][field] = ceiling
        warned = dict(spec_warnings(parse_spec(data)))
        assert f"gate.guardrails.{field}" in warned, warned
        assert warned[f"gate.guardrails.{field}"].endswith("plan at most 200 (rollout.shadow.min_samples)")
