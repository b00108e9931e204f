"""The model registry: one MLflow registered model per use case, with the alias history MLflow forgets.

* `register_version` logs a light pyfunc (base model ref + plan, no weights) and registers it, once per
  plan hash: a retry finds the DB row or the MLflow version tagged with the hash and reuses it.
* Alias moves (`set_alias`, `promote`, `rollback`) are one logical operation over two stores:
  1. write an AliasMove row `pending` + an audit row and COMMIT;
  2. call MLflow;
  3. mark the row `committed` (audit row) — or `failed` with the error (audit row) and raise, unless
     MLflow's alias points at the version already (another caller of the key moved it: committed).
  A crash between 2 and 3 leaves `pending`: nothing claims success, and a retry with the same
  idempotency key re-applies the (idempotent) MLflow call and converges on the same row.
* Who may move aliases: champion moves need an approver (rollout.auth.require_approver); the two system
  identities below act for the pipeline and may only do what the spec lets automation do — the pipeline
  sets `challenger` after calibration, the monitor rolls `champion` back when the use case's rollback
  policy is `auto`. Promotion to champion always needs a person.
* Rollback targets the previous champion from OUR history (committed champion moves), not MLflow's
  current state, which has no memory.

Transactions are this module's own (`session_scope(db_url)`), because step 1 must be committed before
MLflow is called; callers pass use-case names, not sessions.
"""

from __future__ import annotations

import datetime as dt
import json
import tempfile
import warnings
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any, NotRequired, TypedDict, Unpack

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from rollout import audit, tracking
from rollout.auth import Identity, PermissionDenied, require_approver
from rollout.db.models import AliasMove, ModelVersion, SpecVersion, UseCase, as_utc
from rollout.db.session import StateDBBusy, session_scope
from rollout.redact import redact
from rollout.spec import has_visible_text
from sparse_core.errors import SparsePilotError

ALIASES = ("champion", "challenger")
MODEL_PREFIX = "sparsepilot-"
# System identities (source="flow"): what automation may do on its own (see the module docstring).
SYSTEM_PIPELINE = Identity(name=audit.SYSTEM_ACTOR, role="approver", source="flow")
SYSTEM_MONITOR = Identity(name=audit.MONITOR_ACTOR, role="approver", source="flow")
_SYSTEM_RIGHTS = {
    SYSTEM_PIPELINE.name: {("challenger", "set")},
    SYSTEM_MONITOR.name: {("champion", "rollback")},
}
TAG_PLAN_HASH = "sparsepilot.plan_hash"
TAG_BASE_MODEL = "sparsepilot.base_model_ref"
TAG_MODEL_VERSION_ID = "sparsepilot.model_version_id"


class RegistryError(SparsePilotError, RuntimeError):
    """A registry operation could not be completed; the message says which and why."""


class MoveInProgress(RegistryError):
    """Another champion move of the use case is being carried out (its row is pending): one at a time."""


# the status of a move that never took effect and never will (`supersede`): its key is not retried
SUPERSEDED = "superseded"

# a pending champion move younger than this is taken to be in flight (its MLflow call takes seconds); an
# older one was cut off, and its own key's retry (rollout.unfinished) finishes it
MOVE_IN_FLIGHT = dt.timedelta(minutes=5)


def model_name(use_case: str) -> str:
    return MODEL_PREFIX + tracking.check_use_case_name(use_case)


def model_uri(use_case: str, alias: str = "champion") -> str:
    return f"models:/{model_name(use_case)}@{alias}"


def _use_case(session, name: str) -> UseCase:  # noqa: ANN001
    uc = session.scalar(select(UseCase).where(UseCase.name == name))
    if uc is None:
        raise RegistryError(f"use case {name!r} does not exist (add it with `sparsepilot usecase add`)")
    return uc


def _actor_name(actor: Identity | str) -> str:
    return actor.name if isinstance(actor, Identity) else str(actor)


# --------------------------------------------------------------------------------------------------
# Registration


