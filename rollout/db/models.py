"""Typed models of everything SparsePilot remembers.

Conventions that the flows rely on for safe retries:
- every row a flow task writes has a natural unique key (``idempotency_key`` or a composite unique
  constraint), so a retried task finds the existing row instead of writing a second one;
- JSON columns hold evidence exactly as it was shown to the decider (never recomputed later);
- ``audit_log`` and ``approvals`` are append-only, ``gate_decisions`` and ``alias_history`` may only
  move forward (a resolution once, a pending move to its outcome): the ORM refuses audit updates and
  deletes, and migrations 0001/0003 add database triggers (owned by the owner role on PostgreSQL,
  where the app role has only INSERT/SELECT on the append-only tables, see rollout.db.roles).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    event,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def as_utc(ts: dt.datetime) -> dt.datetime:
    """A stored time as an aware UTC datetime (SQLite hands DateTime(timezone=True) columns back naive)."""
    return ts.replace(tzinfo=dt.UTC) if ts.tzinfo is None else ts.astimezone(dt.UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class UseCase(Base):
    __tablename__ = "use_cases"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    owner: Mapped[str] = mapped_column(String(200))
    criticality: Mapped[str] = mapped_column(String(10))
    phase: Mapped[str] = mapped_column(String(30), default="registered")  # rollout.lifecycle.PHASES
    current_spec_version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    spec_versions: Mapped[list[SpecVersion]] = relationship(
        back_populates="use_case", order_by="SpecVersion.version"
    )


class SpecVersion(Base):
    __tablename__ = "spec_versions"
    __table_args__ = (
        UniqueConstraint("use_case_id", "version"),
        UniqueConstraint("use_case_id", "spec_hash"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    use_case_id: Mapped[int] = mapped_column(ForeignKey("use_cases.id"))
    version: Mapped[int] = mapped_column(Integer)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)  # validated spec, as a plain dict
    spec_hash: Mapped[str] = mapped_column(String(64))
    source_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    # migration 0002: the content-addressed dataset copy this version was validated with
    dataset_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    dataset_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    dataset_rows: Mapped[int | None] = mapped_column(Integer, nullable=True)
    validation: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    use_case: Mapped[UseCase] = relationship(back_populates="spec_versions")


class ModelVersion(Base):
    """A candidate sparse model: base model ref + plan, mirrored in the MLflow registry."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("use_case_id", "plan_hash"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    use_case_id: Mapped[int] = mapped_column(ForeignKey("use_cases.id"))
    base_model_ref: Mapped[str] = mapped_column(String(500))
    plan: Mapped[dict[str, Any]] = mapped_column(JSON)
    plan_hash: Mapped[str] = mapped_column(String(64))
    mlflow_model_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    mlflow_version: Mapped[str | None] = mapped_column(String(20), nullable=True)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    density: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class CalibrationRun(Base):
    __tablename__ = "calibration_runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(128), unique=True)
    use_case_id: Mapped[int] = mapped_column(ForeignKey("use_cases.id"))
    spec_version: Mapped[int] = mapped_column(Integer)
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"), nullable=True)
    status: Mapped[str] = mapped_column(String(20), default="running")  # running/succeeded/failed
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    flow_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class EvaluationRun(Base):
    __tablename__ = "evaluation_runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(128), unique=True)
    use_case_id: Mapped[int] = mapped_column(ForeignKey("use_cases.id"))
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    # migration 0011: the spec version whose traffic and cost its dollars are priced at (NULL before)
    spec_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    status: Mapped[str] = mapped_column(String(20), default="running")
    device: Mapped[str | None] = mapped_column(String(50), nullable=True)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    flow_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    density: Mapped[float | None] = mapped_column(Float, nullable=True)
    quality_delta: Mapped[float | None] = mapped_column(Float, nullable=True)
    # one-sided 95% bounds on the task-score change, valid at any number of rows (sparse_core.task_bound)
    quality_low: Mapped[float | None] = mapped_column(Float, nullable=True)
    quality_high: Mapped[float | None] = mapped_column(Float, nullable=True)
    speedup: Mapped[float | None] = mapped_column(Float, nullable=True)
    speedup_low: Mapped[float | None] = mapped_column(Float, nullable=True)
    speedup_high: Mapped[float | None] = mapped_column(Float, nullable=True)
    savings_month_usd: Mapped[float | None] = mapped_column(Float, nullable=True)
    savings_month_low: Mapped[float | None] = mapped_column(Float, nullable=True)
    savings_month_high: Mapped[float | None] = mapped_column(Float, nullable=True)
    payback_days: Mapped[float | None] = mapped_column(Float, nullable=True)
    report: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # EvaluationReport as JSON
    roi: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # ROI breakdown with inputs
    artifacts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # name -> path/URI (PNGs)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Pilot(Base):
    __tablename__ = "pilots"
    # one pilot per place: two pilots started at once cannot both spend pilot k's alpha (NULLs, on pilots
    # started before migration 0006, never collide)
    __table_args__ = (UniqueConstraint("use_case_id", "pilot_number", name="uq_pilots_use_case_number"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    use_case_id: Mapped[int] = mapped_column(ForeignKey("use_cases.id"))
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    salt: Mapped[str] = mapped_column(String(64))
    # running / awaiting_approval / promoted / stopped / rolled_back / replaced (rollout.pilots.ENDED_PILOT)
    status: Mapped[str] = mapped_column(String(30), default="running")
    current_step_index: Mapped[int] = mapped_column(Integer, default=0)
    # migration 0003: the spec version the pilot runs under; a newer version applies to the next pilot
    spec_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # migration 0006: the pilot's place among its use case's pilots (1 = first) and the level its GO test
    # runs at (rollout.gate.spending); NULL on pilots started before: their GO test runs at the spec's alpha
    pilot_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    go_alpha: Mapped[float | None] = mapped_column(Float, nullable=True)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    ended_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    steps: Mapped[list[PilotStep]] = relationship(back_populates="pilot", order_by="PilotStep.index")


class PilotStep(Base):
    __tablename__ = "pilot_steps"
    __table_args__ = (UniqueConstraint("pilot_id", "index"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    pilot_id: Mapped[int] = mapped_column(ForeignKey("pilots.id"))
    index: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(20))  # shadow / split / monitor
    traffic_pct: Mapped[float] = mapped_column(Float)  # share of traffic on the treatment arm
    min_samples: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20), default="running")  # running/passed/failed/skipped
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    ended_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    pilot: Mapped[Pilot] = relationship(back_populates="steps")


class Observation(Base):
    """One request in one arm. (step, request_id, arm) is unique: a retried batch adds nothing."""

    __tablename__ = "observations"
    __table_args__ = (UniqueConstraint("pilot_step_id", "request_id", "arm"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    pilot_step_id: Mapped[int] = mapped_column(ForeignKey("pilot_steps.id"), index=True)
    use_case_id: Mapped[int] = mapped_column(ForeignKey("use_cases.id"), index=True)
    batch_id: Mapped[str] = mapped_column(String(64))
    request_id: Mapped[str] = mapped_column(String(200))
    arm: Mapped[str] = mapped_column(String(10))  # control / treatment
    quality: Mapped[float] = mapped_column(Float)
    latency_ms: Mapped[float] = mapped_column(Float)
    tokens: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[bool] = mapped_column(Boolean, default=False)
    # collected while the host's CPU was oversubscribed (sparse_core.host): its latency is not the model's
    overloaded: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # imported rows: their place in the step's evidence stream within their import (rollout.pilots.stream_key,
    # a salted hash of the request id: a file's order must carry no information); NULL = arrival order
    stream_key: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    source: Mapped[str] = mapped_column(String(20), default="simulated")  # pilot-flow / imported / monitor
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class VoidRequest(Base):
    """A request a pilot step drew and could not use: the control arm gave no reference to score against
    (a reference-free use case, rollout.arms.step). No observation in either arm; kept so the request
    counts as used (`pilots.seen_request_ids`: never drawn again) and the void is counted (migration 0012)."""

    __tablename__ = "void_requests"
    __table_args__ = (UniqueConstraint("pilot_step_id", "request_id", name="uq_void_requests_step_request"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    pilot_step_id: Mapped[int] = mapped_column(ForeignKey("pilot_steps.id"), index=True)
    batch_id: Mapped[str] = mapped_column(String(64))
    request_id: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class GateDecision(Base):
    __tablename__ = "gate_decisions"

    id: Mapped[int] = mapped_column(primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(128), unique=True)
    use_case_id: Mapped[int] = mapped_column(ForeignKey("use_cases.id"), index=True)
    pilot_id: Mapped[int | None] = mapped_column(ForeignKey("pilots.id"), nullable=True)
    pilot_step_id: Mapped[int | None] = mapped_column(ForeignKey("pilot_steps.id"), nullable=True)
    kind: Mapped[str] = mapped_column(String(20), default="gate")  # gate / monitor / rollback
    look_index: Mapped[int] = mapped_column(Integer, default=0)
    outcome: Mapped[str] = mapped_column(String(10))  # GO / EXTEND / NO-GO / INVALID
    # what the decision waits for: none / approval / rollback_approval
    awaiting: Mapped[str] = mapped_column(String(30), default="none")
    resolution: Mapped[str | None] = mapped_column(String(20), nullable=True)  # approved/rejected/...
    evidence: Mapped[dict[str, Any]] = mapped_column(JSON)
    explanation: Mapped[str] = mapped_column(Text)
    data_fingerprint: Mapped[str] = mapped_column(String(64))
    flow_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)  # paused run to resume
    # migration 0009: the decision's MLflow run, NULL until logged (a rerun logs a missing one)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ObservationBatch(Base):
    """A stored batch of a step's observations (migration 0009) and its MLflow run, NULL until logged: a
    rerun of the pilot logs a batch whose log failed (rollout.run_links)."""

    __tablename__ = "observation_batches"
    __table_args__ = (
        UniqueConstraint("pilot_step_id", "batch_id", name="uq_observation_batches_step_batch"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    pilot_step_id: Mapped[int] = mapped_column(ForeignKey("pilot_steps.id"))
    batch_id: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(20))  # pilot-flow / imported / imported-external / monitor
    rows: Mapped[int] = mapped_column(Integer)  # rows the batch brought (an import: the file's)
    inserted: Mapped[int] = mapped_column(Integer)  # of them new (the rest were stored already)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Approval(Base):
    __tablename__ = "approvals"

    id: Mapped[int] = mapped_column(primary_key=True)
    decision_id: Mapped[int] = mapped_column(ForeignKey("gate_decisions.id"), index=True)
    actor: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(20))
    action: Mapped[str] = mapped_column(String(20))  # approve / reject / rollback
    reason: Mapped[str] = mapped_column(Text)
    against_recommendation: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AliasMove(Base):
    """Alias history MLflow forgets. ``status`` is 'pending' before the MLflow call and becomes
    'committed' or 'failed' after, so a crash midway is visible instead of silently claimed; a move that
    never took effect and went stale (a later move committed first) is 'superseded', never retried
    (rollout.registry.supersede)."""

    __tablename__ = "alias_history"

    id: Mapped[int] = mapped_column(primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(128), unique=True)
    use_case_id: Mapped[int] = mapped_column(ForeignKey("use_cases.id"), index=True)
    alias: Mapped[str] = mapped_column(String(30))  # champion / challenger
    from_version: Mapped[str | None] = mapped_column(String(20), nullable=True)
    to_version: Mapped[str | None] = mapped_column(String(20), nullable=True)
    actor: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class UseCaseLease(Base):
    """Who works on a use case now (rollout.leases): one row per use case (made with it), held by one run
    at a time until `expires_at` unless renewed; released by clearing every field but the use case, so a
    run that took and released it leaves the row as it found it (the app role never deletes)."""

    __tablename__ = "use_case_leases"

    use_case_id: Mapped[int] = mapped_column(ForeignKey("use_cases.id"), primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(64), nullable=True)  # a token; NULL when free
    work: Mapped[str | None] = mapped_column(String(300), nullable=True)  # what and where, for the message
    flow_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)  # the holder's, if a flow run
    host: Mapped[str | None] = mapped_column(String(255), nullable=True)  # the holder's host and process
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    acquired_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class AuditEntry(Base):
    __tablename__ = "audit_log"
    # one successor per row: two writers cannot both extend the chain from the same row
    __table_args__ = (Index("uq_audit_log_prev_hash", "prev_hash", unique=True),)

    id: Mapped[int] = mapped_column(primary_key=True)
    ts: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(60), index=True)
    use_case_id: Mapped[int | None] = mapped_column(ForeignKey("use_cases.id"), nullable=True, index=True)
    entity: Mapped[str | None] = mapped_column(String(60), nullable=True)
    entity_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # migration 0003: where the command ran, and the hash chain (rollout.audit)
    os_user: Mapped[str | None] = mapped_column(String(100), nullable=True)
    host: Mapped[str | None] = mapped_column(String(255), nullable=True)
    prev_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    row_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)


class AppendOnlyError(RuntimeError):
    pass


@event.listens_for(AuditEntry, "before_update")
def _refuse_update(mapper, connection, target) -> None:  # noqa: ANN001
    raise AppendOnlyError("audit_log is append-only: entries cannot be changed")


@event.listens_for(AuditEntry, "before_delete")
def _refuse_delete(mapper, connection, target) -> None:  # noqa: ANN001
    raise AppendOnlyError("audit_log is append-only: entries cannot be deleted")
