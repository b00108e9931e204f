"""Where a pilot's batches go: the active pilot and its current step (started for the current challenger
when none runs), the promoted pilot's monitor step, storing a batch, and the streaming import of a
serving system's observations. Each function owns its transaction; the flows get plain dicts."""

from __future__ import annotations

import shlex
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import select

from rollout import audit, champion, decisions, lifecycle, pilots, run_links, runs
from rollout.calibration_outcome import missed_budget_refusal
from rollout.db.models import (
    AuditEntry,
    ModelVersion,
    Observation,
    Pilot,
    PilotStep,
    VoidRequest,
    as_utc,
    utcnow,
)
from rollout.db.session import session_scope
from rollout.observations_io import ObservationImportError, iter_observations, validate_observation_rows
from rollout.outcome_sorted import sorted_file_problem
from rollout.redact import redact
from rollout.runs import calibration_metrics, latest_challenger, version_dict


def _step_info(
    session: Any, pilot: Pilot, step: PilotStep, mv: ModelVersion, *, used_request_ids: bool = True
) -> dict[str, Any]:
    """The step as the flows see it; `used_request_ids`: every request id the pilot has used, sorted
    (what drawing fresh requests from the use case's own traffic needs), else an empty list (an import
    brings its own rows: reading a promoted pilot's million ids costs a second a look for nothing)."""
    return {
        "pilot_id": pilot.id,
        "pilot": pilots.pilot_label(pilot),  # how messages name it: "pilot 2", the use case's second
        "use_case_id": pilot.use_case_id,
        "salt": pilot.salt,
        "step_id": step.id,
        "step_index": step.index,
        "kind": step.kind,
        "traffic_pct": step.traffic_pct,
        "min_samples": step.min_samples,
        # the spec version the pilot runs under (None: started before it was recorded): its batch size,
        # traffic and arms, as its gate's rules, never a later version's
        "spec_version": pilot.spec_version,
        **version_dict(mv),
        "used_request_ids": sorted(pilots.seen_request_ids(session, pilot)) if used_request_ids else [],
    }


class NotPiloted(pilots.PilotStateError):
    """A pilot of the current challenger is not started: `skip` (rollout.roi.PilotSkip) says why, in the
    words the portfolio shows ("no pilot: ..."). `command`: the command that pilots it regardless, the
    one refused with --pilot-anyway added (default `sparsepilot pilot NAME --pilot-anyway`; an import
    names its file: `import_file`)."""

    def __init__(self, use_case: str, skip: Any, *, command: str | None = None) -> None:
        self.skip = skip
        command = command or f"sparsepilot pilot {use_case} --pilot-anyway"
        super().__init__(
            f"{use_case}: not piloted: {skip}; nothing was started (`{command}` pilots it regardless)"
        )


def import_anyway_command(use_case: str, path: str, *, external_assignment: bool = False) -> str:
    """The import of `path` with --pilot-anyway: what pilots a plan `NotPiloted` refused by importing the
    file (`sparsepilot pilot NAME --pilot-anyway` alone runs our own arms' batches instead)."""
    external = " --external-assignment" if external_assignment else ""
    return f"sparsepilot pilot {use_case} --observations {shlex.quote(str(path))}{external} --pilot-anyway"


def pilot_skip(use_case: str, *, pilot_anyway: bool = False) -> Any:
    """Why a tick would start no pilot of the current challenger (`runs.pilot_skip`, the rule
    `ensure_pilot_in` applies), or None: a pilot of it runs already (it keeps running), or one may start.
    What the scheduled cycle asks before its pilot batch, so it says why and does nothing (a missed
    budget among them: `runs.pilot_skip`'s first case, whatever `pilot_anyway`)."""
    with session_scope() as session:
        uc = pilots.get_use_case(session, use_case)
        run = latest_challenger(session, uc.id)
        if run is None:
            return None
        pilot = pilots.active_pilot(session, uc)
        if pilot is not None and pilot.model_version_id == run.model_version_id:
            return None
        return runs.pilot_skip(session, uc, run, pilot_anyway=pilot_anyway)


def not_calibrated(use_case: str) -> Any:
    """Whether the challenger was calibrated under a spec version whose calibration inputs the current
    one changed (`runs.not_calibrated`: a `rollout.recalibration.NotCalibrated`), or None. What the
    scheduled cycle asks in a phase that pilots: it calibrates again (then evaluates) rather than pilot
    the old plan under the new version; a pilot of the old plan running meanwhile is stopped when that
    calibration succeeds (`runs.stop_uncalibrated_pilot`)."""
    with session_scope() as session:
        uc = pilots.get_use_case(session, use_case)
        return runs.not_calibrated(session, uc, latest_challenger(session, uc.id))


