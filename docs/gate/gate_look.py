"""A gate look after importing N rows into a shadow step (docs/gate.md, "What a look costs"): the whole
`decisions.gate_step` once, then its parts (the step's rows read back, the GX check, `decide`) three times
each, medians; one JSON line on stdout. Runs on the code before the read became a table (rows as dicts)
and after (a table), so the two can be timed side by side:

    PYTHONPATH=$PWD taskset -c 1 .venv/bin/python docs/gate/gate_look.py 200000
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from flows.import_bench import _request_ids, _write_observations
from rollout import decisions, pilots
from rollout.bench_home import setup_home
from rollout.db.models import PilotStep
from rollout.db.session import session_scope
from rollout.gate import decide
from rollout.observations_io import validate_observation_rows
from rollout.pilot_batches import current_step, import_file
from sparse_core.host import HostLoadMeter


def main(n: int) -> dict:
    home = Path(tempfile.mkdtemp(prefix="sparsepilot-gate-look-"))
    name = setup_home(home, "bench-gate")
    ids = _request_ids(n)
    path = home / "observations.jsonl"
    _write_observations(path, ids)
    import_file(name, str(path), set(ids))
    step_id = current_step(name)["step_id"]
    out: dict = {"rows": n}
    with HostLoadMeter(threads=1) as meter:
        t = time.perf_counter()
        out["outcome"] = decisions.gate_step(name, step_id)["outcome"]
        out["gate_step_s"] = round(time.perf_counter() - t, 2)
        parts: dict[str, list[float]] = {"read_s": [], "check_s": [], "decide_s": []}
        for _ in range(3):
            t = time.perf_counter()
            with session_scope() as s:
                step = s.get(PilotStep, step_id)
                rows = pilots.step_observations(s, step)
                settings = pilots.gate_settings(pilots.load_step_spec(s, step_id)[0], step)
                history = pilots.gate_history(s, step)
            parts["read_s"].append(time.perf_counter() - t)
            table = rows if isinstance(rows, pd.DataFrame) else None
            known = set(table["request_id"]) if table is not None else {r["request_id"] for r in rows}
            t = time.perf_counter()
            check = validate_observation_rows(rows, known_request_ids=known, require_both_arms=True)
            parts["check_s"].append(time.perf_counter() - t)
            t = time.perf_counter()
            fields = list(pilots.OBSERVATION_FIELDS)
            frame = table if table is not None else pd.DataFrame(rows, columns=fields)
            decision = decide(frame, settings, history, mode="paired", data_check_passed=check["passed"])
            parts["decide_s"].append(time.perf_counter() - t)
    out.update({k: round(statistics.median(v), 3) for k, v in parts.items()})
    out["fingerprint"] = decision.data_fingerprint[:16]  # the pilot's salt orders the import: differs per run
    out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    out["others_busy_cores"] = meter.load.others_busy_cores
    return out


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]))))