def plan_hash_of(plan: Mapping[str, Any] | Any) -> tuple[dict[str, Any], str, Any]:
    """(plan dict, content hash, SparsePlan); validates the plan through sparse_core's contract."""
    from sparse_core.plan import SparsePlan

    sp = plan if isinstance(plan, SparsePlan) else SparsePlan.from_dict(dict(plan))
    if sp.tensors and not sp.metadata.get("gate_weights"):
        # save_plan records the tensors' sha256 in metadata["gate_weights"], which is part of the hash
        from sparse_core.plan import save_plan

        with tempfile.TemporaryDirectory(prefix="sparsepilot-plan-") as tmp:
            save_plan(sp, tmp)
    return sp.to_dict(), sp.content_hash(), sp


def _pip_requirements() -> list[str]:
    reqs = []
    for dist in ("mlflow", "torch", "transformers", "safetensors", "gguf", "numpy", "pandas"):
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            reqs.append(dist)
    # The pyfunc imports sparse_core from the sparsepilot distribution (installed from this repository).
    reqs.append(f"sparsepilot=={metadata.version('sparsepilot')}")
    return reqs


def _find_mlflow_version(c, name: str, plan_hash: str, base_model_ref: str):  # noqa: ANN001, ANN202
    found = c.search_model_versions(f"name = '{name}' and tags.`{TAG_PLAN_HASH}` = '{plan_hash}'")
    found = [v for v in found if v.tags.get(TAG_BASE_MODEL) == base_model_ref]
    found = sorted(found, key=lambda v: int(v.version))
    return found[0] if found else None


def _log_and_register(
    use_case: str,
    sp: Any,
    plan_hash: str,
    base_model_ref: str,
    mv_id: int,
    run_id: str | None,
    plan_dir: Path | None,
) -> tuple[str, str]:
    import mlflow
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    from rollout.pyfunc_model import INFO_ARTIFACT, PLAN_ARTIFACT, SparsePilotModel
    from sparse_core.plan import save_plan

    name = model_name(use_case)
    with tempfile.TemporaryDirectory(prefix="sparsepilot-plan-") as tmp:
        tmp_path = Path(tmp)
        if plan_dir is None:
            if sp.metadata.get("gate_weights") and not sp.tensors:
                raise RegistryError(
                    "the plan references gate weights (metadata.gate_weights) but carries no tensors: "
                    "pass plan_dir= the directory save_plan wrote"
                )
            plan_dir = tmp_path / "plan"
            save_plan(sp, plan_dir)
        info_file = tmp_path / "sparsepilot.json"
        info_file.write_text(
            json.dumps(
                {"use_case": use_case, "base_model_ref": base_model_ref, "plan_hash": plan_hash}, indent=2
            )
        )
        signature = ModelSignature(
            inputs=Schema([ColSpec("string")]),  # a list of prompts (or one unnamed column)
            params=ParamSchema(
                [
                    ParamSpec("mode", "string", "generate"),
                    ParamSpec("max_new_tokens", "long", 32),
                    ParamSpec("reference", "string", ""),  # mode='loglik' (rollout/pyfunc_model.py)
                ]
            ),
        )
        tags = {TAG_PLAN_HASH: plan_hash, TAG_BASE_MODEL: base_model_ref, TAG_MODEL_VERSION_ID: str(mv_id)}

        def log() -> Any:
            with warnings.catch_warnings():
                # No input example on purpose: MLflow would load the base model to validate it.
                warnings.filterwarnings("ignore", message=".*input example.*", category=UserWarning)
                return _log_model()

        def _log_model() -> Any:
            return mlflow.pyfunc.log_model(
                name="sparse-model",
                python_model=SparsePilotModel(),
                artifacts={PLAN_ARTIFACT: str(plan_dir), INFO_ARTIFACT: str(info_file)},
                pip_requirements=_pip_requirements(),
                signature=signature,
            )

        active = mlflow.active_run()
        if active is not None and (run_id is None or active.info.run_id == run_id):
            info = log()
            used_run = active.info.run_id
        else:
            if run_id is None:  # an attempt killed inside its own 'register' run left it RUNNING
                tracking.retire_runs(
                    use_case,
                    "register",
                    tags={TAG_MODEL_VERSION_ID: str(mv_id)},
                    keep=None,
                    why=f"an interrupted registration of model version row {mv_id}, registered again",
                )
            new_tags = None if run_id else {"sparsepilot.flow": "register", TAG_MODEL_VERSION_ID: str(mv_id)}
            with tracking.start_run(
                use_case, run_id=run_id, run_name=None if run_id else "register", tags=new_tags
            ) as run:
                info = log()
                used_run = run.info.run_id
        mv = mlflow.register_model(info.model_uri, name, tags=tags)
    tracking.client().update_model_version(
        name, mv.version, description=f"{base_model_ref} + sparse plan {plan_hash[:12]} (SparsePilot)"
    )
    return str(mv.version), used_run