def pilot_refusal(use_case: str, *, pilot_anyway: bool = False) -> pilots.PilotStateError | None:
    """The refusal `ensure_pilot_in` would make now (`_refusal`: what stands there first, then whether
    the challenger may be piloted), read in one transaction without starting anything, or None: a pilot
    of the current challenger runs, or one would start. What `sparsepilot pilot NAME` asks before its
    flow starts, so an ordinary refusal leaves no Failed flow run."""
    with session_scope() as session:
        uc = pilots.get_use_case(session, use_case)
        return _refusal(session, uc, latest_challenger(session, uc.id), pilot_anyway=pilot_anyway)


def _refusal(session: Any, uc: Any, run: Any, *, pilot_anyway: bool) -> pilots.PilotStateError | None:
    """Why no pilot of the challenger `run` registered takes traffic now, in this order: what stands
    there (no challenger; this challenger's pilot has ended; a pilot waits for a person's approval),
    then whether it is calibrated under the current spec version (a plan calibrated under one whose
    calibration inputs the current one changed, `runs.not_calibrated`: no pilot of it starts, and its
    running pilot takes no batch until `calibrate NAME`, which stops it or, finding the same plan, lets
    it go on), then whether a new pilot is worth starting (a plan that missed the quality budget: never;
    one that cannot pay: `NotPiloted`, which `pilot_anyway` waives). None: a pilot of it runs (it keeps
    running), or one may start."""
    name = uc.name
    if run is None:
        return pilots.PilotStateError(
            f"{name}: no calibrated challenger yet; run `sparsepilot calibrate {name}` first"
        )
    last = pilots.plan_ended(session, uc, run.model_version_id)  # over every pilot of this plan
    if last is not None:
        if pilots.was_aborted(session, last):  # a person may pilot it again: `start_again`
            return pilots.PilotStateError(
                f"{name}: {pilots.pilot_label(last)} of this challenger was aborted; "
                f"{pilots.pilot_aborted_again(name)}"
            )
        return pilots.PilotStateError(
            f"{name}: {pilots.pilot_label(last)} of this challenger has ended ({last.status}) and is not "
            f"piloted again; {pilots.pilot_again(name)}"
        )
    active = pilots.active_pilot(session, uc)
    if active is not None and active.status != "running":  # awaiting_approval, the only other active one
        pending = pilots.pending_decisions(session, uc)
        if not pending:
            return pilots.PilotStateError(
                f"{name}: {pilots.pilot_label(active)} waits for approval: approve or reject it first"
            )
        d = pending[-1].id
        return pilots.PilotStateError(
            f"{name}: {pilots.pilot_label(active)} waits for approval of decision {d}: approve or reject it "
            f"(`sparsepilot approve {name} --decision {d} --reason TEXT`, with --reject to reject)"
        )
    stale = runs.not_calibrated(session, uc, run)  # a plan for another version's budget (or model, data)
    if stale is not None and active is not None and active.model_version_id == run.model_version_id:
        # its running pilot is fed no more: the calibration under the new version stops it where it
        # finds another plan (`runs.stop_uncalibrated_pilot`), and it goes on where it finds this one
        return pilots.PilotStateError(
            f"{name}: {stale}; {pilots.pilot_label(active)} of this challenger takes no batch until then"
        )
    if active is not None and active.model_version_id == run.model_version_id:
        return None
    if stale is not None:
        return pilots.PilotStateError(f"{name}: {stale}; nothing was started")
    if calibration_metrics(session, run).get("met_budget") is False:
        return pilots.PilotStateError(missed_budget_refusal(name, run.id))
    skip = runs.pilot_skip(session, uc, run, pilot_anyway=pilot_anyway)
    return None if skip is None else NotPiloted(name, skip)


def ensure_pilot_in(
    session: Any, use_case: str, *, pilot_anyway: bool = False, actor: str = audit.SYSTEM_ACTOR
) -> dict[str, Any]:
    """The active pilot's current step (a pilot is started at its shadow step for the current challenger
    if none runs), inside the caller's transaction. Refuses, naming the use case, when there is nothing
    to pilot or the pilot cannot take traffic now (`_refusal`: what stands there is said first, an ended
    pilot or one waiting for approval). A new pilot starts only where the challenger is worth piloting
    (`runs.pilot_skip`: a plan that met the budget, skips blocks and establishes a saving;
    `pilot_anyway` waives all but the budget): else `NotPiloted`, nothing started. A pilot already
    running keeps running. Starters take turns (`pilots.held_for_a_start`): a second caller that found no
    pilot while another was starting one waits for it and joins its pilot."""
    uc = pilots.get_use_case(session, use_case)
    spec, _ = pilots.load_current_spec(session, uc)
    run = latest_challenger(session, uc.id)
    running = pilots.active_pilot(session, uc)
    if run is not None and (running is None or running.model_version_id != run.model_version_id):
        uc = pilots.held_for_a_start(session, uc.id)  # may start one: what another start committed meanwhile
    refused = _refusal(session, uc, run, pilot_anyway=pilot_anyway)
    if refused is not None:
        raise refused
    mv = session.get(ModelVersion, run.model_version_id)
    pilot = pilots.active_pilot(session, uc)
    if pilot is None or pilot.model_version_id != mv.id:
        pilot = pilots.start_pilot(session, uc, mv, spec, actor=actor)
    return _step_info(session, pilot, pilots.current_step(session, pilot), mv)


