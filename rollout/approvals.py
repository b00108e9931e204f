"""People deciding: approve or reject a pending decision, or roll a use case back.

Rules enforced here, below every UI, for the CLI and the dashboard alike (the dashboard checks in its
server process; the CLI in the caller's, see rollout.auth):
- an Identity with the approver role and a non-empty reason are required;
- acting against the gate's recommendation (promoting on EXTEND/NO-GO/INVALID, promoting on an
  intermediate step's GO, which skips the remaining ramp steps, or keeping a model whose monitor asked
  for a rollback) needs a second, *different* approver before it takes effect: a different person
  (`rollout.auth.same_person`), so one person signed in once locally and once by OIDC counts once;
- a GO that waits for approval before the plan's last step (a short pilot's, `promote_after_step`) has a
  third answer besides promoting (two approvers) and rejecting: *continue the ramp* (`continue_ramp`),
  one approver, which moves the pilot to the plan's next step as a GO there would have without
  `promote_after_step` (`continue_in`); it promotes nothing and goes against nothing. Its effect moves no
  alias, so it is carried out in the signing transaction (the decision is resolved "continued" with the
  pilot already running at the next step, never one without the other); a paused approval run is then
  resumed only to end (`apply_continue` finds it done);
- a GO judged under a gate looser (any setting that makes a GO easier: a larger non-inferiority margin
  or alpha, alpha spent per pilot, more looks or days, higher guardrail ceilings, fewer ramp steps or
  rows: `GATE_SETTINGS_LOOSER_WHEN`) than the last accepted one (`accepted_baseline`: the spec version
  of the use case's last promoted or approved pilot, else 1) is not approved by anyone who loosened it
  in a version since (`gate_loosened`); another approver signs;
- signing is atomic: the decision is read and signed under a write lock (SQLite ``BEGIN IMMEDIATE``,
  PostgreSQL ``SELECT ... FOR UPDATE``), so of two approvers acting at once exactly one signs and the
  other is told who already did;
- every signature writes an Approval row and an audit entry in the same transaction;
- when a Prefect flow run is paused waiting for this decision, it is resumed with the approval as its
  run input (`resume_flow_run`) once the signature has committed (Prefect is never called under the
  write lock); a recorded run that is no longer paused is a clear error and nothing is written, and one
  that stops waiting between that check and the resume gets the effect applied here instead. When no
  flow run waits (e.g. the main job finished), the effect is applied here directly, via the same
  functions the promote/rollback flows call.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from sqlalchemy import select

from rollout import audit, lifecycle
from rollout.auth import Identity, require_approver, same_person, still_approver
from rollout.db.models import (
    AliasMove,
    Approval,
    AuditEntry,
    GateDecision,
    ModelVersion,
    Pilot,
    SpecVersion,
    UseCase,
    as_utc,
    utcnow,
)
from rollout.db.session import session_scope
from rollout.redact import redact
from rollout.spec import GateSpec, Guardrails, has_visible_text
from sparse_core.errors import SparsePilotError


class ApprovalError(SparsePilotError, ValueError):
    """The request cannot be accepted (missing reason, wrong decision state, same approver twice)."""


class FlowNotWaiting(SparsePilotError, RuntimeError):
    """The decision names a Prefect flow run that is no longer paused: it cannot be resumed."""


class ApprovalPayload(BaseModel):
    """What a paused approval flow receives (its `wait_for_input` model is a RunInput with these fields)."""

    approve: bool
    actor: str
    role: str
    reason: str
    approval_id: int
    decision_id: int
    continue_ramp: bool = False  # the ramp was continued (`approve` False): nothing to promote or stop


@dataclass(frozen=True)
class ApprovalResult:
    decision_id: int
    action: str  # approve / reject / continue / withdraw
    approval_id: int
    message: str
    took_effect: bool = False
    needs_second_approver: bool = False
    against_recommendation: bool = False
    resumed_flow_run_id: str | None = None
    applied_directly: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def recommended_action(decision: Any) -> str:
    """'approve' when the evidence supports what approving does, else 'reject'. `decision`: a
    GateDecision, or anything with its `awaiting`, `outcome` and `evidence`."""
    if decision.awaiting == "rollback_approval":
        return "approve"  # the monitor recommends the rollback
    # A GO asks for promotion (awaiting "approval") at the plan's last step, or at an earlier one where a
    # short pilot asks early (`promote_after_step`, the main job's step 1). Promoting on a GO before the
    # last step skips the remaining ramp steps: an override like promoting on EXTEND (docs/operations.md).
    ok = decision.outcome == "GO" and decision.awaiting == "approval"
    return "approve" if ok and not ramp_steps_skipped(decision.evidence) else "reject"


def ramp_steps_skipped(evidence: Any) -> list[dict[str, Any]]:
    """The ramp steps a promotion on this gate decision skips, [{"index", "traffic_pct"}]: the plan's
    steps after the decision's own (`later_steps`, recorded by the gate; for a decision recorded before
    it, the indexes from `step_index` and `plan_steps`, the shares unknown). [] at the last step, for a
    monitor's or a person's decision, or where the evidence cannot say."""
    ev = evidence or {}
    if "later_steps" in ev:
        return [dict(s) for s in ev["later_steps"]]
    index, steps = ev.get("step_index"), ev.get("plan_steps")
    if not isinstance(index, int) or not isinstance(steps, int):
        return []
    return [{"index": i, "traffic_pct": None} for i in range(index + 1, steps)]


def skipped_in_words(steps: list[dict[str, Any]]) -> str:
    """'ramp step 2 (70%)', 'ramp steps 2 (70%) and 3 (90%)': what `ramp_steps_skipped` returned."""
    named = [
        f"{s['index']}" + (f" ({s['traffic_pct']:g}%)" if s.get("traffic_pct") is not None else "")
        for s in steps
    ]
    listed = named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]
    return f"ramp step{'s' if len(named) > 1 else ''} {listed}"


def skip_note(evidence: Any, *, waits_for_approval: bool) -> str:
    """The sentence an approver reads before promoting on a GO before the plan's last step; '' where a
    promotion skips nothing. Only a GO that waits for approval can continue the ramp (`check_continuable`):
    a middle step's GO that asked nobody has already moved the pilot on, and promoting on it is the
    override alone."""
    steps = ramp_steps_skipped(evidence)
    if not steps:
        return ""
    note = (
        f"Promoting on this decision skips {skipped_in_words(steps)} of the spec's plan: that goes against "
        "the plan, so it takes effect only when two different approvers sign it."
    )
    if not waits_for_approval:
        return note
    nxt = steps[0]
    share = f" ({nxt['traffic_pct']:g}%)" if nxt.get("traffic_pct") is not None else ""
    return (
        f"{note} One approver may instead continue the ramp to step {nxt['index']}{share}, as the plan "
        "would, and the gate looks again there."
    )


def check_continuable(session: Any, d: GateDecision) -> dict[str, Any]:
    """The ramp step a person may continue the pilot to on decision `d` (`{"index", "traffic_pct"}`): a
    gate's GO that waits for approval before the plan's last step, its pilot still awaiting approval at
    the decision's step. ApprovalError, saying why, otherwise (`check_approvable` first: a resolved or
    aborted decision is refused with its own words)."""
    check_approvable(session, d)
    head = f"decision {d.id} ({d.kind} {d.outcome}"
    if d.kind != "gate" or d.outcome != "GO" or d.awaiting != "approval":
        raise ApprovalError(
            f"{head}, {'waiting for approval' if d.awaiting != 'none' else 'asking nobody'}): only a gate's "
            "GO that waits for approval can continue the ramp; nothing was recorded"
        )
    later = ramp_steps_skipped(d.evidence)
    if not later:
        raise ApprovalError(
            f"{head}) is at the plan's last step: there is no later ramp step to continue to; promote or "
            "reject it. Nothing was recorded"
        )
    from rollout.db.models import PilotStep
    from rollout.pilots import pilot_label

    pilot = session.get(Pilot, d.pilot_id) if d.pilot_id else None
    step = session.get(PilotStep, d.pilot_step_id) if d.pilot_step_id else None
    if pilot is None or step is None:  # pragma: no cover - a gate decision always has both
        raise ApprovalError(f"{head}) has no pilot step to continue from; nothing was recorded")
    if (pilot.status, pilot.current_step_index) != ("awaiting_approval", step.index):
        raise ApprovalError(
            f"{head}): {pilot_label(pilot)} is {pilot.status} at step {pilot.current_step_index}, not "
            f"awaiting approval at step {step.index}; nothing was recorded"
        )
    return dict(later[0])


def continue_in(session: Any, d: GateDecision, *, actor: str, reason: str) -> dict[str, Any]:
    """The effect of continuing the ramp on decision `d`, in the caller's transaction (with the use case
    and the pilot locked): what `decisions.act_on` does for a GO at a step that is not final. The pilot
    runs again, its next step opens (`pilots.advance`: the decision's step stays passed, its end the GO's
    time) and the use case is piloting. Returns where the pilot now is."""
    from rollout import pilots

    uc = session.get(UseCase, d.use_case_id)
    pilot = session.get(Pilot, d.pilot_id)
    spec, _ = pilots.load_pilot_spec(session, pilot)  # the pilot's own plan, never a newer version's
    why = f"decision {d.id}: ramp continued by {actor} ({reason})"
    pilots.stop_pilot(session, pilot, status="running", actor=actor, reason=why)
    new = pilots.advance(session, pilot, spec, actor=actor, decision_id=d.id)
    lifecycle.set_phase(session, uc, "piloting", actor=actor, reason=why)
    return {
        "action": "continued",
        "decision_id": d.id,
        "pilot": pilots.pilot_label(pilot),
        "pilot_status": pilot.status,
        "step_index": new.index,
        "traffic_pct": new.traffic_pct,
    }


def check_approvable(session: Any, d: GateDecision) -> None:
    """A person may act on a decision that waits for them, or override the latest gate decision of a
    pilot that is still running (e.g. promote on EXTEND: against the recommendation, two approvers)."""
    if d.resolution == "aborted":  # closed by `pilot NAME --abort` (rollout.pilots): say who and why
        raise ApprovalError(f"decision {d.id} was closed: {_aborted_by(session, d)}; nothing was recorded")
    if d.resolution is not None:
        by = session.scalar(
            select(Approval.actor).where(Approval.decision_id == d.id).order_by(Approval.id.desc())
        )
        finish = ""
        if d.resolution == "approved":  # rollout.unfinished: an approval whose effect did not complete
            finish = (
                "; if it did not take effect, `sparsepilot rollback NAME` finishes it"
                if d.awaiting == "rollback_approval"
                else f"; if it did not take effect, `sparsepilot promote NAME --decision {d.id}` finishes it"
            )
        raise ApprovalError(
            f"decision {d.id} was already {d.resolution}" + (f" by {by}" if by else "") + finish
        )
    if d.awaiting != "none":
        return
    pilot = session.get(Pilot, d.pilot_id) if d.pilot_id else None
    latest = (
        session.scalar(
            select(GateDecision.id)
            .where(GateDecision.pilot_id == d.pilot_id, GateDecision.kind == "gate")
            .order_by(GateDecision.id.desc())
        )
        if pilot
        else None
    )
    if d.kind != "gate" or pilot is None or pilot.status != "running" or latest != d.id:
        raise ApprovalError(
            f"decision {d.id} ({d.kind} {d.outcome}) is not waiting for a person and is not the latest "
            "decision of a running pilot"
        )


def _aborted_by(session: Any, d: GateDecision) -> str:
    """Who aborted the pilot that closed decision `d`, when and why (its `pilot.abort` audit entry)."""
    from rollout.pilots import pilot_label

    pilot = session.get(Pilot, d.pilot_id) if d.pilot_id else None
    entry = (
        session.scalar(
            select(AuditEntry)
            .where(
                AuditEntry.action == "pilot.abort",
                AuditEntry.entity == "pilot",
                AuditEntry.entity_id == str(d.pilot_id),
            )
            .order_by(AuditEntry.id.desc())
        )
        if pilot
        else None
    )
    if entry is None:
        return "its pilot was aborted"
    reason = (entry.details or {}).get("reason")
    return f"{pilot_label(pilot)} was aborted by {entry.actor} at {as_utc(entry.ts):%Y-%m-%d %H:%M} UTC" + (
        f" (reason: {reason})" if reason else ""
    )


def lock_decision(session: Any, decision_id: int) -> GateDecision:
    """The decision re-read and locked for a read-check-write, after its use case and pilot
    (`pilots.locked`: use case -> pilot -> decision, the one order of every writer of a pilot's state; a
    decision without a pilot, such as a person's rollback, locks its use case). Locking the decision
    first deadlocked PostgreSQL against `pilot --abort`, which locks in that order. ApprovalError when
    the decision does not exist. The caller's transaction is `session_scope(immediate=True)`."""
    from rollout import pilots

    ids = session.execute(
        select(GateDecision.use_case_id, GateDecision.pilot_id).where(GateDecision.id == decision_id)
    ).first()
    if ids is None:
        raise ApprovalError(f"decision {decision_id} does not exist")
    pilots.locked(session, ids.use_case_id, ids.pilot_id)
    d = session.get(GateDecision, decision_id, with_for_update=True, populate_existing=True)
    if d is None:  # pragma: no cover - decisions are never deleted
        raise ApprovalError(f"decision {decision_id} does not exist")
    return d


def check_decision_of(use_case: str, decision_id: int, *, db_url: str | None = None) -> None:
    """Refuse a decision id that is not one of this use case's decisions (ApprovalError; an unknown use
    case is UnknownUseCase)."""
    from rollout.pilots import get_use_case

    with session_scope(db_url) as session:
        uc = get_use_case(session, use_case)
        d = session.get(GateDecision, decision_id)
        if d is None:  # review U4: it was "does not belong to use case", as if it were another's
            open_ = session.scalars(
                select(GateDecision.id)
                .where(GateDecision.use_case_id == uc.id, GateDecision.resolution.is_(None))
                .order_by(GateDecision.id)
            ).all()
            waiting = (
                f"{use_case}'s open decisions: {', '.join(map(str, open_))}"
                if open_
                else f"{use_case} has no open decision; `sparsepilot gate {use_case}` makes one"
            )
            raise ApprovalError(f"decision {decision_id} does not exist ({waiting})")
        if d.use_case_id != uc.id:
            other = session.get(UseCase, d.use_case_id).name
            raise ApprovalError(
                f"decision {decision_id} belongs to use case {other!r}, not {use_case!r}; "
                "nothing was recorded"
            )


def unfinished_promotion(decision_id: int, *, db_url: str | None = None) -> int | None:
    """The approval behind a promotion that was approved but did not complete (e.g. MLflow was down):
    its id, so the promotion can be finished, or None when the decision still needs a person's
    approval. A decision that asks for a rollback is not promoted on (ApprovalError)."""
    with session_scope(db_url) as session:
        d = session.get(GateDecision, decision_id)
        if d is None:
            raise ApprovalError(f"no decision {decision_id}")
        if d.awaiting == "rollback_approval":
            raise ApprovalError(
                f"decision {decision_id} asks for a rollback; its approval, if it did not take effect, is "
                "finished by `sparsepilot rollback`"
            )
        return unfinished_promotion_in(session, d)


def unfinished_promotion_in(session: Any, d: GateDecision) -> int | None:
    """`unfinished_promotion` of a decision read in the caller's transaction."""
    approval = session.scalar(
        select(Approval.id)
        .where(Approval.decision_id == d.id, Approval.action == "approve")
        .order_by(Approval.id.desc())
    )
    phase = session.get(UseCase, d.use_case_id).phase
    if d.resolution != "approved" or phase in ("promoted", "rolled_back") or approval is None:
        return None
    return None if _superseded(session, d) else approval


def _superseded(session: Any, d: GateDecision) -> bool:
    """Whether the champion moved on after this decision's promotion committed (a rollback, a later
    promotion): finishing it again would re-promote on old evidence. A promotion that committed in
    MLflow but crashed before the use case was marked promoted is the last champion move: unfinished."""
    from rollout import registry

    moves = registry.committed_moves(session, d.use_case_id, "champion")
    mine = [i for i, m in enumerate(moves) if m.idempotency_key == f"promote:{d.id}"]
    return bool(mine) and mine[-1] < len(moves) - 1


def override_signatures(session: Any, decision_id: int, action: str) -> list[Approval]:
    """The signatures already given to `action` the decision against the gate's recommendation (less
    those their signers withdrew: `withdrawn_signatures`)."""
    gone = withdrawn_signatures(session, decision_id)
    return [
        a
        for a in session.scalars(
            select(Approval).where(
                Approval.decision_id == decision_id,
                Approval.action == action,
                Approval.against_recommendation.is_(True),
            )
        )
        if a.id not in gone
    ]


def signer_subject(session: Any, approval: Approval) -> str:
    """The OIDC ``<issuer>#<subject>`` a signature was given with ("" for a local account, or a
    signature recorded before subjects were kept): from its audit entry, written with the Approval row."""
    details = session.scalars(
        select(AuditEntry.details)
        .where(
            AuditEntry.entity == "gate_decision",
            AuditEntry.entity_id == str(approval.decision_id),
            AuditEntry.actor == approval.actor,
            AuditEntry.action.like(f"approval.{approval.action}%"),
        )
        .order_by(AuditEntry.id)
    ).all()
    return next((str(d["subject"]) for d in details if isinstance(d, dict) and d.get("subject")), "")


def counting_signatures(
    session: Any, decision_id: int, action: str
) -> tuple[list[tuple[Approval, str]], list[tuple[Approval, str]]]:
    """The override signatures already given (`override_signatures`), split into those that still count
    ([(approval, its signer's OIDC subject)]) and those that lapsed ([(approval, why)]): a signer who
    is no longer an approver (a local account demoted or deleted, an OIDC user taken off the approver
    list; `rollout.auth.still_approver`) does not count, so one current approver cannot complete an
    override on a former approver's signature."""
    counting, lapsed = [], []
    for a in override_signatures(session, decision_id, action):
        subject = signer_subject(session, a)
        ok, what = still_approver(a.actor, subject=subject)
        if ok:
            counting.append((a, subject))
        else:
            lapsed.append((a, what))
    return counting, lapsed


@dataclass(frozen=True)
class GateLoosening:
    """How the gate of the spec version a pilot ran under (`version`) is looser than the last accepted
    one (`baseline`, for the reason `basis`): `net`, the settings looser than the baseline's, and
    `steps`, [(version, its author, [changes])] for each version since the baseline that loosened one
    of those settings against the version before it."""

    version: int
    baseline: int
    basis: str
    net: list[str]
    steps: list[tuple[int, str, list[str]]]


# --- what makes a GO easier: the spec's gate-relevant settings, each with the way that is looser --------
#
# A GO is easier when its test is weaker (margin, alpha, alpha spent per pilot rather than across the use
# case's pilots), when it gets more chances (looks, days), when a guardrail stops less (higher ceilings,
# a slower latency SLO, a guardrail judged on fewer rows) or when there is less to pass (fewer ramp steps,
# fewer rows before a step's test may decide). Not compared: the planning values (`planned_effect`,
# `planned_sd`, `score_type`), which tune the bets but keep the GO's level, and the steps' traffic shares,
# which change who is served, not the evidence a GO needs.

_GATE_DEFAULTS = {name: f.default for name, f in GateSpec.model_fields.items() if not f.is_required()}
_GUARD_DEFAULTS = Guardrails().model_dump()
_SPENDING_LOOSENESS = {"use_case": 0, "pilot": 1}  # each pilot's GO at the whole alpha is looser


def _section(spec: Mapping[str, Any], *path: str) -> Mapping[str, Any] | None:
    node: Any = spec
    for key in path:
        node = node.get(key) if isinstance(node, Mapping) else None
    return node if isinstance(node, Mapping) else None


def _gate(key: str) -> Callable[[Mapping[str, Any]], Any]:
    return lambda spec: (_section(spec, "gate") or {}).get(key, _GATE_DEFAULTS.get(key))


def _guard(key: str) -> Callable[[Mapping[str, Any]], Any]:
    return lambda spec: (_section(spec, "gate", "guardrails") or {}).get(key, _GUARD_DEFAULTS[key])


def _latency_slo(spec: Mapping[str, Any]) -> Any:
    """The latency guardrail's SLO, as `GateSettings.from_spec` takes it: the gate's own, else the spec's
    p95 SLO; None where the spec says neither."""
    own = (_section(spec, "gate", "guardrails") or {}).get("p95_latency_ms")
    if own is not None:
        return own
    slo = spec.get("latency_slo_ms")
    return slo.get("p95") if isinstance(slo, Mapping) else slo


def _ramp(spec: Mapping[str, Any]) -> list[Any] | None:
    steps = (_section(spec, "rollout") or {}).get("steps")
    return steps if isinstance(steps, list) else None


def _step_min_samples(n: int) -> Callable[[Mapping[str, Any]], Any]:
    def read(spec: Mapping[str, Any]) -> Any:
        steps = _ramp(spec) or []
        return (
            steps[n - 1].get("min_samples") if n <= len(steps) and isinstance(steps[n - 1], Mapping) else None
        )

    return read


def _larger(old: Any, new: Any) -> bool:
    return float(new) > float(old)


def _smaller(old: Any, new: Any) -> bool:
    return float(new) < float(old)


def _more_spent_per_pilot(old: Any, new: Any) -> bool:
    return _SPENDING_LOOSENESS.get(new, -1) > _SPENDING_LOOSENESS.get(old, 2)


@dataclass(frozen=True)
class LooserWhen:
    """One gate-relevant setting: its label in messages, how to read it from a stored spec (None: the spec
    cannot say), and whether a change from ``old`` to ``new`` makes a GO easier."""

    label: str
    read: Callable[[Mapping[str, Any]], Any]
    looser: Callable[[Any, Any], bool]

    def change(self, before: Mapping[str, Any], after: Mapping[str, Any]) -> str | None:
        """'margin 0.2 -> 0.5' where ``after`` is looser than ``before`` on this setting, else None."""
        old, new = self.read(before), self.read(after)
        if old is None or new is None or not self.looser(old, new):
            return None
        show = (lambda v: f"{v:g}") if isinstance(old, int | float) and isinstance(new, int | float) else str
        return f"{self.label} {show(old)} -> {show(new)}"


GATE_SETTINGS_LOOSER_WHEN = (
    LooserWhen("margin", _gate("non_inferiority_margin"), _larger),
    LooserWhen("alpha", _gate("alpha"), _larger),
    LooserWhen("alpha spending", _gate("alpha_spending"), _more_spent_per_pilot),
    LooserWhen("max looks", _gate("max_looks"), _larger),
    LooserWhen("max duration days", _gate("max_duration_days"), _larger),
    LooserWhen("error-rate ceiling", _guard("max_error_rate"), _larger),
    LooserWhen("error-rate increase ceiling", _guard("max_error_rate_increase"), _larger),
    LooserWhen("latency SLO ms", _latency_slo, _larger),
    LooserWhen("latency exceedance", _guard("max_latency_exceedance"), _larger),
    LooserWhen("guardrail min samples", _guard("min_samples"), _smaller),
    LooserWhen(
        "shadow min samples",
        lambda spec: (_section(spec, "rollout", "shadow") or {}).get("min_samples"),
        _smaller,
    ),
    LooserWhen("ramp steps", lambda spec: None if _ramp(spec) is None else len(_ramp(spec) or []), _smaller),
)


def looser_when(versions: list[Mapping[str, Any]]) -> tuple[LooserWhen, ...]:
    """The settings compared across these specs: `GATE_SETTINGS_LOOSER_WHEN`, and each ramp step's
    ``min_samples`` (step N against step N; a step gone is counted by "ramp steps")."""
    most = max((len(_ramp(spec) or []) for spec in versions), default=0)
    steps = tuple(
        LooserWhen(f"step {n} min samples", _step_min_samples(n), _smaller) for n in range(1, most + 1)
    )
    return GATE_SETTINGS_LOOSER_WHEN + steps


def loosenings(
    versions: list[tuple[int, str, dict[str, Any]]],
) -> tuple[list[str], list[tuple[int, str, list[str]]]]:
    """Of spec versions [(version, author, spec)] from the baseline (first) to the one a pilot ran under
    (last), in order: the gate-relevant settings (`looser_when`) on which the last is looser than the
    baseline (["margin 0.2 -> 0.5", "ramp steps 3 -> 1"]), and each later version that loosened one of
    those against the version before it, with its author and changes. A setting brought back to (or
    tighter than) the baseline's is no loosening, nor is its history: the GO is judged under a gate no
    looser than the one last accepted."""
    if len(versions) < 2:
        return [], []
    first, last = versions[0][2], versions[-1][2]
    net, settings = [], []
    for setting in looser_when([spec for _, _, spec in versions]):
        change = setting.change(first, last)
        if change is not None:
            net.append(change)
            settings.append(setting)
    steps = []
    for (_, _, before), (version, author, now) in zip(versions, versions[1:], strict=False):
        changes = [c for c in (setting.change(before, now) for setting in settings) if c is not None]
        if changes:
            steps.append((version, author, changes))
    return net, steps


def accepted_baseline(session: Any, pilot: Pilot) -> tuple[int, str]:
    """The spec version of the gate last accepted for ``pilot``'s use case, and why: that of its latest
    earlier pilot that was promoted (or later rolled back) or whose GO an approver approved; else 1."""
    approved_go = (
        select(GateDecision.pilot_id)
        .where(GateDecision.outcome == "GO", GateDecision.resolution == "approved")
        .where(GateDecision.pilot_id.is_not(None))
    )
    earlier = session.scalars(
        select(Pilot)
        .where(Pilot.use_case_id == pilot.use_case_id, Pilot.id < pilot.id, Pilot.spec_version.is_not(None))
        .where(Pilot.status.in_(("promoted", "rolled_back")) | Pilot.id.in_(approved_go))
        .order_by(Pilot.id.desc())
        .limit(1)
    ).first()
    if earlier is None:
        return 1, "the first spec version: no earlier pilot of the use case was promoted or approved"
    return int(earlier.spec_version), f"the version pilot {earlier.id} ran under, the last accepted"


def gate_loosened(session: Any, d: GateDecision) -> GateLoosening | None:
    """How the gate ``d``'s pilot ran under is looser (a GO comes easier: `looser_when`) than the gate
    last accepted for the use case (`accepted_baseline`), and who loosened
    it in which version since (`loosenings`), else None. Comparing with the version just before the
    pilot's was not enough: loosen in v2, add a reworded v3, and v3 against v2 changed nothing (review
    s46 T3-1)."""
    pilot = session.get(Pilot, d.pilot_id) if d.pilot_id else None
    if pilot is None or not pilot.spec_version:
        return None
    baseline, basis = accepted_baseline(session, pilot)
    if pilot.spec_version <= baseline:
        return None
    rows = session.scalars(
        select(SpecVersion)
        .where(
            SpecVersion.use_case_id == d.use_case_id,
            SpecVersion.version >= baseline,
            SpecVersion.version <= pilot.spec_version,
        )
        .order_by(SpecVersion.version)
    ).all()
    if not rows or rows[0].version != baseline or rows[-1].version != pilot.spec_version:
        return None
    net, steps = loosenings([(sv.version, sv.created_by, sv.spec) for sv in rows])
    if not net:
        return None
    return GateLoosening(pilot.spec_version, baseline, basis, net, steps)


def _refuse_the_loosener(session: Any, d: GateDecision, who: Identity) -> None:
    """A GO judged under a gate looser than the one last accepted is not approved by anyone who loosened
    it since (in any version between): another approver looks at it (one signature, as for any GO).
    Otherwise one approver could move the gate and then approve what passed it alone (review s46 A13),
    also across versions: loosen in one, reword in the next (T3-1)."""
    loosened = gate_loosened(session, d)
    if loosened is None:
        return
    mine = [
        (version, changes)
        for version, author, changes in loosened.steps
        if same_person(author, who.name, subjects=("", who.subject))
    ]
    if not mine:
        return
    by = "; ".join(f"{author} in version {v} ({', '.join(ch)})" for v, author, ch in loosened.steps)
    raise ApprovalError(
        f"decision {d.id} was judged under spec version {loosened.version}, whose gate is looser than "
        f"spec version {loosened.baseline}'s ({loosened.basis}): {', '.join(loosened.net)}; loosened by "
        f"{by}; its GO needs an approver other than {who.name}, who loosened it in version "
        f"{', '.join(str(v) for v, _ in mine)}; nothing was recorded"
    )


def _sign(
    session: Any,
    d: GateDecision,
    who: Identity,
    action: str,
    text: str,
    against: bool,
    event: str,
    **about: Any,
) -> Approval:
    """A person's signature on the decision: the Approval row and its audit entry (`event`, with the
    reason, the role, `about` and where the identity came from)."""
    row = Approval(
        decision_id=d.id,
        actor=who.name,
        role=who.role,
        action=action,
        reason=text,
        against_recommendation=against,
    )
    session.add(row)
    session.flush()
    details = {"reason": text, "role": who.role, **about, "source": who.source}
    if who.subject:  # an OIDC user: who they are whatever email they were recorded under (`signer_subject`)
        details["subject"] = who.subject
    audit.record(session, who.name, event, on=d, details=details)
    return row


def _check_reason(reason: str | None) -> str:
    text = (reason or "").strip()
    if not has_visible_text(text):  # zero-width and other invisible characters alone say nothing
        raise ApprovalError("a reason is required (say why, in a sentence the audit log can keep)")
    return text


def _flow_run_state(flow_run_id: str) -> tuple[bool, str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        fr = client.read_flow_run(uuid.UUID(flow_run_id))
    state = fr.state
    return bool(state and state.is_paused()), (state.name if state else "unknown")


def flow_is_waiting(flow_run_id: str | None) -> bool:
    if not flow_run_id:
        return False
    try:
        return _flow_run_state(flow_run_id)[0]
    except Exception:  # noqa: BLE001 - an unknown run is simply not waiting
        return False


def approve(
    decision_id: int,
    identity: Identity | None,
    reason: str | None,
    *,
    reject: bool = False,
    continue_ramp: bool = False,
    apply_if_no_flow: bool = True,
    db_url: str | None = None,
) -> ApprovalResult:
    """Approve (or reject) a pending decision, or (`continue_ramp`) continue the pilot's ramp from a GO
    before the plan's last step. See the module docstring for the rules."""
    if reject and continue_ramp:
        raise ApprovalError("reject or continue the ramp, not both")
    action = "continue" if continue_ramp else "reject" if reject else "approve"
    what = "continue the ramp on" if continue_ramp else action
    who = require_approver(identity, f"{what} decision {decision_id}")
    text = _check_reason(reason)
    effect: dict[str, Any] | None = None
    resumed: str | None = None
    apply_now = False
    # The paused run is asked about before the write lock is taken and resumed after the signature has
    # committed: a call to Prefect inside the transaction held the state DB's write lock for as long as
    # Prefect took to answer (minutes with a stalled API, every other writer failing meanwhile), and the
    # resumed run could read the decision before the approval existed.
    with session_scope(db_url) as session:
        d = session.get(GateDecision, decision_id)
        asked = None if d is None else d.flow_run_id
    waiting, state = _flow_run_state_safe(asked) if asked else (False, "none")
    with session_scope(db_url, immediate=True) as session:
        # Two approvers signing at once are serialised (PostgreSQL: the row locks; SQLite: BEGIN
        # IMMEDIATE takes the write lock before this read), so the second sees the first's signature or
        # resolution instead of both acting on the same open decision. The use case and the pilot are
        # locked first (`lock_decision`: the order every writer of a pilot's state takes), so the pilot
        # `check_approvable` reads stays as it is until the commit.
        d = lock_decision(session, decision_id)
        if d.flow_run_id != asked:
            raise FlowNotWaiting(
                f"decision {d.id}: its approval run changed while you approved (another run registered, or "
                "the last one was released); nothing was recorded, try again"
            )
        if action == "continue":
            to_step = check_continuable(session, d)
        else:
            check_approvable(session, d)
        if action == "reject":
            refuse_rejecting_unasked(session, d)
        if action == "approve" and d.awaiting == "rollback_approval":
            _require_an_earlier_champion(session, d)
        # continuing the ramp is what the plan would have done: it goes against nothing, one signature
        against = action != "continue" and action != recommended_action(d)
        if action == "approve" and not against:
            _refuse_the_loosener(session, d, who)
        if against:
            earlier, lapsed = counting_signatures(session, d.id, action)
            signed = [
                a.actor for a, sub in earlier if same_person(a.actor, who.name, subjects=(sub, who.subject))
            ]
            if signed:  # one person under two identities (a local account and OIDC) counts once
                also = f" (as {signed[0]!r})" if signed[0] != who.name else ""
                raise ApprovalError(
                    f"{who.name!r} already signed this override of decision {decision_id}{also}; "
                    "a second, different approver must confirm it"
                )
            gone = "; ".join(
                f"{a.actor}'s signature no longer counts ({a.actor} is {what})" for a, what in lapsed
            )
            for a, what in lapsed:
                audit.record(
                    session,
                    who.name,
                    f"approval.{action}.signature_lapsed",
                    on=d,
                    details={"signer": a.actor, "approval_id": a.id, "why": what},
                )
            if not earlier:
                row = _sign(
                    session,
                    d,
                    who,
                    action,
                    text,
                    True,
                    f"approval.{action}.first_signature",
                    outcome=d.outcome,
                )
                return ApprovalResult(
                    decision_id=d.id,
                    action=action,
                    approval_id=row.id,
                    needs_second_approver=True,
                    against_recommendation=True,
                    message=(
                        (f"{gone}; " if gone else "")
                        + f"recorded {who.name}'s signature; to {action} against the gate's recommendation "
                        f"({d.outcome}{_skips(d) if action == 'approve' else ''}) a second, different "
                        f"approver must also {action} decision {d.id}; {_unchanged_in_words(session, d)}"
                    ),
                )
        d.resolution = {"approve": "approved", "reject": "rejected", "continue": "continued"}[action]
        about: dict[str, Any] = {"to_step": to_step} if action == "continue" else {}
        row = _sign(
            session,
            d,
            who,
            action,
            text,
            against,
            f"approval.{action}",
            outcome=d.outcome,
            awaiting=d.awaiting,
            against_recommendation=against,
            flow_run_id=d.flow_run_id,
            **about,
        )
        payload = ApprovalPayload(
            approve=action == "approve",
            actor=who.name,
            role=who.role,
            reason=text,
            approval_id=row.id,
            decision_id=d.id,
            continue_ramp=action == "continue",
        )
        if action == "continue":  # no alias moves: done here, with the signature, whole or not at all
            effect = continue_in(session, d, actor=who.name, reason=text)
        if d.flow_run_id:
            if not waiting:
                raise FlowNotWaiting(
                    f"decision {d.id}: flow run {d.flow_run_id} is no longer paused (state: {state}); "
                    "nothing was recorded. Start a new approval run (`sparsepilot approve` does) "
                    "or check the run in Prefect."
                )
            resumed = d.flow_run_id
        elif apply_if_no_flow or effect is not None:
            apply_now = effect is None
        else:
            raise FlowNotWaiting(
                f"decision {d.id}: no paused flow run is waiting for it; nothing was recorded"
            )
        approval_id, decision_pk = row.id, d.id
        effect_words = effect_in_words(session, d, action)
    if resumed is not None:
        try:
            _resume(resumed, payload)
        except Exception as exc:  # noqa: BLE001 - the signature stands: carry it out here instead
            # the run stopped waiting between the check and now (or Prefect cannot be reached): the
            # approval is recorded, so its effect is applied directly, as when no run waits (a run that
            # still waits will find the decision resolved; rollout.unfinished covers a death meanwhile)
            logging.getLogger("sparsepilot.approvals").warning(
                "decision %s: could not resume flow run %s (%s); applying the decision directly",
                decision_pk,
                resumed,
                redact(f"{type(exc).__name__}: {exc}"),
            )
            resumed, apply_now = None, effect is None  # a continued ramp is in effect already
    if apply_now:
        apply_decision(decision_pk, payload, db_url=db_url)
    if effect is not None:
        return ApprovalResult(
            decision_id=decision_pk,
            action=action,
            approval_id=approval_id,
            took_effect=True,
            resumed_flow_run_id=resumed,
            applied_directly=resumed is None,
            message=(
                f"continued the ramp on decision {decision_pk}: {effect['pilot']} runs at step "
                f"{effect['step_index']} ({effect['traffic_pct']:g}%) and the gate looks again there"
                + (f"; resumed flow run {resumed}" if resumed else "")
            ),
        )
    return ApprovalResult(
        decision_id=decision_pk,
        action=action,
        approval_id=approval_id,
        took_effect=True,
        against_recommendation=against,
        resumed_flow_run_id=resumed,
        applied_directly=apply_now,
        message=(
            f"{'approved' if action == 'approve' else 'rejected'} decision {decision_pk}: {effect_words}"
            + (f"; resumed flow run {resumed}" if resumed else "; applied directly (no flow run was waiting)")
        ),
    )


# --- what a signature does, in words; a decision that asked nobody (review U9) -----------------------
#
# A running pilot's latest gate decision (EXTEND, or a GO before the plan's last step) asks nobody: a
# person may only override it (promote, two approvers). Rejecting it used to stop the whole pilot on one
# signature, the natural way a new approver tried to take back a mistaken first signature; the pilot is
# stopped by `pilot NAME --abort` and a first signature is taken back by `approve --withdraw`.


def _names(session: Any, d: GateDecision) -> tuple[str, str]:
    """The decision's use-case name and its pilot's label ('pilot 2 of NAME'), or its use case alone."""
    from rollout.pilots import pilot_label

    name = session.get(UseCase, d.use_case_id).name
    pilot = session.get(Pilot, d.pilot_id) if d.pilot_id else None
    return name, (f"{pilot_label(pilot)} of {name}" if pilot is not None else name)


def effect_in_words(session: Any, d: GateDecision, action: str) -> str:
    """What a signature that takes effect does, for its message ('pilot 1 of NAME stopped ...')."""
    name, pilot = _names(session, d)
    if d.awaiting == "rollback_approval":
        return (
            f"{name}'s champion rolls back to the previous one"
            if action == "approve"
            else f"{name}'s champion is kept and its monitor resumes"
        )
    if action == "approve":
        return f"{pilot} promoted (its challenger becomes {name}'s champion)"
    from rollout.pilots import PILOT_AGAIN

    # this challenger's pilot has ended: `sparsepilot pilot NAME` refuses it (ensure_pilot_in)
    return f"{pilot} stopped (use case phase stopped); {PILOT_AGAIN} (`sparsepilot calibrate {name}`)"


def _unchanged_in_words(session: Any, d: GateDecision) -> str:
    """A first override signature changes nothing yet: where the pilot stands, and how to take it back."""
    name, pilot = _names(session, d)
    where = session.get(Pilot, d.pilot_id) if d.pilot_id else session.get(UseCase, d.use_case_id)
    status = where.status if isinstance(where, Pilot) else where.phase
    return (
        f"nothing changed yet ({pilot} is {status}); `sparsepilot approve {name} --decision {d.id} "
        "--withdraw --reason TEXT` takes your signature back"
    )


def refuse_rejecting_unasked(session: Any, d: GateDecision) -> None:
    """A decision that asked nobody is not rejected (ApprovalError naming what to do instead): that used
    to stop the running pilot on one signature."""
    if d.awaiting != "none" or d.resolution is not None:
        return
    name, pilot = _names(session, d)
    raise ApprovalError(
        f"decision {d.id} ({d.outcome}) asked nobody, so there is nothing to reject; nothing was recorded. "
        f"To stop {pilot}: `sparsepilot pilot {name} --abort --reason TEXT`; to take back your own "
        f"override signature: `sparsepilot approve {name} --decision {d.id} --withdraw --reason TEXT`"
    )


WITHDRAW = "withdraw"  # an Approval row's action: its signer took back their earlier override signature


def withdrawn_signatures(session: Any, decision_id: int) -> set[int]:
    """The ids of the decision's override signatures their signers withdrew: approvals are append-only
    (migration 0003), so a withdrawal is a later `withdraw` row by the same person (`same_person`, by
    name or by OIDC subject, `signer_subject`: an OIDC approver whose email changed is still the one who
    signed, as `approve` knows them)."""
    rows = list(
        session.scalars(select(Approval).where(Approval.decision_id == decision_id).order_by(Approval.id))
    )
    withdrawals = [w for w in rows if w.action == WITHDRAW]
    if not withdrawals:
        return set()
    subject = {a.id: signer_subject(session, a) for a in rows}
    gone: set[int] = set()
    for w in withdrawals:
        gone |= {
            a.id
            for a in rows
            if a.id < w.id and a.action != WITHDRAW and a.against_recommendation
            and same_person(a.actor, w.actor, subjects=(subject[a.id], subject[w.id]))
        }  # fmt: skip
    return gone


def withdraw(
    decision_id: int, identity: Identity | None, reason: str | None, *, db_url: str | None = None
) -> ApprovalResult:
    """Take back the caller's own first signature of an override that no second approver has confirmed:
    audited (`approval.withdraw`), the decision and its pilot unchanged. Refused for a decision already
    resolved (the override was confirmed, or the decision decided otherwise) and where the caller has
    no open override signature (another approver's is theirs to withdraw)."""
    who = require_approver(identity, f"withdraw a signature on decision {decision_id}")
    text = _check_reason(reason)
    with session_scope(db_url, immediate=True) as session:
        d = lock_decision(session, decision_id)
        if d.resolution is not None:
            raise ApprovalError(
                f"decision {d.id} was already {d.resolution}: a signature that took effect cannot be "
                "withdrawn; nothing was recorded"
            )
        gone = withdrawn_signatures(session, d.id)
        open_ = [
            a
            for a in session.scalars(
                select(Approval).where(Approval.decision_id == d.id, Approval.action != WITHDRAW)
            )
            if a.against_recommendation and a.id not in gone
        ]
        # the person, as `approve` knows them: by name, or by OIDC subject whatever email they signed with
        mine = [
            a
            for a in open_
            if same_person(a.actor, who.name, subjects=(signer_subject(session, a), who.subject))
        ]
        if not mine:
            others = sorted({a.actor for a in open_})
            raise ApprovalError(
                f"{who.name!r} has no unconfirmed signature on decision {d.id} to withdraw"
                + (f" (signed by {', '.join(others)}: only they can withdraw theirs)" if others else "")
                + "; nothing was recorded"
            )
        row = _sign(
            session,
            d,
            who,
            WITHDRAW,
            text,
            False,
            "approval.withdraw",
            withdrawn=[a.id for a in mine],
            action_withdrawn=mine[0].action,
        )
        _name, pilot = _names(session, d)
        status = session.get(Pilot, d.pilot_id).status if d.pilot_id else None
        message = (
            f"signature withdrawn: {who.name}'s {mine[0].action} of decision {d.id} no longer counts; "
            f"decision {d.id} is unchanged" + (f" and {pilot} is {status}" if status else "")
        )
        return ApprovalResult(
            decision_id=d.id,
            action=WITHDRAW,
            approval_id=row.id,
            message=message,
        )


def _skips(d: GateDecision) -> str:
    """'; promoting now skips ramp steps 2 (70%) and 3 (90%)' for a GO before the plan's last step (the
    remaining ramp steps, unnamed, for a GO that asked nobody recorded without the plan's steps)."""
    if d.outcome != "GO":
        return ""
    steps = ramp_steps_skipped(d.evidence)
    if steps:
        return f"; promoting now skips {skipped_in_words(steps)}"
    # a GO that asked nobody is an intermediate step's even where its evidence cannot name the rest
    return "; promoting now skips the remaining ramp steps" if d.awaiting == "none" else ""


def _require_an_earlier_champion(session: Any, d: GateDecision) -> None:
    """A rollback needs a version to return to. Approving one that has none used to commit the approval,
    then fail to move the alias, and leave the use case waiting for a decision nobody could make."""
    from rollout import registry

    if len(registry.champions(session, d.use_case_id)) < 2:
        raise ApprovalError(
            f"decision {d.id}: there is no earlier champion to roll back to; nothing was recorded. Keep "
            "the champion (reject the rollback: two approvers, as it goes against the monitor) and take it "
            "out of serving by hand if it must go"
        )


def _flow_run_state_safe(flow_run_id: str) -> tuple[bool, str]:
    try:
        return _flow_run_state(flow_run_id)
    except Exception as exc:  # noqa: BLE001
        return False, f"unreadable ({type(exc).__name__}: {exc})"


def _resume(flow_run_id: str, payload: ApprovalPayload) -> None:
    from prefect.exceptions import FlowPauseTimeout, NotPausedError
    from prefect.flow_runs import resume_flow_run

    try:
        resume_flow_run(uuid.UUID(flow_run_id), run_input=payload.model_dump())
    except (NotPausedError, FlowPauseTimeout) as exc:
        raise FlowNotWaiting(f"flow run {flow_run_id} can no longer be resumed: {exc}") from None


# --- effects (called by the resumed flow, or directly when no flow waits) ---------------------------
#
# The effects trust the database, not their caller: the acting identity is read back from the Approval
# row (a forged run input cannot promote anything), and every alias move goes through rollout.registry
# with an idempotency key derived from the decision, so a retried flow converges on the same move.


def approval_identity(
    approval_id: int, decision_id: int, *, actions: tuple[str, ...], db_url: str | None = None
) -> Identity:
    """The Identity that signed `approval_id` for `decision_id` with one of `actions`, re-checked."""
    with session_scope(db_url) as session:
        row = session.get(Approval, approval_id)
        if row is None or row.decision_id != decision_id or row.action not in actions:
            raise ApprovalError(
                f"approval {approval_id} is not a {'/'.join(actions)} of decision {decision_id}"
            )
        d = session.get(GateDecision, decision_id)
        if d is None or d.resolution not in ("approved", "rejected", "continued"):
            raise ApprovalError(f"decision {decision_id} is not resolved; nothing to carry out")
        who = Identity(name=row.actor, role=row.role, source="approval")  # type: ignore[arg-type]
    return require_approver(who, f"carry out decision {decision_id}")


def apply_decision(
    decision_id: int, payload: ApprovalPayload, *, db_url: str | None = None
) -> dict[str, Any]:
    """Carry out a resolved decision: promote, stop the pilot, roll back, or (a continued ramp, done when
    it was signed) report where the pilot runs now."""
    with session_scope(db_url) as session:
        d = session.get(GateDecision, decision_id)
        if d is None:
            raise ApprovalError(f"decision {decision_id} does not exist")
        awaiting = d.awaiting
    if payload.continue_ramp:
        return apply_continue(decision_id, payload.approval_id, reason=payload.reason, db_url=db_url)
    if awaiting == "rollback_approval":
        if payload.approve:
            return apply_rollback(decision_id, payload.approval_id, reason=payload.reason, db_url=db_url)
        return apply_keep(decision_id, payload.approval_id, reason=payload.reason, db_url=db_url)
    if payload.approve:
        return apply_promotion(decision_id, payload.approval_id, reason=payload.reason, db_url=db_url)
    return apply_rejection(decision_id, payload.approval_id, reason=payload.reason, db_url=db_url)


def baseline_version_id(use_case_name: str, *, db_url: str | None = None) -> int | None:
    """The use case's registered dense baseline (plan metadata 'baseline' = 'dense'), if any."""
    from rollout import pilots
    from rollout.db.models import ModelVersion

    with session_scope(db_url) as session:
        uc = pilots.get_use_case(session, use_case_name)
        for mv in session.scalars(
            select(ModelVersion).where(ModelVersion.use_case_id == uc.id).order_by(ModelVersion.id)
        ):
            if (mv.plan or {}).get("metadata", {}).get("baseline") == "dense" and mv.mlflow_version:
                return mv.id
    return None


def _resolved_and_locked(
    session: Any, decision_id: int, resolution: str, *, to: str
) -> tuple[GateDecision, UseCase, Pilot]:
    """What an effect on a decision's pilot starts with (`apply_promotion`, `apply_continue`): the
    decision, refused unless it was resolved ``resolution`` and has a pilot ``to`` act on, with its use
    case and pilot locked (`pilots.locked`: the order every writer of a pilot's state takes)."""
    from rollout import pilots

    d = session.get(GateDecision, decision_id)
    if d is None:
        raise ApprovalError(f"decision {decision_id} does not exist")
    if d.resolution != resolution:
        raise ApprovalError(f"decision {decision_id} is {d.resolution}, not {resolution}")
    if d.pilot_id is None:
        raise ApprovalError(f"decision {decision_id} has no pilot to {to}")
    uc, pilot = pilots.locked(session, d.use_case_id, d.pilot_id)
    return d, uc, pilot


def apply_promotion(
    decision_id: int, approval_id: int, *, reason: str, db_url: str | None = None
) -> dict[str, Any]:
    """challenger -> champion for the decision's pilot. Before a use case's first promotion the dense
    baseline (what was serving) is recorded as champion, so a rollback has somewhere to return to."""
    from rollout import pilots, registry

    who = approval_identity(approval_id, decision_id, actions=("approve",), db_url=db_url)
    with session_scope(db_url, immediate=True) as session:
        d, uc, pilot = _resolved_and_locked(session, decision_id, "approved", to="promote")
        _require_pilot_to_promote(d, pilot, moved=False)
        name, mv_id = uc.name, pilot.model_version_id
        has_champion = bool(registry.champions(session, uc.id))
    moves = []
    if not has_champion:
        base = baseline_version_id(name, db_url=db_url)
        if base is not None:
            moves.append(
                registry.set_alias(
                    name,
                    "champion",
                    model_version_id=base,
                    actor=who,
                    reason=(
                        "record the dense baseline that served before the first promotion "
                        f"(decision {decision_id})"
                    ),
                    idempotency_key=f"baseline:{decision_id}",
                    db_url=db_url,
                )
            )
    moves.append(
        registry.promote(
            name,
            model_version_id=mv_id,
            actor=who,
            reason=reason,
            idempotency_key=f"promote:{decision_id}",
            db_url=db_url,
        )
    )
    with session_scope(db_url, immediate=True) as session:
        d = session.get(GateDecision, decision_id)
        uc, pilot = pilots.locked(session, d.use_case_id, d.pilot_id)
        _require_pilot_to_promote(d, pilot, moved=True)
        # promoted on an earlier step's GO (two approvers): the steps not run are "skipped", not passed
        skipped = d.awaiting != "approval"
        pilots.stop_pilot(
            session,
            pilot,
            status="promoted",
            actor=who.name,
            reason=reason,
            open_steps="skipped" if skipped else None,
        )
        lifecycle.set_phase(
            session, uc, "promoted", actor=who.name, reason=f"decision {decision_id} approved"
        )
    return {"action": "promoted", "decision_id": decision_id, "alias_moves": [_move_dict(m) for m in moves]}


def _require_pilot_to_promote(d: GateDecision, pilot: Pilot, *, moved: bool) -> None:
    """The pilot an approved GO promotes must still be live (or promoted by this decision already, on a
    retry): one stopped or rolled back since (an abort is refused once the GO is approved, `abort_pilot`)
    is never brought back to "promoted"."""
    from rollout.pilots import ACTIVE_PILOT, pilot_label

    if pilot.status in (*ACTIVE_PILOT, "promoted"):
        return
    done = (
        "its champion move committed already (alias history): the use case's state is left as it is, "
        "for a person to decide"
        if moved
        else "nothing moved"
    )
    raise ApprovalError(f"decision {d.id}: {pilot_label(pilot)} is {pilot.status}, not promotable; {done}")


def apply_continue(
    decision_id: int, approval_id: int, *, reason: str, db_url: str | None = None
) -> dict[str, Any]:
    """A continued ramp, for the approval run that was resumed with it: the signature carried it out
    already (`approve`), so this reports where the pilot runs now. Should the pilot still await approval
    at the decision's step (a record written otherwise), it is continued here, once, under the lock."""
    from rollout import pilots
    from rollout.db.models import PilotStep

    who = approval_identity(approval_id, decision_id, actions=("continue",), db_url=db_url)
    with session_scope(db_url, immediate=True) as session:
        d, _uc, pilot = _resolved_and_locked(session, decision_id, "continued", to="continue")
        step = session.get(PilotStep, d.pilot_step_id)
        if (pilot.status, pilot.current_step_index) == ("awaiting_approval", step.index):
            return continue_in(session, d, actor=who.name, reason=reason)
        now = pilots.current_step(session, pilot)
        return {
            "action": "continued",
            "decision_id": decision_id,
            "pilot": pilots.pilot_label(pilot),
            "pilot_status": pilot.status,
            "step_index": now.index,
            "traffic_pct": now.traffic_pct,
        }


def apply_rejection(
    decision_id: int, approval_id: int, *, reason: str, db_url: str | None = None
) -> dict[str, Any]:
    from rollout import pilots

    who = approval_identity(approval_id, decision_id, actions=("reject",), db_url=db_url)
    with session_scope(db_url) as session:
        d = session.get(GateDecision, decision_id)
        assert d is not None
        uc = session.get(UseCase, d.use_case_id)
        pilot = session.get(Pilot, d.pilot_id) if d.pilot_id else None
        if pilot is not None:
            pilots.stop_pilot(session, pilot, status="stopped", actor=who.name, reason=reason)
        lifecycle.set_phase(session, uc, "stopped", actor=who.name, reason=f"decision {decision_id} rejected")
    return {"action": "stopped", "decision_id": decision_id}


def apply_keep(
    decision_id: int, approval_id: int, *, reason: str, db_url: str | None = None
) -> dict[str, Any]:
    """A person kept the champion through the monitor's alarm: the use case is promoted again, so the
    monitor resumes, and its detector starts afresh after the kept alarm (`pilots.monitor_observations`).
    Safe to repeat: only a use case still awaiting this approval moves."""
    who = approval_identity(approval_id, decision_id, actions=("reject",), db_url=db_url)
    with session_scope(db_url) as session:
        d = session.get(GateDecision, decision_id)
        assert d is not None
        uc = session.get(UseCase, d.use_case_id)
        if uc.phase == "awaiting_approval":
            lifecycle.set_phase(
                session,
                uc,
                "promoted",
                actor=who.name,
                reason=f"decision {decision_id}: champion kept ({reason})",
            )
    return {"action": "kept", "decision_id": decision_id}


def apply_rollback(
    decision_id: int,
    approval_id: int | None,
    *,
    reason: str,
    automatic: bool = False,
    db_url: str | None = None,
) -> dict[str, Any]:
    """champion -> the previous champion from our own alias history; idempotent per decision. An
    automatic rollback acts as the monitor's system identity, which the registry only lets through
    when the use case's rollback policy is 'auto'. A rollback undoes the champion its decision was
    about (`rollback_about`): where another rollback or promotion has moved the champion since, nothing
    moves (a person's rollback and the monitor's, one after the other, used to roll back two versions)
    and the decision is closed "superseded" with an audit entry."""
    from rollout import pilots, registry

    if automatic:
        who = registry.SYSTEM_MONITOR
    else:
        if approval_id is None:
            raise ApprovalError(f"rollback of decision {decision_id} needs a person's approval")
        who = approval_identity(approval_id, decision_id, actions=("approve", "rollback"), db_url=db_url)
    key = f"rollback:{decision_id}"
    with session_scope(db_url) as session:
        d = session.get(GateDecision, decision_id)
        if d is None:
            raise ApprovalError(f"decision {decision_id} does not exist")
        name = session.get(UseCase, d.use_case_id).name
        about = rollback_about(session, d)
        done = session.scalar(select(AliasMove.status).where(AliasMove.idempotency_key == key))
        serving = registry.champions(session, d.use_case_id)[-1:]
        if done != "committed" and about is not None and serving != [about]:
            now = serving[0] if serving else None
            why = (
                f"decision {decision_id} asked to roll back champion v{about}, but "
                + (f"v{now} serves now" if now else "no champion of ours serves now")
                + " (another rollback or promotion came first): nothing moved"
            )
            _supersede(session, d, who.name, f"v{now}" if now else "no champion", about=about, serving=now)
            return {"action": "none", "decision_id": decision_id, "reason": why}
    try:
        move = registry.rollback(
            name, actor=who, reason=reason, idempotency_key=key, expected=about, db_url=db_url
        )
    except registry.MoveInProgress as busy:
        if not automatic:
            raise
        # a person's rollback is moving the champion now: the monitor's gives way (its own never began)
        with session_scope(db_url) as session:
            _supersede(session, session.get(GateDecision, decision_id), who.name, str(busy), about=about)
        return {"action": "none", "decision_id": decision_id, "reason": str(busy)}
    with session_scope(db_url) as session:
        uc = pilots.get_use_case(session, name)
        d = session.get(GateDecision, decision_id)
        if d.resolution is None:
            d.resolution = "auto_rolled_back" if automatic else "approved"
        promoted = pilots.promoted_pilot(session, uc)
        if promoted is not None:
            pilots.stop_pilot(session, promoted, status="rolled_back", actor=who.name, reason=reason)
        lifecycle.set_phase(session, uc, "rolled_back", actor=who.name, reason=reason)
    return {"action": "rolled_back", "decision_id": decision_id, "alias_move": _move_dict(move)}


def _supersede(session: Any, d: GateDecision, actor: str, by: str, **details: Any) -> None:
    """Close a rollback decision another rollback or promotion made moot: "superseded" (where still
    open), with a `rollback.superseded` audit entry saying by what."""
    if d.resolution is None:
        d.resolution = "superseded"
    audit.record(session, actor, "rollback.superseded", on=d, details={"by": by, **details})


def rollback_about(session: Any, d: GateDecision) -> str | None:
    """The champion version (MLflow's) a rollback decision is about: the one the monitor judged (its
    promoted pilot's model version) or, for a person's rollback, the one in force when they asked; None
    where the record cannot say (nothing is then checked)."""
    if d.kind == "rollback":
        about = (d.evidence or {}).get("champion")
        if about is None and d.idempotency_key.startswith("manual-rollback:"):  # recorded before the field
            about = d.idempotency_key.split(":")[2]
        return None if about is None else str(about)
    pilot = session.get(Pilot, d.pilot_id) if d.pilot_id else None
    mv = session.get(ModelVersion, pilot.model_version_id) if pilot is not None else None
    return None if mv is None or mv.mlflow_version is None else str(mv.mlflow_version)


def _move_dict(move: Any) -> Any:
    if isinstance(move, AliasMove):
        return {
            "id": move.id,
            "alias": move.alias,
            "from_version": move.from_version,
            "to_version": move.to_version,
            "status": move.status,
        }
    return move


def request_rollback(
    use_case_name: str,
    identity: Identity | None,
    reason: str | None,
    *,
    apply: bool = True,
    db_url: str | None = None,
) -> dict[str, Any]:
    """A person rolls a use case back: records a rollback decision + approval + audit, then (by default)
    applies it. Returns the decision and approval ids (the rollback flow takes them when `apply` is False)."""
    from rollout import pilots, registry
    from rollout.unfinished import unfinished_in

    who = require_approver(identity, f"roll back {use_case_name}")
    text = _check_reason(reason)
    # one writer at a time (SQLite: BEGIN IMMEDIATE; PostgreSQL: the use case's row lock below), so two
    # approvers asking at once see one request, not two
    with session_scope(db_url, immediate=True) as session:
        uc = pilots.get_use_case(session, use_case_name)
        session.execute(select(UseCase.id).where(UseCase.id == uc.id).with_for_update())
        # a rollback decided but not in effect (its run died, or MLflow was down: rollout.unfinished) is
        # finished, not followed by a second one that would roll back another version; the monitor's own
        # that has moved nothing yet gives way to the person's, which closes it "superseded" below
        pending = unfinished_in(session, uc)
        started = (
            pending is not None
            and pending.action == "rollback"
            and pending.automatic
            and _monitor_move_started(session, use_case_name, pending.decision_id)
        )
        if (
            pending is not None
            and pending.action == "rollback"
            and (not pending.automatic or pending.moved or started)
        ):
            _refuse_while_applied(session, use_case_name, pending)
            decision_id, approval_id = pending.decision_id, pending.approval_id
            text = f"finishing rollback {decision_id}: {text}"
        elif not lifecycle.can(uc.phase, "rollback"):
            _refuse_while_alarm_waits(session, uc)
            raise ApprovalError(
                f"use case {use_case_name!r} is {uc.phase}, not promoted: "
                "there is no champion of ours to roll back"
            )
        else:
            moves = registry.committed_moves(session, uc.id, "champion")
            decision_id, approval_id = _record_rollback(session, uc, who, text, moves)
            if pending is not None and pending.action == "rollback":  # the monitor's own gives way
                _supersede(
                    session,
                    session.get(GateDecision, pending.decision_id),
                    who.name,
                    f"rollback {decision_id}",
                )
    out: dict[str, Any] = {"decision_id": decision_id, "approval_id": approval_id}
    if apply:
        out["effect"] = apply_rollback(
            decision_id, approval_id, reason=text, automatic=approval_id is None, db_url=db_url
        )
    return out


def _refuse_while_applied(session: Any, use_case_name: str, pending: Any) -> None:
    """A person's rollback signed a moment ago (`Unfinished.applied_directly_now`) is being carried out
    by whoever signed it: finishing it now as well made its move twice, the same double apply the cycle's
    grace prevents. MoveInProgress, naming the signer; after the grace it is finished here."""
    import datetime as dt

    from rollout import registry
    from rollout.unfinished import APPLY_GRACE

    if not pending.applied_directly_now(dt.datetime.now(dt.UTC)):
        return
    signer = session.scalar(select(Approval.actor).where(Approval.id == pending.approval_id))
    raise registry.MoveInProgress(
        f"{use_case_name}: {signer}'s rollback (decision {pending.decision_id}) was signed a moment ago and "
        "is being carried out; nothing was recorded. Look again in a moment: the use case is then rolled "
        f"back; if it is not {int(APPLY_GRACE.total_seconds() // 60)} minutes after the signature, "
        f"`sparsepilot rollback {use_case_name}` finishes it"
    )


def _refuse_while_alarm_waits(session: Any, uc: UseCase) -> None:
    """The monitor's alarm waits for a person's approval of its rollback (the use case is awaiting
    approval): the person is told which decision to approve, not that there is no champion to roll back."""
    waiting = session.scalar(
        select(GateDecision.id)
        .where(
            GateDecision.use_case_id == uc.id,
            GateDecision.awaiting == "rollback_approval",
            GateDecision.resolution.is_(None),
        )
        .order_by(GateDecision.id.desc())
    )
    if waiting is not None:
        raise ApprovalError(
            f"use case {uc.name!r}: the monitor's rollback decision {waiting} waits for approval; nothing "
            f"was recorded. Approve it to roll back: `sparsepilot approve {uc.name} --decision {waiting} "
            '--reason "..."`'
        )


def _monitor_move_started(session: Any, use_case_name: str, decision_id: int) -> bool:
    """Has the monitor's automatic rollback begun its alias move (pending)? It is not "moved nothing":
    superseding it then made two rollbacks for one act. Recent (`registry.MOVE_IN_FLIGHT`): its MLflow
    call is under way, and the person is told so (MoveInProgress); older: it was cut off, and the person's
    request finishes it under its own key (True)."""

    from rollout import registry

    move = session.scalar(select(AliasMove).where(AliasMove.idempotency_key == f"rollback:{decision_id}"))
    if move is None or move.status != "pending":
        return False
    if utcnow() - as_utc(move.created_at) < registry.MOVE_IN_FLIGHT:
        raise registry.MoveInProgress(
            f"{use_case_name}: the monitor's automatic rollback (decision {decision_id}, champion "
            f"v{move.from_version} -> v{move.to_version}) is under way; nothing was recorded. Look again in "
            "a moment: the use case is then rolled back"
        )
    return True


def _record_rollback(
    session: Any, uc: UseCase, who: Identity, text: str, moves: list
) -> tuple[int, int | None]:
    """The manual rollback decision and its signature. Its key is the intent: the champion in force and
    the moves that led to it, so a person retrying, or a second approver at the same moment, gets the same
    decision (and its one alias move), never a second rollback."""
    from rollout import pilots, registry

    lineage = registry.champion_lineage(moves)
    if len(lineage) < 2:
        raise ApprovalError(f"use case {uc.name!r} has no previous champion to roll back to")
    key = f"manual-rollback:{uc.id}:{lineage[-1]}:{len(moves)}"
    d, created = pilots.record_decision(
        session,
        idempotency_key=key,
        use_case=uc,
        outcome="NO-GO",
        kind="rollback",
        evidence={"requested_by": who.name, "role": who.role, "reason": text, "champion": lineage[-1]},
        explanation=f"Manual rollback requested by {who.name} ({who.role}): {text}",
        data_fingerprint="manual",
        awaiting="none",
        actor=who.name,
    )
    if not created:  # the same intent, asked again: its first signature stands
        first = session.scalar(select(Approval.id).where(Approval.decision_id == d.id).order_by(Approval.id))
        return d.id, first
    d.resolution = "approved"
    return d.id, _sign(session, d, who, "rollback", text, False, "approval.rollback").id