def register_version(
    use_case: str,
    plan: Mapping[str, Any] | Any,
    base_model_ref: str,
    *,
    run_id: str | None = None,
    actor: Identity | str,
    plan_dir: str | Path | None = None,
    density: float | None = None,
    db_url: str | None = None,
) -> ModelVersion:
    """Register (once per plan hash) the use case's model version: DB row + MLflow model version.

    `plan` is a SparsePlan or its dict; `plan_dir` (optional) is the directory `save_plan` wrote, needed
    when the plan has gate tensors. The pyfunc is logged into `run_id` (or the active run, or a new
    'register' run in the use case's experiment). Returns the (detached) ModelVersion row."""
    plan_dict, h, sp = plan_hash_of(plan)
    name = model_name(use_case)
    who = _actor_name(actor)
    try:
        mv_id, complete = _version_row(use_case, plan_dict, h, base_model_ref, density, who, db_url)
    except IntegrityError:  # registered concurrently by another task: converge on its row
        mv_id, complete = _version_row(use_case, plan_dict, h, base_model_ref, density, who, db_url)
    if complete:
        with session_scope(db_url) as session:
            return session.get(ModelVersion, mv_id)
    c = tracking.client()
    existing = _find_mlflow_version(c, name, h, base_model_ref)
    if existing is not None:
        version, used_run = str(existing.version), existing.run_id
    else:
        version, used_run = _log_and_register(
            use_case, sp, h, base_model_ref, mv_id, run_id, Path(plan_dir) if plan_dir else None
        )
    with session_scope(db_url) as session:
        row = session.get(ModelVersion, mv_id)
        row.mlflow_model_name = name
        row.mlflow_version = version
        row.mlflow_run_id = used_run
        audit.record(
            session,
            who,
            "model_version.registered",
            on=row,
            details={"mlflow_model": name, "mlflow_version": version, "plan_hash": h, "run_id": used_run},
        )
        return row


BASELINE_REASON = "dense baseline: the model as it served before any sparse plan"


def register_challenger(
    use_case: str,
    plan: Any,
    base_model_ref: str,
    *,
    run_id: str | None,
    n_layers: int | None,
    density: float | None,
    calibration_run: int,
) -> tuple[ModelVersion, AliasMove]:
    """Register a calibrated plan's version and point `challenger` at it. The dense baseline (every
    layer dense, the model as it served before any sparse plan) is registered beside it once, so a
    rollback after the first promotion has a version to return to."""
    from sparse_core import SparsePlan

    mv = register_version(
        use_case, plan, base_model_ref, run_id=run_id, actor=SYSTEM_PIPELINE, density=density
    )
    if n_layers:
        baseline = SparsePlan(
            block_size=plan.block_size,
            estimator="pooled",
            tau=1.0,
            dense_layers=tuple(range(n_layers)),
            metadata={"baseline": "dense", "note": BASELINE_REASON},
        )
        if baseline.content_hash() != plan.content_hash():
            register_version(use_case, baseline, base_model_ref, actor=SYSTEM_PIPELINE, density=1.0)
    shown = float("nan") if density is None else density
    move = set_alias(
        use_case,
        "challenger",
        model_version_id=mv.id,
        actor=SYSTEM_PIPELINE,
        reason=f"calibrated to the quality budget (density {shown:.3f})",
        idempotency_key=f"challenger:{mv.id}:calibration:{calibration_run}",
    )
    return mv, move


