"""What was decided but is not in effect, and what finishes it.

A decision's effect runs after the decision is recorded: a person's approval commits, then its run moves
the aliases (rollout.registry: pending -> committed) and the use case's phase (rollout.approvals). A run
that dies in between (MLflow down, a deploy, an OOM) leaves a decision that waits for no one, yet:

- a **rollback** whose alias move committed while the use case was never marked rolled back (the monitor
  would judge a model MLflow no longer serves);
- an approved **rollback** (a person's, or one a person approved after the monitor asked) whose move
  failed or never ran: the champion that breached keeps serving;
- the monitor's **automatic rollback** whose move failed: its decision says "rolled back automatically";
- an approved **promotion** whose moves did not complete: MLflow may serve the challenger while the use
  case still waits for approval, unmonitored (held while the champion's alarm waits; once it is decided,
  finished over the champion serving then, a stale move recorded again from it, and said so:
  `approvals.promotion_moves`);
- a **kept alarm** (two approvers rejected the monitor's rollback) or a **rejection** whose run died
  after the signature committed: the use case waits for approval for good (a kept champion unmonitored).

`unfinished_in` finds the one a use case has (the newest); `flows.promote.finish_unfinished` claims it
(`claim_to_finish`, unless its approval run is at work: `run_at_work`, the one rule every finisher asks)
and carries it out through the same effect the approval's run would have run, under the same idempotency
keys, so finishing twice, or finishing while that run completes after all, converges on one move. The
scheduled cycle and the monitor finish one before they do anything else; `sparsepilot rollback` / `promote
--decision` / `approve --decision --reject` finish one on a person's request (`Unfinished.command`); the
moves stay the signer's, and an `approval.finished` audit entry names who finished it and why; `stalled`
lists them for the approvals page."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import and_, func, or_, select

from rollout import registry
from rollout.db.models import AliasMove, Approval, AuditEntry, GateDecision, Pilot, UseCase, as_utc
from rollout.db.session import session_scope

# An effect not in effect this long after it was decided is shown as stalled (a promotion or rollback
# takes seconds; one whose alias move failed is shown at once).
STALLED_AFTER = dt.timedelta(minutes=5)


# a person's decision with no failed move is taken to be carried out by whoever signed it (the dashboard
# or the CLI applies it directly, in seconds) for this long after the signature: nobody else finishes it
# meanwhile (`applied_directly_now`: the cycle's `finish_unfinished`, a person's `sparsepilot rollback`)
APPLY_GRACE = dt.timedelta(minutes=2)


@dataclass(frozen=True)
class Unfinished:
    use_case: str
    decision_id: int
    action: str  # "rollback" / "promote" / "keep" (the champion kept through an alarm) / "reject"
    approval_id: int | None  # the person's signature it carries out; None: the monitor's own rollback
    decided_at: dt.datetime  # when it was decided (the approval's time, or the decision's)
    failed_move: bool  # an alias move of it failed (MLflow unreachable, ...)
    moved: bool  # its alias move committed: only the state DB's side is left to do
    flow_run_id: str | None  # the approval run that was to carry it out (may still be doing so)
    # a promotion whose champion changed since its GO was signed: what finishing it does, in words
    # (`approvals.promotion_moves.champion_change`: promoted over the champion serving now)
    champion_changed: str | None = None
    # a promotion held while the monitor's alarm about the champion waited (`approvals.promotion_held`),
    # the alarm decided since: when it was decided, and from when the automation finishes the promotion
    # (`held_finish_from`); nobody carries it out before (its signer's process was refused, held)
    held_until: dt.datetime | None = None
    finish_from: dt.datetime | None = None
    finish_after: str | None = None  # why not before `finish_from`, in words (`held_finish_from`)

    @property
    def automatic(self) -> bool:
        return self.approval_id is None

    def applied_directly_now(
        self, now: dt.datetime, grace: dt.timedelta = APPLY_GRACE, *, moved_too: bool = False
    ) -> bool:
        """A person's decision signed less than `grace` ago whose move has not failed (or committed): the
        process that signed it is carrying it out now. Finishing it at the same time made its move twice
        (MLflow called twice, "retried" and "committed" twice in the audit); one whose process died is
        finished after the grace. `moved_too` (the automation's finishing: the cycle's, the monitor's):
        one whose move committed counts as well. Only the state DB's side is left of it, which a person
        asking for it may finish at once (nothing is moved twice), while the automation leaves it to its
        signer for the grace rather than finish it beside them."""
        signed = (
            self.decided_at if self.decided_at.tzinfo is not None else self.decided_at.replace(tzinfo=dt.UTC)
        )
        return (
            self.approval_id is not None
            and not self.failed_move
            and (moved_too or not self.moved)
            and now - signed < grace
        )

    def stalled_at(self, now: dt.datetime) -> bool:
        """Not simply still running: its alias move failed, or it was decided `STALLED_AFTER` ago."""
        return self.failed_move or now - _aware(self.decided_at) >= STALLED_AFTER

    def finish_command(self) -> str:
        """`command` without its `--reason`: the words of a sentence that names it."""
        return self.command().removesuffix(" --reason ...")

    def command(self) -> str:
        """What an approver runs to finish it now: `rollback`, `promote --decision`, or (a rejection, a
        champion kept through an alarm) `approve --decision --reject` again."""
        if self.action == "rollback":
            return f"sparsepilot rollback {self.use_case} --reason ..."
        if self.action == "promote":
            return f"sparsepilot promote {self.use_case} --decision {self.decision_id} --reason ..."
        return f"sparsepilot approve {self.use_case} --decision {self.decision_id} --reject --reason ..."

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "automatic": self.automatic, "command": self.command()}


def unfinished_in(session: Any, uc: UseCase) -> Unfinished | None:
    """The use case's decided-but-not-in-effect decision (module docstring), or None."""
    from rollout.pilots import promoted_pilot

    promoted = promoted_pilot(session, uc)
    # a rollback's last transaction marks the pilot it rolled back "rolled_back" (a kept alarm's moves the
    # use case on): while a pilot is still marked promoted one may be unfinished, whatever the phase (a
    # champion is rolled back while another challenger pilots, or after a rollback returned to it)
    if promoted is not None:
        found = _unfinished_rollback(session, uc, promoted)
        if found is not None:
            return found
    # a promotion's (or a rejection's) last transaction moves its pilot on: one whose pilot still runs or
    # awaits approval after the decision was resolved is unfinished (a pilot promoted since is not)
    latest_pilot = session.scalar(select(func.max(Pilot.id)).where(Pilot.use_case_id == uc.id))
    pilot = None if latest_pilot is None else session.get(Pilot, latest_pilot)
    if uc.phase in ("promoted", "rolled_back") or pilot is None or pilot.status not in LIVE_PILOT:
        return None
    from rollout.decisions import newest_decision

    # the pilot's newest gate decision only: a later look (its GO waiting now) outranks an older one
    latest = newest_decision(session, pilot.id, "gate")
    if latest is None or latest.resolution not in ("approved", "rejected"):
        return None
    if latest.resolution == "rejected":
        return _unfinished(session, uc, latest, "reject")
    from rollout.approvals import promotion_held, unfinished_promotion_in

    # held while the monitor's alarm about the serving champion waits: finished once it is decided
    if unfinished_promotion_in(session, latest) is not None and not promotion_held(session, latest):
        return _unfinished(session, uc, latest, "promote")
    return None


def promotion_unfinished(session: Any, d: GateDecision) -> Unfinished:
    """Approved promotion `d` as unfinished, where `unfinished_in` holds it while the champion's alarm
    waits but MLflow shows its move done (`approvals.effects._shown`): `promote --decision` records it."""
    return _unfinished(session, session.get(UseCase, d.use_case_id), d, "promote")


LIVE_PILOT = ("running", "awaiting_approval")


def may_be_unfinished(row: dict[str, Any]) -> bool:
    """Whether a portfolio row's current decision (`rollout.queries.portfolio`: its `decision_kind`,
    `decision` outcome, `awaiting`, `resolution`, the use case's `phase` and latest `pilot_status`) can be
    one `unfinished_in` finds, so the portfolio asks it about those rows alone (a healthy portfolio costs
    no query more): a gate decision resolved while its pilot is still live (a promotion or rejection
    whose run did not finish), or, whatever the phase (a champion is monitored and rolled back while
    another challenger pilots: `rollout.champion`), a monitor's or a person's rollback decision approved,
    rejected, or the monitor's own."""
    resolved = row.get("resolution") in ("approved", "rejected")
    if row.get("decision_kind") == "gate":
        return resolved and row.get("pilot_status") in LIVE_PILOT
    own = row.get("resolution") is None and row.get("awaiting") == "none"  # the monitor's automatic one
    return (
        row.get("decision_kind") in ("monitor", "rollback")
        and row.get("decision") != "GO"
        and (resolved or own)
    )


# what each unfinished action carries out, and the signature that decided it
FINISHING = {
    "promote": ("the promotion", "approved"),
    "rollback": ("the rollback", "approved"),
    "keep": ("keeping the champion", "rejected"),
    "reject": ("stopping the pilot", "rejected"),
}


def waits_words(pending: dict[str, Any]) -> str:
    """What a use case with a decided-but-not-in-effect decision waits for, in the portfolio's words
    (`rollout.queries.waits_for`; `pending`: `Unfinished.to_dict()` with the `signer`'s name and whether
    it is `stalled`): the effect being carried out, or, once stalled, someone to finish it and the
    command that does (the Approvals page's list says the same)."""
    what, verb = FINISHING[pending["action"]]
    who = "" if pending["automatic"] else f"{verb} by {pending.get('signer') or 'an approver'}; "
    if pending["automatic"]:
        what = "the monitor's automatic rollback"
    if pending.get("champion_changed"):
        who += f"{pending['champion_changed']}; "
    if pending.get("held_until") and not pending.get("stalled"):  # nobody is carrying it out yet
        command = pending["command"].removesuffix(" --reason ...")
        return (
            f"{what} to be finished ({who}{held_words(pending['held_until'])}; not in effect): "
            f"{held_finished_by(pending['finish_from'], command, pending['finish_after'])}"
        )
    if not pending.get("stalled"):
        return f"{what} to complete ({who}being carried out now)"
    return f"{what} to be finished ({who}not in effect): {pending['command'].removesuffix(' --reason ...')}"


def held_words(held_until: dt.datetime) -> str:
    """What a held promotion (`Unfinished.held_until`) went through, in words: "held while the monitor's
    alarm about the champion waited, decided at 10:02 UTC" (the portfolio's and `promote --decision`'s)."""
    return (
        f"held while the monitor's alarm about the champion waited, decided at {_aware(held_until):%H:%M} UTC"
    )


def held_finished_by(finish_from: dt.datetime, command: str, after: str) -> str:
    """By what and from when a held promotion is finished (`Unfinished.finish_from`, `command`; `after`:
    why not before, `Unfinished.finish_after`): the portfolio's words, those of `promote --decision`
    refused before then, and the hold's own (`approvals.effects.PromotionHeld`). `after` is its signer's
    grace, or its approval run's time where that run took it up and was held: the words said "its signer's
    grace" of both."""
    return (
        f"by the scheduled cycle's first run from {_aware(finish_from):%H:%M} UTC ({after}), or "
        f"`{command}` from then"
    )


def _unfinished_rollback(session: Any, uc: UseCase, promoted: Pilot) -> Unfinished | None:
    """The unfinished rollback or kept alarm of the pilot `promoted` (module docstring)."""
    from rollout.approvals import rollback_about
    from rollout.champion import phase_is_champions, version_of, waiting_alarm

    moves = registry.committed_moves(session, uc.id, "champion")
    # moved; the state DB never heard: its last transaction moves a phase that is the champion's to
    # rolled_back; where the phase is a challenger's (it stays), the pilot it rolled back is still marked
    # promoted (once it heard, the promoted pilot is the one the rollback returned to)
    if (
        moves
        and moves[-1].idempotency_key.startswith("rollback:")
        and (phase_is_champions(session, uc) or moves[-1].from_version == version_of(session, promoted))
    ):
        d = session.get(GateDecision, int(moves[-1].idempotency_key.split(":", 1)[1]))
        return _unfinished(session, uc, d, "rollback")
    serving = registry.champion_lineage(moves)[-1:]
    # the promoted pilot's newest alarm: a kept one older than an alarm waiting now is done with
    newest_alarm = session.scalar(
        select(func.max(GateDecision.id)).where(
            GateDecision.pilot_id == promoted.id, GateDecision.kind == "monitor", GateDecision.outcome != "GO"
        )
    )
    candidates = session.scalars(
        select(GateDecision)
        .where(
            GateDecision.use_case_id == uc.id,
            GateDecision.kind.in_(("monitor", "rollback")),
            GateDecision.outcome != "GO",
            or_(
                GateDecision.resolution.in_(("approved", "rejected")),
                and_(GateDecision.resolution.is_(None), GateDecision.awaiting == "none"),
            ),
        )
        .order_by(GateDecision.id.desc())
    )
    for d in candidates:
        # the monitor's decisions are about the pilot it judged: one of an earlier promotion of the same
        # version (rolled back, then promoted again) is not this champion's; a person's about the champion
        # in force when they asked, while no champion move came since (`_moved_since`)
        if d.kind == "monitor":
            about = d.pilot_id == promoted.id
        else:
            about = [rollback_about(session, d)] == serving and not _moved_since(d, len(moves))
        if not about or _move_status(session, f"rollback:{d.id}") == "committed":
            continue  # superseded, or carried out
        asked = d.kind == "rollback" or d.awaiting == "rollback_approval"
        if d.resolution == "approved" and asked:
            return _unfinished(session, uc, d, "rollback")
        if d.resolution is None and d.kind == "monitor" and waiting_alarm(session, promoted) is None:
            return _unfinished(session, uc, d, "rollback")  # the monitor's own
        if (
            d.resolution == "rejected"
            and d.awaiting == "rollback_approval"
            and uc.phase == "awaiting_approval"
            and phase_is_champions(session, uc)
            and d.id == newest_alarm
        ):
            return _unfinished(session, uc, d, "keep")  # kept through the alarm: the monitor resumes
    return None


def refuse_while_applied(
    session: Any, pending: Unfinished, *, claim_for: str | None, now: dt.datetime | None = None
) -> None:
    """A person's rollback or promotion signed a moment ago (`Unfinished.applied_directly_now`) is being
    carried out by whoever signed it: a person's `rollback` or `promote --decision` finishing it now as
    well made its move twice ("retried" and "committed" twice in the audit), the double apply the cycle's
    grace prevents. So is one the decision's approval run took up (`carried_out_by_run`), after the grace
    too. MoveInProgress, naming who carries it out and by when the command finishes it; after that it is
    finished by that command. Not refused, it is claimed for `claim_for` (the person about to finish it)
    from its approval run that has not taken it up (`waiter.claim_for_finisher`), so that run, waking
    later, declines it: the caller holds the decision's lock (`approvals.lock_decision`, or its use case's
    row), which the run's take-up takes too. Before, a run taking it up just after this check carried it
    out beside the person (the alias moved twice, a double audit). `claim_for` None: asked only. A
    rejection (`approve --decision --reject` again: "reject", "keep") by the same rule: it moves no alias,
    but finished beside its claimant it was carried out twice. A promotion held while the monitor's alarm
    waited (`Unfinished.held_until`), the alarm decided since, is carried out by nobody in that time (its
    signer, or its run, was refused, held): refused all the same, its words say so and from when it is
    finished (`held_finished_by`, the portfolio's), where they said "signed a moment ago and is being
    carried out"."""
    now = now or dt.datetime.now(dt.UTC)
    signer = session.scalar(select(Approval.actor).where(Approval.id == pending.approval_id))
    what, done = _IN_WORDS[pending.action]
    run = carried_out_by_run(session, pending, now)
    if pending.held_until is not None and (run is not None or pending.applied_directly_now(now, APPLY_GRACE)):
        raise registry.MoveInProgress(  # nobody carries it out: its signer (or run) was refused, held
            f"{pending.use_case}: {signer}'s {what} (decision {pending.decision_id}) was "
            f"{held_words(pending.held_until)}, and is not in effect; nothing was recorded. It is finished "
            f"{held_finished_by(pending.finish_from, pending.finish_command(), pending.finish_after)}"
        )
    if run is not None:
        doing = f"carried out by its approval run {run[0]}, which took it up"
        raise _at_work(pending, signer, doing, run[1], stalled=" (the run stalled)")
    if not pending.applied_directly_now(now, APPLY_GRACE):  # read now: a test sets it
        claim = claimed_now(session, pending, now)
        if claim is not None:
            raise _at_work(pending, signer, f"finished by {claim[0]}, who claimed it", claim[1])
        _claim_from_run(session, pending, claim_for)
        return
    by = (_aware(pending.decided_at) + APPLY_GRACE).strftime("%H:%M UTC")
    raise registry.MoveInProgress(
        f"{pending.use_case}: {signer}'s {what} (decision {pending.decision_id}) was signed a moment ago and "
        f"is being carried out; nothing was recorded. Look again in a moment: the use case is then {done}; "
        f"if it is not by {by}, `{pending.finish_command()}` finishes it"
    )


# what `refuse_while_applied` calls a decision's effect, and the use case's phase once it is in effect
_IN_WORDS = {
    "rollback": ("rollback", "rolled back"),
    "promote": ("promotion", "promoted"),
    "reject": ("rejection", "stopped"),
    "keep": ("rejection of the rollback", "promoted"),
}


def _at_work(
    pending: Unfinished, signer: str, doing: str, since: dt.datetime, *, stalled: str = ""
) -> registry.MoveInProgress:
    """`refuse_while_applied`'s refusal where someone is at work on the decision since `since` (its
    approval run took it up, or a finisher claimed it): `doing` says who and how, and the decision's own
    command finishes it once `STALLED_AFTER` has passed (`stalled`: why, where it is said)."""
    what, done = _IN_WORDS[pending.action]
    by = (since + STALLED_AFTER).strftime("%H:%M UTC")
    return registry.MoveInProgress(
        f"{pending.use_case}: {signer}'s {what} (decision {pending.decision_id}) is being {doing} at "
        f"{since:%H:%M:%S} UTC; nothing was recorded. Look again in a moment: the use case is then {done}; "
        f"if it is not by {by}{stalled}, `{pending.finish_command()}` finishes it"
    )


def _claim_from_run(session: Any, pending: Unfinished, by: str | None) -> None:
    """`refuse_while_applied`'s claim: `by` finishes the decision, which its approval run (if it has one)
    is not carrying out: that run, waking later, declines it; another finisher gives way (`claimed_now`)."""
    from rollout.approvals.waiter import claim_for_finisher

    if by is not None:
        claim_for_finisher(session, session.get(GateDecision, pending.decision_id), pending.flow_run_id, by)


def claimed_now(session: Any, u: Unfinished, now: dt.datetime) -> tuple[str, dt.datetime] | None:
    """Who finishes the decision now, and since when: the newest finisher's claim of it (a person's
    `promote --decision` / `rollback`, the cycle's, the monitor's: `waiter.newest_claim`) while that
    finisher is at work, by the rule of a run's take-up (`run_at_work`, the claim's time as the take-up):
    not once their process is known to be gone or a move of it failed after the claim, nor `STALLED_AFTER`
    on. Else None. Before, a claim kept out only the approval run: a person and the cycle, or two people,
    both claimed and both finished it (MLflow called twice, `approval.finished` twice)."""
    from rollout.approvals.waiter import newest_claim

    claim = newest_claim(session, session.get(GateDecision, u.decision_id))
    if claim is None:
        return None
    who, at, gone = claim
    failed = _failed_since(session, u, at)
    at_work = run_at_work(taken_up_at=at, signed_at=u.decided_at, now=now, failed_move=failed, gone=gone)
    return (who, at) if at_work else None


def _failed_since(session: Any, u: Unfinished, since: dt.datetime) -> bool:
    """Did a move of the decision's effect fail at or after `since` (its `alias.*.failed` audit entry)?"""
    ids = [
        str(i)
        for i in session.scalars(
            select(AliasMove.id).where(
                AliasMove.idempotency_key.in_(_move_keys(session, u.action, u.decision_id))
            )
        )
    ]
    failures = session.scalars(
        select(AuditEntry.ts).where(
            AuditEntry.entity == "alias_move",
            AuditEntry.entity_id.in_(ids),
            AuditEntry.action.like("alias.%.failed"),
        )
    )
    return any(as_utc(ts) >= since for ts in failures)


def run_at_work(
    *,
    taken_up_at: dt.datetime | None,
    signed_at: dt.datetime,
    now: dt.datetime,
    failed_move: bool,
    gone: bool,
) -> bool:
    """The one rule of whether a decision's approval run is carrying it out now (a person's `promote
    --decision` / `rollback`, the cycle and the monitor alike): not once a move of it failed (that ends
    its effect) or its process is known to be gone (`waiter_gone`); while it took the decision up
    (`approval.taken_up`) less than `STALLED_AFTER` ago; and, not yet taken up, for `APPLY_GRACE` after
    the signature (resumed a moment ago, it is waking to take it up). Before, the cycle asked Prefect for
    the run's state and a person's command read the take-up: two answers for one run."""
    if failed_move or gone:
        return False
    if taken_up_at is None:
        return now - _aware(signed_at) < APPLY_GRACE
    return now - _aware(taken_up_at) < STALLED_AFTER


def carried_out_by_run(session: Any, pending: Unfinished, now: dt.datetime) -> tuple[str, dt.datetime] | None:
    """The decision's approval run, and when it took the decision up, while it is carrying it out
    (`run_at_work`), else None (one not yet taken up is the signer's grace: `applied_directly_now`)."""
    from rollout.approvals.waiter import taken_up_at, waiter_gone

    if pending.flow_run_id is None:
        return None
    d = session.get(GateDecision, pending.decision_id)
    at = taken_up_at(session, d, pending.flow_run_id)
    if at is None:
        return None
    gone = waiter_gone(session, d) is not None
    if not run_at_work(
        taken_up_at=at, signed_at=pending.decided_at, now=now, failed_move=pending.failed_move, gone=gone
    ):
        return None
    return pending.flow_run_id, at


def claim_to_finish(use_case: str, by: str, *, db_url: str | None = None) -> Unfinished | None:
    """The automation's finishing (the cycle's, the monitor's: `flows.promote.finish_unfinished`): the use
    case's unfinished decision, claimed for `by`, or None where someone carries it out now: its approval
    run (`run_at_work`), or, with no run, its signer (`applied_directly_now`, a committed move too). In
    one transaction under the decision's lock, which the run's take-up takes too: claimed for `by`
    (`waiter.claim_for_finisher`), so a run that has not taken it up, waking later, declines it; None
    too while another finisher's claim is at work (`claimed_now`: a person's `promote --decision`)."""
    from rollout.approvals.checks import lock_decision
    from rollout.approvals.waiter import claim_for_finisher, taken_up_at, waiter_gone
    from rollout.pilots import get_use_case

    if unfinished_of(use_case, db_url=db_url) is None:  # most ticks: read only, no write lock taken
        return None
    now = dt.datetime.now(dt.UTC)
    with session_scope(db_url, immediate=True) as session:
        uc_id = get_use_case(session, use_case).id
        uc = session.get(UseCase, uc_id, with_for_update=True, populate_existing=True)
        u = unfinished_in(session, uc)
        if u is None:
            return None
        d = lock_decision(session, u.decision_id)
        if u.flow_run_id is None:
            if u.applied_directly_now(now, APPLY_GRACE, moved_too=True):
                return None
        else:
            at = taken_up_at(session, d, u.flow_run_id)
            gone = waiter_gone(session, d) is not None
            if run_at_work(
                taken_up_at=at, signed_at=u.decided_at, now=now, failed_move=u.failed_move, gone=gone
            ):
                return None
        if claimed_now(session, u, now) is not None:  # a person's command, or another finisher, is at it
            return None
        claim_for_finisher(session, d, u.flow_run_id, by)
        return u


def unfinished_of(use_case: str, *, db_url: str | None = None) -> Unfinished | None:
    """`unfinished_in` by use-case name, in its own transaction."""
    from rollout.pilots import get_use_case

    with session_scope(db_url) as session:
        return unfinished_in(session, get_use_case(session, use_case))


def stalled(session: Any, *, now: dt.datetime | None = None) -> list[Unfinished]:
    """Every use case's unfinished decision that is not simply still running: one whose alias move
    failed, or decided longer than `STALLED_AFTER` ago. Oldest first (the approvals page)."""
    now = now or dt.datetime.now(dt.UTC)
    out = []
    for uc in session.scalars(select(UseCase).order_by(UseCase.id)):
        u = unfinished_in(session, uc)
        if u is not None and u.stalled_at(now):
            out.append(u)
    return sorted(out, key=lambda u: _aware(u.decided_at))


def _unfinished(session: Any, uc: UseCase, d: GateDecision, action: str) -> Unfinished:
    signed = ("reject",) if action in ("keep", "reject") else ("approve", "rollback")
    signature = session.scalar(
        select(Approval)
        .where(Approval.decision_id == d.id, Approval.action.in_(signed))
        .order_by(Approval.id.desc())
    )
    from rollout.approvals.promotion_moves import champion_change

    status = [_move_status(session, k) for k in _move_keys(session, action, d.id)] or [None]
    change = champion_change(session, d) if action == "promote" and status[0] != "committed" else None
    held, finish = None, (None, None)
    if action == "promote" and status[0] != "committed" and signature is not None:
        held = _alarm_decided_after(session, uc, signature.created_at)
    if held is not None:
        finish = held_finish_from(session, d, signature.created_at)
    return Unfinished(
        use_case=uc.name,
        decision_id=d.id,
        action=action,
        approval_id=None if signature is None else signature.id,
        decided_at=d.created_at if signature is None else signature.created_at,
        failed_move="failed" in status,
        moved=status[0] == "committed",
        flow_run_id=d.flow_run_id,
        champion_changed=None if change is None else change.words(),
        held_until=held,
        finish_from=finish[0],
        finish_after=finish[1],
    )


def _alarm_decided_after(session: Any, uc: UseCase, signed: dt.datetime) -> dt.datetime | None:
    """When the monitor's alarm about the use case's champion was decided after a promotion's signature
    at `signed` (its newest signature then), or None. No promotion is signed while an alarm waits, so an
    alarm decided after the signature held the promotion (`approvals.effects._hold_while_rollback_waits`)."""
    alarms = select(GateDecision.id).where(
        GateDecision.use_case_id == uc.id, GateDecision.awaiting == "rollback_approval"
    )
    times = session.scalars(select(Approval.created_at).where(Approval.decision_id.in_(alarms)))
    after = [as_utc(t) for t in times if as_utc(t) > as_utc(signed)]
    return max(after, default=None)


def held_finish_from(session: Any, d: GateDecision, signed: dt.datetime) -> tuple[dt.datetime, str]:
    """From when the automation (`claim_to_finish`: the cycle, the monitor) finishes a held promotion
    once its alarm is decided, and why not before, in words (`held_finished_by`): after its signer's grace
    (`APPLY_GRACE` from the signature), or, where its approval run took it up (and was held), once that run
    is no longer taken to be at work (`STALLED_AFTER` from its take-up, `run_at_work`)."""
    from rollout.approvals.waiter import taken_up_at

    at = None if d.flow_run_id is None else taken_up_at(session, d, d.flow_run_id)
    if at is None:
        return _aware(signed) + APPLY_GRACE, "its signer's grace"
    minutes = int(STALLED_AFTER.total_seconds() // 60)
    return at + STALLED_AFTER, f"{minutes} minutes after its approval run took it up and was held"


def _move_keys(session: Any, action: str, decision_id: int) -> list[str]:
    """The idempotency keys of the alias moves that carry out `action` of decision `decision_id`, its
    main move's first (a promotion's newest: `approvals.promotion_moves.keys_of`)."""
    from rollout.approvals.promotion_moves import keys_of

    if action == "rollback":
        return [f"rollback:{decision_id}"]
    if action == "promote":
        return [*keys_of(session, decision_id), f"baseline:{decision_id}"]
    return []


def _moved_since(d: GateDecision, moves_now: int) -> bool:
    """Has a champion move committed since a person's rollback was asked? Its key records how many there
    were (`manual-rollback:<use case>:<champion>:<moves>`); one asked before, superseded by another
    rollback or promotion, must not come back when the same version is promoted again."""
    parts = d.idempotency_key.split(":")
    return len(parts) == 4 and parts[3].isdigit() and int(parts[3]) != moves_now


def _move_status(session: Any, key: str) -> str | None:
    return session.scalar(select(AliasMove.status).where(AliasMove.idempotency_key == key))


def _aware(t: dt.datetime) -> dt.datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)
