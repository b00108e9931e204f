"""Promotion, rejection and rollback flows: thin wrappers over rollout.approvals' effects, which move
aliases through rollout.registry (pending -> committed alias history + audit, idempotent per decision)
and update the pilot and the use case's phase. The acting person is read back from the Approval row."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.common import log_run


@task(cache_policy=NO_CACHE, name="promote-move-aliases", retries=2, retry_delay_seconds=1)
def promote_task(decision_id: int, approval_id: int, reason: str) -> dict[str, Any]:
    from rollout.approvals import apply_promotion

    return apply_promotion(decision_id, approval_id, reason=reason)


@task(cache_policy=NO_CACHE, name="reject-stop-pilot", retries=2, retry_delay_seconds=1)
def reject_task(decision_id: int, approval_id: int, reason: str) -> dict[str, Any]:
    from rollout.approvals import apply_rejection

    return apply_rejection(decision_id, approval_id, reason=reason)


@task(cache_policy=NO_CACHE, name="rollback-move-alias", retries=2, retry_delay_seconds=1)
def rollback_task(decision_id: int, approval_id: int | None, reason: str, automatic: bool) -> dict[str, Any]:
    from rollout.approvals import apply_rollback

    return apply_rollback(decision_id, approval_id, reason=reason, automatic=automatic)


def _use_case_of(decision_id: int) -> str:
    from rollout.db.models import GateDecision, UseCase
    from rollout.db.session import session_scope

    with session_scope() as session:
        d = session.get(GateDecision, decision_id)
        return session.get(UseCase, d.use_case_id).name


@task(cache_policy=NO_CACHE, name="alias-log-mlflow", retries=2, retry_delay_seconds=1)
def log_alias_event(decision_id: int, result: dict[str, Any], action: str, actor: str) -> str:
    from rollout import registry

    name = _use_case_of(decision_id)
    return log_run(
        name,
        run_name=action,
        params={"decision_id": decision_id, "actor": actor},
        tags={
            "sparsepilot.flow": action,
            **{f"alias.{k}": v for k, v in registry.current_aliases(name).items()},
        },
        json_artifacts={f"{action}.json": result},
    )


@flow(name="promote", log_prints=True)
def promote_flow(decision_id: int, approval_id: int, reason: str, actor: str = "") -> dict[str, Any]:
    result = promote_task(decision_id, approval_id, reason)
    log_alias_event(decision_id, result, "promote", actor)
    get_run_logger().info("decision %s: promoted (%s)", decision_id, result.get("alias_moves"))
    return result


@flow(name="reject", log_prints=True)
def reject_flow(decision_id: int, approval_id: int, reason: str, actor: str = "") -> dict[str, Any]:
    return reject_task(decision_id, approval_id, reason)


@flow(name="rollback", log_prints=True)
def rollback_flow(
    decision_id: int,
    approval_id: int | None = None,
    reason: str = "",
    automatic: bool = False,
    actor: str = "",
) -> dict[str, Any]:
    result = rollback_task(decision_id, approval_id, reason, automatic)
    log_alias_event(decision_id, result, "rollback", actor or ("sparsepilot-monitor" if automatic else ""))
    get_run_logger().info("decision %s: rolled back (%s)", decision_id, result.get("alias_move"))
    return result
