"""Pilot state transitions: the only place that creates pilots and steps, stores observations and gate
decisions, and moves a use case between phases. Flows call these inside `session_scope()`; every write is
keyed so that a retried task finds its earlier row instead of writing a second one."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from rollout import audit
from rollout.db.models import (
    AuditEntry,
    GateDecision,
    ModelVersion,
    Observation,
    Pilot,
    PilotStep,
    SpecVersion,
    UseCase,
    VoidRequest,
    utcnow,
)
from rollout.gate.spending import DEFAULT_ALPHA, DEFAULT_SPENDING, pilot_alpha, spent
from rollout.lifecycle import set_phase
from rollout.usecases import get_use_case  # noqa: F401 - callers ask pilots for the row; one implementation
from rollout.words import counted
from sparse_core.errors import SparsePilotError

if TYPE_CHECKING:
    import pandas as pd

OBSERVATION_FIELDS = ("request_id", "arm", "quality", "latency_ms", "tokens", "error", "overloaded")
ACTIVE_PILOT = ("running", "awaiting_approval")
# "replaced": promoted once, then another promotion took its model out of the champions in force
ENDED_PILOT = ("stopped", "promoted", "rolled_back", "replaced")


def pilot_again(name: str) -> str:
    """What starts a pilot again once a challenger's pilot ended NO-GO, rejected, promoted or rolled back:
    that challenger is not piloted again, and a challenger is a plan (the registry keeps one model version
    per plan hash), so `calibrate` alone, or a new spec version whose calibration finds the same plan,
    returns the same challenger. What `rollout.pilot_batches` refuses it in, and a rejection's message
    says (pure)."""
    return (
        "a new pilot needs another plan: a new spec version whose quality budget or estimator calibrates "
        f"one (`sparsepilot usecase add SPEC --new-version`), then `sparsepilot calibrate {name}` (a "
        "calibration that finds the same plan returns the same challenger)"
    )


def pilot_aborted_again(name: str) -> str:
    """The way on after an operator aborted the pilot (data not trusted, a serving system's wrong split):
    its challenger may be piloted again by a person (`rollout.pilot_batches.start_again`, docs/gate.md
    "Across a use case's pilots"), or another plan piloted (pure)."""
    return (
        f"`sparsepilot pilot {name} --again --reason TEXT` pilots its challenger again (a new pilot, whose "
        f"GO is held to the next, smaller level); or {pilot_again(name)}"
    )


class PilotStateError(SparsePilotError, RuntimeError):
    """The requested transition does not fit the stored state (names the use case and state)."""


# --- lookups ---------------------------------------------------------------------------------------


def current_spec_version(session: Session, use_case: UseCase) -> SpecVersion:
    sv = session.scalar(
        select(SpecVersion).where(
            SpecVersion.use_case_id == use_case.id, SpecVersion.version == use_case.current_spec_version
        )
    )
    if sv is None:
        raise PilotStateError(
            f"use case {use_case.name!r} has no spec version {use_case.current_spec_version}"
        )
    return sv


def load_current_spec(session: Session, use_case: UseCase) -> tuple[Any, SpecVersion]:
    """The validated spec object of the use case's current version, and its row."""
    from rollout.spec import parse_spec

    sv = current_spec_version(session, use_case)
    return parse_spec(sv.spec, source=f"{use_case.name} spec v{sv.version}"), sv


def load_pilot_spec(session: Session, pilot: Pilot) -> tuple[Any, SpecVersion]:
    """The spec a pilot runs under: the version it started with. A new spec version applies to the
    next pilot, never to one that is running (its gate would judge old evidence by new rules)."""
    from rollout.spec import parse_spec

    version = pilot.spec_version
    if version is None:  # a pilot from before migration 0003 was given its version there; defensive
        uc = session.get(UseCase, pilot.use_case_id)
        return load_current_spec(session, uc)
    sv = session.scalar(
        select(SpecVersion).where(
            SpecVersion.use_case_id == pilot.use_case_id, SpecVersion.version == version
        )
    )
    if sv is None:
        raise PilotStateError(f"{pilot_label(pilot)} runs under spec version {version}, which does not exist")
    return parse_spec(sv.spec, source=f"spec v{sv.version} ({pilot_label(pilot)})"), sv


def load_step_spec(session: Session, step_id: int) -> tuple[Any, SpecVersion]:
    """`load_pilot_spec` for the pilot of a step."""
    step = session.get(PilotStep, step_id)
    if step is None:
        raise PilotStateError(f"pilot step {step_id} does not exist")
    return load_pilot_spec(session, session.get(Pilot, step.pilot_id))


def active_pilot(session: Session, use_case: UseCase) -> Pilot | None:
    return session.scalar(
        select(Pilot)
        .where(Pilot.use_case_id == use_case.id, Pilot.status.in_(ACTIVE_PILOT))
        .order_by(Pilot.id.desc())
    )


def locked(session: Session, use_case_id: int, pilot_id: int | None) -> tuple[UseCase, Pilot | None]:
    """The use case and pilot re-read and locked for a read-check-write of the pilot's state: PostgreSQL
    locks the rows (use case first, the order every writer of a pilot's state takes), SQLite holds its
    write lock from the transaction's start (`session_scope(immediate=True)`, which the caller opens).
    What another transaction committed since this session read the rows is what the caller sees."""
    uc = session.get(UseCase, use_case_id, with_for_update=True, populate_existing=True)
    pilot = None
    if pilot_id is not None:
        pilot = session.get(Pilot, pilot_id, with_for_update=True, populate_existing=True)
    return uc, pilot


def held_for_observations(session: Session, use_case_id: int, pilot_id: int) -> tuple[UseCase, Pilot]:
    """The use case and pilot re-read and held against a change of the pilot's state while observations
    are written into it (a batch, an import, a monitor file). PostgreSQL: a key-share lock on the use case
    row, then a share lock on the pilot row (use case first, as `locked`), so a writer of the pilot's
    state (an abort, a gate look, an approval: `locked`'s exclusive locks) waits for this transaction to
    end, and this one for it; writers of observations do not wait for each other, nor do rows that only
    name the use case (an audit entry), so an import that holds these for minutes blocks no audit writer.
    SQLite holds its write lock from the transaction's start (`session_scope(immediate=True)`, which the
    caller opens). Check what you hold with `observations_refused`."""
    shared = {"read": True, "key_share": True}
    uc = session.get(UseCase, use_case_id, with_for_update=shared, populate_existing=True)
    pilot = session.get(Pilot, pilot_id, with_for_update={"read": True}, populate_existing=True)
    return uc, pilot


def held_for_a_start(session: Session, use_case_id: int) -> UseCase:
    """The use case re-read and held against another start of its pilot, before the caller looks for an
    active pilot and starts one if there is none (`rollout.pilot_batches.ensure_pilot_in`): two first
    imports at once take turns, and the second finds the pilot the first started. PostgreSQL: ``FOR NO
    KEY UPDATE`` on the use case row (what the start's own update of the row takes anyway), so observation
    writers' key-share locks (`held_for_observations`) and rows that only name the use case (an audit
    entry) do not wait for it; `locked`'s writers do, as for any writer of the pilot's state. Use case
    first, as `locked`. SQLite: nothing here; the caller holds the write lock from its start
    (`session_scope(immediate=True)`: an import, `pilot_batches.ensure_pilot`)."""
    return session.get(UseCase, use_case_id, with_for_update={"key_share": True}, populate_existing=True)


def observations_refused(pilot: Pilot, step: PilotStep) -> str | None:
    """Why `step` of `pilot` takes no observations now, said as what happened ("pilot 1 was aborted"),
    or None while it does: a ramp step while the pilot runs and the step is its current, open one. The
    monitor step always does: a batch the monitor answered while a person rolled the champion back is
    kept, and its look is recorded as superseded (`rollout.decisions.monitor_look`), not lost (pure)."""
    label = pilot_label(pilot)
    if step.kind == "monitor":
        return None
    if step.status == "aborted":
        return f"{label} was aborted"
    if pilot.status != "running":
        return f"{label} is {pilot.status.replace('_', ' ')}"
    if step.index != pilot.current_step_index or step.status != "running":
        return f"{label} has left step {step.index} ({step.status}) for step {pilot.current_step_index}"
    return None


def promoted_pilot(session: Session, use_case: UseCase) -> Pilot | None:
    """The pilot whose challenger serves as champion now (the monitor samples it, a rollback ends it):
    the newest "promoted" one. Each promotion leaves "promoted" only the pilots whose champion a rollback
    can return to (`replaced_by_promotion`), so after a rollback the one before serves again, or none."""
    return session.scalar(
        select(Pilot)
        .where(Pilot.use_case_id == use_case.id, Pilot.status == "promoted")
        .order_by(Pilot.id.desc())
    )


def replaced_by_promotion(champions: Sequence[str], earlier: Iterable[tuple[int, str | None]]) -> list[int]:
    """Of the earlier promoted pilots, (id, MLflow version), those a promotion to `champions[-1]` replaced
    (pure): their version serves now as the new pilot's, or has left the champions in force (promoting a
    version under the top pops the one above it, `registry.champion_lineage`). Those left, under the top,
    are where rollbacks return to, newest first. Left "promoted", a replaced pilot was taken for the
    champion's once the pilot promoted over it was rolled back, while the dense baseline served."""
    under = set(champions[:-1])
    return [pilot_id for pilot_id, version in earlier if version not in under]


def replace_earlier(
    session: Session, pilot: Pilot, champions: Sequence[str], *, actor: str, reason: str
) -> None:
    """`pilot` was promoted and `champions` (oldest first) are in force: the earlier promoted pilots it
    replaced (`replaced_by_promotion`) become "replaced", each audited. Nothing moves where its version does
    not serve as the top champion (a record written otherwise: left for a person)."""
    version = session.scalar(
        select(ModelVersion.mlflow_version).where(ModelVersion.id == pilot.model_version_id)
    )
    if version is None or list(champions[-1:]) != [version]:
        return
    earlier = session.execute(
        select(Pilot, ModelVersion.mlflow_version)
        .join(ModelVersion, ModelVersion.id == Pilot.model_version_id)
        .where(Pilot.use_case_id == pilot.use_case_id, Pilot.status == "promoted", Pilot.id != pilot.id)
    ).all()
    by_id = {p.id: p for p, _ in earlier}
    for pilot_id in replaced_by_promotion(champions, [(p.id, v) for p, v in earlier]):
        stop_pilot(session, by_id[pilot_id], status="replaced", actor=actor, reason=reason)


def latest_pilot(session: Session, use_case: UseCase) -> Pilot | None:
    return session.scalar(select(Pilot).where(Pilot.use_case_id == use_case.id).order_by(Pilot.id.desc()))


def was_aborted(session: Session, pilot: Pilot) -> bool:
    """Whether an operator aborted this ended pilot (`abort_pilot`'s `pilot.abort` audit entry), or its
    approved promotion was abandoned by an earlier build when its move went stale (`promotion.superseded`;
    now it is promoted over the champion serving: `approvals.promotion_moves`), rather than a NO-GO, a
    rejection or a new challenger stopping it."""
    if pilot.status != "stopped":
        return False
    found = session.scalar(
        select(AuditEntry.id).where(
            AuditEntry.action.in_(("pilot.abort", "promotion.superseded")),
            AuditEntry.entity == audit.ENTITIES[Pilot.__tablename__],
            AuditEntry.entity_id == str(pilot.id),
        )
    )
    return found is not None


SUPERSEDED = "superseded by a new challenger"  # why `start_pilot` stops another plan's active pilot
RECALIBRATES = "recalibrates this use case"


def recalibrated(version: int) -> str:
    """Why a calibration stopped the running pilot of a plan spec version `version` left uncalibrated
    (`rollout.runs.stop_uncalibrated_pilot`); like a supersession, it judged nothing (`plan_ended`)."""
    return f"spec v{version} {RECALIBRATES}"


def _judged_nothing(reason: str | None) -> bool:
    """A pilot stopped for another plan (`SUPERSEDED`, `recalibrated`): its plan was never judged."""
    return reason == SUPERSEDED or (reason or "").endswith(RECALIBRATES)


def plan_ended(session: Session, use_case: UseCase, model_version_id: int) -> Pilot | None:
    """What stands before a new pilot of this plan (a challenger is a plan: one model version per plan
    hash), looked for over every pilot of it the use case started, not only its latest pilot (another
    plan's pilot may have come between, and the challenger moved back to this plan since): the latest of
    them that judged the plan (ended by a NO-GO, a rejection, a promotion or a rollback), else the latest
    one an operator aborted (`was_aborted`: piloted again only by a person, `start_again`). None: the plan
    has no pilot, its latest pilot is active (it goes on), or its pilots were only superseded by another
    challenger's or stopped by a calibration under a spec version that changed its inputs (`recalibrated`:
    judged nothing, so the pipeline may pilot it again, a spec reverted to its budget)."""
    mine = list(
        session.scalars(
            select(Pilot)
            .where(Pilot.use_case_id == use_case.id, Pilot.model_version_id == model_version_id)
            .order_by(Pilot.id.desc())
        )
    )
    if not mine or mine[0].status not in ENDED_PILOT:
        return None
    aborted = [p for p in mine if was_aborted(session, p)]
    superseded = {
        int(e.entity_id)
        for e in session.scalars(
            select(AuditEntry).where(
                AuditEntry.action == "pilot.status",
                AuditEntry.entity == audit.ENTITIES[Pilot.__tablename__],
                AuditEntry.entity_id.in_([str(p.id) for p in mine]),
            )
        )
        if _judged_nothing((e.details or {}).get("reason"))
    }
    judged = [p for p in mine if p.status in ENDED_PILOT and p not in aborted and p.id not in superseded]
    return (judged or aborted or [None])[0]


def next_pilot_number(session: Session, use_case: UseCase) -> int:
    """The place the use case's next pilot takes among its pilots (1 = its first): every pilot it ever
    started counts, whatever became of it (each could have said GO)."""
    started = session.scalar(select(func.count()).select_from(Pilot).where(Pilot.use_case_id == use_case.id))
    return int(started or 0) + 1


def next_go_alpha(session: Session, use_case: UseCase, alpha: float, spending: str) -> float:
    """The GO level the use case's next pilot would run at (rollout.gate.spending): its place's term of
    the series, capped by what its earlier pilots left of `alpha`; 0.0 when nothing is left."""
    earlier = session.scalars(select(Pilot.go_alpha).where(Pilot.use_case_id == use_case.id)).all()
    return pilot_alpha(alpha, len(earlier) + 1, spending, spent_before=spent(alpha, earlier))


def planned_pilot(
    session: Session, use_case: UseCase, gate: Mapping[str, Any], spec_version: int | None = None
) -> tuple[int | None, float]:
    """The pilot a plan of spec version `spec_version` is for and its GO level, under that version's
    `gate` section: the active pilot's number and the level fixed when it started (None and alpha itself
    for a pilot started before alpha was spent across pilots) where it runs under that version, else the
    next pilot's number and `next_go_alpha` (a pilot of an earlier version runs under its own gate: a new
    version that lowered alpha below its level used to make every plan view crash)."""
    alpha = gate.get("alpha", DEFAULT_ALPHA)
    pilot = active_pilot(session, use_case)
    if pilot is not None and (spec_version is None or pilot.spec_version in (None, spec_version)):
        return pilot.pilot_number, alpha if pilot.go_alpha is None else pilot.go_alpha
    spending = gate.get("alpha_spending", DEFAULT_SPENDING)
    return next_pilot_number(session, use_case), next_go_alpha(session, use_case, alpha, spending)


def current_step(session: Session, pilot: Pilot) -> PilotStep:
    step = session.scalar(
        select(PilotStep).where(PilotStep.pilot_id == pilot.id, PilotStep.index == pilot.current_step_index)
    )
    if step is None:
        raise PilotStateError(f"{pilot_label(pilot)} has no step {pilot.current_step_index}")
    return step


# --- plan of steps ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepPlan:
    index: int
    kind: str  # shadow / split
    traffic_pct: float  # share of live traffic served by the treatment arm (0 in shadow)
    min_samples: int

    @property
    def planned_treatment_share(self) -> float:
        """Expected share of *observations* in the treatment arm: in shadow both arms answer every
        request, so the observation split is 50/50 even though treatment serves nothing."""
        return 0.5 if self.kind == "shadow" else self.traffic_pct / 100.0


def plan_steps(spec: Any) -> list[StepPlan]:
    """Shadow first, then the ramp steps, from the spec's rollout plan."""
    steps = [StepPlan(0, "shadow", 0.0, spec.rollout.shadow.min_samples)]
    for i, s in enumerate(spec.rollout.steps, start=1):
        steps.append(StepPlan(i, "split", float(s.traffic_pct), s.min_samples))
    return steps


def _step_row(plan: StepPlan, **row: Any) -> PilotStep:
    """A new PilotStep row for the planned step (`row`: its pilot_id, unless it goes into Pilot.steps)."""
    return PilotStep(
        index=plan.index, kind=plan.kind, traffic_pct=plan.traffic_pct, min_samples=plan.min_samples, **row
    )


def step_plan_for(spec: Any, step: PilotStep) -> StepPlan:
    if step.kind == "monitor":
        return StepPlan(step.index, "monitor", step.traffic_pct, step.min_samples)
    return plan_steps(spec)[step.index]


def is_last_step(spec: Any, step: PilotStep) -> bool:
    return step.kind != "monitor" and step.index == len(plan_steps(spec)) - 1


# --- arm assignment --------------------------------------------------------------------------------


def hash_unit(request_id: str, salt: str) -> float:
    """A uniform number in [0, 1) from sha256(salt:request_id): stable across processes and machines
    (Python's hash() is salted per process, so it would reshuffle arms on every retry)."""
    digest = hashlib.sha256(f"{salt}:{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_arm(request_id: str, salt: str, traffic_pct: float) -> str:
    return "treatment" if hash_unit(request_id, salt) < traffic_pct / 100.0 else "control"


# --- the order of the evidence ---------------------------------------------------------------------

IMPORTED_SOURCES = ("imported", "imported-external")


def stream_key(request_id: str, salt: str) -> int:
    """Where an imported row enters its step's evidence stream, among the rows imported with it (before
    the next gate look: `in_evidence_order`): a salted hash of the request id (a hash domain of its own,
    apart from the arm assignment), in [0, 2^63). The gate's sequences need an order that carries no
    information about the outcomes; a file's may (an export sorted by latency, when the sparse model loses
    more on long requests), a salted hash cannot. Both arms of a request share the key, so a shadow pair is
    complete where its key places it."""
    digest = hashlib.sha256(f"{salt}:evidence-order:{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def in_evidence_order(
    records: list[tuple],
    *,
    batch: int = -2,
    key: int = -1,
    row_id: int | None = None,
    looks: Sequence[int] | None = None,
    batch_unit_through: int = 0,
) -> list[tuple]:
    """Stored rows (in id order) as the evidence stream takes them. `batch`, `key` and `row_id` index each
    record's batch id, stream key and row id.

    The gate (`looks`: the last row id each recorded gate look of the step judged): the imported rows
    stored between two looks enter the stream together, by their stream key, however many files brought
    them (a paginated export, or one log per arm, imported file by file, gives the stream one file with the
    same rows gives), at the place of the first of them; the rows a look judged keep their place, so each
    look's stream extends the one before. Rows up to `batch_unit_through` (judged by looks recorded before
    the look was the unit) keep the order they were judged in: each import's rows by key, batch by batch.
    The monitor (`looks` None): each batch is its own unit, an import's rows by key (the files of one
    `monitor` command are one batch, one look). Rows without a key (the pilot flow's) stay where they
    arrived, batch by batch."""
    from operator import itemgetter

    keys = list(map(itemgetter(key), records))
    if keys.count(None) == len(keys):  # no imported row: arrival order (the common case, C speed)
        return records
    import numpy as np
    import pandas as pd

    unit = pd.factorize(np.array(list(map(itemgetter(batch), records)), dtype=object))[0]
    imported = np.array([k is not None for k in keys])
    if looks is not None:
        if row_id is None:
            raise ValueError("in_evidence_order: the gate's order (looks) needs each record's row id")
        ids = np.fromiter(map(itemgetter(row_id), records), dtype=np.int64, count=len(records))
        interval = np.searchsorted(np.sort(np.asarray(looks, dtype=np.int64)), ids, side="left")
        together = imported & (ids > batch_unit_through)
        unit = np.where(together, -1 - interval, unit)  # an interval's imports: one unit
    rank = pd.factorize(unit)[0]  # units in the order of their first row
    stream = np.array([0 if k is None else k for k in keys], dtype=np.int64)
    order = np.lexsort((np.arange(len(records)), stream, rank))
    return list(map(records.__getitem__, order.tolist()))


# --- pilots and steps ------------------------------------------------------------------------------


def pilot_label(pilot: Pilot) -> str:
    """How a message names a pilot: its number within its use case (`pilot_number`: "pilot 2" is the use
    case's second, as `usecase show`, the dashboard and the gate's alpha spending count them), or "pilot
    id N" (its row id) for one started before pilots were numbered. Never the bare row id, which counts
    every use case's pilots together (pure)."""
    return f"pilot id {pilot.id}" if pilot.pilot_number is None else f"pilot {pilot.pilot_number}"


def start_pilot(
    session: Session, use_case: UseCase, model_version: ModelVersion, spec: Any, *, actor: str
) -> Pilot:
    """The running pilot of this model version, or a new one at its shadow step. A pilot of another
    (older) model version that is still active is stopped first: one pilot per use case at a time."""
    current = active_pilot(session, use_case)
    if current is not None and current.model_version_id == model_version.id:
        return current
    number = next_pilot_number(session, use_case)
    go_alpha = next_go_alpha(session, use_case, spec.gate.alpha, spec.gate.alpha_spending)
    if go_alpha <= 0:
        earlier = session.scalars(select(Pilot.go_alpha).where(Pilot.use_case_id == use_case.id)).all()
        used = spent(spec.gate.alpha, earlier)
        raise PilotStateError(
            f"use case {use_case.name!r} has spent its false-GO budget: alpha {spec.gate.alpha:g}, "
            f"{used:.3g} spent over {counted(number - 1, 'pilot')} (a pilot started before alpha was "
            "spent across pilots, or under gate.alpha_spending: pilot, ran at alpha itself), so a new "
            "pilot could never say GO; a new spec version with gate.alpha_spending: pilot holds each "
            'pilot to alpha on its own (docs/gate.md, "Across a use case\'s pilots")'
        )
    if current is not None:
        stop_pilot(session, current, status="stopped", actor=actor, reason=SUPERSEDED)
    first = plan_steps(spec)[0]
    pilot = Pilot(
        use_case_id=use_case.id,
        model_version_id=model_version.id,
        salt=secrets.token_hex(8),
        status="running",
        current_step_index=0,
        spec_version=use_case.current_spec_version,  # pinned: see load_pilot_spec
        pilot_number=number,
        go_alpha=go_alpha,  # fixed for its life
        steps=[_step_row(first)],
    )
    audit.record_new(
        session,
        pilot,
        actor,
        "pilot.start",
        {
            "model_version_id": model_version.id,
            "spec_version": use_case.current_spec_version,
            "pilot_number": number,
            "go_alpha": pilot.go_alpha,
            "alpha_spending": spec.gate.alpha_spending,
            "steps": [s.__dict__ for s in plan_steps(spec)],
        },
    )
    set_phase(session, use_case, "piloting", actor=actor, reason=f"{pilot_label(pilot)} started")
    session.flush()
    return pilot


def advance(
    session: Session, pilot: Pilot, spec: Any, *, actor: str, decision_id: int | None = None
) -> PilotStep:
    """Close the current step as passed and open the next one. Raises at the last step."""
    step = current_step(session, pilot)
    plans = plan_steps(spec)
    if step.index + 1 >= len(plans):
        raise PilotStateError(
            f"{pilot_label(pilot)} is at its last step ({step.index}); nothing to advance to"
        )
    nxt = plans[step.index + 1]
    step.status = "passed"
    step.ended_at = step.ended_at or utcnow()  # a GO that waited for a person ended its step then
    new = _step_row(nxt, pilot_id=pilot.id)
    session.add(new)
    pilot.current_step_index = nxt.index
    audit.record(
        session,
        actor,
        "pilot.advance",
        on=pilot,
        details={
            "from_step": step.index,
            "to_step": nxt.index,
            "traffic_pct": nxt.traffic_pct,
            "decision_id": decision_id,
        },
    )
    session.flush()
    return new


def stop_pilot(
    session: Session, pilot: Pilot, *, status: str, actor: str, reason: str, open_steps: str | None = None
) -> None:
    """Move the pilot to ``status``; its running steps end as passed (promoted), failed, or
    ``open_steps`` when given (e.g. "skipped" for a promotion that skips ramp steps, "aborted")."""
    if status not in (*ENDED_PILOT, *ACTIVE_PILOT):
        raise ValueError(f"unknown pilot status {status!r}")
    if pilot.status == status:
        return
    before = pilot.status
    pilot.status = status
    if status in ENDED_PILOT:
        pilot.ended_at = pilot.ended_at or utcnow()
        for step in pilot.steps:
            if step.status == "running" and step.kind != "monitor":
                step.status = open_steps or ("passed" if status == "promoted" else "failed")
                step.ended_at = utcnow()
    audit.record_change(session, actor, "pilot.status", on=pilot, before=before, after=status, reason=reason)


def open_monitor_step(session: Session, pilot: Pilot, *, min_samples: int) -> PilotStep:
    """The step that holds post-promotion traffic samples (index after the ramp steps)."""
    existing = session.scalar(
        select(PilotStep).where(PilotStep.pilot_id == pilot.id, PilotStep.kind == "monitor")
    )
    if existing is not None:
        return existing
    last = session.scalar(select(func.max(PilotStep.index)).where(PilotStep.pilot_id == pilot.id)) or 0
    step = _step_row(StepPlan(last + 1, "monitor", 100.0, min_samples), pilot_id=pilot.id)
    session.add(step)
    session.flush()
    return step


# --- observations ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class InsertResult:
    inserted: int
    already_present: int


def record_observations(
    session: Session, step: PilotStep, rows: Iterable[Mapping[str, Any]], *, batch_id: str, source: str
) -> InsertResult:
    """Insert observations not already stored for (step, request_id, arm): a retried batch adds nothing.
    Rows are expected to be validated already (rollout.validation)."""
    pilot = session.get(Pilot, step.pilot_id)
    assert pilot is not None
    rows = list(rows)
    keys = {(str(r["request_id"]), str(r["arm"])) for r in rows}
    ids = sorted({k[0] for k in keys})
    existing: set[tuple[str, str]] = set()
    for chunk_start in range(0, len(ids), 500):
        chunk = ids[chunk_start : chunk_start + 500]
        existing |= set(
            session.execute(
                select(Observation.request_id, Observation.arm).where(
                    Observation.pilot_step_id == step.id, Observation.request_id.in_(chunk)
                )
            ).tuples()
        )
    inserted = 0
    seen: set[tuple[str, str]] = set()
    for r in rows:
        key = (str(r["request_id"]), str(r["arm"]))
        if key in existing or key in seen:
            continue
        seen.add(key)
        session.add(
            Observation(
                pilot_step_id=step.id,
                use_case_id=pilot.use_case_id,
                batch_id=batch_id,
                request_id=key[0],
                arm=key[1],
                quality=float(r["quality"]),
                latency_ms=float(r["latency_ms"]),
                tokens=int(r.get("tokens") or 0),
                error=bool(r.get("error") or False),
                overloaded=bool(r.get("overloaded") or False),
                source=source,
                stream_key=stream_key(key[0], pilot.salt) if source in IMPORTED_SOURCES else None,
            )
        )
        inserted += 1
    session.flush()
    return InsertResult(inserted=inserted, already_present=len(rows) - inserted)


_ARM_BIT = {"control": 1, "treatment": 2}
# An import into a split step whose arm counts a random assignment at the step's share gives with
# probability below this is refused (`ImportCheck.share_problem`): the false refusal rate per file (the
# exact test's size is at most this at every file size), so at most 0.1% over 1,000 honest files (a
# pilot fed hourly slices for six weeks); the step's rows so far with the file's are tested at it too, so
# at most 2e-6 an import, 0.2% over 1,000 (the union bound). A file of dense rows only is refused from 139
# rows at a 10% share (282 at 5%, 21 at 50%), of sparse rows only from 7 (5, 21): below the one-arm files
# that move the GO capital to its threshold (docs/gate.md "The order of the evidence"). It was 1e-3, which
# refused an honest hourly slice of 100 requests at 10% for good (the hash gives the same counts on every
# retry): 27% of pilots fed 504 hourly slices met one (review W1)
IMPORT_SHARE_LEVEL = 1e-6


def _values(r: Mapping[str, Any]) -> int:
    """What a stored observation says, as a small hash (two imports of one row must agree on it)."""
    return hash(
        (float(r["quality"]), float(r["latency_ms"]), int(r.get("tokens") or 0), bool(r.get("error")))
    )


class ImportCheck:
    """Does an observation import fit the step's design? Fed the file in chunks (`add`), it keeps one
    small entry per (request, arm) seen (a hash of its values, not the row), so memory grows with the
    number of requests, not with the file's bytes.

    Shadow: every request has both arms. Split: every request is in exactly one arm, the one the
    pilot's hash assignment gives it (unless the serving system assigned arms itself:
    ``external_assignment``). A (request, arm) already stored, or given twice, must carry the same values: a
    stored observation is never replaced. A request an earlier step of the pilot judged (``used_elsewhere``)
    is refused: a request is evidence once, and one chosen again after its answers were seen could be chosen
    for them. So is a request void in any step of the pilot, this one included (``void``: drawn, no reference
    to score against, `VoidRequest`): it is used, and never observed. Split: the file's new rows must hold the
    arms in the step's share, as a random assignment would (the exact binomial test at `IMPORT_SHARE_LEVEL`,
    the hash's or the serving system's assignment alike): a file of one arm (the dense deployment's log, then
    the sparse one's) would put the arms into the evidence stream in an order no random assignment gives. The
    step's rows so far with the file's (``stored``: all of the step's rows) are tested alike, at the same
    level: one-arm files each below the file's refusal size, a gate look between each, would otherwise feed
    the stream one arm's rows look after look."""

    def __init__(
        self,
        stored: Iterable[Mapping[str, Any]],
        *,
        kind: str,
        salt: str,
        traffic_pct: float,
        external_assignment: bool,
        used_elsewhere: Collection[str] = frozenset(),
        void: Collection[str] = frozenset(),
        max_listed: int = 8,
    ) -> None:
        self.kind, self.salt, self.pct, self.external = kind, salt, traffic_pct, external_assignment
        self.used_elsewhere, self.void = used_elsewhere, void
        self.reused: list[str] = []
        self.was_void: list[str] = []
        self.max_listed = max_listed
        self.values: dict[tuple[str, str], int] = {}
        self.arms: dict[str, int] = {}
        self.stored_per_arm = {"control": 0, "treatment": 0}
        for r in stored:
            key = (str(r["request_id"]), str(r["arm"]))
            self.values[key] = _values(r)
            self.arms[key[0]] = self.arms.get(key[0], 0) | _ARM_BIT.get(key[1], 0)
            self.stored_per_arm[key[1]] = self.stored_per_arm.get(key[1], 0) + 1
        self.touched: set[str] = set()
        self.conflicts: list[str] = []
        self.wrong_arm: list[str] = []
        self.new_per_arm = {"control": 0, "treatment": 0}

    def add(self, rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        """Record a chunk; returns its rows that are new (not stored, not given earlier in the file)."""
        new = []
        for r in rows:
            rid, arm = str(r["request_id"]), str(r["arm"])
            if rid in self.void:
                self.was_void.append(f"{rid}/{arm}")
                continue
            if rid in self.used_elsewhere:
                self.reused.append(f"{rid}/{arm}")
                continue
            value = _values(r)
            known = self.values.get((rid, arm))
            if known is not None:
                if known != value:
                    self.conflicts.append(f"{rid}/{arm}")
                continue
            self.values[(rid, arm)] = value
            self.arms[rid] = self.arms.get(rid, 0) | _ARM_BIT.get(arm, 0)
            self.touched.add(rid)
            self.new_per_arm[arm] = self.new_per_arm.get(arm, 0) + 1
            if self.kind == "split" and not self.external and arm != assign_arm(rid, self.salt, self.pct):
                self.wrong_arm.append(f"{rid}/{arm}")
            new.append(r)
        return new

    def _listed(self, items: list[str]) -> str:
        more = f" and {len(items) - self.max_listed} more" if len(items) > self.max_listed else ""
        return ", ".join(items[: self.max_listed]) + more

    def problems(self) -> list[str]:
        """Everything wrong with the import so far (call after the last chunk)."""
        out = []
        if self.was_void:
            out.append(
                f"request(s) {self._listed(self.was_void)} are void in this pilot (drawn, with no reference "
                "to score against: the control arm gave none); a void request is used, never observed"
            )
        if self.reused:
            out.append(
                f"request(s) {self._listed(self.reused)} were judged in an earlier step of this pilot; a "
                "request is evidence once"
            )
        if self.conflicts:
            out.append(
                f"request(s) {self._listed(self.conflicts)} are already stored with different values; "
                "a stored observation is never replaced"
            )
        touched = sorted(self.touched)
        if self.kind == "shadow":
            half = [rid for rid in touched if self.arms[rid] != 3]
            if half:
                out.append(
                    f"shadow step: request(s) {self._listed(half)} lack one arm; "
                    "both arms answer every request"
                )
        elif self.kind == "split":
            both = [rid for rid in touched if self.arms[rid] == 3]
            if both:
                out.append(
                    f"split step: request(s) {self._listed(both)} appear in both arms; "
                    "each request is served by one"
                )
            if self.wrong_arm:
                out.append(
                    f"split step at {self.pct:g}%: request(s) {self._listed(self.wrong_arm)} are not in "
                    "the arm the pilot's hash assignment gives them; if your serving system assigned arms "
                    "itself, import with --external-assignment"
                )
            share = self.share_problem()
            if share:
                out.append(share)
        return out

    def share_problem(self) -> str:
        """A split import whose arm counts contradict the step's share ('' when they do not): the exact
        two-sided binomial test of the sparse-arm count of the file's new rows, and of the step's rows so far
        with them (the stream up to this import), each refused below `IMPORT_SHARE_LEVEL`."""
        n_c, n_t = self.new_per_arm.get("control", 0), self.new_per_arm.get("treatment", 0)
        if self.kind != "split" or n_c + n_t == 0:
            return ""
        file_p = _share_p(n_c, n_t, self.pct)
        if file_p < IMPORT_SHARE_LEVEL:
            return (
                f"split step at {self.pct:g}%: its new rows hold {_arm_counts(n_c, n_t)}; a random "
                f"assignment at {self.pct:g}% gives counts this far off with probability {file_p:.1g} (exact "
                f"binomial test, refused below {IMPORT_SHARE_LEVEL:g}), and the evidence stream needs both "
                "arms in the step's share. If the file is an export of one arm (or one arm's rows first, "
                "split into files), import the step's rows of both arms together in one file or in slices "
                "of time; if it is a small slice of time, import it together with the next slice (one "
                "file): the rows imported between two gate looks enter the stream together anyway"
            )
        s_c, s_t = self.stored_per_arm.get("control", 0), self.stored_per_arm.get("treatment", 0)
        all_c, all_t = s_c + n_c, s_t + n_t
        step_p = _share_p(all_c, all_t, self.pct)
        if step_p >= IMPORT_SHARE_LEVEL or s_c + s_t == 0:
            return ""
        return (
            f"split step at {self.pct:g}%: the step's rows so far hold {_arm_counts(s_c, s_t)}, and with "
            f"this file's new rows ({_arm_counts(n_c, n_t)}) {_arm_counts(all_c, all_t)}; a random "
            f"assignment at {self.pct:g}% gives counts this far off with probability {step_p:.1g} (exact "
            f"binomial test, refused below {IMPORT_SHARE_LEVEL:g}). Files of one arm, each too small to be "
            "refused on its own, with gate looks between them, would put that arm's rows into the evidence "
            "stream look after look. Import the step's rows of both arms together, in slices of time"
        )


def _share_p(n_control: int, n_treatment: int, pct: float) -> float:
    """The exact two-sided binomial test's p of the sparse-arm count against a split step's share."""
    from rollout.gate.inputs import srm_test

    return srm_test(n_control, n_treatment, pct / 100.0)[1]


def _arm_counts(n_control: int, n_treatment: int) -> str:
    """ "22 sparse and 78 dense (22.0% sparse)": a split import's arm counts, as its refusal says them."""
    return (
        f"{n_treatment} sparse and {n_control} dense ({100 * n_treatment / (n_control + n_treatment):.1f}% "
        "sparse)"
    )


def abort_pilot(
    session: Session, use_case: UseCase, *, actor: str, reason: str
) -> tuple[Pilot, list[GateDecision]]:
    """An operator stops the active pilot: its open steps end "aborted", its open decisions are
    resolved "aborted" (no one can approve them any more), the use case is "stopped". Returns the
    pilot and the decisions closed (their paused approval runs are the caller's to cancel). Refused
    (PilotStateError, naming the decision) once a GO of the pilot is approved: its promotion is being
    carried out, and an abort would be undone by it. The caller's transaction must be
    `session_scope(immediate=True)` (SQLite's write lock; PostgreSQL's row locks are taken here)."""
    locked(session, use_case.id, None)  # serialised with gate looks and promotions of this use case
    pilot = active_pilot(session, use_case)
    if pilot is None:
        raise PilotStateError(
            f"use case {use_case.name!r} has no active pilot to abort (phase {use_case.phase})"
        )
    locked(session, use_case.id, pilot.id)
    decided = list(  # locked: an approval signing one of them now is seen, not overwritten
        session.scalars(
            select(GateDecision)
            .where(GateDecision.pilot_id == pilot.id)
            .order_by(GateDecision.id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    )
    approved = [d for d in decided if d.kind == "gate" and d.resolution == "approved"]
    if approved:
        raise PilotStateError(
            f"use case {use_case.name!r}: decision {approved[-1].id} is approved and its promotion is being "
            f"carried out (or waits to be finished: sparsepilot promote {use_case.name} --decision "
            f"{approved[-1].id}); {pilot_label(pilot)} cannot be aborted now, nothing was changed. Roll the "
            "champion back once it is promoted if it must not serve"
        )
    open_decisions = [d for d in decided if d.resolution is None]
    for d in open_decisions:
        d.resolution = "aborted"
    stop_pilot(session, pilot, status="stopped", actor=actor, reason=reason, open_steps="aborted")
    audit.record(
        session,
        actor,
        "pilot.abort",
        on=pilot,
        details={"reason": reason, "closed_decisions": [d.id for d in open_decisions]},
    )
    set_phase(session, use_case, "stopped", actor=actor, reason=f"{pilot_label(pilot)} aborted: {reason}")
    return pilot, open_decisions


def step_observations(session: Session, step: PilotStep) -> pd.DataFrame:
    """The observations of one step (the gate's input table, columns `OBSERVATION_FIELDS`) in evidence
    order (`step_evidence`)."""
    return step_evidence(session, step)[0]


def step_evidence(session: Session, step: PilotStep) -> tuple[pd.DataFrame, int]:
    """The gate's input table of one step (columns `OBSERVATION_FIELDS`) in evidence order, and the id of
    the last row it holds (0 for none: what a look on it judged through, `judged_through` in its evidence).
    Order (`in_evidence_order`): the rows imported since the step's last gate look together, by their
    stream key, after the rows earlier looks judged, in the order those looks judged them; the pilot
    flow's rows as they arrived. The gate's confidence sequence runs along this order, and each look's
    stream extends the one before."""
    looks, legacy = _look_boundaries(session, step)
    table = _evidence_table(session, Observation.pilot_step_id == step.id, looks=looks, legacy_rows=legacy)
    last = int(table["row_id"].max()) if len(table) else 0
    return table.drop(columns=["look", "row_id"]), last


def _look_boundaries(session: Session, step: PilotStep) -> tuple[list[int], int]:
    """What the step's recorded gate looks judged: the last row id of each look that says so
    (`judged_through`), and the most rows a look recorded before it said so judged (its counts: a look
    reads all of the step's rows, the first ones by id; rows are never deleted)."""
    looks, legacy = [], 0
    for d in decisions_for_step(session, step):
        ev = d.evidence or {}
        if d.kind != "gate" or "quality" not in ev:  # a failed batch's INVALID judged no stored row
            continue
        if ev.get("judged_through") is not None:
            looks.append(int(ev["judged_through"]))
        else:
            legacy = max(legacy, int(ev.get("n_control") or 0) + int(ev.get("n_treatment") or 0))
    return looks, legacy


def monitor_observations(session: Session, step: PilotStep) -> pd.DataFrame:
    """The monitor step's rows that its change detector judges, in evidence order (`in_evidence_order`),
    each with its look (`look`: the batch id): every row since the monitor began, or since the last alarm
    a person kept the champion through (that alarm is settled; detection starts again, with its own
    alpha). A table of columns `OBSERVATION_FIELDS` and `look`."""
    kept = _kept_alarm(session, step)
    after = int((kept.evidence or {}).get("judged_through") or 0) if kept is not None else 0
    table = _evidence_table(session, Observation.pilot_step_id == step.id, Observation.id > after)
    return table.drop(columns="row_id")


def monitor_voids(session: Session, step: PilotStep) -> tuple[int, int]:
    """The void requests a monitor look's evidence excluded, as `monitor_observations` reads its rows: the
    step's since the last alarm a person kept (those before it are settled with its rows), and the id of
    the step's last void request (0 for none: `void_through` in the look's evidence, where a kept alarm
    says which voids it settled). A kept alarm recorded before it said so settles the voids stored up to
    its own time."""
    kept = _kept_alarm(session, step)
    of_step = VoidRequest.pilot_step_id == step.id
    since = []
    if kept is not None:
        through = (kept.evidence or {}).get("void_through")
        since = (
            [VoidRequest.id > int(through)]
            if through is not None
            else [VoidRequest.created_at > kept.created_at]
        )
    n = session.scalar(select(func.count()).where(of_step, *since)) or 0
    return int(n), int(session.scalar(select(func.max(VoidRequest.id)).where(of_step)) or 0)


def _kept_alarm(session: Session, step: PilotStep) -> GateDecision | None:
    """The last monitor alarm of the step a person kept the champion through (resolved "rejected")."""
    return session.scalar(
        select(GateDecision)
        .where(
            GateDecision.pilot_step_id == step.id,
            GateDecision.kind == "monitor",
            GateDecision.resolution == "rejected",
        )
        .order_by(GateDecision.id.desc())
        .limit(1)
    )


def monitor_basis(session: Session, step: PilotStep) -> tuple[int, int]:
    """What a monitor look's judgement rests on: the step's last stored row (`last_observation_id`) and
    the last alarm a person kept (its id, 0 for none; `monitor_observations` starts after it). A look
    judged without the lock reads this again under the lock and judges again where it moved."""
    kept = _kept_alarm(session, step)
    return last_observation_id(session, step), kept.id if kept is not None else 0


def _evidence_table(
    session: Session, *where: Any, looks: Sequence[int] | None = None, legacy_rows: int = 0
) -> pd.DataFrame:
    """The stored rows that match `where`, in evidence order, as one table (`OBSERVATION_FIELDS`, `look`,
    the batch id, and `row_id`), read through the connection: every look reads all of its step's rows, and
    an ORM row and a dict per stored row made a look over a million rows take 1.5x the time and memory
    (`sparsepilot bench monitor`, docs/gate.md "What a look costs"). `looks`, `legacy_rows`: the gate's
    looks (`_look_boundaries`; None: each batch is its own unit, as the monitor's looks are)."""
    import pandas as pd

    result = session.connection().execute(
        select(
            *(getattr(Observation, f) for f in OBSERVATION_FIELDS),
            Observation.batch_id,
            Observation.id,
            Observation.stream_key,
        )
        .where(*where)
        .order_by(Observation.id)
    )
    records = result.all()
    # the rows the looks recorded before `judged_through` judged: the first `legacy_rows` by id
    through = records[legacy_rows - 1][-2] if 0 < legacy_rows <= len(records) else 0
    ordered = in_evidence_order(records, batch=-3, row_id=-2, looks=looks, batch_unit_through=through)
    fields = (*OBSERVATION_FIELDS, "look", "row_id")
    columns = list(zip(*ordered, strict=True)) or [()] * (len(fields) + 1)
    return pd.DataFrame(dict(zip(fields, columns[:-1], strict=True)))


def rows_by_source(session: Session, step: PilotStep) -> dict[str, int]:
    """How many of the step's rows each source stored (pilot-flow, imported, imported-external, ...)."""
    result = session.execute(
        select(Observation.source, func.count())
        .where(Observation.pilot_step_id == step.id)
        .group_by(Observation.source)
    )
    return {str(source): int(n) for source, n in result.tuples()}


def last_observation_id(session: Session, step: PilotStep) -> int:
    """The id of the step's last stored row (0 for none): where a monitor look's judgement ends."""
    return session.scalar(select(func.max(Observation.id)).where(Observation.pilot_step_id == step.id)) or 0


def monitor_look_key(step_id: int, batch_id: str) -> str:
    """The idempotency key of the monitor look on this batch (`decisions.monitor_look`)."""
    return f"monitor:{step_id}:{batch_id}"


def judged_by_a_look(session: Session, step: PilotStep, request_ids: Iterable[str]) -> bool:
    """Whether every stored row of these requests in the monitor step was judged by a recorded look: none
    is stored after the `judged_through` of the step's last look (each look judges the step's rows up to
    there). False where one is (stored, and its look's record failed), or where the last look does not say
    how far it judged (recorded before looks said so). Looked up in chunks."""
    last = session.scalar(
        select(GateDecision)
        .where(GateDecision.pilot_step_id == step.id, GateDecision.kind == "monitor")
        .order_by(GateDecision.id.desc())
        .limit(1)
    )
    through = (last.evidence or {}).get("judged_through") if last is not None else None
    if through is None:
        return False
    newest = 0
    for chunk in _chunks(request_ids):
        found = session.scalar(
            select(func.max(Observation.id)).where(
                Observation.pilot_step_id == step.id, Observation.request_id.in_(chunk)
            )
        )
        newest = max(newest, found or 0)
    return newest <= int(through)


def seen_request_ids(
    session: Session,
    pilot: Pilot,
    *,
    but: PilotStep | None = None,
    among: Iterable[str] | None = None,
) -> set[str]:
    """Request ids already used in any step of this pilot (each request is used once per pilot): observed,
    or void (`VoidRequest`: drawn, no reference to score against); `but`: in any step other than that one
    (what an import into it may not bring again); `among`: only these ids are asked about, in chunks (a
    promoted pilot's monitor can hold millions of rows: a file's ids are looked up, never the whole
    history read)."""
    step_ids = select(PilotStep.id).where(PilotStep.pilot_id == pilot.id)
    if but is not None:
        step_ids = step_ids.where(PilotStep.id != but.id)
    queries = [
        select(Observation.request_id).where(Observation.pilot_step_id.in_(step_ids)).distinct(),
        select(VoidRequest.request_id).where(VoidRequest.pilot_step_id.in_(step_ids)),
    ]
    out: set[str] = set()
    for query in queries:
        if among is None:
            out |= set(session.scalars(query))
            continue
        for chunk in _chunks(among):
            out |= set(session.scalars(query.where(query.selected_columns[0].in_(chunk))))
    return out


def void_request_ids(session: Session, pilot: Pilot, *, among: Iterable[str] | None = None) -> set[str]:
    """Request ids void in any step of this pilot, the one an import goes into included (`VoidRequest`: an
    import bringing one is refused, `ImportCheck`); `among`: only these ids are asked about, in chunks."""
    step_ids = select(PilotStep.id).where(PilotStep.pilot_id == pilot.id)
    query = select(VoidRequest.request_id).where(VoidRequest.pilot_step_id.in_(step_ids))
    if among is None:
        return set(session.scalars(query))
    return {
        rid
        for chunk in _chunks(among)
        for rid in session.scalars(query.where(VoidRequest.request_id.in_(chunk)))
    }


VOID_MEANING = "the dense answer failed; not evidence"


def void_note(n: int) -> str:
    """How a step's void requests are said where people look (`usecase show`, the use-case page, a gate
    look's explanation): "3 requests void: the dense answer failed; not evidence"."""
    return f"{counted(n, 'request')} void: {VOID_MEANING}"


def void_counts(session: Session, step_ids: Iterable[int]) -> dict[int, int]:
    """Per step, its void requests (`VoidRequest`: drawn, no reference to score against); a step with
    none is absent."""
    ids = list(step_ids)
    if not ids:
        return {}
    stmt = (
        select(VoidRequest.pilot_step_id, func.count())
        .where(VoidRequest.pilot_step_id.in_(ids))
        .group_by(VoidRequest.pilot_step_id)
    )
    return {step_id: n for step_id, n in session.execute(stmt)}


def step_rows_among(session: Session, step: PilotStep, request_ids: Iterable[str]) -> list[dict[str, Any]]:
    """The step's stored observations (`OBSERVATION_FIELDS`) of these request ids only, looked up in chunks
    (what `ImportCheck` compares a file with, without reading the step's whole history)."""
    out: list[dict[str, Any]] = []
    cols = [getattr(Observation, f) for f in OBSERVATION_FIELDS]
    for chunk in _chunks(request_ids):
        rows = session.execute(
            select(*cols).where(Observation.pilot_step_id == step.id, Observation.request_id.in_(chunk))
        )
        out.extend(dict(r._mapping) for r in rows)
    return out


def _chunks(ids: Iterable[str], size: int = 500) -> Iterable[list[str]]:
    """Sorted distinct ids in lists of `size` (an IN list stays under every database's parameter limit)."""
    ids = sorted({str(i) for i in ids})
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


# --- decisions -------------------------------------------------------------------------------------


def decisions_for_step(session: Session, step: PilotStep) -> list[GateDecision]:
    return list(
        session.scalars(
            select(GateDecision)
            .where(GateDecision.pilot_step_id == step.id)
            .order_by(GateDecision.look_index)
        )
    )


def decision_by_key(session: Session, idempotency_key: str) -> GateDecision | None:
    return session.scalar(select(GateDecision).where(GateDecision.idempotency_key == idempotency_key))


def record_decision(
    session: Session,
    *,
    idempotency_key: str,
    use_case: UseCase,
    outcome: str,
    evidence: dict[str, Any],
    explanation: str,
    data_fingerprint: str,
    kind: str = "gate",
    pilot: Pilot | None = None,
    step: PilotStep | None = None,
    look_index: int = 0,
    awaiting: str = "none",
    actor: str = audit.SYSTEM_ACTOR,
) -> tuple[GateDecision, bool]:
    """The decision stored under this key, or a new one. Returns (decision, created)."""
    found = decision_by_key(session, idempotency_key)
    if found is not None:
        return found, False
    d = GateDecision(
        idempotency_key=idempotency_key,
        use_case_id=use_case.id,
        pilot_id=pilot.id if pilot else None,
        pilot_step_id=step.id if step else None,
        kind=kind,
        look_index=look_index,
        outcome=outcome,
        awaiting=awaiting,
        evidence=evidence,
        explanation=explanation,
        data_fingerprint=data_fingerprint,
    )
    audit.record_new(
        session,
        d,
        actor,
        f"decision.{kind}",
        {
            "outcome": outcome,
            "awaiting": awaiting,
            "step": step.index if step else None,
            "look_index": look_index,
            "fingerprint": data_fingerprint,
        },
    )
    return d, True


def ramp_continued(session: Session, pilot: Pilot) -> int | None:
    """The decision at which a person continued this pilot's ramp past a short pilot's early GO
    (`rollout.approvals.approve(..., continue_ramp=True)`, resolution "continued"), or None: from then
    on the pilot follows its spec's whole plan, so a later GO is final only at the last step."""
    return session.scalar(
        select(GateDecision.id)
        .where(GateDecision.pilot_id == pilot.id, GateDecision.resolution == "continued")
        .order_by(GateDecision.id)
    )


def pending_decisions(session: Session, use_case: UseCase | None = None) -> list[GateDecision]:
    q = select(GateDecision).where(GateDecision.awaiting != "none", GateDecision.resolution.is_(None))
    if use_case is not None:
        q = q.where(GateDecision.use_case_id == use_case.id)
    return list(session.scalars(q.order_by(GateDecision.id)))


def now() -> dt.datetime:
    return utcnow()


# --- gate inputs -----------------------------------------------------------------------------------


def gate_settings(spec: Any, step: PilotStep) -> Any:
    """rollout.gate.GateSettings for one step: the spec's gate section (GateSettings.from_spec), with the
    pilot's own GO level (fixed when it started) and the step's minimum sample as the quality test's and
    as a cap on the guardrails' own."""
    from rollout.gate import GateSettings

    return GateSettings.from_spec(
        spec,
        go_alpha=step.pilot.go_alpha,  # NULL on pilots started before spending: the spec's alpha
        min_samples_per_arm=max(2, step.min_samples),
        guardrail_min_samples=max(1, min(spec.gate.guardrails.min_samples, step.min_samples)),
    )


def gate_history(session: Session, step: PilotStep) -> Any:
    """Earlier looks at this step, from the evidence stored with their decisions (data-check-only
    INVALID rows recorded by the pilot flow carry no interval and are skipped)."""
    from rollout.gate import GateHistory

    evidence = [
        d.evidence for d in decisions_for_step(session, step) if d.kind == "gate" and "quality" in d.evidence
    ]
    return GateHistory.from_evidence(evidence)


def elapsed_days(step: PilotStep) -> float:
    """Days since the step's pilot started: `gate.max_duration_days` bounds the whole pilot, across its
    steps, as the spec says and the planner counts (it was measured from the step's start, so a pilot of
    k steps could stay inconclusive for k times the limit)."""
    started = step.pilot.started_at
    if started.tzinfo is None:
        started = started.replace(tzinfo=dt.UTC)
    return max(0.0, (utcnow() - started).total_seconds() / 86400.0)


def monitor_guardrails(rows: pd.DataFrame | list[Mapping[str, Any]], spec: Any) -> dict[str, Any]:
    """The monitor's checks on the champion's traffic, judged over all its looks by the change detector
    (`rollout.gate.guardrails.judge_monitor`; a row's look is its `look`, the batch id, else all rows are
    one look), so a check is breached only when the evidence shows it and its false alarms stay <= alpha
    however many looks are taken: the gate's rate checks on the sparse arm's rows, and on the requests
    both arms answered (the dense model answers the sampled requests offline) the excess error over
    dense and the quality loss beyond the margin (`judge_monitor_quality`). Pure; every value, threshold
    and bound is returned."""
    import pandas as pd

    from rollout.gate import GateSettings, check_observations, guardrail_checks, judge_monitor
    from rollout.gate.guardrails import judge_monitor_quality
    from rollout.gate.quality import paired_arms

    settings = GateSettings.from_spec(spec)
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    frame = frame.reset_index(drop=True)
    if "look" not in frame.columns:
        frame = frame.assign(look="")
    trt = frame[frame["arm"] == "treatment"] if len(frame) else frame
    checked = check_observations(trt, mode="split") if len(trt) else None
    out: dict[str, Any] = {"n_treatment": len(trt), "checks": [], "breached": []}
    if checked is None or checked.frame is None:
        out["problems"] = (
            list(checked.problems)
            if checked is not None
            else ["no row of the champion (arm 'treatment'): the monitor judges the champion's own answers"]
        )
        return out
    trt_looks = trt["look"].to_numpy(dtype=object)
    both = check_observations(frame, mode="paired")
    pairs = None  # the paired checks are not judged when the two arms' rows cannot be paired
    if both.frame is None:
        out["problems"] = list(both.problems)
    else:
        looks = frame["look"].to_numpy(dtype=object)
        pairs = paired_arms(both.frame).pairs
        pairs = pairs.assign(look=looks[pairs["row"].to_numpy()])
    out["looks"] = len(dict.fromkeys(trt_looks))
    out["pairs"] = 0 if pairs is None else len(pairs)
    out["method"] = "change-detector"
    results = [
        judge_monitor(c, checked.frame, trt_looks, alpha=settings.alpha, pairs=pairs)
        for c in guardrail_checks(settings)
    ]
    results.append(
        judge_monitor_quality(
            pairs, settings.margin, alpha=settings.alpha, min_samples=settings.guardrail_min_samples
        )
    )
    out["checks"] = [
        {
            "name": r.name,
            "value": r.value,
            "threshold": r.threshold,
            "breached": r.breached,
            "evaluated": r.evaluated,
            "lower_bound": r.lower_bound,
            "note": r.note,
        }
        for r in results
    ]
    out["breached"] = [r.name for r in results if r.breached]
    return out
