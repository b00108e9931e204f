"""The append-only audit log. Writes go through `record` inside the caller's transaction, so the audit
row and the change it describes commit or roll back together."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from rollout.db.models import AuditEntry


def record(
    session: Session,
    actor: str,
    action: str,
    *,
    use_case_id: int | None = None,
    entity: str | None = None,
    entity_id: str | int | None = None,
    details: dict[str, Any] | None = None,
) -> AuditEntry:
    entry = AuditEntry(
        actor=actor,
        action=action,
        use_case_id=use_case_id,
        entity=entity,
        entity_id=None if entity_id is None else str(entity_id),
        details=details or {},
    )
    session.add(entry)
    session.flush()
    return entry
