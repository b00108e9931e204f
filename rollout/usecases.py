"""Add, list and show use cases. A use case is the unit of work; its spec is versioned.

`add_usecase` validates everything first (spec, model ref, dataset) and writes nothing until all of
it passed; then the use case, its spec version and the audit row commit in one transaction.

Versioning: a version's hash covers the spec's canonical content and its dataset's sha256.
- same name, same hash as the current version -> nothing to do ("unchanged"), nothing written;
- same name, different content -> refused unless the caller asks for a new version
  (``new_version=True``, ``sparsepilot usecase add FILE --new-version``);
- same content as an older version, with ``new_version`` -> that version becomes current again.
Old versions stay readable (`load_spec_version`, `show_usecase(..., version=N)`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rollout import audit, lifecycle
from rollout.audit import redacted_details
from rollout.dataset_split import kept_apart_of
from rollout.db.models import AuditEntry, SpecVersion, UseCase, UseCaseLease
from rollout.db.session import session_scope
from rollout.pilot_plan import plan_summary
from rollout.recalibration import new_version_notes, spec_changes
from rollout.redact import redacted_name
from rollout.settings import get_settings
from rollout.spec import SpecError, UseCaseSpec, load_spec, parse_spec, spec_warnings, url_credentials
from rollout.task_budget import task_bound_warnings
from rollout.validation import ValidationResult, dataset_bytes, token_counter_for, validate_dataset
from sparse_core.errors import SparsePilotError


class UseCaseError(SparsePilotError, ValueError):
    """A use case that cannot be added or found; the message names the file and field."""


class UnknownUseCase(UseCaseError, LookupError):
    """No use case of that name; one class for the whole domain (rollout.pilots re-exports it)."""


@dataclass
class AddResult:
    name: str
    status: str  # created / new_version / reverted / unchanged
    version: int
    spec_hash: str
    use_case_id: int
    dataset_path: str
    validation: dict[str, Any] = field(default_factory=dict)
    changed_fields: list[str] = field(default_factory=list)
    # what the changes mean (`rollout.recalibration.new_version_notes`): calibrating again, a schedule
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class LoadedSpec:
    """A stored spec version, ready for the flows."""

    use_case_id: int
    name: str
    version: int
    spec: UseCaseSpec
    spec_hash: str
    dataset_path: Path
    dataset_sha256: str | None
    source_dir: Path | None = None  # the spec file's folder: relative paths in the spec resolve against it


@dataclass(frozen=True)
class DatasetRow:
    id: str
    prompt: str
    reference: str | None
    tags: tuple[str, ...]


# ---------------------------------------------------------------------------------------------------
# checks that run before anything is written


def resolve_model(spec: UseCaseSpec, source: str) -> Any:
    """``sparse_core.resolve_model_ref`` (cheap: no weights). An unknown ref is an error naming the
    spec file and the ``model`` field."""
    try:
        import sparse_core
    except ImportError as exc:  # sparse_core is part of this distribution: missing means broken install
        raise UseCaseError(
            f"{source}: model: cannot check the model ref, sparse_core is unavailable ({exc})"
        ) from exc
    try:
        return sparse_core.resolve_model_ref(spec.model)
    except sparse_core.ModelRefError as exc:
        raise UseCaseError(f"{source}: model: {exc}") from None


def check_against_model(spec: UseCaseSpec, info: Any, source: str) -> None:
    ctx = getattr(info, "context_length", None)
    if not ctx:
        return
    longest = spec.traffic.prompt_tokens.max() + spec.traffic.output_tokens.max()
    if longest > ctx:
        raise UseCaseError(
            f"{source}: traffic.prompt_tokens: the longest prompt ({spec.traffic.prompt_tokens.max()}) plus "
            f"output ({spec.traffic.output_tokens.max()}) tokens exceed the model's context ({ctx})"
        )
    max_seq_len = spec.quality_budget.calibration.max_seq_len
    if max_seq_len > ctx:
        raise UseCaseError(
            f"{source}: quality_budget.calibration.max_seq_len: {max_seq_len} "
            f"exceeds the model's context ({ctx})"
        )


@dataclass
class CheckedSpec:
    spec: UseCaseSpec
    source_path: Path
    dataset_source: Path
    dataset: bytes = field(repr=False)  # the file's bytes as validated: hashed and stored as they are
    dataset_sha256: str
    spec_hash: str
    validation: ValidationResult
    context_length: int | None


def check_spec_file(path: Path | str) -> CheckedSpec:
    """Everything `add_usecase` checks before it writes: spec, model ref, dataset. Raises
    SpecError / UseCaseError / DataValidationError with messages naming file, row and field."""
    path = Path(path)
    spec = load_spec(path).with_model_resolved(path.resolve().parent)
    source = str(path)
    secrets_in_urls = [  # checked when a spec is added, never when a stored one is read
        (f"pilot.arms.{arm}.url", f"holds {secret}, which looks like a credential; a spec is stored for "
         "good and shown to every viewer: put the key in an environment variable and name it in api_key_env")
        for arm in ("control", "treatment")
        if (secret := url_credentials(getattr(spec.pilot.arms, arm).url or ""))
    ]  # fmt: skip
    if secrets_in_urls:
        raise SpecError(source, secrets_in_urls)
    dataset = spec.dataset_path(path.resolve().parent)
    if not dataset.is_file():
        what = "is a directory, not a file" if dataset.is_dir() else "does not exist"
        raise UseCaseError(f"{source}: dataset.path: {spec.dataset.path!r} {what} (looked for {dataset})")
    info = resolve_model(spec, source)
    check_against_model(spec, info, source)
    counter, counted_by = token_counter_for(getattr(info, "path", None))
    data = dataset_bytes(dataset)  # read once: validated, hashed and stored, never read again
    result = validate_dataset(
        dataset,
        spec,
        context_length=getattr(info, "context_length", None),
        count_tokens=counter,
        token_source=counted_by,
        data=data,
    )
    result.raise_for_failures()
    if spec.rollout.traffic_source.kind == "request-log":
        result.stats.update(check_request_log(spec, path.resolve().parent, source))
    result.warnings.extend(f"{field}: {message}" for field, message in spec_warnings(spec))
    stats = result.stats
    result.warnings.extend(f"{field}: {message}" for field, message in task_bound_warnings(spec, stats))
    result.warnings.extend(
        plan_summary(spec, dataset_rows=stats.get("rows"), kept_apart=stats.get("kept_apart"))["warnings"]
    )
    sha = hashlib.sha256(data).hexdigest()
    return CheckedSpec(
        spec=spec,
        source_path=path.resolve(),
        dataset_source=dataset,
        dataset=data,
        dataset_sha256=sha,
        spec_hash=spec.content_hash(sha),
        validation=result,
        context_length=getattr(info, "context_length", None),
    )


def check_request_log(spec: UseCaseSpec, spec_dir: Path, source: str) -> dict[str, int]:
    """The spec's request log, read once as the pilot will read it (streamed): it must exist and every
    line must be a request, else a UseCaseError naming `rollout.traffic_source.path` and each bad line
    (path:line, up to MAX_LISTED). Returns what it holds, for the version's validation stats."""
    from rollout.traffic import TrafficError
    from rollout.traffic.base import request_log_path
    from rollout.traffic.request_log import RequestLogSource

    where = f"{source}: rollout.traffic_source.path"
    log = request_log_path(spec, spec_dir)
    try:
        found = RequestLogSource(log, salt="usecase-add").check()
    except TrafficError as exc:
        raise UseCaseError(f"{where}: {exc}") from None
    except OSError as exc:
        raise UseCaseError(f"{where}: {log}: cannot read the file ({exc.strerror or exc})") from None
    if found.bad_lines:
        more = found.bad_lines - len(found.problems)
        raise UseCaseError(
            "\n".join(
                [f"{where}: {found.bad_lines} bad line(s) in the request log:", *found.problems]
                + ([f"... and {more} more"] if more else [])
            )
        )
    if not found.requests:
        raise UseCaseError(f"{where}: {log} holds no requests")
    return {"request_log_requests": found.requests, "request_log_distinct_prompts": found.distinct_prompts}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _store_dataset(data: bytes, sha: str) -> Path:
    """Content-addressed copy under SPARSEPILOT_HOME/datasets of the bytes validated and hashed (never the
    source file read again: another writer may have changed it since): immutable, so any version stays
    usable. Written via a temp file + rename, so a crash never leaves a partial file under the final name."""
    root = get_settings().home / "datasets"
    root.mkdir(parents=True, exist_ok=True)
    dst = root / f"{sha}.jsonl"
    if not dst.is_file() or _sha256(dst) != sha:
        tmp = root / f".{sha}.tmp"
        tmp.write_bytes(data)
        tmp.replace(dst)
    return dst