def repoint_challenger(use_case: str, *, model_version_id: int, calibration_run: int) -> AliasMove | None:
    """Point `challenger` back at the version of a calibration run that is reused (the spec was reverted to
    the version that calibrated it) when it is not the challenger now; None when it is. The key names the
    last committed challenger move it replaces, so it differs from the run's first move
    (`challenger:<mv>:calibration:<run>`, which is committed and would not move again), a retry after a
    failed or cut-off move repeats it and converges, and a later revert back to this run moves again."""
    with session_scope() as session:
        uc = _use_case(session, use_case)
        mv = session.get(ModelVersion, model_version_id)
        if mv is None or mv.use_case_id != uc.id or mv.mlflow_version is None:
            return None  # nothing of ours in MLflow to point at (a plan-less test version)
        history = committed_moves(session, uc.id, "challenger")
        if history and history[-1].to_version == mv.mlflow_version:
            return None
        after = history[-1].id if history else 0
        version = mv.mlflow_version
    return set_alias(
        use_case,
        "challenger",
        model_version_id=model_version_id,
        actor=SYSTEM_PIPELINE,
        reason=f"calibration run {calibration_run} reused: the current spec's plan (version {version})",
        idempotency_key=f"challenger:{model_version_id}:calibration:{calibration_run}:after:{after}",
    )


def _version_row(
    use_case: str,
    plan_dict: dict[str, Any],
    h: str,
    base_model_ref: str,
    density: float | None,
    who: str,
    db_url: str | None,
) -> tuple[int, bool]:
    """Find or create the DB row for (use case, plan hash): (row id, already registered)."""
    name = model_name(use_case)
    with session_scope(db_url) as session:
        uc = _use_case(session, use_case)
        row = session.scalar(
            select(ModelVersion).where(ModelVersion.use_case_id == uc.id, ModelVersion.plan_hash == h)
        )
        if row is not None and row.base_model_ref != base_model_ref:
            raise RegistryError(
                f"plan {h[:12]} of {use_case!r} is already registered for base model {row.base_model_ref!r}, "
                f"not {base_model_ref!r}; a plan is calibrated for one model — recalibrate for the new one"
            )
        if row is not None and row.mlflow_version is not None:
            return row.id, True
        if row is None:
            row = ModelVersion(
                use_case_id=uc.id,
                base_model_ref=base_model_ref,
                plan=plan_dict,
                plan_hash=h,
                mlflow_model_name=name,
                density=density,
            )
            audit.record_new(
                session,
                row,
                who,
                "model_version.created",
                {"plan_hash": h, "base_model_ref": base_model_ref},
            )
        return row.id, False


# --------------------------------------------------------------------------------------------------
# Aliases


def _check_identity(actor: Identity, alias: str, action: str, use_case: str) -> Identity:
    if not isinstance(actor, Identity):
        raise PermissionDenied(
            f"{action} of {alias!r} for {use_case!r} needs an Identity (rollout.auth.Identity), "
            f"got {type(actor).__name__} {actor!r}"
        )
    who = require_approver(actor, f"{action} {alias} for {use_case}")
    if who.name in _SYSTEM_RIGHTS and (alias, action) not in _SYSTEM_RIGHTS[who.name]:
        raise PermissionDenied(
            f"system identity {who.name!r} may not {action} {alias!r}; a person must approve"
        )
    return who


def _require_auto_rollback(session, uc: UseCase) -> None:  # noqa: ANN001
    """The monitor rolls back by itself only under `rollback: auto` of the spec version the serving
    champion was promoted under (its pilot's, as `rollout.pilots.load_pilot_spec` reads it), never a later
    version's: an operator's new version must not let the monitor roll back a champion an approver
    promoted under `manual`. Without a promoted pilot, the current version's."""
    from rollout.pilots import promoted_pilot  # rollout.pilots builds on this module's layer

    pilot = promoted_pilot(session, uc)
    version = pilot.spec_version if pilot is not None and pilot.spec_version else uc.current_spec_version
    spec = session.scalar(
        select(SpecVersion).where(SpecVersion.use_case_id == uc.id, SpecVersion.version == version)
    )
    policy = (spec.spec or {}).get("rollback", "manual") if spec is not None else "manual"
    if policy != "auto":
        raise PermissionDenied(
            f"use case {uc.name!r} has rollback policy {policy!r} (spec version {version}, the serving "
            "champion's): an automatic rollback needs a person's approval"
        )


