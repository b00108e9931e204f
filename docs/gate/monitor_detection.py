"""The monitor's guardrails over many looks (docs/gate.md, "The monitor: a change detector").

Simulated monitors of one rate check (`rollout.gate.simulation.simulate_monitor`): LOOKS batches of
`batch` rows of the champion's traffic, 0/1 outcomes (an error, a latency over the SLO), judged after every
batch by three methods:
- `detector`: what the monitor runs now (`rollout.gate.detection`, a weighted sum over change points at
  each look's first row);
- `per_look`: the step's rate test run afresh on each batch (what the monitor did before);
- `since_promotion`: the step's rate test over every row since the promotion.
Scenarios, per ceiling c and batch size: the rate at c for the whole life (the null's edge: every alarm is
false); a breach at 2.5c from the first look (a champion bad from the start); healthy at c/2 for 100 looks,
then 2.5c (a breach that starts late). Printed: the share alarmed by look 30 and 200 (with the upper end of
its 95% Clopper-Pearson interval) and the looks after the change by which half (and 90%) had an alarm.

Then the quality check (`simulate_monitor_quality`, margin 0.03): the paired loss q_dense - q_sparse of
the gate's score models and two noisier ones, at the margin for the whole life (every alarm false),
2x and 3x the margin from look 1, and 3x from look 101 after no loss; for the chosen mixture of bets
(`detection.LOSS_MIXTURE`) and two bolder ones, looks to 50% / 90% alarmed. A score model that cannot lose
3x the margin (`MOST_LOSS`: 0/1 at 80% correct with 7% of the answers differing loses at most 0.07, every
differing answer a loss) runs those two rows at the most it can lose, and their label says so.

    python docs/gate/monitor_detection.py OUT.json [REPLICATIONS]
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterable

from rollout.gate.detection import LOSS_MIXTURE
from rollout.gate.simulation import (
    MONITOR_METHODS,
    MonitorResult,
    simulate_monitor,
    simulate_monitor_quality,
)

LOOKS = 200
CELLS = [(0.01, 12), (0.01, 200), (0.05, 12), (0.05, 200)]
QUALITY_CELLS = [
    ("beta8_2", 12),
    ("binary80", 12),
    ("losses", 12),
    ("noisy20", 12),
    ("noisy40", 12),
    ("binary80", 200),
]
# The most a score model can lose where that is less than 3x the margin (rollout.gate.simulation refuses a
# shift a model cannot express): 0/1 scores at 80% correct with 7% of the answers differing lose at most 7%,
# every differing answer a loss (3x 0.03 would need the sparse arm to lose on more answers than differ).
MOST_LOSS = {"binary80": (0.07, "7% differing, all lost")}


def main(out: str, replications: int = 2000) -> None:
    rows = []
    t0 = time.time()
    for ceiling, batch in CELLS:
        scenarios = {
            "at the ceiling": dict(before=ceiling, after=ceiling),
            "2.5c from look 1": dict(before=2.5 * ceiling, after=2.5 * ceiling),
            "c/2, then 2.5c from look 101": dict(before=ceiling / 2, after=2.5 * ceiling, change_look=101),
        }
        for name, kw in scenarios.items():
            r = simulate_monitor(ceiling, batch=batch, looks=LOOKS, replications=replications, seed=7, **kw)
            detect = _looks_to_detect(r, MONITOR_METHODS)
            rows.append(
                {
                    "ceiling": ceiling,
                    "batch": batch,
                    "scenario": name,
                    **r.to_dict(),
                    "looks_to_detect": detect,
                }
            )
            cells = _cells(r, MONITOR_METHODS, detect, null=name == "at the ceiling", looks=(29, -1))
            print(f"| {ceiling} | {batch} | {name} | {cells} |", flush=True)
    quality = []
    mixtures = {"chosen": LOSS_MIXTURE, "g 0.45/0.8": ((0.45, 0.5), (0.8, 0.5)), "g 0.8": ((0.8, 1.0),)}
    margin = 0.03
    for scores, batch in QUALITY_CELLS:
        big, label = _big_loss(scores, margin)
        scenarios = {
            "at the margin": (margin, margin, 1),
            "2x margin from look 1": (2 * margin, 2 * margin, 1),
            f"{label} from look 1": (big, big, 1),
            f"none, then {label} from look 101": (0.0, big, 101),
        }
        for name, (before, after, change) in scenarios.items():
            r = simulate_monitor_quality(
                scores,
                margin=margin,
                batch=batch,
                looks=LOOKS,
                before=before,
                after=after,
                change_look=change,
                replications=replications,
                mixtures=mixtures,
                seed=11,
            )
            detect = _looks_to_detect(r, mixtures)
            quality.append({"scores": scores, "scenario": name, **r.to_dict(), "looks_to_detect": detect})
            cells = _cells(r, mixtures, detect, null=name == "at the margin", looks=(-1,))
            print(f"| {scores} | {batch} | {name} | {cells} |", flush=True)
    meta = {
        "replications": replications,
        "looks": LOOKS,
        "seconds": round(time.time() - t0, 1),
        "load_average": os.getloadavg(),
        "methods": MONITOR_METHODS,
    }
    with open(out, "w") as f:
        json.dump(_rounded({"meta": meta, "rows": rows, "quality": quality}), f, separators=(",", ":"))
    print(f"{meta['seconds']} s, load {meta['load_average']}")


def _big_loss(scores: str, margin: float) -> tuple[float, str]:
    """The large loss a score model's rows simulate, and its label: 3x the margin, or the most the model
    can lose (`MOST_LOSS`) where that is less."""
    most, why = MOST_LOSS.get(scores, (math.inf, ""))
    if most >= 3 * margin:
        return 3 * margin, "3x margin"
    return most, f"{most:g} ({most / margin:.1f}x margin: {why})"


def _looks_to_detect(r: MonitorResult, methods: Iterable[str]) -> dict[str, list]:
    """Per method, the looks after the change by which 50% and 90% of the monitors had an alarm."""
    return {m: [r.looks_to_detect(m, 0.5), r.looks_to_detect(m, 0.9)] for m in methods}


def _cells(
    r: MonitorResult, methods: Iterable[str], detect: dict[str, list], *, null: bool, looks: tuple[int, ...]
) -> str:
    """A table row's cells, a method each: where every alarm is false (`null`), the share alarmed by each
    of `looks` (0-based) and the upper end of its 95% interval at the last look; else the looks to 50% / 90%
    alarmed."""
    if not null:
        return " | ".join("{} / {}".format(*detect[m]) for m in methods)
    return " | ".join(
        " / ".join(f"{100 * r.alarm_by_look[m][k]:.1f}%" for k in looks) + f" ({100 * r.upper95[m][-1]:.1f}%)"
        for m in methods
    )


def _rounded(x):  # noqa: ANN001, ANN202 - shares of 2,000 monitors and their bounds: 5 decimals keep them
    if isinstance(x, float):
        return round(x, 5)
    if isinstance(x, list | tuple):
        return [_rounded(v) for v in x]
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    return x


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
