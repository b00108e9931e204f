"""The interval `decide` reports covers the true difference at every look of a step (docs/gate.md, "The
reported interval": lower end at the GO level alpha_k, upper end at alpha, together at least
1 - alpha_k - alpha), at the sample sizes pilots really have, by simulation through the very tests `decide`
runs (`rollout.gate.simulation.simulate_coverage`), with a replay of simulated pilots through `decide`'s
quality path to prove both say the same. A look whose bounds cross (INVALID, `crossed-bounds`) has missed
the truth on one side, so this bounds the crossings on honest data too."""

from __future__ import annotations

import zlib

import pytest

from rollout.gate import GateHistory, GateSettings
from rollout.gate.decide import _quality
from rollout.gate.inputs import check_observations
from rollout.gate.quality import paired_arms, split_arms
from rollout.gate.simulation import DESIGNS, draw_pilot, simulate_coverage

from .gate_helpers import frame_of, refuted

# a use case's first pilot: GO at 0.0304, the interval's upper end at alpha
SETTINGS = GateSettings(
    alpha=0.05, go_alpha=0.0304, margin=0.03, min_samples_per_arm=2, guardrail_min_samples=1, max_looks=1000
)
CLAIM = SETTINGS.alpha_go + SETTINGS.alpha
LOOKS = 20


def test_the_reported_interval_covers_the_truth_at_every_look() -> None:
    """docs/gate.md: "together they hold the true difference at every look with probability at least
    1 - alpha_k - alpha" (0.9196 for a first pilot): 0/1 scores at 80% correct (the noisiest of the grid,
    where the interval misses most), truth at -margin and at 0, shadow and split 50% / 10%, 8 / 25 / 50 pairs
    or treatment rows a look, 20 looks, 1,000 pilots a cell; each side at its own level too."""
    rows = []
    for design in ("paired", "split50", "split10"):
        for per_look in (8, 25, 50):
            for truth in (-SETTINGS.margin, 0.0):
                reps, scores = 1000, "binary80"
                r = simulate_coverage(
                    SETTINGS,
                    design=design,
                    scores=scores,
                    per_look=per_look,
                    looks=LOOKS,
                    truth=truth,
                    replications=reps,
                    seed=zlib.crc32(repr((design, scores, per_look, truth)).encode()),
                )
                rows.append(r)
                print(
                    f"{design:8} {scores:9} {per_look:3}/look truth {truth:+.2f}: "
                    f"missed {100 * r.missed:.2f}% "
                    f"(upper {100 * r.missed_upper95:.2f}%), lower end above {100 * r.lower_above:.2f}%, "
                    f"upper end below {100 * r.upper_below:.2f}%"
                )
    bad = [
        r
        for r in rows
        if refuted(round(r.missed * r.replications), r.replications, CLAIM)
        or refuted(round(r.lower_above * r.replications), r.replications, SETTINGS.alpha_go)
        or refuted(round(r.upper_below * r.replications), r.replications, SETTINGS.alpha)
    ]
    assert not bad, [(r.design, r.per_look, r.truth, r.missed, r.lower_above, r.upper_below) for r in bad]


def _missed_through_decide(design: str, per_look: int, looks: int, truth: float, seed: int) -> bool:
    """One simulated pilot, look by look through `decide`'s quality path (`decide._quality` on the checked
    rows, the history carried as the gate flow carries it): did a look's reported interval miss the truth?"""
    share = DESIGNS[design]
    paired = share is None
    c, s, t = draw_pilot(
        design=design, scores="binary80", per_look=per_look, looks=looks, truth=truth, seed=seed
    )
    full = check_observations(frame_of(c, s, t, paired, len(c)), mode="paired" if paired else "split").frame
    history, missed = GateHistory(), False
    for k in range(1, looks + 1):
        f = full.iloc[: (2 if paired else 1) * (len(c) * k // looks)]
        arms = paired_arms(f) if paired else split_arms(f, share)
        mode = "paired" if paired else "split"
        q, _ = _quality(arms, SETTINGS, history, mode, 0.5 if paired else share, counts=True)
        missed |= (q.interval_low is not None and q.interval_low > truth + 1e-12) or (
            q.interval_high is not None and q.interval_high < truth - 1e-12
        )
        history = history.after(
            look_low=q.look_low, look_high=q.look_high, counts=q.counts_toward_interval, fingerprint=""
        )
    return missed


SEEDS = {"paired": 830, "split10": 55}  # 40 pilots from here: 2 and 4 misses among them


@pytest.mark.parametrize(("design", "truth"), [("paired", 0.0), ("split10", -0.03)])
def test_decide_reports_the_interval_the_simulation_judges(design: str, truth: float) -> None:
    """The replay: simulated pilots (the seeds of `simulate_coverage` with one replication each) judged look
    by look through `decide`'s quality path miss the truth exactly when the simulation says they do."""
    per_look, looks = 8, 10
    seeds = range(SEEDS[design], SEEDS[design] + 40)
    sim = [
        simulate_coverage(
            SETTINGS,
            design=design,
            scores="binary80",
            per_look=per_look,
            looks=looks,
            truth=truth,
            replications=1,
            seed=seed,
            keep_runs=True,
        ).missed_runs[0]
        for seed in seeds
    ]
    replay = [_missed_through_decide(design, per_look, looks, truth, seed) for seed in seeds]
    assert sim == replay
    assert sum(sim) >= 2  # misses among them: the agreement is not only on pilots that covered