# ---------------------------------------------------------------------------------------------------
# writes


def add_usecase(
    path: Path | str, *, actor: str, new_version: bool = False, url: str | None = None
) -> AddResult:
    """Validate ``path`` (spec, model ref, dataset), then store it in one transaction with its audit
    entry. Raises SpecError / UseCaseError / DataValidationError; on any error nothing is stored."""
    checked = check_spec_file(path)
    try:
        return _write(checked, str(path), actor=actor, new_version=new_version, url=url)
    except IntegrityError:
        # Two writers raced on the same name/version; the transaction rolled back whole.
        raise UseCaseError(
            f"{path}: name: use case {checked.spec.name!r} was changed concurrently; nothing stored, retry"
        ) from None


def _write(checked: CheckedSpec, source: str, *, actor: str, new_version: bool, url: str | None) -> AddResult:
    spec = checked.spec
    spec_dict = spec.to_dict()
    with session_scope(url) as s:
        uc = s.scalar(select(UseCase).where(UseCase.name == spec.name))
        if uc is not None:
            versions = list(s.scalars(select(SpecVersion).where(SpecVersion.use_case_id == uc.id)))
            current = next(v for v in versions if v.version == uc.current_spec_version)
            same = next((v for v in versions if v.spec_hash == checked.spec_hash), None)
            if same is not None and same.version == current.version:
                return _result(uc, same, "unchanged", checked)
            changed = spec_changes(current.spec, current.dataset_sha256, spec_dict, checked.dataset_sha256)
            if not new_version:
                what = f"identical to its version {same.version}" if same else "different"
                raise UseCaseError(
                    f"{source}: name: use case {spec.name!r} already exists (current version "
                    f"{current.version}) and this spec is {what} (changed: {', '.join(changed) or '-'}); "
                    "re-run with --new-version to make it the current version"
                )
            if same is not None:  # back to an older version's content
                uc.current_spec_version = same.version
                uc.owner, uc.criticality = spec.owner, spec.criticality
                audit.record(
                    s,
                    actor,
                    "usecase.revert_version",
                    on=same,
                    details={"from_version": current.version, "to_version": same.version, "changed": changed},
                )
                return _result(uc, same, "reverted", checked, changed)
            version = max(v.version for v in versions) + 1
            sv = _new_version(s, uc, version, checked, spec_dict, actor)
            uc.current_spec_version = version
            uc.owner, uc.criticality = spec.owner, spec.criticality
            s.flush()
            audit.record(
                s,
                actor,
                "usecase.new_version",
                on=sv,
                details={
                    "version": version,
                    "previous_version": current.version,
                    "spec_hash": checked.spec_hash,
                    "changed": changed,
                    "source_path": str(checked.source_path),
                },
            )
            return _result(uc, sv, "new_version", checked, changed)

        uc = UseCase(name=spec.name, owner=spec.owner, criticality=spec.criticality, current_spec_version=1)
        s.add(uc)
        s.flush()
        s.add(UseCaseLease(use_case_id=uc.id))  # free; a run takes it by updating (rollout.leases)
        sv = _new_version(s, uc, 1, checked, spec_dict, actor)
        audit.record(
            s,
            actor,
            "usecase.add",
            on=sv,
            details={
                "version": 1,
                "spec_hash": checked.spec_hash,
                "source_path": str(checked.source_path),
                "model": spec.model,
                "dataset_rows": checked.validation.stats.get("rows"),
            },
        )
        return _result(uc, sv, "created", checked)