def start_again(use_case: str, *, actor: str, reason: str) -> dict[str, Any]:
    """A person pilots the current challenger again after an operator aborted its pilot (`sparsepilot
    pilot NAME --again --reason TEXT`): a new pilot at its shadow step, its GO held to the next level of
    the use case's alpha spending (every pilot started counts, the aborted one too: docs/gate.md "Across
    a use case's pilots"), audited (`pilot.again`: the reason and the aborted pilot). Only after an abort:
    an abort judged nothing (the data could not be trusted, the serving system's split was wrong), while a
    NO-GO, a rejection or a rollback judged this plan, and the challenger is a plan (one model version
    per plan hash), so those are refused in `pilots.pilot_again`'s words. Never the pipeline's: the cycle
    does not restart what an operator stopped."""
    from rollout.spec import has_visible_text

    text = (reason or "").strip()
    if not has_visible_text(text):
        raise pilots.PilotStateError("--again needs a --reason (kept in the audit log)")
    with session_scope(immediate=True) as session:
        uc = pilots.held_for_a_start(session, pilots.get_use_case(session, use_case).id)
        spec, _ = pilots.load_current_spec(session, uc)
        run = latest_challenger(session, uc.id)
        last = None if run is None else pilots.plan_ended(session, uc, run.model_version_id)
        if last is None or not pilots.was_aborted(session, last):
            raise _refusal(session, uc, run, pilot_anyway=True) or _not_aborted(session, uc, run)
        stale = runs.not_calibrated(session, uc, run)
        if stale is not None:  # piloted again under a version whose budget it was not calibrated to: no
            raise pilots.PilotStateError(f"{uc.name}: {stale}; nothing was started")
        gate = spec.gate
        left = pilots.next_go_alpha(session, uc, gate.alpha, "use_case")  # the level `use_case` gives it
        if gate.alpha_spending == "pilot" or left <= 0:
            raise pilots.PilotStateError(
                again_at_alpha(uc.name, left, per_pilot=gate.alpha_spending == "pilot")
            )
        mv = session.get(ModelVersion, run.model_version_id)
        pilot = pilots.start_pilot(session, uc, mv, spec, actor=actor)
        audit.record(
            session,
            actor,
            "pilot.again",
            on=pilot,
            details={"reason": text, "aborted_pilot_id": last.id, "model_version_id": mv.id},
        )
        return {
            "pilot_id": pilot.id,
            "pilot": pilots.pilot_label(pilot),
            "aborted": pilots.pilot_label(last),
            "go_alpha": pilot.go_alpha,
        }


def _not_aborted(session: Any, uc: Any, run: Any) -> pilots.PilotStateError:
    """Why `start_again` refuses a challenger that `_refusal` lets through: no pilot of it was aborted.
    Its latest pilot runs (`pilot NAME` goes on with it), or it has none the pipeline may not start."""
    mine = session.scalar(
        select(Pilot)
        .where(Pilot.use_case_id == uc.id, Pilot.model_version_id == run.model_version_id)
        .order_by(Pilot.id.desc())
    )
    if mine is None or mine.status in pilots.ENDED_PILOT:  # none, or superseded by another plan's only
        return pilots.PilotStateError(
            f"{uc.name}: no pilot of the challenger was aborted, so there is nothing to pilot again; "
            f"`sparsepilot pilot {uc.name}` pilots it"
        )
    look = decisions.newest_decision(session, mine.id, "gate")  # its latest look
    # more samples do not cure an INVALID (rollout.decisions.invalid_remedy): the abort does
    if look is not None and look.outcome == "INVALID":
        way = (
            "its latest look is INVALID, which more samples do not cure: "
            f"`sparsepilot pilot {uc.name} --abort --reason TEXT` ends it, then "
            f"`sparsepilot pilot {uc.name} --again --reason TEXT` pilots its challenger again"
        )
    else:
        way = f"`sparsepilot pilot {uc.name}` goes on with it"
    return pilots.PilotStateError(
        f"{uc.name}: {pilots.pilot_label(mine)} of this challenger is {mine.status}, not aborted; {way}"
    )