def _resolve_version(session, uc: UseCase, version: str | int | None, model_version_id: int | None) -> str:  # noqa: ANN001
    if model_version_id is not None:
        mv = session.get(ModelVersion, model_version_id)
        if mv is None or mv.use_case_id != uc.id:
            raise RegistryError(
                f"model version id {model_version_id} does not belong to use case {uc.name!r}"
            )
        if mv.mlflow_version is None:
            raise RegistryError(f"model version id {model_version_id} is not registered in MLflow yet")
        if version is not None and str(version) != mv.mlflow_version:
            raise RegistryError(f"version {version} and model_version_id {model_version_id} disagree")
        return mv.mlflow_version
    if version is None:
        raise RegistryError("say which version: version= (MLflow version) or model_version_id=")
    mv = session.scalar(
        select(ModelVersion).where(
            ModelVersion.use_case_id == uc.id, ModelVersion.mlflow_version == str(version)
        )
    )
    if mv is None:
        raise RegistryError(f"version {version} of {model_name(uc.name)} was not registered by SparsePilot")
    return str(version)


def committed_moves(session, uc_id: int, alias: str) -> list[AliasMove]:  # noqa: ANN001
    """The committed moves of one alias of a use case, oldest first (what champion_lineage reads)."""
    return list(
        session.scalars(
            select(AliasMove)
            .where(AliasMove.use_case_id == uc_id, AliasMove.alias == alias, AliasMove.status == "committed")
            .order_by(AliasMove.id)
        )
    )


def champions(session, uc_id: int) -> list[str]:  # noqa: ANN001
    """The use case's champion versions in force, oldest first: the last serves now, the one before it
    is what a rollback returns to (none before it: nothing to roll back to)."""
    return champion_lineage(committed_moves(session, uc_id, "champion"))


def champion_lineage(moves: list[AliasMove]) -> list[str]:
    """Champion versions still 'in force', oldest first, from committed moves: a move back to the version
    under the top is a rollback (pop), anything else a promotion (push)."""
    stack: list[str] = []
    for m in moves:
        if m.to_version is None:
            continue
        if len(stack) >= 2 and stack[-2] == m.to_version and stack[-1] == m.from_version:
            stack.pop()
        elif not stack or stack[-1] != m.to_version:
            stack.append(m.to_version)
    return stack


def _apply_mlflow(name: str, alias: str, version: str | None) -> None:
    c = tracking.client()
    if version is None:
        c.delete_registered_model_alias(name, alias)
    else:
        c.set_registered_model_alias(name, alias, version)


class MoveRequest(TypedDict):
    """The keywords every alias move takes (set_alias, promote, rollback): who moves it, why (kept in the
    audit log), the idempotency key a retry repeats, and the state DB (default: the settings')."""

    actor: Identity
    reason: str
    idempotency_key: str
    db_url: NotRequired[str | None]