def _new_version(
    s: Any, uc: UseCase, version: int, checked: CheckedSpec, spec_dict: dict, actor: str
) -> SpecVersion:
    stored = _store_dataset(checked.dataset, checked.dataset_sha256)
    sv = SpecVersion(
        use_case_id=uc.id,
        version=version,
        spec=spec_dict,
        spec_hash=checked.spec_hash,
        source_path=str(checked.source_path),
        dataset_path=str(stored),
        dataset_sha256=checked.dataset_sha256,
        dataset_rows=int(checked.validation.stats.get("rows", 0)),
        validation=checked.validation.to_dict() | {"dataset_source": str(checked.dataset_source)},
        created_by=actor,
    )
    s.add(sv)
    s.flush()
    return sv


def _result(
    uc: UseCase, sv: SpecVersion, status: str, checked: CheckedSpec, changed: list[str] | None = None
) -> AddResult:
    return AddResult(
        name=uc.name,
        status=status,
        version=sv.version,
        spec_hash=sv.spec_hash,
        use_case_id=uc.id,
        dataset_path=sv.dataset_path or "",
        validation=checked.validation.to_dict(),
        changed_fields=changed or [],
        notes=new_version_notes(uc.name, changed or [], ended=uc.phase in lifecycle.ENDED_PHASES),
    )