def again_at_alpha(name: str, left: float, *, per_pilot: bool) -> str:
    """Why `start_again` refuses (pure). `per_pilot`: under `gate.alpha_spending: pilot` every pilot runs
    its GO test at alpha on its own, so an operator who aborted each pilot of a plan that trended badly
    and piloted it again would give the same plan a fresh alpha each try, its false-GO chance growing
    with the tries (docs/gate.md "Piloting an aborted pilot's challenger again"). `left`: the level the
    use case's spending (`use_case`) would give the new pilot. Only where it is above 0 is that route
    named: where the earlier pilots spent alpha (one that ran at alpha itself, under `pilot` spending or
    before alpha was spent across pilots, spends it all), `--again` is refused under either spending,
    and the way on is another plan (`pilots.pilot_again`), never a spec change that would be refused in
    turn."""
    if per_pilot:
        head = (
            f"{name}: the spec holds each pilot to alpha on its own (gate.alpha_spending: pilot), so "
            "piloting the same challenger again would give it a fresh alpha for every try; "
        )
        if left > 0:
            return head + (
                "add a spec version with gate.alpha_spending: use_case (`sparsepilot usecase add SPEC "
                f"--new-version`), then `sparsepilot pilot {name} --again --reason TEXT` pilots it at the "
                f"use case's next level ({left:.3g})"
            )
        head += "and the use case's spending (gate.alpha_spending: use_case) has no alpha left for it "
    else:
        head = f"{name}: the use case's spending has no alpha left for another pilot "
    return head + (
        "(its earlier pilots spent it: one that ran at alpha itself spends it all), so its challenger "
        f"piloted again could never say GO and is not piloted again; {pilots.pilot_again(name)}"
    )


def ensure_pilot(
    use_case: str, *, pilot_anyway: bool = False, actor: str = audit.SYSTEM_ACTOR
) -> dict[str, Any]:
    """`ensure_pilot_in` in its own transaction, which on SQLite holds the write lock from its start (as an
    import's does): two processes starting the first pilot at once take turns, and the second joins the
    pilot the first started (a deferred transaction let both read "no pilot" and the second's start failed
    with the raw IntegrityError on `uq_pilots_use_case_number`)."""
    with session_scope(immediate=True) as session:
        return ensure_pilot_in(session, use_case, pilot_anyway=pilot_anyway, actor=actor)


def pilot_spec_version(use_case: str) -> int:
    """The spec version the pilot that `ensure_pilot_in` would hand out runs under: the active pilot's
    own when it pilots the current challenger (a new version applies to the next pilot), else the
    current version (the one a pilot started now takes). What an import's request ids are checked
    against (`import_file`'s `spec_version`); `ensure_pilot_in` itself refuses what cannot be piloted."""
    with session_scope() as session:
        uc = pilots.get_use_case(session, use_case)
        current = pilots.current_spec_version(session, uc)
        run = latest_challenger(session, uc.id)
        pilot = pilots.active_pilot(session, uc)
        if run is not None and pilot is not None and pilot.model_version_id == run.model_version_id:
            return pilot.spec_version if pilot.spec_version is not None else current.version
        return current.version


def monitor_target(use_case: str, *, used_request_ids: bool = True) -> dict[str, Any] | None:
    """The serving champion's monitor step (opened on first use), or None when no champion of ours serves
    or its alarm waits for a person (`champion.monitored_pilot`, whatever the use case's phase).
    `used_request_ids=False` when the look imports observations rather than sampling the use case's
    traffic (the list is then empty). The monitor keeps the rules of the spec version the champion was
    promoted under (`pilots.load_pilot_spec`: its batch size, rollback policy, guardrails); `spec_version`
    names it, for the flow's traffic and arms. A later spec version applies from the next promotion."""
    with session_scope() as session:
        uc = pilots.get_use_case(session, use_case)
        pilot = champion.monitored_pilot(session, uc)  # whatever the phase: another challenger may pilot
        if pilot is None:
            return None
        spec, sv = pilots.load_pilot_spec(session, pilot)
        step = pilots.open_monitor_step(session, pilot, min_samples=spec.rollout.batch_size)
        return {
            **_step_info(
                session,
                pilot,
                step,
                session.get(ModelVersion, pilot.model_version_id),
                used_request_ids=used_request_ids,
            ),
            "kind": "shadow",  # both arms answer each sampled request (dense offline, for quality)
            "traffic_pct": 100.0,
            "spec_version": sv.version,  # the pilot's own, or the current one for a pilot from before it
        }


def champion_watched(use_case: str) -> bool:
    """Whether the monitor has a champion to watch now (`champion.monitored_pilot`), whatever the phase:
    what the scheduled cycle asks before it runs the monitor."""
    with session_scope() as session:
        return champion.monitored_pilot(session, pilots.get_use_case(session, use_case)) is not None


def nothing_to_monitor(use_case: str, observations_file: str) -> pilots.PilotStateError:
    """The refusal of a monitor given a file of observations while nothing is promoted (never promoted,
    rolled back): the file's rows have no champion to be judged against, so they are not imported, and
    saying so is an error, where the monitor used to answer "nothing to monitor" with exit 0 and a cron
    shipping each day's log after an automatic rollback kept "succeeding" (review s49 R5). A scheduled
    monitor, which samples, still skips quietly. A running pilot's rows go to its own import. Where the
    champion serves but the monitor's alarm about it waits for a person, that is said instead (it read
    "nothing promoted" there)."""
    with session_scope() as session:
        uc = pilots.get_use_case(session, use_case)
        phase = uc.phase
        serving = champion.serving_pilot(session, uc)
        alarm = None if serving is None else champion.waiting_alarm(session, serving)
    if alarm is not None:
        return pilots.PilotStateError(
            f"{use_case}: the monitor's alarm (decision {alarm}) waits for a person, who rolls the champion "
            f"back (`sparsepilot approve {use_case} --decision {alarm} --reason TEXT`) or keeps it, which "
            f"resumes the monitor (`sparsepilot approve {use_case} --decision {alarm} --reject --reason "
            f"TEXT`): {observations_file} was not imported"
        )
    piloting = (
        f"; a running pilot's observations are imported with "
        f"`sparsepilot pilot {use_case} --observations {shlex.quote(str(observations_file))}`"
        if lifecycle.can(phase, "pilot")
        else ""
    )
    return pilots.PilotStateError(
        f"{use_case}: nothing promoted (phase {phase}), nothing to monitor: {observations_file} was not "
        f"imported{piloting}"
    )


