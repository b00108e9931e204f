"""Shared by the gate's simulation tests: the requirement on a simulated error rate, its one-line report,
and the replay of a simulated pilot through `decide` look by look, history carried as the gate flow does
(the check that the vectorised simulations of `rollout.gate.simulation` judge exactly what `decide` does)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd

from rollout.gate import GateHistory, GateSettings, decide
from rollout.gate.evidence import Decision
from rollout.gate.simulation import DESIGNS, clopper_pearson_lower, clopper_pearson_upper, draw_pilot

REPORT_LOOKS = (1, 5, 10)  # error rates by look 1, 5 and 10 of a 10-look pilot


def refuted(successes: int, trials: int, level: float) -> bool:
    """A simulated rate that breaks a promise "at most `level`": above level + 1 pp, the upper end of its 95%
    Clopper-Pearson interval above level + 2 pp (too few replications to tell), or the interval's lower end
    above the level (the simulation shows the rate exceeds it)."""
    return (
        successes / trials > level + 0.01
        or clopper_pearson_upper(successes, trials) > level + 0.02
        or clopper_pearson_lower(successes, trials) > level
    )


def too_high(rates: tuple[float, ...], upper95: tuple[float, ...], alpha: float, replications: int) -> bool:
    """The issue's requirement broken at a reported look (`refuted`): the rate above alpha + 1 pp, the upper
    end of its 95% interval above alpha + 2 pp, or its lower end above alpha."""
    return any(
        upper95[k - 1] > alpha + 0.02 or refuted(round(rates[k - 1] * replications), replications, alpha)
        for k in REPORT_LOOKS
    )


def by_look(rates: tuple[float, ...], upper95: tuple[float, ...], digits: int = 1) -> str:
    """The rates at the reported looks with their upper ends: r1% (u1%) / r5% (u5%) / r10% (u10%)."""
    return " / ".join(
        f"{100 * rates[k - 1]:.{digits}f}% ({100 * upper95[k - 1]:.{digits}f}%)" for k in REPORT_LOOKS
    )


# Looks are never cut short by max_looks, and the minimum samples never hold a look back.
REPLAY_SETTINGS = GateSettings(
    alpha=0.05, margin=0.03, min_samples_per_arm=2, guardrail_min_samples=1, max_looks=50
)


def first_look(
    frames: Iterable[pd.DataFrame],
    share: float | None,
    hit: Callable[[Decision], bool],
    settings: GateSettings = REPLAY_SETTINGS,
) -> tuple[int, Decision | None]:
    """(look, decision) of the first look (1-based) whose decision satisfies `hit`; (0, None) if none.
    `frames`: all the step's rows up to each look, in arrival order; `share` None for a shadow step."""
    history = GateHistory()
    for k, frame in enumerate(frames, start=1):
        d = decide(
            frame,
            settings,
            history,
            mode="paired" if share is None else "split",
            planned_treatment_share=share,
        )
        if hit(d):
            return k, d
        history = d.next_history(history)
    return 0, None


def frame_of(
    control: np.ndarray, sparse: np.ndarray, treated: np.ndarray, paired: bool, upto: int
) -> pd.DataFrame:
    """The pilot's rows in arrival order up to request `upto`, as the flows store them."""
    rows = []
    for i in range(upto):
        if paired:
            rows.append((f"r{i}", "control", control[i]))
            rows.append((f"r{i}", "treatment", sparse[i]))
        else:
            rows.append(
                (f"r{i}", "treatment" if treated[i] else "control", sparse[i] if treated[i] else control[i])
            )
    df = pd.DataFrame(rows, columns=["request_id", "arm", "quality"])
    return df.assign(latency_ms=100.0, error=False)


def replay(
    *,
    design: str,
    scores: str,
    per_look: int,
    looks: int,
    truth: float,
    seed: int,
    hit: Callable[[Decision], bool],
    settings: GateSettings = REPLAY_SETTINGS,
) -> tuple[int, Decision | None]:
    """One simulated pilot (`draw_pilot`, as `simulate` draws it with one replication and `seed`) judged
    look by look through `decide` until a decision satisfies `hit` (`first_look`)."""
    share = DESIGNS[design]
    control, sparse, treated = draw_pilot(
        design=design, scores=scores, per_look=per_look, looks=looks, truth=truth, seed=seed
    )
    units = len(control)
    frames = (
        frame_of(control, sparse, treated, share is None, units * k // looks) for k in range(1, looks + 1)
    )
    return first_look(frames, share, hit, settings)
