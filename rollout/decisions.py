"""Decisions and what they change: the gate's look at a pilot step (decide, record, then advance / ask for
approval / stop), the monitor's look at the champion's traffic, and the INVALID a failed batch leaves.
Every decision is keyed (a retried or repeated look on unchanged data returns the recorded one) and its
state changes commit with it. Each function owns its transaction; the flows pass values."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from rollout import approvals, audit, champion, lifecycle, pilots, registry
from rollout.db.models import GateDecision, Pilot, PilotStep, UseCase
from rollout.db.session import session_scope
from rollout.words import counted


def awaiting_after(outcome: str, final: bool) -> str:
    """A GO at the pilot's final step waits for a person's approval; nothing else waits."""
    return "approval" if outcome == "GO" and final else "none"


def act_on(
    session: Any,
    uc: UseCase,
    pilot: Pilot,
    spec: Any,
    step: PilotStep,
    d: GateDecision,
    final: bool,
    *,
    actor: str = audit.SYSTEM_ACTOR,
) -> None:
    """A new gate decision's effect: GO advances to the next step, or at the final step stops the pilot
    to wait for approval; NO-GO stops the pilot; EXTEND and INVALID change nothing. `actor`: who ran the
    look (`gate_step`'s), the actor of these changes in the audit log."""
    if d.outcome == "GO" and not final:
        pilots.advance(session, pilot, spec, actor=actor, decision_id=d.id)
    elif d.outcome == "GO":
        step.status = "passed"
        step.ended_at = pilots.now()
        pilots.stop_pilot(
            session, pilot, status="awaiting_approval", actor=actor, reason=f"decision {d.id}: GO"
        )
        lifecycle.set_phase(
            session, uc, "awaiting_approval", actor=actor, reason=f"decision {d.id}: GO at step {step.index}"
        )
    elif d.outcome == "NO-GO":
        pilots.stop_pilot(session, pilot, status="stopped", actor=actor, reason=f"decision {d.id}: NO-GO")
        lifecycle.set_phase(session, uc, "stopped", actor=actor, reason=f"decision {d.id}: NO-GO")


def summary(d: GateDecision, step: PilotStep | None, created: bool) -> dict[str, Any]:
    ev = d.evidence or {}
    q = ev.get("quality") or {}
    return {
        "decision_id": d.id,
        "outcome": d.outcome,
        "awaiting": d.awaiting,
        "created": created,
        "step_index": step.index if step is not None else None,
        "step_kind": step.kind if step is not None else None,
        "look_index": d.look_index,
        "interval_low": q.get("interval_low"),
        "interval_high": q.get("interval_high"),
        "estimate": q.get("estimate"),
        "explanation": d.explanation,
        "reasons": ev.get("reasons", []),
        **{k: ev.get(k) for k in ("n_control", "n_treatment", "n_pairs", "projected_requests")},
    }


def gate_step(
    use_case: str,
    step_id: int,
    *,
    promote_after_step: int | None = None,
    traffic: dict[str, Any] | None = None,
    actor: str = audit.SYSTEM_ACTOR,
) -> dict[str, Any]:
    """Run `rollout.gate.decide` on all of the step's observations with the earlier looks as history,
    record the decision (keyed by step + data fingerprint) and act on it. No rows, or rows decide() cannot
    judge, are recorded as INVALID with the reason (never a crash). `promote_after_step` ends a short
    pilot early (not once a person continued its ramp: `pilots.ramp_continued`); `traffic` (what the
    source has left) turns an EXTEND on used-up traffic into a note. `actor`: who runs the look (the
    operator signed in for `gate`, `run`; the pipeline's own name where no person did), the audit log's
    actor of the decision and of what it changes; never part of the key (a retry by anyone finds the
    decision recorded)."""
    from rollout.gate import decide
    from rollout.observations_io import validate_observation_rows
    from rollout.traffic import exhaustion_note

    with session_scope() as session:
        uc = pilots.get_use_case(session, use_case)
        spec, _ = pilots.load_step_spec(session, step_id)
        step = session.get(PilotStep, step_id)
        pilot = session.get(Pilot, step.pilot_id)
        rows, judged_through = pilots.step_evidence(session, step)
        void = pilots.void_counts(session, [step.id]).get(step.id, 0)
        plan = pilots.step_plan_for(spec, step)
        check = (
            validate_observation_rows(
                rows,
                known_request_ids=set(rows["request_id"]),
                # a split step at a small traffic % may have no treatment row yet: that is "too few
                # samples" (EXTEND), judged by decide, not a broken batch
                require_both_arms=step.kind == "shadow",
                source=f"{use_case} step {step.index} observations",
            )
            if len(rows)
            else {"passed": True, "failures": [], "report": {"rows": 0}}
        )
        decision = decide(
            rows,
            pilots.gate_settings(spec, step),
            pilots.gate_history(session, step),
            mode="paired" if step.kind == "shadow" else "split",
            planned_treatment_share=plan.planned_treatment_share,
            data_check_passed=check["passed"],
            data_check_failures=check["failures"],
            elapsed_days=pilots.elapsed_days(step),
            min_samples_per_arm=step.min_samples,
        )
        key = _look_key(session, step, decision)
        found = pilots.decision_by_key(session, key)
        if found is not None:  # a retry, or a re-run on unchanged data
            return summary(found, step, False)
        _check_still_running(use_case, pilot, step)
        # a person who continued the ramp past a short pilot's early GO set `promote_after_step` aside
        # for this pilot: its later GOs advance as the plan says, and only the last step's is final
        continued = pilots.ramp_continued(session, pilot)
        early = None if continued is not None else promote_after_step
        final = pilots.is_last_step(spec, step) or (early is not None and step.index >= early)
        evidence = decision.to_dict()
        evidence.update(
            {
                "pilot_id": pilot.id,
                "step_index": step.index,
                "step_kind": step.kind,
                "traffic_pct": step.traffic_pct,
                "data_check": check["report"],
                "final_step": final,
                "plan_steps": len(pilots.plan_steps(spec)),
                # what a promotion on this decision skips (rollout.approvals.ramp_steps_skipped)
                "later_steps": [
                    {"index": p.index, "traffic_pct": p.traffic_pct}
                    for p in pilots.plan_steps(spec)[step.index + 1 :]
                ],
                "promote_after_step": early,
                "ramp_continued_at": continued,
                "traffic": traffic,
                # the step's last row this look judged: the rows stored after it enter the stream
                # together, by their stream key, after these (`pilots.in_evidence_order`)
                "judged_through": judged_through,
                # drawn, no reference (the dense answer failed): in neither arm, its error rate included
                "void_requests": void,
            }
        )
        explanation = decision.explanation
        if void:
            explanation = (
                f"{explanation} Note: {pilots.void_note(void)} (in neither arm: both arms' error rates "
                "are of the requests the dense arm answered)."
            )
        external = (
            pilots.rows_by_source(session, step).get("imported-external", 0) if step.kind != "shadow" else 0
        )
        if external:
            # the split's guarantee needs arms assigned at random with the known share; the serving system's
            # own assignment is its assumption, which the SRM test checks only in total
            evidence["externally_assigned_rows"] = external
            explanation = (
                f"{explanation} Note: {external} of this step's rows were assigned to arms by the serving "
                f"system (--external-assignment), not by the pilot's hash: the result assumes that "
                f"assignment is random, independent of the requests, at {step.traffic_pct:g}% sparse."
            )
        if decision.outcome == "GO" and final:
            # a final GO waits for approval (awaiting_after), so it may continue the ramp instead
            explanation = f"{explanation} {approvals.skip_note(evidence, waits_for_approval=True)}".rstrip()
        remedy = invalid_remedy(use_case, decision.outcome, decision.reasons, step.traffic_pct)
        if remedy:
            explanation = f"{explanation} {remedy}"
        exhausted = exhaustion_note(decision.outcome, traffic, decision.projected_requests)
        if exhausted:
            evidence["reasons"] = [*evidence["reasons"], "traffic-exhausted"]
            explanation = f"{explanation} {exhausted}"
    # decide() ran without the lock (it may take a while): the pilot is read again, locked, in the
    # transaction that records and acts, so an abort, an approval or a promotion that came meanwhile is
    # seen, and this look then records nothing (PilotStateError) instead of overwriting it
    with session_scope(immediate=True) as session:
        uc, pilot = pilots.locked(session, uc.id, pilot.id)
        step = session.get(PilotStep, step_id)
        found = pilots.decision_by_key(session, key)
        if found is not None:
            return summary(found, step, False)
        _check_still_running(use_case, pilot, step, changed=True)
        _check_no_approved_promotion(session, use_case, pilot)
        d, created = pilots.record_decision(
            session,
            idempotency_key=key,
            use_case=uc,
            pilot=pilot,
            step=step,
            outcome=decision.outcome,
            evidence=evidence,
            explanation=explanation,
            data_fingerprint=decision.data_fingerprint,
            look_index=decision.look_index,
            awaiting=awaiting_after(decision.outcome, final),
            actor=actor,
        )
        if created:
            act_on(session, uc, pilot, spec, step, d, final, actor=actor)
        return summary(d, step, created)


def _look_key(session: Any, step: PilotStep, decision: Any) -> str:
    """A gate look's idempotency key: the step and the rows it judged, so a retried or repeated look on
    unchanged rows returns the decision recorded (the rows are judged once, nothing is spent twice). The
    one exception is time: an EXTEND or INVALID recorded before the pilot's maximum duration left the
    pilot running, and on rows that no longer change (a used-up traffic source, no import since) it stood
    for good and the limit never fired. The first look on those rows once the duration is reached is a
    look of its own (`...:at-maximum`), recorded once (a retry finds it) and final, as the limit says: on
    the same rows the tests' capital is the same, so it is NO-GO (an INVALID at the maximum is NO-GO too).
    The look limit needs no such key: it counts recorded looks, so a look on new rows reaches it."""
    key = f"gate:{step.id}:{decision.data_fingerprint}"
    at_maximum = f"{key}:at-maximum"
    if pilots.decision_by_key(session, at_maximum) is not None:  # that look, retried: its decision
        return at_maximum
    found = pilots.decision_by_key(session, key)
    pilot = step.pilot
    left_running = (
        found is not None
        and found.outcome in ("EXTEND", "INVALID")
        and (pilot.status, pilot.current_step_index) == ("running", step.index)
    )
    reached = decision.elapsed_days >= decision.settings.max_duration_days
    return at_maximum if left_running and reached else key


# Why a crossing is not the challenger's: what ends a step whose bounds crossed and what the next pilot needs
# (the portfolio's "Waits for" says the same, `rollout.queries.waits_for`)
CROSSED_CAUSE = (
    "the bounds crossed on the order of this step's rows (one arm's rows imported after the other's, pages "
    "of a sorted export), not on the challenger: import each export whole, both arms' rows together, or "
    "in time slices"
)


def invalid_remedy(use_case: str, outcome: str, reasons: Any, traffic_pct: float) -> str:
    """The way out of a step whose data cannot be trusted, in commands: no command reruns a step and its
    stored rows stay, so an INVALID look is ended by aborting the pilot, and a person pilots its challenger
    again (`pilot_batches.start_again`: an abort judged nothing); at the limit its NO-GO judged the plan,
    so the next pilot needs another one (`pilots.pilot_again`). A sample-ratio mismatch also needs the
    serving system set to the step's share; crossed bounds need the rows in an order that carries no
    information (`CROSSED_CAUSE`: the order, not the challenger, crossed them). Every pilot started counts
    toward the use case's false-GO alpha, the aborted one too (docs/gate.md), so the new pilot's GO is
    held to a smaller level. '' otherwise."""
    reasons = tuple(reasons)
    if outcome != "INVALID" and "max-duration-invalid" not in reasons:
        return ""
    ended = "the aborted pilot" if outcome == "INVALID" else "this pilot"
    spent = (
        f"{ended} still counts toward the use case's false-GO alpha, so the next pilot's GO is held to a "
        "smaller level"
    )
    if "crossed-bounds" in reasons:
        how = f"with the rows in an order that carries no information: {CROSSED_CAUSE}"
    elif "sample-ratio-mismatch" in reasons:
        how = f"with the serving system sending {traffic_pct:g}% of the requests to the sparse model"
    else:
        how = ""
    if outcome == "INVALID":
        again = f'`sparsepilot pilot {use_case} --again --reason "..."` pilots its challenger again'
        return (
            f'To start over: `sparsepilot pilot {use_case} --abort --reason "..."`, then {again}'
            f"{', ' + how if how else ''}; {spent}."
        )
    return f"To pilot again: {pilots.pilot_again(use_case)}{'; pilot it ' + how if how else ''}; {spent}."


def _check_still_running(use_case: str, pilot: Pilot, step: PilotStep, *, changed: bool = False) -> None:
    """A gate look acts only on a pilot still running at the step it judged (PilotStateError otherwise)."""
    if pilot.status != "running" or pilot.current_step_index != step.index:
        meanwhile = (
            f"; it was running at step {step.index} when this look began (an abort, an approval or another "
            "look came first), so this look records nothing"
            if changed
            else ""
        )
        raise pilots.PilotStateError(
            f"{use_case}: {pilots.pilot_label(pilot)} is {pilot.status} at step {pilot.current_step_index}"
            f"{meanwhile}"
        )


def _check_no_approved_promotion(session: Any, use_case: str, pilot: Pilot) -> None:
    """A gate look records nothing on a pilot whose GO (or an override) a person approved: its promotion
    is being carried out, in a transaction after the approval's, and a NO-GO recorded in between stopped
    the pilot under it (the approval stood "approved" on a decision that could never take effect). The
    same rule as `pilots.abort_pilot`'s."""
    from sqlalchemy import select

    approved = session.scalar(
        select(GateDecision.id)
        .where(
            GateDecision.pilot_id == pilot.id,
            GateDecision.kind == "gate",
            GateDecision.resolution == "approved",
        )
        .order_by(GateDecision.id.desc())
    )
    if approved is not None:
        raise pilots.PilotStateError(
            f"{use_case}: decision {approved} of {pilots.pilot_label(pilot)} is approved and its promotion "
            f"is being carried out (or waits to be finished: sparsepilot promote {use_case} --decision "
            f"{approved}); this look records nothing"
        )


def _monitor_verdict(check: dict[str, Any], guard: dict[str, Any], alpha: float) -> tuple[str, str]:
    """(outcome, why) of a monitor look: INVALID on failed data checks, NO-GO on a breached guardrail."""
    if not check["passed"]:
        return "INVALID", "the sampled traffic failed its data checks (" + "; ".join(
            check["failures"][:3]
        ) + ")"
    if guard.get("problems") and not guard["breached"]:
        return "INVALID", "the monitored rows cannot be judged (" + "; ".join(guard["problems"][:3]) + ")"
    if guard["breached"]:
        return "NO-GO", "guardrail breached: " + ", ".join(
            f"{c['name']} {c['value']:.4g} > {c['threshold']:.4g} "
            f"(at least {c['lower_bound']:.4g} with {100 * (1 - alpha):.0f}% confidence; {c['note']})"
            for c in guard["checks"]
            if c["breached"]
        )
    looks = guard.get("looks", 1)
    return "GO", f"no guardrail shown breached over {counted(looks, 'look')}: " + ", ".join(
        f"{c['name']} {c['value']:.4g} (limit {c['threshold']:.4g})"
        if c["value"] is not None
        else f"{c['name']} not judged ({c['note']})"
        for c in guard["checks"]
    )


def monitor_look(
    use_case: str, info: dict[str, Any], rows: list[dict], check: dict[str, Any], batch_id: str
) -> dict[str, Any]:
    """Record the monitor's decision on a batch of the champion's traffic. A breach or a failed data
    check rolls back automatically under the spec's `rollback: auto` (the caller runs the rollback),
    else leaves a rollback decision waiting for a person (the use case then awaits approval). The spec is
    the promoted pilot's own version (`pilots.load_pilot_spec`), never the use case's current one: a new
    version (an operator's `usecase add`) must not turn on automatic rollback for a live champion."""
    # judged without the lock, as a gate look decides: a look reads and judges the monitor's whole history
    # (seconds at a million rows), and holding the lock meanwhile (SQLite: the state DB's one write lock)
    # made every writer of every use case wait, other use cases' runs refused as busy
    with session_scope() as session:
        pilot = session.get(Pilot, info["pilot_id"])
        spec, _ = pilots.load_pilot_spec(session, pilot)
        guard, basis = _monitor_judgement(session, session.get(PilotStep, info["step_id"]), spec, check)
    # then locked (SQLite: the write lock; PostgreSQL: the rows) to re-check and record: a person's
    # rollback or a promotion that came while the batch was answered or judged is seen here, and rows
    # stored (or an alarm kept) meanwhile are judged again, under the lock, so what is recorded is the
    # judgement of what `judged_through` says
    with session_scope(immediate=True) as session:
        uc, pilot = pilots.locked(session, pilots.get_use_case(session, use_case).id, info["pilot_id"])
        step = session.get(PilotStep, info["step_id"])
        if pilots.monitor_basis(session, step) != basis:
            guard, basis = _monitor_judgement(session, step, spec, check)
        outcome, why = _monitor_verdict(check, guard, spec.gate.alpha)
        # the voids this look's evidence excluded: none settled by a kept alarm (as its rows)
        void, void_through = pilots.monitor_voids(session, step)
        bad = outcome != "GO"
        auto = bad and spec.rollback == "auto"  # the policy the champion was promoted under
        # an automatic rollback needs a version to return to; without one (the dense baseline was never
        # recorded as champion) the alarm must not end as a NO-GO nobody acts on: a person decides
        stranded = auto and len(registry.champions(session, uc.id)) < 2
        auto = auto and not stranded
        # only the champion that still serves as promoted is rolled back or asked about: one rolled back
        # (or replaced) while the batch was answered is recorded, settled, and moves nothing
        watched = champion.monitored_pilot(session, uc)
        gone = None
        if watched is None or watched.id != pilot.id:
            gone = "not the champion watched" if pilot.status == "promoted" else pilot.status
        auto = auto and gone is None
        awaiting = "rollback_approval" if bad and not auto and gone is None else "none"
        action = (
            f"The judged champion no longer serves as promoted ({pilots.pilot_label(pilot)} is {gone}, the "
            f"use case {uc.phase}): nothing is rolled back or asked."
            if gone is not None
            else "The champion is rolled back automatically (rollback policy: auto)."
            if auto
            else "No earlier champion is recorded to roll back to, so a person must decide (rollback policy: "
            "auto)."
            if stranded
            else "A rollback waits for a person's approval (rollback policy: manual)."
            if bad
            else "The champion keeps serving."
        )
        explanation = f"Monitor: {outcome}. {why}. {action}"
        if void:
            explanation = (
                f"{explanation} Note: {pilots.void_note(void)} (in neither arm: both arms' error rates "
                "are of the requests the dense arm answered)."
            )
        d, created = pilots.record_decision(
            session,
            idempotency_key=pilots.monitor_look_key(info["step_id"], batch_id),
            use_case=uc,
            pilot=pilot,
            step=step,
            kind="monitor",
            outcome=outcome,
            evidence={
                "guardrails": guard,
                "data_check": check["report"],
                "batch_id": batch_id,
                "rows": len(rows),
                # a kept alarm settles the rows up to here (`pilots.monitor_observations`)
                "judged_through": basis[0],
                # the monitor step's requests drawn without a reference (the dense answer failed) since
                # the last kept alarm, which settles those up to its `void_through` (`pilots.monitor_voids`)
                "void_requests": void,
                "void_through": void_through,
            },
            explanation=explanation,
            data_fingerprint=batch_id[:64],
            awaiting=awaiting,
            actor=audit.MONITOR_ACTOR,  # the monitor's decisions are its own (docs/operations.md)
        )
        if created and gone is not None and bad:
            d.resolution = "superseded"  # a later rollback or promotion made it moot (as `_supersede`)
        # the phase waits for the person where it is the champion's (promoted); while another challenger
        # pilots it stays the pilot's, and the decision alone waits (`champion.waiting_alarm`)
        if created and awaiting == "rollback_approval" and champion.phase_is_champions(session, uc):
            lifecycle.set_phase(
                session, uc, "awaiting_approval", actor=audit.MONITOR_ACTOR, reason=explanation
            )
        return {
            "decision_id": d.id,
            "outcome": d.outcome,
            "awaiting": d.awaiting,
            "resolution": d.resolution,
            "automatic_rollback": auto,
            "explanation": d.explanation,
            "created": created,
        }


def _monitor_judgement(
    session: Any, step: PilotStep, spec: Any, check: dict[str, Any]
) -> tuple[dict[str, Any], tuple[int, int]]:
    """The monitor's guardrails over every look since the monitor began (or since a kept alarm), this
    batch last, and what they rest on (`pilots.monitor_basis`, read first: a row stored after it is
    judged again, never missed)."""
    basis = pilots.monitor_basis(session, step)
    guard: dict[str, Any] = {"checks": [], "breached": []}
    if check["passed"]:
        guard = pilots.monitor_guardrails(pilots.monitor_observations(session, step), spec)
    return guard, basis


def failed_batch(
    use_case: str,
    info: dict[str, Any],
    batch_id: str,
    check: dict[str, Any],
    *,
    actor: str = audit.SYSTEM_ACTOR,
) -> int:
    """A batch that failed its data check does not count; the INVALID decision says why, recorded as
    `actor`'s (who ran the pilot batch). Returns its id."""
    with session_scope() as session:
        step = session.get(PilotStep, info["step_id"])
        failures = check.get("failures", [])
        d, _ = pilots.record_decision(
            session,
            idempotency_key=f"datacheck:{step.id}:{batch_id}",
            use_case=pilots.get_use_case(session, use_case),
            pilot=session.get(Pilot, info["pilot_id"]),
            step=step,
            outcome="INVALID",
            evidence={"data_check": check, "batch_id": batch_id, "reasons": ["data-check-failed"]},
            explanation=(
                f"Decision: INVALID. Pilot batch {batch_id} of step {step.index} failed its data checks "
                f"({'; '.join(failures[:3])}); its observations were not stored and do not count."
            ),
            data_fingerprint=batch_id[:64],
            actor=actor,
        )
        return d.id


def evidence(decision_id: int) -> dict[str, Any]:
    with session_scope() as session:
        return dict(session.get(GateDecision, decision_id).evidence)


def use_case_of(decision_id: int) -> str:
    with session_scope() as session:
        d = session.get(GateDecision, decision_id)
        return session.get(UseCase, d.use_case_id).name


def latest_waiting(use_case: str) -> int | None:
    """The newest decision of the use case that waits for a person, if any."""
    with session_scope() as session:
        pending = pilots.pending_decisions(session, pilots.get_use_case(session, use_case))
        return pending[-1].id if pending else None


def newest_decision(session: Any, pilot_id: int, kind: str) -> GateDecision | None:
    """The pilot's newest decision of `kind` ("gate": its latest look, which outranks an older one;
    "monitor": the champion's last look), or None."""
    return session.scalar(
        select(GateDecision)
        .where(GateDecision.pilot_id == pilot_id, GateDecision.kind == kind)
        .order_by(GateDecision.id.desc())
        .limit(1)
    )