def finished_before_import(
    use_case: str, finished: Mapping[str, Any], observations_file: str
) -> pilots.PilotStateError:
    """The refusal of a monitor given a file while a decision of the use case was decided but not in
    effect (`rollout.unfinished`): the monitor carried the decision out first, as every finisher does, and
    did not import the file, whose rows were served before that decision took effect (after a rollback
    nothing is promoted; after a promotion a new champion serves). It exited 0 with "finished", so a cron
    shipping each day's log lost that day's rows without a word (review s49, fix-r1's note). The finished
    decision is said (`finished`: `Unfinished.to_dict`), and the way to import the file now."""
    what = f"decision {finished.get('decision_id')} ({finished.get('action')})"
    return pilots.PilotStateError(
        f"{use_case}: the monitor first carried out {what}, decided earlier but not yet in effect; "
        f"{observations_file} was not imported: its rows were served before that took effect. Import it "
        f"again (`sparsepilot monitor {use_case} --observations {shlex.quote(str(observations_file))}`) "
        "if it holds the current champion's answers"
    )


def note_monitor_skip(use_case: str, info: Mapping[str, Any], reason: str, explanation: str) -> bool:
    """A scheduled monitor that could not look (`reason`, e.g. "traffic-exhausted") leaves an audit entry
    (`monitor.skipped`, on the promoted pilot), so an unmonitored champion shows in the audit log and on
    the use case's page (rollout.queries.monitor_state). At most one a day per use case and reason: a
    tick every few minutes must not flood the log. Returns whether an entry was written."""
    with session_scope(immediate=True) as session:
        uc = pilots.get_use_case(session, use_case)
        last = session.scalar(
            select(AuditEntry)
            .where(AuditEntry.use_case_id == uc.id, AuditEntry.action == audit.MONITOR_SKIPPED)
            .order_by(AuditEntry.id.desc())
            .limit(1)
        )
        if (
            last is not None
            and (last.details or {}).get("reason") == reason
            and as_utc(last.ts).date() == utcnow().date()
        ):
            return False
        audit.record(
            session,
            audit.MONITOR_ACTOR,
            audit.MONITOR_SKIPPED,
            on=session.get(Pilot, info["pilot_id"]),
            details={"reason": reason, "explanation": explanation, "step_id": info["step_id"]},
        )
        return True


def current_step(use_case: str) -> dict[str, Any] | None:
    """The active pilot's status and current step, or None when no pilot is active."""
    with session_scope() as session:
        pilot = pilots.active_pilot(session, pilots.get_use_case(session, use_case))
        if pilot is None:
            return None
        step = pilots.current_step(session, pilot)
        return {
            "pilot_status": pilot.status,
            "step_id": step.id,
            "index": step.index,
            "kind": step.kind,
            "min_samples": step.min_samples,
            "traffic_pct": step.traffic_pct,
        }


def step_traffic_use(step_id: int) -> tuple[str, set[str]]:
    """(the pilot's salt, the request ids its steps have used so far) for the pilot of a step."""
    with session_scope() as session:
        pilot = session.get(Pilot, session.get(PilotStep, step_id).pilot_id)
        return pilot.salt, pilots.seen_request_ids(session, pilot)


def _held_step(session: Any, step_id: int, *, meanwhile: str) -> PilotStep:
    """The step, its pilot held against a change of state while observations are written into it
    (`pilots.held_for_observations`) and re-read under that hold. Refused (PilotStateError: what
    happened, `meanwhile` what this writer was doing then, and that nothing was stored) unless the step
    takes observations now (`pilots.observations_refused`): a pilot aborted, stopped or moved on since the
    caller read its step keeps none of the rows collected for it."""
    step = session.get(PilotStep, step_id)
    if step is None:
        raise pilots.PilotStateError(f"pilot step id {step_id} does not exist; nothing was stored")
    uc, pilot = pilots.held_for_observations(session, step.pilot.use_case_id, step.pilot_id)
    step = session.get(PilotStep, step_id, populate_existing=True)
    why = pilots.observations_refused(pilot, step)
    if why is not None:
        raise pilots.PilotStateError(f"{uc.name}: {why} while {meanwhile}; nothing was stored")
    return step


