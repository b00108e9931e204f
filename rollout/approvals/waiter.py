"""Who waits in a decision's paused approval run: the process that registered it (its host is on the
`approval.waiting` audit row, its pid in the row's details: `waiter_details`), and whether that process is
gone (`waiter_gone`). Prefect cannot tell: a paused run whose process was killed (an OOM, `kill -9`, a
host restart of `run --serve` or `serve`) reads "Paused" until its pause times out (7 days), and resuming
it carries out nothing. A process of this host that no longer exists is gone; another host's cannot be
seen, and counts as waiting."""

from __future__ import annotations

import os
from typing import Any

from sqlalchemy import select

from rollout.db.models import AuditEntry, GateDecision
from rollout.leases import process_gone

WAITING = "approval.waiting"


def waiter_details(run_id: str) -> dict[str, Any]:
    """The `approval.waiting` row's details for `run_id`, registered by this process."""
    return {"flow_run_id": run_id, "pid": os.getpid()}


def waiter_gone(session: Any, d: GateDecision) -> str | None:
    """Why nobody continues the decision's registered approval run ("its process 123 on host-a is
    gone"), or None while its process may be alive (another host's, or a run registered before the pid
    was recorded)."""
    if not d.flow_run_id:
        return None
    rows = session.execute(
        select(AuditEntry.host, AuditEntry.details)
        .where(
            AuditEntry.action == WAITING,
            AuditEntry.entity == "gate_decision",
            AuditEntry.entity_id == str(d.id),
        )
        .order_by(AuditEntry.id.desc())
    )
    for host, details in rows:
        if (details or {}).get("flow_run_id") == d.flow_run_id:
            pid = details.get("pid")
            if isinstance(pid, int) and process_gone(host, pid):
                return f"its process {pid} on {host} is gone"
            return None
    return None