# ---------------------------------------------------------------------------------------------------
# reads


def _with_current_version(*columns: Any) -> Any:
    """SELECT columns of each use case joined with its current spec version, by name."""
    current = (SpecVersion.use_case_id == UseCase.id) & (SpecVersion.version == UseCase.current_spec_version)
    return select(*columns).select_from(UseCase).join(SpecVersion, current).order_by(UseCase.name)


def list_usecases(url: str | None = None) -> list[dict[str, Any]]:
    with session_scope(url) as s:
        counts = dict(
            s.execute(select(SpecVersion.use_case_id, func.count()).group_by(SpecVersion.use_case_id)).all()
        )
        rows = s.execute(_with_current_version(UseCase, SpecVersion)).all()
        return [
            {
                "name": uc.name,
                "owner": uc.owner,
                "criticality": uc.criticality,
                "phase": uc.phase,
                "version": uc.current_spec_version,
                "versions": int(counts.get(uc.id, 0)),
                "model": sv.spec.get("model"),
                "task": (sv.spec.get("dataset") or {}).get("task"),
                "requests": sv.dataset_rows,
                "requests_per_day": (sv.spec.get("traffic") or {}).get("requests_per_day"),
                "spec_hash": sv.spec_hash,
                "updated_at": uc.updated_at,
            }
            for uc, sv in rows
        ]