def step_refusal(step_id: int) -> dict[str, str] | None:
    """None while the step takes observations, else why not: `stopped` ("pilot aborted" when an operator
    aborted its pilot, else "pilot step closed") and `explanation` (`pilots.observations_refused`: "pilot
    1 was aborted"). What a run asks before it answers its next batch (one read, no lock; storing checks
    again under the lock)."""
    with session_scope() as session:
        step = session.get(PilotStep, step_id)
        if step is None:
            return {"stopped": "pilot step closed", "explanation": f"pilot step id {step_id} does not exist"}
        why = pilots.observations_refused(step.pilot, step)
        if why is None:
            return None
        return {
            "stopped": "pilot aborted" if step.status == "aborted" else "pilot step closed",
            "explanation": why,
        }


def store_batch(
    step_id: int,
    rows: list[dict[str, Any]],
    batch_id: str,
    source: str,
    void: Mapping[str, str] | None = None,
) -> dict[str, int]:
    """Store a validated batch in its step; rows already stored are skipped (a retried batch adds none).
    `void`: the batch's requests that have no row (request id -> why: the control arm gave no reference,
    rollout.arms.step), kept as used (`VoidRequest`) and counted (`void`). Refused (PilotStateError,
    nothing stored) when the step no longer takes observations: its pilot was aborted, stopped or moved on
    to another step while the batch was answered (`_held_step`; a monitor batch answered across a rollback
    is kept: its look says it was superseded)."""
    with session_scope(immediate=True) as session:
        step = _held_step(session, step_id, meanwhile="this batch was answered")
        res = pilots.record_observations(session, step, rows, batch_id=batch_id, source=source)
        _record_void(session, step, void or {}, batch_id)
        run_links.record_batch(session, step.id, batch_id, source, rows=len(rows), inserted=res.inserted)
    return {"inserted": res.inserted, "already_present": res.already_present, "void": len(void or {})}


def _record_void(session: Any, step: PilotStep, void: Mapping[str, str], batch_id: str) -> None:
    """The void requests not already kept for the step (a retried batch adds none)."""
    if not void:
        return
    kept = set(
        session.scalars(
            select(VoidRequest.request_id).where(
                VoidRequest.pilot_step_id == step.id, VoidRequest.request_id.in_(sorted(void))
            )
        )
    )
    for rid, why in sorted(void.items()):
        if rid not in kept:
            why = redact(why)[:500]
            session.add(VoidRequest(pilot_step_id=step.id, batch_id=batch_id, request_id=rid, reason=why))


def checked_file_rows(
    path: str,
    numbered: Sequence[tuple[int, Mapping[str, Any]]],
    known_request_ids: Iterable[str],
    *,
    refused_request_ids: Mapping[str, str] | None = None,
    outcome: str = "nothing was stored",
) -> dict[str, Any]:
    """The observation checks (GX) of a file's rows, as `iter_observations` reads them ((line, row)
    pairs): a failure names the row by its line in the file (`path:LINE`, as the file's parse errors do;
    a CSV's data row 3 is its line 4), never by its place among the rows. Refused (ObservationImportError,
    saying `outcome`) unless every row passes; else the GX summary. The pilot's import and the monitor's
    name a bad row alike through it."""
    gx = validate_observation_rows(
        [row for _, row in numbered],
        known_request_ids=known_request_ids,
        require_both_arms=False,
        source=path,
        lines=[line for line, _ in numbered],
        refused_request_ids=refused_request_ids,
    )
    if not gx["passed"]:
        raise ObservationImportError(
            f"{path}: failed the observation checks; {outcome}:\n  - " + "\n  - ".join(gx["failures"])
        )
    return gx