def _move(
    use_case: str,
    alias: str,
    action: str,
    target: Any,
    *,
    actor: Identity,
    reason: str,
    idempotency_key: str,
    db_url: str | None = None,
) -> AliasMove:
    """The three-step alias move. `target(session, uc)` returns (to_version, from_version)."""
    if alias not in ALIASES:
        raise RegistryError(f"alias must be one of {ALIASES}, got {alias!r}")
    who = _check_identity(actor, alias, action, use_case)
    text = redact((reason or "").strip())  # the alias history is append-only, as the audit log
    if not has_visible_text(text):
        raise RegistryError("a reason is required for every alias move")
    if not idempotency_key:
        raise RegistryError("an idempotency_key is required for every alias move")
    name = model_name(use_case)

    # 1. pending row + audit, committed before MLflow is touched (or the existing row for this key); one
    # first step per use case at a time (SQLite: the write lock; PostgreSQL: the use case's row), so a
    # champion move sees another's pending row
    try:
        with session_scope(db_url, immediate=True) as session:
            uc = _use_case(session, use_case)
            session.get(UseCase, uc.id, with_for_update=True)
            if who.name == SYSTEM_MONITOR.name:
                _require_auto_rollback(session, uc)
            move = session.scalar(select(AliasMove).where(AliasMove.idempotency_key == idempotency_key))
            if move is None:
                if alias == "champion":
                    _refuse_while_moving(session, uc, idempotency_key)
                to_version, from_version = target(session, uc)
                move = AliasMove(
                    idempotency_key=idempotency_key,
                    use_case_id=uc.id,
                    alias=alias,
                    from_version=from_version,
                    to_version=to_version,
                    actor=who.name,
                    reason=text,
                    status="pending",
                )
                audit.record_new(
                    session,
                    move,
                    who.name,
                    f"alias.{action}.requested",
                    {
                        "alias": alias,
                        "from": from_version,
                        "to": to_version,
                        "reason": text,
                        "role": who.role,
                        "source": who.source,
                        "idempotency_key": idempotency_key,
                    },
                )
            elif move.use_case_id != uc.id or move.alias != alias:
                raise RegistryError(
                    f"idempotency key {idempotency_key!r} already names a move of {move.alias!r} "
                    "for another request"
                )
            elif move.status == "committed":
                return move
            elif move.status == SUPERSEDED:
                raise RegistryError(
                    f"alias_history id {move.id} ({idempotency_key!r}: v{move.from_version} -> "
                    f"v{move.to_version}) was superseded and is never carried out: {move.error}"
                )
            elif alias == "champion" and (stale := stale_move(session, move)) is not None:
                raise RegistryError(f"{stale}; nothing was moved")
            else:
                audit.record(
                    session,
                    who.name,
                    f"alias.{action}.retried",
                    on=move,
                    details={"previous_status": move.status, "previous_error": move.error},
                )
            move_id, to_version = move.id, move.to_version
    except IntegrityError:  # the same key inserted concurrently: converge on that row
        return _move(
            use_case,
            alias,
            action=action,
            target=target,
            actor=actor,
            reason=reason,
            idempotency_key=idempotency_key,
            db_url=db_url,
        )

    # 2. MLflow
    try:
        _apply_mlflow(name, alias, to_version)
    except Exception as exc:
        if _points_at(name, alias, to_version):
            # another caller of this key moved the alias (its call's INSERT is why this one failed), and its
            # row is still pending until its step 3 commits: the move happened, never "failed"
            return _committed(db_url, move_id, who, action, alias, to_version, use_case, idempotency_key)
        # kept for good (alias history, the append-only audit log) and shown to every viewer: an MLflow
        # error names its URL, password and all
        message = redact(f"{type(exc).__name__}: {exc}")
        with session_scope(db_url) as session:
            move = session.get(AliasMove, move_id)
            if move.status == "committed":  # another caller of this key moved it meanwhile: MLflow agrees
                return move
            move.status = "failed"
            move.error = message[:4000]
            audit.record(
                session,
                who.name,
                f"alias.{action}.failed",
                on=move,
                details={"alias": alias, "to": to_version, "error": message[:1000]},
            )
        raise RegistryError(
            f"MLflow did not move {alias!r} of {name} to version {to_version}: {message}. "
            f"The move is recorded as failed (alias_history id {move_id}); "
            "retry with the same idempotency key."
        ) from exc

    return _committed(db_url, move_id, who, action, alias, to_version, use_case, idempotency_key)


def points_at(use_case: str, alias: str, version: str | None) -> bool:
    """Whether MLflow's `alias` of the use case's model points at `version` now: a move not recorded as
    committed has taken effect only where it does (False where MLflow cannot say)."""
    return _points_at(model_name(use_case), alias, version)


def stale_move(session, move: AliasMove) -> str | None:  # noqa: ANN001
    """Why a champion move not committed is stale, or None: its `from_version` is no longer the champion
    (a later move of the alias committed meanwhile: a rollback, a promotion). Retried, it moved MLflow
    from whatever serves now while its row said from `from_version`, and the lineage, read in row order,
    no longer named what MLflow serves (`champion_lineage`): a committed move always starts from the
    champion of its time, so row order is commit order."""
    lineage = champions(session, move.use_case_id)
    serving = lineage[-1] if lineage else None
    if move.status == "committed" or move.from_version == serving:
        return None
    since = session.scalar(
        select(AliasMove)
        .where(
            AliasMove.use_case_id == move.use_case_id,
            AliasMove.alias == "champion",
            AliasMove.status == "committed",
            AliasMove.id > move.id,
        )
        .order_by(AliasMove.id.desc())
        .limit(1)
    )
    by = "a later move"
    if since is not None:
        by = f"{since.idempotency_key!r} (alias_history id {since.id}: v{since.from_version} -> "
        by += f"v{since.to_version})"
    return (
        f"alias_history id {move.id} ({move.idempotency_key!r}) was to move the champion from "
        f"v{move.from_version} to v{move.to_version}, but {by} committed since: "
        + (f"v{serving} serves" if serving else "no champion of ours serves")
    )


