"""Rollback triggered from the dashboard moves MLflow's champion alias back (rollout.registry against a
real MLflow SQLite store) and records it in our alias history and audit log."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from rollout import registry, tracking
from rollout.auth import Identity
from rollout.db.models import AuditEntry, ModelVersion, UseCase
from rollout.db.session import session_scope
from rollout.settings import Settings
from tests.dashboard.apptest_helpers import button_labels, new_app, open_page, sign_in

USE_CASE = "support-chat"


def _two_registered_versions(home: Settings) -> None:
    """Versions 1 and 2 in MLflow's registry (real store, no model weights needed) and in our DB."""
    client = tracking.client()
    name = registry.model_name(USE_CASE)
    client.create_registered_model(name)
    source = home.home / "mlartifacts" / "placeholder-model"
    source.mkdir(parents=True)
    for _ in range(2):
        client.create_model_version(name, source=str(source))
    with session_scope() as s:
        uc = s.scalar(select(UseCase).where(UseCase.name == USE_CASE))
        s.add(
            ModelVersion(
                use_case_id=uc.id,
                base_model_ref="smollm2-135m",
                plan={"density": 1.0},
                plan_hash="plan-v1",
                mlflow_model_name=name,
                mlflow_version="1",
            )
        )


def test_rollback_from_the_ui_moves_the_alias_back(seeded: dict[str, Any], dash_env: Settings) -> None:
    _two_registered_versions(dash_env)
    alice = Identity("alice", "approver", "local-account")
    for v in ("1", "2"):
        registry.promote(USE_CASE, version=v, actor=alice, reason=f"promote v{v}", idempotency_key=f"p{v}")
    with session_scope() as s:
        s.scalar(select(UseCase).where(UseCase.name == USE_CASE)).phase = "promoted"
    assert registry.current_aliases(USE_CASE)["champion"] == "2"

    at = sign_in(new_app(), "bob")  # a viewer sees the promoted use case but no rollback button
    open_page(at, "approvals")
    assert "Trigger rollback" not in button_labels(at)

    at = sign_in(new_app(), "alice")
    open_page(at, "approvals")
    at.selectbox(key="rollback_uc").select(USE_CASE)
    at.text_area(key="rollback_reason").input("p95 latency regressed after promotion")
    at.button(key="rollback_go").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert "rollback recorded" in at.success[0].value

    assert registry.current_aliases(USE_CASE)["champion"] == "1"  # MLflow serves the previous champion
    last = registry.alias_history(USE_CASE)[-1]
    assert (last["alias"], last["from_version"], last["to_version"], last["status"]) == (
        "champion",
        "2",
        "1",
        "committed",
    )
    assert last["actor"] == "alice" and last["reason"] == "p95 latency regressed after promotion"
    with session_scope() as s:
        assert s.scalar(select(UseCase.phase).where(UseCase.name == USE_CASE)) == "rolled_back"
        actions = set(s.scalars(select(AuditEntry.action).where(AuditEntry.actor == "alice")))
    assert {"approval.rollback", "alias.rollback.committed"} <= actions
