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

    python docs/gate/monitor_detection.py OUT.json [REPLICATIONS]
"""

from __future__ import annotations

import json
import os
import sys
import time

from rollout.gate.simulation import MONITOR_METHODS, simulate_monitor

LOOKS = 200
CELLS = [(0.01, 12), (0.01, 200), (0.05, 12), (0.05, 200)]


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
            row = {"ceiling": ceiling, "batch": batch, "scenario": name, **r.to_dict()}
            row["looks_to_detect"] = {
                m: [r.looks_to_detect(m, 0.5), r.looks_to_detect(m, 0.9)] for m in MONITOR_METHODS
            }
            rows.append(row)
            by = r.alarm_by_look
            cells = " | ".join(
                f"{100 * by[m][29]:.1f}% / {100 * by[m][-1]:.1f}% ({100 * r.upper95[m][-1]:.1f}%)"
                if name == "at the ceiling"
                else f"{row['looks_to_detect'][m][0]} / {row['looks_to_detect'][m][1]}"
                for m in MONITOR_METHODS
            )
            print(f"| {ceiling} | {batch} | {name} | {cells} |", flush=True)
    meta = {
        "replications": replications,
        "looks": LOOKS,
        "seconds": round(time.time() - t0, 1),
        "load_average": os.getloadavg(),
        "methods": MONITOR_METHODS,
    }
    with open(out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"{meta['seconds']} s, load {meta['load_average']}")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