def supersede(session, move: AliasMove, *, actor: str, why: str) -> None:  # noqa: ANN001
    """Mark a champion move that never took effect (pending or failed, MLflow not pointing at its target)
    `superseded`, for good: a later committed move of the alias made its `from_version` history, so
    carrying it out would move the alias over a champion it was never judged against (`_move` refuses
    its key from now on). Audited (`alias.<move>.superseded`, why), in the caller's transaction."""
    if move.status == "committed":
        raise RegistryError(f"alias_history id {move.id} is committed; a committed move is never superseded")
    move.status = SUPERSEDED
    move.error = redact(why)[:4000]
    kind = move.idempotency_key.split(":", 1)[0]
    audit.record(
        session,
        actor,
        f"alias.{kind}.superseded",
        on=move,
        details={"alias": move.alias, "from": move.from_version, "to": move.to_version, "why": move.error},
    )


def _points_at(name: str, alias: str, version: str | None) -> bool:
    """Whether MLflow's `alias` of `name` points at `version` now (absent: None); False where MLflow
    cannot say."""
    try:
        return current_aliases_of(name).get(alias) == version
    except Exception:  # noqa: BLE001 - MLflow unreachable: the move is not known to have happened
        return False


def _committed(
    db_url: str | None,
    move_id: int,
    who: Identity,
    action: str,
    alias: str,
    to_version: str | None,
    use_case: str,
    idempotency_key: str,
) -> AliasMove:
    """Step 3 of `_move`, once MLflow points the alias at `to_version`."""
    name = model_name(use_case)
    # 3. committed (a crash before this commit leaves 'pending', which a retry completes); audited by the
    # caller whose update changed the row, once (two callers of one key at once both reach here)
    try:
        with session_scope(db_url) as session:
            changed = session.execute(
                update(AliasMove)
                .where(AliasMove.id == move_id, AliasMove.status != "committed")
                .values(status="committed", error=None)
            ).rowcount
            move = session.get(AliasMove, move_id, populate_existing=True)
            if changed:
                audit.record(
                    session,
                    who.name,
                    f"alias.{action}.committed",
                    on=move,
                    details={"alias": alias, "from": move.from_version, "to": to_version},
                )
    except StateDBBusy as exc:
        # MLflow HAS moved: StateDBBusy's "nothing was written" would be false here
        raise RegistryError(
            f"MLflow moved {alias!r} of {name} to version {to_version}, but the state DB was busy (another "
            "run held SQLite's write lock), so the move is not yet recorded as done: alias_history id "
            f"{move_id} stays pending. {finish_hint(use_case, idempotency_key)}"
        ) from exc
    return move


def finish_hint(use_case: str, key: str) -> str:
    """How a pending move of idempotency key `key` is finished: its own key's retry, which the command
    that made it runs again (a promotion's, a rollback's), and nothing in MLflow."""
    kind, _, decision = key.partition(":")
    decision = decision.split(":", 1)[0]  # `promote:12:40`: decision 12's move recorded again
    command = (
        f"`sparsepilot promote {use_case} --decision {decision}` does"
        if kind in ("promote", "baseline") and decision.isdigit()
        else f"`sparsepilot rollback {use_case}` does"
        if kind == "rollback" and decision.isdigit()
        else "the command that asked for it does, run again"
    )
    return (
        f"Retry with the same idempotency key ({key!r}) to finish it ({command}); nothing needs doing in "
        "MLflow"
    )