def show_usecase(name: str, *, version: int | None = None, url: str | None = None) -> dict[str, Any]:
    from rollout.leases import working_now  # leases reads use cases through this module

    with session_scope(url) as s:
        uc = get_use_case(s, name)
        versions = list(
            s.scalars(
                select(SpecVersion).where(SpecVersion.use_case_id == uc.id).order_by(SpecVersion.version)
            )
        )
        wanted = version or uc.current_spec_version
        sv = next((v for v in versions if v.version == wanted), None)
        if sv is None:
            known = ", ".join(str(v.version) for v in versions)
            raise UnknownUseCase(f"use case {name!r} has no version {wanted} (versions: {known})")
        history = s.scalars(
            select(AuditEntry).where(AuditEntry.use_case_id == uc.id).order_by(AuditEntry.id.desc()).limit(20)
        ).all()
        return {
            "name": uc.name,
            "owner": uc.owner,
            "criticality": uc.criticality,
            "phase": uc.phase,
            "current_version": uc.current_spec_version,
            "created_at": uc.created_at,
            "updated_at": uc.updated_at,
            "version": sv.version,
            "spec_hash": sv.spec_hash,
            "spec": sv.spec,
            "source_path": sv.source_path,
            "dataset_path": sv.dataset_path,
            "dataset_sha256": sv.dataset_sha256,
            "dataset_rows": sv.dataset_rows,
            "validation": sv.validation,
            "working_now": working_now(s, uc.id),
            **_plan_shown(s, uc, sv, default_version=version is None),
            **_pilots_and_budget(s, uc, next(v for v in versions if v.version == uc.current_spec_version)),
            "monitor": _monitor_state(s, uc),
            "waits_for": _waits_for(s, uc),
            "versions": [
                {
                    "version": v.version,
                    "spec_hash": v.spec_hash,
                    "created_by": v.created_by,
                    "created_at": v.created_at,
                    "source_path": v.source_path,
                    "current": v.version == uc.current_spec_version,
                }
                for v in versions
            ],
            "audit": [
                # redacted as the Audit page shows them: a row stored before details were stored redacted
                {
                    "ts": e.ts,
                    "actor": redacted_name(e.actor),
                    "action": e.action,
                    "details": redacted_details(e.details),
                }
                for e in history
            ],
        }


def names(url: str | None = None) -> list[str]:
    with session_scope(url) as s:
        return list(s.scalars(select(UseCase.name).order_by(UseCase.name)))


# The automation's names a spec version may be created by (the main job adding the samples); rows from
# before the pipeline had one name say "sparsepilot-flow" or "sparsepilot-run" (rollout.audit).
AUTOMATION_ACTORS = frozenset({audit.SYSTEM_ACTOR, "sparsepilot-flow", "sparsepilot-run"})


def added_by_people(wanted: list[str], url: str | None = None) -> list[str]:
    """Of ``wanted``, the use cases that exist and have a spec version a person added (`usecase add`:
    an operator's), as opposed to the samples the main job adds for itself: piloting and gating those
    needs an operator, whoever starts it (`sparsepilot run --use-case`). An unmigrated state DB has
    none."""
    from sqlalchemy import inspect

    with session_scope(url) as s:
        if not wanted or not inspect(s.connection()).has_table(UseCase.__tablename__):
            return []
        found = s.scalars(
            select(UseCase.name)
            .join(SpecVersion, SpecVersion.use_case_id == UseCase.id)
            .where(UseCase.name.in_(wanted), SpecVersion.created_by.not_in(AUTOMATION_ACTORS))
            .distinct()
        ).all()
    return [n for n in wanted if n in set(found)]


def run_started(wanted: list[str], actor: str, url: str | None = None) -> int:
    """A `run.started` audit entry on each of ``wanted`` that exists, naming ``actor``: the operator
    who signed in for `sparsepilot run` (a person's use cases are then piloted and gated as theirs,
    `flows.main_job.pilot_actor`; the samples as the pipeline's). Returns how many entries were written."""
    with session_scope(url) as s:
        found = s.scalars(select(UseCase).where(UseCase.name.in_(wanted)).order_by(UseCase.name)).all()
        for uc in found:
            audit.record(s, actor, "run.started", on=uc, details={"command": "sparsepilot run"})
    return len(found)


