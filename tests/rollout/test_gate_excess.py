"""The excess-over-control guardrail (`error_rate_increase`: sparse-arm error rate minus dense-arm error rate
<= max_error_rate_increase) at the sample sizes pilots really have, by simulation through the very test
`decide` runs (`rollout.gate.simulation.simulate_excess`), with a replay of simulated pilots through `decide`
itself to prove both paths stop at the same look.

docs/gate.md promises: a true excess at or below its ceiling is stopped with probability <= alpha, however
often it is looked at. Checked here with rare errors (dense-arm rate 0.5% / 1% / 2%), true excess at the
ceiling (the least favourable null) and at half of it, in shadow steps (the arms failing independently
given the request, and positively correlated) and split steps at 50% / 10% / 5% treatment share, 8 / 12 /
20 / 50 / 200 treatment rows per look, stopped by look 1, 5 and 10. Requirement (as for the quality test):
false stop <= alpha + 1 pp, the upper end of its 95% Clopper-Pearson interval <= alpha + 2 pp and its lower
end <= alpha (`gate_helpers.refuted`).

CI runs a REPRESENTATIVE SUBSET of that grid (every design and dense-arm rate; the long split horizons at
5% / 10% share, 20,000-40,000 requests per pilot, only where the rate is highest); `sparsepilot bench gate
--excess` runs the full grid (docs/gate.md carries its table)."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pandas as pd
import pytest

from rollout.gate import GateSettings
from rollout.gate.evidence import Decision
from rollout.gate.guardrails import Guardrail
from rollout.gate.simulation import EXCESS_DESIGNS, ExcessResult, draw_errors, requests, simulate_excess

from .gate_helpers import REPLAY_SETTINGS, by_look, first_look, too_high

SETTINGS = GateSettings(alpha=0.05, margin=0.03, min_samples_per_arm=2, guardrail_min_samples=1)
CEILING = SETTINGS.max_error_rate_increase  # 0.01, the spec default
CONTROL_RATES = (0.005, 0.01, 0.02)
REPLICATIONS = 2000  # the upper 95% end is <= alpha + 2 pp whenever the observed rate is <= ~5.9%


def subset(excess: float) -> list[tuple[str, float, int]]:
    """(design, dense-arm rate, treatment rows per look) in CI."""
    cells = []
    for design, (share, _) in EXCESS_DESIGNS.items():
        for rate in CONTROL_RATES:
            cheap = share is None or share >= 0.5
            per_look = (8, 12, 20, 50, 200) if cheap else (8, 20, 50) + ((200,) if rate == 0.02 else ())
            if excess < CEILING:  # half the ceiling: far from the edge, a lighter sample of the grid
                per_look = tuple(n for n in per_look if n in (20, 200 if cheap else 50))
            cells += [(design, rate, n) for n in per_look]
    return cells


def table(results: list[ExcessResult]) -> str:
    head = "design             dense  per-look  stopped by look 1 / 5 / 10 (upper 95%)"
    rows = [
        f"{r.design:18} {r.control_rate:.3f} {r.per_look:8}  {by_look(r.stop_by_look, r.upper95, 2)}"
        for r in results
    ]
    return "\n".join([head, *rows])


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_false_stop_of_the_excess_check_at_pilot_sizes(fraction: float) -> None:
    """Time-uniform false stop at a true excess of `fraction` x the ceiling, every cell of the subset."""
    a = SETTINGS.alpha
    results = [
        simulate_excess(
            SETTINGS,
            design=design,
            control_rate=rate,
            excess=fraction * CEILING,
            per_look=n,
            looks=10,
            replications=REPLICATIONS,
            seed=zlib.crc32(repr((design, rate, n, fraction)).encode()),
        )
        for design, rate, n in subset(fraction * CEILING)
    ]
    print(table(results))
    bad = [r for r in results if too_high(r.stop_by_look, r.upper95, a, r.replications)]
    assert not bad, (
        "false stop above alpha + 1 pp, its interval above alpha + 2 pp, or its lower end above alpha:\n"
        + table(bad)
    )
    # the stop probability can only grow with more looks at more rows
    assert all(np.all(np.diff(r.stop_by_look) >= 0) for r in results)


def test_power_of_the_excess_check_is_reported() -> None:
    """Power, reported (docs/gate.md carries the full table): stopped by 200 and by 1,000 treatment rows
    at a true excess of 2.5x and 4x the ceiling. What must hold: a larger breach is stopped more often,
    more rows never stop less, and a gross breach (4x) is stopped in most pilots by 1,000 rows."""
    power = {}
    for design in EXCESS_DESIGNS:
        for factor in (2.5, 4.0):
            r = simulate_excess(
                SETTINGS,
                design=design,
                control_rate=0.01,
                excess=factor * CEILING,
                per_look=200,
                looks=5,
                replications=400,
                seed=11,
            )
            power[(design, factor)] = (r.stop_by_look[0], r.stop_by_look[4])
            print(
                f"{design:18} dense 1%, excess {factor}x ceiling: stopped by 200 rows "
                f"{100 * r.stop_by_look[0]:.1f}%, by 1,000 rows {100 * r.stop_by_look[4]:.1f}%"
            )
    for design in EXCESS_DESIGNS:
        (s200, s1000), (g200, g1000) = power[(design, 2.5)], power[(design, 4.0)]
        assert s200 <= s1000 and g200 <= g1000
        assert g1000 > s1000 and g1000 >= 0.8, (design, power)


def guard_of(d: Decision) -> Guardrail:
    return next(g for g in d.guardrails if g.name == "error_rate_increase")


def pilot_frame(a: np.ndarray, b: np.ndarray, paired: bool, upto: int) -> pd.DataFrame:
    """The first `upto` requests of a simulated pilot (`draw_errors`' arrays), as the flows store them."""
    rows = []
    for i in range(upto):
        if paired:
            rows += [(f"r{i}", "control", bool(b[i])), (f"r{i}", "treatment", bool(a[i]))]
        else:
            rows.append((f"r{i}", "treatment" if b[i] else "control", bool(a[i])))
    df = pd.DataFrame(rows, columns=["request_id", "arm", "error"])
    return df.assign(quality=0.9, latency_ms=100.0)


@pytest.mark.parametrize(
    ("design", "control_rate", "per_look"),
    [("paired", 0.01, 100), ("paired_correlated", 0.02, 100), ("split50", 0.01, 100), ("split10", 0.005, 80)],
)
def test_decide_stops_where_the_simulation_does(design: str, control_rate: float, per_look: int) -> None:
    """Replay simulated pilots (a true excess of 4x the ceiling, so some stop and some do not) look by look
    through `decide` (history carried, as the gate flow does): the look of the first breach of
    `error_rate_increase` equals the simulation's, pilot by pilot."""
    looks, excess = 5, 4 * CEILING
    share = EXCESS_DESIGNS[design][0]
    rates = {"design": design, "control_rate": control_rate, "excess": excess}
    firsts = []
    for seed in range(8):
        sim = simulate_excess(
            REPLAY_SETTINGS,
            **rates,
            per_look=per_look,
            looks=looks,
            replications=1,
            seed=seed,
            keep_runs=True,
        )
        units = requests(share, per_look, looks)
        # the one pilot simulate_excess drew from this seed
        a, b = draw_errors(np.random.default_rng(seed), **rates, shape=(1, units))
        frames = (pilot_frame(a[0], b[0], share is None, units * k // looks) for k in range(1, looks + 1))
        first, d = first_look(frames, share, lambda d: guard_of(d).breached)
        if first:
            assert "guardrail:error_rate_increase" in d.reasons and d.outcome == "NO-GO"
            low = guard_of(d).lower_bound
            assert low is not None and low >= CEILING - 2e-4  # the breach's lower bound (brentq's xtol)
        assert first == sim.first_stop_look[0], (seed, first, sim.first_stop_look[0])
        firsts.append(first)
    assert any(firsts) and not all(firsts), f"every or no pilot stopped: the replay proves little {firsts}"


def test_draw_errors_has_the_asked_rates() -> None:
    """The simulated arms' error rates (and the correlated shadow design's shared failures) are the asked
    ones, within a 99.9% normal interval."""
    rng = np.random.default_rng(3)
    n = 400_000
    for design, (share, joint) in EXCESS_DESIGNS.items():
        a, b = draw_errors(rng, design=design, control_rate=0.02, excess=0.01, shape=(1, n))
        if share is None:
            sparse, dense = a[0], b[0]
            both = float((sparse * dense).mean())
            want = 0.02 * (0.03 if joint is None else joint)
            assert abs(both - want) <= 3.3 * math.sqrt(want / n), (design, both, want)
        else:
            treated = b[0]
            sparse, dense = a[0][treated], a[0][~treated]
            assert abs(treated.mean() - share) <= 3.3 * math.sqrt(share * (1 - share) / n)
        for got, want in ((sparse.mean(), 0.03), (dense.mean(), 0.02)):
            assert abs(got - want) <= 3.3 * math.sqrt(want / min(len(sparse), len(dense))), (design, got)
    with pytest.raises(ValueError, match="below the failures it shares"):
        draw_errors(rng, design="paired_correlated", control_rate=0.2, excess=-0.15, shape=(1, 4))


def test_the_full_grid_table_of_bench_gate_excess() -> None:
    """`sparsepilot bench gate --excess` (rollout.gate.bench.excess_table) covers the whole grid, here
    with a handful of pilots per cell: every design x dense rate x {c, c/2} x rows per look, and the power
    at 2.5c and 4c, each a share that can only grow with the looks."""
    from rollout.gate.bench import EXCESS_CONTROL_RATES, EXCESS_PER_LOOK, excess_table

    table = excess_table(replications=20, power_replications=20)
    cells = {
        (r["design"], r["control_rate"], round(r["excess"], 6), r["per_look"]) for r in table["false_stop"]
    }
    assert cells == {
        (d, rate, round(f * CEILING, 6), n)
        for d in EXCESS_DESIGNS
        for rate in EXCESS_CONTROL_RATES
        for f in (1.0, 0.5)
        for n in EXCESS_PER_LOOK
    }
    for r in table["false_stop"]:
        assert 0 <= r["false_stop_look1"] <= r["false_stop_look5"] <= r["false_stop_look10"] <= 1
        assert r["false_stop_look10"] <= r["upper95_look10"] and r["replications"] == 20
    assert {(r["design"], r["control_rate"], r["factor"]) for r in table["power"]} == {
        (d, rate, f) for d in EXCESS_DESIGNS for rate in EXCESS_CONTROL_RATES for f in (2.5, 4.0)
    }
    assert all(0 <= r["stopped_by_200_rows"] <= r["stopped_by_1000_rows"] <= 1 for r in table["power"])
    assert table["environment"]["cpu_count"] >= 1
