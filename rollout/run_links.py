"""Which stored rows have their MLflow run: gate decisions and pilot batches (migration 0009).

A flow writes its row to the state DB first and logs its MLflow run after it, as the registry's moves do
(`rollout.registry`): the row's run id stays NULL until the log is recorded. A log that failed (an MLflow
blip, a process killed between the two) leaves NULL, and the flow's next run logs what is missing: the
gate flow the latest pilot's gate decisions, the pilot flow (and an import) the latest pilot's batches.
The monitor's looks are found by `unlogged_monitor_decisions`, its batches by their decision (one run per
look, flows/monitor.py).

Each function owns its transaction, except `record_batch`, which is part of the transaction that stores
the batch's observations."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from rollout import decisions, pilots
from rollout.db.models import GateDecision, Observation, ObservationBatch, PilotStep
from rollout.db.session import session_scope

SAMPLE_ROWS = 1000  # the rows a batch's run is computed from when it is logged later (an import's: a sample)


def record_batch(session: Any, step_id: int, batch_id: str, source: str, *, rows: int, inserted: int) -> None:
    """The stored batch's row, without its run (a retried store finds the row its first attempt wrote)."""
    found = session.scalar(
        select(ObservationBatch).where(
            ObservationBatch.pilot_step_id == step_id, ObservationBatch.batch_id == batch_id
        )
    )
    if found is None:
        session.add(
            ObservationBatch(
                pilot_step_id=step_id, batch_id=batch_id, source=source, rows=rows, inserted=inserted
            )
        )


def batch_logged(step_id: int, batch_id: str, mlflow_run_id: str) -> None:
    with session_scope() as session:
        batch = session.scalar(
            select(ObservationBatch).where(
                ObservationBatch.pilot_step_id == step_id, ObservationBatch.batch_id == batch_id
            )
        )
        if batch is not None and batch.mlflow_run_id is None:  # recorded once (migration 0010's guard)
            batch.mlflow_run_id = mlflow_run_id


def unlogged_batches(use_case: str) -> list[dict[str, Any]]:
    """The latest pilot's stored batches (its monitor step's aside) whose MLflow run is not recorded,
    oldest first, each with what its log needs: the step as the pilot flow sees it (`info`), up to
    `SAMPLE_ROWS` of its rows, its counts (`stored`) and its source."""
    with session_scope() as session:
        pilot = pilots.latest_pilot(session, pilots.get_use_case(session, use_case))
        if pilot is None:
            return []
        found = session.execute(
            select(ObservationBatch, PilotStep)
            .join(PilotStep, ObservationBatch.pilot_step_id == PilotStep.id)
            .where(
                PilotStep.pilot_id == pilot.id,
                PilotStep.kind != "monitor",
                ObservationBatch.mlflow_run_id.is_(None),
            )
            .order_by(ObservationBatch.id)
        ).all()
        out = []
        for batch, step in found:
            obs = session.scalars(
                select(Observation)
                .where(Observation.pilot_step_id == step.id, Observation.batch_id == batch.batch_id)
                .order_by(Observation.id)
                .limit(SAMPLE_ROWS)
            )
            out.append(
                {
                    "batch_id": batch.batch_id,
                    "source": batch.source,
                    "info": {
                        "pilot_id": pilot.id,
                        "step_id": step.id,
                        "step_index": step.index,
                        "kind": step.kind,
                        "traffic_pct": step.traffic_pct,
                        "model_version_id": pilot.model_version_id,
                    },
                    "rows": [
                        {
                            "arm": o.arm,
                            "quality": o.quality,
                            "latency_ms": o.latency_ms,
                            "error": o.error,
                            "overloaded": o.overloaded,  # its latency left out of the run's (log_batch)
                        }
                        for o in obs
                    ],
                    "stored": {
                        "rows": batch.rows,
                        "inserted": batch.inserted,
                        "already_present": batch.rows - batch.inserted,
                    },
                }
            )
        return out


def unlogged_gate_decisions(use_case: str) -> list[dict[str, Any]]:
    """The latest pilot's gate decisions (the gate's looks: `gate:` keys, not a batch's data check) whose
    MLflow run is not recorded, oldest first, as `rollout.decisions.summary` gives them. A pilot a NO-GO
    stopped is still the latest, so its last decision is found after the pilot ended."""
    with session_scope() as session:
        found = _unlogged(
            session, use_case, GateDecision.kind == "gate", GateDecision.idempotency_key.like("gate:%")
        )
        return [decisions.summary(d, session.get(PilotStep, d.pilot_step_id), False) for d in found]


def _unlogged(session: Any, use_case: str, *where: Any) -> list[GateDecision]:
    """The latest pilot's decisions matching `where` whose MLflow run is not recorded, oldest first."""
    pilot = pilots.latest_pilot(session, pilots.get_use_case(session, use_case))
    if pilot is None:
        return []
    q = select(GateDecision).where(
        GateDecision.pilot_id == pilot.id, GateDecision.mlflow_run_id.is_(None), *where
    )
    return list(session.scalars(q.order_by(GateDecision.id)))


def decision_logged(decision_id: int, mlflow_run_id: str) -> None:
    with session_scope() as session:
        d = session.get(GateDecision, decision_id)
        if d.mlflow_run_id is None:  # recorded once (migration 0010's guard)
            d.mlflow_run_id = mlflow_run_id


def unlogged_monitor_decisions(use_case: str) -> list[dict[str, Any]]:
    """The latest pilot's monitor decisions (one per look) whose MLflow run is not recorded, oldest first:
    id, outcome, explanation and the rows the look judged."""
    with session_scope() as session:
        found = _unlogged(session, use_case, GateDecision.kind == "monitor")
        return [
            {
                "decision_id": d.id,
                "outcome": d.outcome,
                "explanation": d.explanation,
                "rows": (d.evidence or {}).get("rows"),
                "resolution": d.resolution,
            }
            for d in found
        ]