def not_added(wanted: list[str], url: str | None = None) -> list[str]:
    """Of ``wanted``, the names no use case has yet (all of them on an unmigrated state DB): what
    `sparsepilot run --specs DIR` would add from the folder's specs."""
    from sqlalchemy import inspect

    with session_scope(url) as s:
        if not wanted or not inspect(s.connection()).has_table(UseCase.__tablename__):
            return list(wanted)
        found = set(s.scalars(select(UseCase.name).where(UseCase.name.in_(wanted))).all())
    return [n for n in wanted if n not in found]


def phase_of(name: str, url: str | None = None) -> str:
    """The use case's phase (rollout.lifecycle)."""
    with session_scope(url) as s:
        return get_use_case(s, name).phase


def _current_specs(url: str | None) -> list[tuple[str, UseCaseSpec, int]]:
    """(name, parsed current spec, its version) of every use case, by name."""
    with session_scope(url) as s:
        rows = s.execute(_with_current_version(UseCase.name, SpecVersion.spec, SpecVersion.version)).all()
    return [
        (name, parse_spec(spec, source=f"{name} spec v{version}"), version) for name, spec, version in rows
    ]


def schedules(wanted: list[str] | None = None, url: str | None = None) -> list[dict[str, Any]]:
    """(use case, cron, timezone) for every use case (or those `wanted`) whose current spec has a
    schedule; an unknown name in `wanted` is an error naming the known ones."""
    rows = _current_specs(url)
    known = {name for name, _, _ in rows}
    for n in wanted or []:
        if n not in known:
            raise UnknownUseCase(f"unknown use case {n!r} (known: {', '.join(sorted(known)) or 'none'})")
    return [
        {"use_case": name, "cron": spec.schedule.cron, "timezone": spec.schedule.timezone}
        for name, spec, _ in rows
        if spec.schedule is not None and (not wanted or name in wanted)
    ]


def unscheduled(url: str | None = None) -> dict[str, int]:
    """Use case -> current spec version, for every use case whose current spec has no schedule (its cycle
    must not run on a cron any more, whatever an earlier version said)."""
    return {name: version for name, spec, version in _current_specs(url) if spec.schedule is None}


def get_use_case(s: Any, name: str) -> UseCase:
    """The use case row by name; UnknownUseCase naming the known ones otherwise."""
    uc = s.scalar(select(UseCase).where(UseCase.name == name))
    if uc is None:
        known = ", ".join(s.scalars(select(UseCase.name).order_by(UseCase.name))) or "none yet"
        raise UnknownUseCase(
            f"unknown use case {name!r} (known: {known}); add it with `sparsepilot usecase add`"
        )
    return uc


def require_use_case(name: str, *, url: str | None = None) -> None:
    """UnknownUseCase unless `name` is a use case."""
    with session_scope(url) as s:
        get_use_case(s, name)


def load_spec_version(name: str, version: int | None = None, *, url: str | None = None) -> LoadedSpec:
    """The stored spec (current version unless given), re-validated into a UseCaseSpec."""
    with session_scope(url) as s:
        uc = get_use_case(s, name)
        sv = _version_of(s, uc, version)
        wanted = sv.version
        try:
            spec = UseCaseSpec.model_validate(sv.spec)
        except Exception as exc:  # noqa: BLE001 - a stored spec that no longer parses is a hard error
            raise UseCaseError(
                f"use case {name!r} version {wanted}: stored spec no longer validates: {exc}"
            ) from exc
        dataset = (
            Path(sv.dataset_path)
            if sv.dataset_path
            else spec.dataset_path(Path(sv.source_path or ".").parent)
        )
        source_dir = Path(sv.source_path).parent if sv.source_path else None
        return LoadedSpec(
            uc.id, uc.name, sv.version, spec, sv.spec_hash, dataset, sv.dataset_sha256, source_dir
        )


