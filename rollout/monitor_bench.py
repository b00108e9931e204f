"""`sparsepilot bench monitor`: what one monitor look costs once the champion has served N sampled
requests. Each look of the monitor flow reads back every row since promotion (the change detector judges
all the looks, `rollout.pilots.monitor_observations`) and every request id the pilot used (so no request is
evidence twice, `pilot_batches.monitor_target`; `target_import_s` times it for a look that imports its
rows instead, which needs no ids), so a look's cost grows with the monitor's age. Each size
runs in a fresh process (its peak RSS is its own) with a scratch SPARSEPILOT_HOME on SQLite: the bench
use case of `bench import`, its pilot promoted, N rows seeded into the monitor step in looks of `batch`
requests (both arms), then `looks` more looks through the monitor's own domain calls, each part timed.
Not timed: the models answering the batch and the batch's data check (both per batch, not per row
stored)."""

from __future__ import annotations

import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rollout.bench_home import host_fields, in_fresh_processes, load_average, setup_home

NAME = "bench-monitor"
PARTS = ("target_s", "target_import_s", "store_s", "read_s", "judge_s", "look_s")


def _rows(first: int, requests: int) -> list[dict[str, Any]]:
    """`requests` distinct requests from number `first` on, each answered by both arms (the monitor samples
    the champion and has dense answer the same request offline): a healthy champion, 1% errors."""
    rows = []
    for i in range(first, first + requests):
        q = 0.5 + (i % 97) / 400
        for arm, delta, latency in (("control", 0.0, 100 + i % 50), ("treatment", -0.01, 80 + i % 40)):
            rows.append(
                {
                    "request_id": f"req-{i}",
                    "arm": arm,
                    "quality": round(q + delta, 4),
                    "latency_ms": float(latency),
                    "tokens": 120,
                    "error": i % 100 == 0,
                    "overloaded": False,
                }
            )
    return rows


def _promoted_monitor_step(name: str) -> int:
    """Start the bench use case's pilot and promote it as an approval would (the champion alias on its
    challenger: the monitor watches the champion that serves); returns the monitor step id."""
    from rollout import audit, lifecycle, pilot_batches, pilots
    from rollout.db.models import AliasMove, ModelVersion
    from rollout.db.session import session_scope

    with session_scope() as session:
        info = pilot_batches.ensure_pilot_in(session, name)
    with session_scope() as session:
        uc = pilots.get_use_case(session, name)
        pilot = pilots.active_pilot(session, uc)
        # the champion alias on the pilot's challenger, as the promotion's move records it (the bench's
        # version is not in MLflow: its number is the scratch home's own)
        session.get(ModelVersion, pilot.model_version_id).mlflow_version = "1"
        session.add(
            AliasMove(
                idempotency_key="bench-seed",
                use_case_id=uc.id,
                alias="champion",
                to_version="1",
                actor=audit.SYSTEM_ACTOR,
                reason="bench seed",
                status="committed",
            )
        )
        pilots.stop_pilot(session, pilot, status="promoted", actor=audit.SYSTEM_ACTOR, reason="bench seed")
        lifecycle.set_phase(session, uc, "promoted", actor=audit.SYSTEM_ACTOR, reason="bench seed")
        assert info["pilot_id"] == pilot.id
    target = pilot_batches.monitor_target(name)
    assert target is not None
    return int(target["step_id"])