def _refuse_while_moving(session, uc: UseCase, key: str) -> None:  # noqa: ANN001
    """MoveInProgress while another key's champion move of the use case is pending and recent: two
    rollbacks at once (the monitor's and a person's) used to commit two moves for one act."""
    since = dt.datetime.now(dt.UTC) - MOVE_IN_FLIGHT
    for other in session.scalars(
        select(AliasMove).where(
            AliasMove.use_case_id == uc.id,
            AliasMove.alias == "champion",
            AliasMove.status == "pending",
            AliasMove.idempotency_key != key,
        )
    ):
        created = as_utc(other.created_at)
        if created >= since:
            age = int((dt.datetime.now(dt.UTC) - created).total_seconds())
            raise MoveInProgress(
                f"use case {uc.name!r}: champion move {other.idempotency_key!r} by {other.actor} "
                f"(v{other.from_version} -> v{other.to_version}) is being carried out; nothing was "
                "recorded for this one, look again when it has finished. It may also have been cut off "
                f"(its run died, or the state DB was busy when it was to be recorded): pending for {age} s, "
                f"it counts as cut off once {int(MOVE_IN_FLIGHT.total_seconds() // 60)} minutes old; "
                f"{finish_hint(uc.name, other.idempotency_key)}"
            )


def set_alias(
    use_case: str,
    alias: str,
    *,
    version: str | int | None = None,
    model_version_id: int | None = None,
    **move: Unpack[MoveRequest],
) -> AliasMove:
    """Point `alias` at a registered version (by MLflow version or our ModelVersion id)."""

    def target(session, uc):  # noqa: ANN001, ANN202
        to_version = _resolve_version(session, uc, version, model_version_id)
        history = committed_moves(session, uc.id, alias)
        return to_version, (history[-1].to_version if history else None)

    return _move(use_case, alias, "set", target, **move)


def promote(
    use_case: str,
    *,
    version: str | int | None = None,
    model_version_id: int | None = None,
    **move: Unpack[MoveRequest],
) -> AliasMove:
    """champion -> the given version (default: the current challenger). The previous champion is kept
    as the move's from_version, which is what `rollback` returns to."""

    def target(session, uc):  # noqa: ANN001, ANN202
        if version is None and model_version_id is None:
            challengers = committed_moves(session, uc.id, "challenger")
            if not challengers or challengers[-1].to_version is None:
                raise RegistryError(f"use case {uc.name!r} has no challenger to promote")
            to_version = challengers[-1].to_version
        else:
            to_version = _resolve_version(session, uc, version, model_version_id)
        lineage = champions(session, uc.id)
        current = lineage[-1] if lineage else None
        if current == to_version:
            raise RegistryError(f"version {to_version} is already the champion of {uc.name!r}")
        return to_version, current

    return _move(use_case, "champion", "promote", target, **move)


def rollback(
    use_case: str,
    *,
    expected: str | None = None,
    **move: Unpack[MoveRequest],
) -> AliasMove:
    """champion -> the previous champion from our alias history (never from MLflow's state).
    `expected`: the champion version the rollback is about; refused when another serves by now."""

    def target(session, uc):  # noqa: ANN001, ANN202
        lineage = champions(session, uc.id)
        if expected is not None and lineage[-1:] != [expected]:
            now = f"v{lineage[-1]} serves" if lineage else "no champion of ours serves"
            raise RegistryError(
                f"use case {uc.name!r}: the rollback is about champion v{expected}, but {now}"
            )
        if len(lineage) < 2:
            raise RegistryError(f"use case {uc.name!r} has no previous champion to roll back to")
        return lineage[-2], lineage[-1]

    return _move(use_case, "champion", "rollback", target, **move)


def current_aliases(use_case: str) -> dict[str, str]:
    """What MLflow serves right now: alias -> version ({} when the model is not registered yet)."""
    return current_aliases_of(model_name(use_case))


def current_aliases_of(name: str) -> dict[str, str]:
    """`current_aliases` by the registered model's name."""
    from mlflow.exceptions import MlflowException

    try:
        rm = tracking.client().get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return {}
        raise
    return {str(k): str(v) for k, v in (rm.aliases or {}).items()}


def alias_history(use_case: str, *, db_url: str | None = None) -> list[dict[str, Any]]:
    """`rollout.queries.alias_moves` by use-case name, in its own transaction (times as ISO text)."""
    from rollout.queries import alias_moves

    with session_scope(db_url) as session:
        moves = alias_moves(session, _use_case(session, use_case).id)
    return [m | {"created_at": m["created_at"].isoformat() if m["created_at"] else None} for m in moves]