def store_monitor_import(
    info: Mapping[str, Any],
    files: Sequence[tuple[str, Sequence[tuple[int, dict[str, Any]]]]],
    batch_id: str,
) -> dict[str, Any]:
    """Store one or more files of production observations in the promoted pilot's monitor step
    (`monitor_target`'s `info`) as ONE look, all or nothing, as the pilot's import is (`import_file`): a file
    that fails the observation checks (GX), brings a (request, arm) already stored with other values or given
    in another of the files, a request another step of the pilot judged (the gate's) or one void in any step
    (this one's too), is refused with an ObservationImportError naming the file and its rows; nothing is
    stored, and the caller records no look. A file given alone is refused where its rows are evidently sorted
    by an outcome (`outcome_sorted.sorted_file_problem`): it would be its own look, and a page of a sorted
    export judges a sorted order; the pages given together are one look, their rows in stream-key order.
    Stored with the pilot held against a change of state (`pilots.held_for_observations`): a rollback waits
    for it, as for the monitor's own batch, and a file read across one is kept for a look that says it was
    superseded. Only the files' ids are looked up (chunked IN lists): a promoted pilot's whole history is
    never read. `files`: (path, its rows with their lines, `observations_io.read_numbered`), which a refusal
    names. A path given twice (by any spelling of it) is one file (`distinct_paths`), checked as such. An
    import that stores no new row, every row already judged by a recorded look (`pilots.judged_by_a_look`:
    a page of an earlier multi-file look given again alone) and no look on this batch yet, records no look:
    `nothing_new` says so (else None). Returns the GX summary (`check`: the look's data check, of all the
    files), the counts stored and `nothing_new`."""
    outcome = "nothing was stored and no look was recorded"
    read = dict(files)
    files = [(path, read[path]) for path in distinct_paths([path for path, _ in files])]
    if len(files) == 1:
        sorted_problem = sorted_file_problem(files[0][0], [row for _, row in files[0][1]])
        if sorted_problem:
            raise ObservationImportError(sorted_problem)
    gxs, given, twice = [], {}, []
    for path, numbered in files:
        gxs.append(
            checked_file_rows(
                path,
                numbered,
                {str(r["request_id"]) for _, r in numbered},  # production traffic: any request id
                outcome=outcome,
            )
        )
        for line, r in numbered:
            key = (str(r["request_id"]), str(r["arm"]))
            if key in given and given[key] != path:
                twice.append(f"{key[0]}/{key[1]} ({given[key]} and {path}:{line})")
            given.setdefault(key, path)
    paths = ", ".join(path for path, _ in files)
    if twice:
        raise ObservationImportError(
            f"{paths}: request(s) {', '.join(twice[:8])}{' and more' if len(twice) > 8 else ''} are given in "
            f"two of the files; each (request, arm) is one row of the look; {outcome}"
        )
    rows = [row for _, numbered in files for _, row in numbered]
    gx = gxs[0] if len(gxs) == 1 else _merged_checks(gxs)
    with session_scope(immediate=True) as session:
        step = _held_step(session, info["step_id"], meanwhile=f"{paths} was read")
        ids = {str(r["request_id"]) for r in rows}
        check = pilots.ImportCheck(
            pilots.step_rows_among(session, step, ids),
            kind=step.kind,  # "monitor": no arm design to check
            salt=info["salt"],
            traffic_pct=100.0,
            external_assignment=True,
            used_elsewhere=pilots.seen_request_ids(session, step.pilot, but=step, among=ids),
            void=pilots.void_request_ids(session, step.pilot, among=ids),
        )
        check.add(rows)
        problems = check.problems()
        if problems:
            raise ObservationImportError(
                f"{paths}: does not fit the monitor (step {step.index}); {outcome}:\n  - "
                + "\n  - ".join(problems)
            )
        res = pilots.record_observations(session, step, rows, batch_id=batch_id, source="imported")
        nothing_new = None
        if (
            res.inserted == 0
            and pilots.decision_by_key(session, pilots.monitor_look_key(step.id, batch_id)) is None
            and pilots.judged_by_a_look(session, step, ids)
        ):  # a retry of this batch's look finds its decision; an earlier look already judged every row
            nothing_new = (
                f"nothing new: every row of {paths} was already judged (by an earlier monitor look); no "
                "look was recorded"
            )
        else:
            run_links.record_batch(
                session, step.id, batch_id, "imported", rows=len(rows), inserted=res.inserted
            )
    return {
        "check": gx,
        "inserted": res.inserted,
        "already_present": res.already_present,
        "nothing_new": nothing_new,
    }


def distinct_paths(paths: Sequence[str]) -> list[str]:
    """The paths, each file once in the order first given (`a.jsonl` and `./a.jsonl` are one file): a file
    given twice is one file of the look, and one file alone is checked as a file alone."""
    from pathlib import Path

    seen: dict[Path, str] = {}
    for path in paths:
        seen.setdefault(Path(path).resolve(), path)
    return list(seen.values())


