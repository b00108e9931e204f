"""State DB: typed SQLAlchemy models and sessions. The schema is made only by Alembic migrations."""

from rollout.db.models import (  # noqa: F401
    AliasMove,
    Approval,
    AuditEntry,
    Base,
    CalibrationRun,
    EvaluationRun,
    GateDecision,
    ModelVersion,
    Observation,
    Pilot,
    PilotStep,
    SpecVersion,
    UseCase,
    UseCaseLease,
)