def _version_of(s: Session, uc: UseCase, version: int | None = None) -> SpecVersion:
    """A stored spec version of the use case (default: the current one); UnknownUseCase if none."""
    wanted = version or uc.current_spec_version
    sv = s.scalar(select(SpecVersion).where(SpecVersion.use_case_id == uc.id, SpecVersion.version == wanted))
    if sv is None:
        raise UnknownUseCase(f"use case {uc.name!r} has no version {wanted}")
    return sv


def _planned_pilot(s: Session, uc: UseCase, sv: SpecVersion) -> tuple[int | None, float]:
    from rollout.pilots import planned_pilot  # rollout.pilots builds on this module

    return planned_pilot(s, uc, sv.spec.get("gate") or {}, sv.version)


def _pilots_and_budget(s: Session, uc: UseCase, current: SpecVersion) -> dict[str, Any]:
    """The use case's pilots, their steps' void requests (`queries.step_voids`) and its false-GO budget
    under the current spec (rollout.gate.spending)."""
    from rollout.gate.spending import account

    # rollout.queries builds on rollout.pilots, which builds on this module
    from rollout.queries import pilot_history, step_voids

    pilots = pilot_history(s, uc.id)
    return {
        "pilots": pilots,
        "void_requests": step_voids(s, uc.id),  # per step: used, never evidence (a reference-free use case)
        "alpha_budget": account(current.spec.get("gate") or {}, (p["go_alpha"] for p in pilots)),
    }


def _waits_for(s: Session, uc: UseCase) -> str:
    """What the use case waits for, in the portfolio's words (rollout.queries.waits_for): after an abort,
    the command that pilots its challenger again, which `usecase show` named nowhere."""
    from rollout.queries import portfolio  # builds on this module, as above

    return portfolio(s, use_case_id=uc.id)[0]["waits_for"]


def _monitor_state(s: Session, uc: UseCase) -> str | None:
    """When the promoted champion's monitor last looked, for people (rollout.queries.monitor_state)."""
    from rollout.queries import describe_monitor_state, monitor_state  # builds on this module, as above

    return describe_monitor_state(monitor_state(s, uc.id))


def _plan_shown(s: Session, uc: UseCase, sv: SpecVersion, *, default_version: bool) -> dict[str, Any]:
    """`usecase show`'s `pilot_plan` and `running_pilot`. Without `--version` (`default_version`), as the
    use-case page: a pilot running under an earlier spec version than the current is planned as itself,
    under its own version and GO level (`rollout.queries.running_pilot`), and `running_pilot` says so
    and what the current version applies to (`describe_running_pilot`); it used to plan only the next
    pilot, under the current version. Else (or with `--version N`) the plan of the version shown, for
    the pilot it is for (`_planned_pilot`)."""
    # rollout.queries builds on rollout.pilots, which builds on this module
    from rollout.queries import describe_running_pilot, running_pilot

    planned = _planned_pilot(s, uc, sv)
    running = running_pilot(s, uc, sv.version) if default_version else None
    if running is None:
        return {"pilot_plan": _plan_of_stored(sv, planned=planned, with_monitor=True), "running_pilot": None}
    plan = _plan_of(
        running["spec"],
        running["dataset_rows"],
        running["kept_apart"],
        planned=running["planned_pilot"],
        with_monitor=True,
    )
    return {
        "pilot_plan": plan,
        "running_pilot": {
            "pilot_number": running["pilot_number"],
            "status": running["status"],
            "spec_version": running["spec_version"],
            "go_alpha": running["planned_pilot"][1],
            "note": describe_running_pilot(running, sv.version, planned),
        },
    }


def _plan_of_stored(
    sv: SpecVersion,
    approval_after: int | None = None,
    *,
    planned: tuple[int | None, float],
    with_monitor: bool = False,
) -> dict[str, Any] | None:
    """The pilot plan of a stored spec version, for the use case's pilot `planned` (its number and GO
    level, `_planned_pilot`; `with_monitor`: and how fast the monitor reacts after promotion); None for a
    stored spec that no longer validates (the flows refuse it with the reason, see load_spec_version)."""
    return _plan_of(
        sv.spec,
        sv.dataset_rows,
        kept_apart_of(sv.validation),
        approval_after,
        planned=planned,
        with_monitor=with_monitor,
    )