def _seed(step_id: int, rows: int, batch: int) -> None:
    """`rows` observations in the monitor step, `batch` requests (2 rows each) a look, bulk-inserted (the
    seeding is not what is timed)."""
    from sqlalchemy import insert

    from rollout.db.models import Observation, Pilot, PilotStep
    from rollout.db.session import session_scope

    with session_scope() as session:
        step = session.get(PilotStep, step_id)
        use_case_id = session.get(Pilot, step.pilot_id).use_case_id
        for look, first in enumerate(range(0, rows // 2, batch)):
            chunk = _rows(first, min(batch, rows // 2 - first))
            session.execute(
                insert(Observation),
                [
                    {**r, "pilot_step_id": step_id, "use_case_id": use_case_id, "batch_id": f"seed-{look}",
                     "source": "monitor"}
                    for r in chunk
                ],
            )  # fmt: skip


def _look(name: str, spec: Any, step_id: int, first: int, batch: int, look: int) -> dict[str, Any]:
    """One monitor look on a new batch through the monitor flow's domain calls, each part timed."""
    from rollout import decisions, pilot_batches, pilots
    from rollout.db.models import PilotStep
    from rollout.db.session import session_scope

    rows = _rows(first, batch)
    batch_id = f"m-{step_id}-bench-{look}"
    out: dict[str, Any] = {}
    t = time.perf_counter()
    info = pilot_batches.monitor_target(name)  # the promoted pilot, with every request id it used
    out["target_s"] = time.perf_counter() - t
    assert info is not None and len(info["used_request_ids"]) >= first
    t = time.perf_counter()
    imported = pilot_batches.monitor_target(name, used_request_ids=False)  # a look that imports its rows
    out["target_import_s"] = time.perf_counter() - t
    assert imported is not None and imported["used_request_ids"] == []
    t = time.perf_counter()
    stored = pilot_batches.store_batch(step_id, rows, batch_id, "monitor")
    out["store_s"] = time.perf_counter() - t
    assert stored["inserted"] == len(rows)
    # the read and the judgement alone (monitor_look does both, then records the decision)
    t = time.perf_counter()
    with session_scope() as session:
        judged = pilots.monitor_observations(session, session.get(PilotStep, step_id))
    out["read_s"] = time.perf_counter() - t
    t = time.perf_counter()
    guard = pilots.monitor_guardrails(judged, spec)
    out["judge_s"] = time.perf_counter() - t
    check = {"passed": True, "report": {"success": True, "note": "bench batch: not checked"}}
    t = time.perf_counter()
    decision = decisions.monitor_look(name, info, rows, check, batch_id)
    out["look_s"] = time.perf_counter() - t
    out.update(rows_judged=len(judged), looks=guard.get("looks"), outcome=decision["outcome"])
    out["breached"] = ",".join(guard["breached"])
    return out


def _spec(name: str) -> Any:
    """The spec the monitor judges by: the promoted pilot's own version (`pilots.load_pilot_spec`, as
    `decisions.monitor_look` reads it), never the use case's newest."""
    from rollout import pilots
    from rollout.db.session import session_scope

    with session_scope() as session:
        return pilots.load_pilot_spec(
            session, pilots.promoted_pilot(session, pilots.get_use_case(session, name))
        )[0]


def _one(rows: int, batch: int, looks: int, out: Any) -> None:
    from sparse_core.host import HostLoadMeter

    home = Path(tempfile.mkdtemp(prefix="sparsepilot-bench-monitor-"))
    name = setup_home(home, NAME)
    step_id = _promoted_monitor_step(name)
    t = time.perf_counter()
    _seed(step_id, rows, batch)
    seed_s = time.perf_counter() - t
    spec = _spec(name)  # read once: the judgement alone is timed
    with HostLoadMeter(threads=1) as meter:  # the look is one thread of this process
        timed = [_look(name, spec, step_id, rows // 2 + i * batch, batch, i) for i in range(looks)]
    out.put(
        {
            "rows": rows,
            "batch_requests": batch,
            "seed_s": round(seed_s, 1),
            **{part: round(statistics.median(t[part] for t in timed), 3) for part in PARTS},
            "rows_judged": timed[-1]["rows_judged"],
            "looks_judged": timed[-1]["looks"],
            "outcome": timed[-1]["outcome"],
            "breached": timed[-1]["breached"],
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "database": "sqlite",
            **host_fields(meter.load),
        }
    )


def run_monitor_bench(
    sizes: list[int], *, batch: int = 100, looks: int = 3, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """One fresh process per size; the parts' medians over `looks` looks; `progress` hears each size's
    start and end."""
    calls = [(rows, batch, looks) for rows in sizes]
    results = in_fresh_processes(_one, calls, progress, lambda a: f"monitor at {a[0]:,} rows")
    return {"results": results, "loadavg": load_average(), "cpu_count": os.cpu_count(), "looks": looks}