def _merged_checks(gxs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The GX summaries of several files as one look's data check: passed (each file passed, or it was
    refused), its report per file."""
    reports = [g["report"] for g in gxs]
    return {"passed": all(g["passed"] for g in gxs), "failures": [], "report": {"files": reports}}


def import_file(
    use_case: str,
    path: str,
    known_ids: Iterable[str],
    *,
    refused_ids: Mapping[str, str] | None = None,
    external_assignment: bool = False,
    chunk_rows: int = 50_000,
    progress: Any = None,
    actor: str | None = None,
    spec_version: int | None = None,
    pilot_anyway: bool = False,
) -> dict[str, Any]:
    """Import a file of observations into the current step, all or nothing, streaming: each chunk is
    parsed, checked (GX) and checked against the step's design (rollout.pilots.ImportCheck), then
    bulk-inserted; any problem rolls the whole import back. The pilot is started in the same
    transaction, so a refused import starts nothing either; its audit entries (the pilot's start, the
    import) are appended at the end (`audit.deferred`), so the import holds the audit chain's lock (on
    PostgreSQL: every audit writer of every use case waits on it) only for its last moment. The pilot is
    held against a change of state for the import's length (`pilots.held_for_observations`): an abort
    that comes while it runs waits for it; one that came first refuses it (PilotStateError). Its request
    ids must be among `known_ids` (what the pilot's traffic source may hand out:
    rollout.traffic.importable); `refused_ids` says why another id is not. ``progress(rows_done)`` after
    each chunk. `actor`: who imports (the signed-in account; None: the automation), kept in the audit log
    with the file, so the evidence behind a decision names who brought it, and as the starter of a pilot
    the import starts. `spec_version`: the version
    `known_ids` come from (`pilot_spec_version`, the pilot's own); a pilot that runs under another one is
    refused, nothing stored (the pilot changed between the two reads). `pilot_anyway`: as
    `ensure_pilot_in`'s."""
    source = "imported-external" if external_assignment else "imported"
    rows_seen = inserted = 0
    with session_scope(immediate=True) as session, audit.deferred(session):
        try:
            info = ensure_pilot_in(
                session, use_case, pilot_anyway=pilot_anyway, actor=actor or audit.SYSTEM_ACTOR
            )
        except NotPiloted as refused:  # the command that pilots it regardless is this import's own
            command = import_anyway_command(use_case, path, external_assignment=external_assignment)
            raise NotPiloted(use_case, refused.skip, command=command) from None
        # held until the import ends: an abort (or any change of the pilot's state) waits for it, or, when
        # it came first, the import sees it here and stores nothing
        step = _held_step(session, info["step_id"], meanwhile=f"the import of {path} began")
        if spec_version is not None and info["spec_version"] not in (None, spec_version):
            raise ObservationImportError(
                f"{path}: {info['pilot']} runs under spec version {info['spec_version']}, not the version "
                f"{spec_version} its request ids were checked against; nothing was stored: import it again"
            )
        if external_assignment and info["kind"] != "split":  # rolled back with the pilot it may have started
            raise ObservationImportError(
                f"{path}: --external-assignment is for a split step (the serving system chose each "
                f"request's arm); the current step is {info['kind']}, where both arms answer every request"
            )
        check = pilots.ImportCheck(
            pilots.step_observations(session, step).to_dict("records"),
            kind=info["kind"],
            salt=info["salt"],
            traffic_pct=info["traffic_pct"],
            external_assignment=external_assignment,
            used_elsewhere=pilots.seen_request_ids(session, step.pilot, but=step),
            void=pilots.void_request_ids(session, step.pilot),
        )
        bid = f"b-{step.id}-import-{uuid.uuid4().hex[:16]}"
        salt = info["salt"]  # the file's order carries no weight: pilots.stream_key places each row
        sample: list[dict[str, Any]] = []
        for chunk in iter_observations(path, chunk_rows):
            rows = [r for _, r in chunk]
            checked_file_rows(path, chunk, known_ids, refused_request_ids=refused_ids)
            new = check.add(rows)
            if (
                check.conflicts or check.wrong_arm or check.reused or check.was_void
            ):  # fail early; problems() lists them
                break
            if new:  # Core executemany: the ORM's per-row bookkeeping costs more than the insert itself
                fixed = {"pilot_step_id": step.id, "use_case_id": info["use_case_id"], "batch_id": bid,
                         "source": source, "created_at": utcnow()}  # fmt: skip
                session.execute(
                    Observation.__table__.insert(),
                    [{**r, **fixed, "stream_key": pilots.stream_key(r["request_id"], salt)} for r in new],
                )
            rows_seen += len(rows)
            inserted += len(new)
            if len(sample) < 1000:
                sample.extend(rows[: 1000 - len(sample)])
            if progress is not None:
                progress(rows_seen)
        problems = check.problems()
        if problems:
            raise ObservationImportError(
                f"{path}: does not fit step {info['step_index']} ({info['kind']}); nothing was stored:\n  - "
                + "\n  - ".join(problems)
            )
        if inserted:  # an identical re-import (a retry) adds nothing, not even an entry or a batch
            run_links.record_batch(session, step.id, bid, source, rows=rows_seen, inserted=inserted)
            audit.record(
                session,
                actor or audit.SYSTEM_ACTOR,
                "observations.import",
                on=session.get(Pilot, info["pilot_id"]),
                details={"file": str(path), "step_index": info["step_index"], "batch_id": bid,
                         "source": source, "rows": rows_seen, "inserted": inserted},
            )  # fmt: skip
    stored = {"inserted": inserted, "already_present": rows_seen - inserted, "rows": rows_seen}
    return {"info": info, "rows": sample, "batch_id": bid, "source": source, "stored": stored}


def abort(use_case: str, *, actor: str, reason: str) -> tuple[int, str, list[int], list[str]]:
    """Stop the active pilot (rollout.pilots.abort_pilot): (pilot id, how messages name it, the
    decisions it closed, the paused approval runs of those decisions, which the caller cancels)."""
    with session_scope(immediate=True) as session:
        uc = pilots.get_use_case(session, use_case)
        pilot, closed = pilots.abort_pilot(session, uc, actor=actor, reason=reason)
        closed_ids = [d.id for d in closed]
        return (
            pilot.id,
            pilots.pilot_label(pilot),
            closed_ids,
            [d.flow_run_id for d in closed if d.flow_run_id],
        )