def _plan_of(
    stored: dict[str, Any],
    dataset_rows: int | None,
    kept_apart: int | None,
    approval_after: int | None = None,
    *,
    planned: tuple[int | None, float],
    with_monitor: bool = False,
) -> dict[str, Any] | None:
    """`_plan_of_stored` of a stored spec's parts (its spec, dataset rows and kept-apart rows)."""
    try:
        spec = UseCaseSpec.model_validate(stored)
    except ValueError:  # pydantic's ValidationError
        return None
    return plan_summary(
        spec,
        dataset_rows=dataset_rows,
        kept_apart=kept_apart,
        approval_after=approval_after,
        pilot_number=planned[0],
        go_alpha=planned[1],
        with_monitor=with_monitor,
    )


def pilot_plan_of(
    name: str, *, approval_after: int | None = None, url: str | None = None
) -> dict[str, Any] | None:
    """What the use case's active (else next) pilot takes before its approval (rollout.pilot_plan), with
    the dataset's distinct requests where the dataset is the traffic source: under the current spec
    version, or an active pilot's own where it runs under an earlier one (`rollout.queries.running_pilot`,
    as `usecase show` and the use-case page plan it)."""
    from rollout.queries import running_pilot  # builds on this module, as in _plan_shown

    with session_scope(url) as s:
        uc = get_use_case(s, name)
        sv = _version_of(s, uc)
        running = running_pilot(s, uc, sv.version)
        if running is None:
            plan = _plan_of_stored(sv, approval_after, planned=_planned_pilot(s, uc, sv))
        else:
            parts = (running["spec"], running["dataset_rows"], running["kept_apart"], approval_after)
            plan = _plan_of(*parts, planned=running["planned_pilot"])
    return None if plan is None else {"use_case": name, **plan}


def dataset_rows(loaded: LoadedSpec) -> list[DatasetRow]:
    """The version's dataset rows; refuses a file whose content changed since it was validated (the bytes
    read once, hashed and parsed: never a second read that another writer may have changed)."""
    from rollout.validation import read_dataset

    if not loaded.dataset_path.is_file():
        raise UseCaseError(
            f"use case {loaded.name!r} v{loaded.version}: dataset {loaded.dataset_path} is missing"
        )
    try:  # read once: the bytes hashed are the bytes read (the file may change between two reads)
        data = loaded.dataset_path.read_bytes()
    except OSError as exc:
        raise UseCaseError(
            f"use case {loaded.name!r} v{loaded.version}: dataset {loaded.dataset_path} cannot be read "
            f"({exc.strerror or exc})"
        ) from None
    if loaded.dataset_sha256 and hashlib.sha256(data).hexdigest() != loaded.dataset_sha256:
        raise UseCaseError(
            f"use case {loaded.name!r} v{loaded.version}: dataset {loaded.dataset_path} changed since it was "
            "validated (sha256 differs); add the spec again with --new-version"
        )
    rows, failures, _ = read_dataset(loaded.dataset_path, data)
    if failures:
        raise UseCaseError("\n".join(f.describe(str(loaded.dataset_path)) for f in failures))
    return [
        DatasetRow(i, p, r, tuple(t))
        for i, p, r, t in zip(rows.id, rows.prompt, rows.reference, rows.tags, strict=True)
    ]


__all__ = [
    "AddResult",
    "CheckedSpec",
    "DatasetRow",
    "LoadedSpec",
    "SpecError",
    "UnknownUseCase",
    "UseCaseError",
    "add_usecase",
    "check_spec_file",
    "dataset_rows",
    "list_usecases",
    "load_spec_version",
    "show_usecase",
]
