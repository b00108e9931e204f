"""Approvals: pending decisions with their evidence; approve, reject, continue a short pilot's ramp or
roll back with a reason.
Buttons are drawn only for approvers, and every action goes through rollout.approvals, which checks
the role again on the server side and resumes the paused Prefect flow."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pandas as pd
import streamlit as st

from dashboard import fmt
from dashboard.data import read
from dashboard.identity import approver_list_known, current_identity
from rollout import approvals, queries, registry
from rollout.auth import Identity, PermissionDenied
from rollout.redact import redact
from rollout.unfinished import FINISHING, Unfinished, unfinished_of

FLASH_KEY = "sp_approvals_flash"


def flash(kind: str, text: str) -> None:
    """Keep a message for the next draw, redacted (`rollout.redact`): a failure's text may be a library's
    own, naming a URL with its password."""
    st.session_state[FLASH_KEY] = (kind, redact(text))


def show_flash() -> None:
    item = st.session_state.pop(FLASH_KEY, None)
    if item:
        kind, text = item
        {"success": st.success, "warning": st.warning, "error": st.error}[kind](fmt.plain(text))


def run_action(fn: Any, *args: Any, reason_key: str, **kwargs: Any) -> None:
    """A button's on_click: call rollout.approvals with the reason typed under `reason_key` and turn
    every refusal into a message the person can act on. A callback runs on the click's rerun before the
    page is drawn, so a click on a card whose decision someone else resolved meanwhile (approved in
    another browser, closed by `pilot --abort`) still reaches rollout.approvals, whose own check says what
    became of it; drawn inline, the button no longer existed on that rerun and the click was dropped
    under "Nothing is waiting for a decision"."""
    try:
        with approver_list_known():  # a callback runs before the page, outside app.py's
            result = fn(*args, current_identity(), st.session_state.get(reason_key), **kwargs)
    except PermissionDenied as exc:
        flash("error", f"Refused: {exc}")
    except approvals.FlowNotWaiting as exc:
        flash("error", f"The flow is no longer waiting, so nothing was recorded. {exc}")
    except approvals.PromotionHeld as exc:  # signed, its effect held: the signature stands
        flash("warning", f"Your approval was recorded, but nothing was promoted yet: {exc}")
    except approvals.ApprovalError as exc:
        flash("error", f"Not accepted, nothing was recorded: {exc}")
    except registry.RegistryError as exc:  # MLflow did not move the alias: recorded before, or not at all
        # (MoveInProgress: another's effect is under way and nothing of this click was recorded)
        pending = None if isinstance(exc, registry.MoveInProgress) else recorded_not_in_effect(args[0])
        if pending is None:
            flash("error", f"The action failed: {type(exc).__name__}: {exc}")
        else:
            flash("warning", not_in_effect_text(pending, exc))
    except Exception as exc:  # noqa: BLE001 - show the failure instead of a stack trace page
        flash("error", f"The action failed: {type(exc).__name__}: {exc}")
    else:
        if isinstance(result, approvals.ApprovalResult) and result.needs_second_approver:
            flash("warning", f"Signature recorded, not yet in effect: {result.message}")
        elif isinstance(result, approvals.ApprovalResult):
            flash("success", f"Done: {result.message}")
        else:
            flash("success", f"Done: rollback recorded as decision #{result} and applied")


def recorded_not_in_effect(target: Any) -> Unfinished | None:
    """The decision a click recorded whose effect did not follow (rollout.unfinished): the one of
    decision `target` (an approval) or of use case `target` (a rollback), or None where nothing was."""
    if isinstance(target, str):
        return unfinished_of(target)
    d = read(queries.decision, target)
    pending = None if d is None else unfinished_of(d["use_case"])
    return pending if pending is not None and pending.decision_id == target else None


def not_in_effect_text(pending: Unfinished, exc: Exception) -> str:
    """A click whose signature was recorded but whose alias move failed: what stands, MLflow's answer
    (the registry's own advice on idempotency keys is for the command line) and what finishes it."""
    what, verb = FINISHING[pending.action]
    cause = str(exc).split(" The move is recorded as failed", 1)[0]
    return (
        f"{verb.capitalize()} and recorded; {what} is not in effect: {cause}. Finish it with "
        f"`{pending.finish_command()}` (the use case's next scheduled cycle finishes it too)."
    )


def money_summary(d: dict[str, Any]) -> None:
    """What the promotion is worth (`queries.roi_summary`: the figures of the plan the decision's pilot
    runs, in the portfolio's rules; `roi_missing`: why there are none): $/month
    saved with its interval, payback, and beside them why no saving is established and the caveats the
    figures carry. The gate's GO judges quality only; the money is the business owner's to weigh."""
    money = d.get("roi")
    if money is None:
        st.caption(f"$/month saved: - ({d.get('roi_missing') or 'no evaluation priced this use case'})")
        return
    m1, m2 = st.columns(2)
    m1.metric("$/month saved", fmt.money(money["savings_month_usd"]))
    m1.caption(  # "no interval: one timing pair" where none was measured, not "interval - to -"
        fmt.money_interval(
            money["savings_month_usd"], money["savings_month_low"], money["savings_month_high"]
        )
    )
    m2.metric("Payback", fmt.days(money["payback_days"]))
    if money["not_established"]:
        st.warning(
            fmt.plain(
                "The gate judges quality only: quality may hold, but no saving is established: "
                f"{money['not_established']}."
            )
        )
    for note in money["caveats"]:
        st.warning(fmt.plain(f"$/month {note}."))


def evidence_summary(d: dict[str, Any]) -> None:
    ev = d["evidence"]
    q = ev.get("quality") or {}
    margin = (ev.get("settings") or {}).get("margin")
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Quality Δ", fmt.num_interval(q.get("estimate"), None, None))
    interval = fmt.quality_interval(q.get("interval_low"), q.get("interval_high"))
    c1.caption(f"interval {interval}" + (f" · allowed loss {margin}" if margin is not None else ""))
    c2.metric("Samples (control / treatment)", f"{ev.get('n_control', '-')} / {ev.get('n_treatment', '-')}")
    srm = ev.get("srm_p_value")
    c3.metric("SRM p-value", f"{srm:.3g}" if isinstance(srm, int | float) else "-")
    p95 = ev.get("p95_latency_treatment_ms")
    c4.metric("p95 latency, treatment", f"{p95:.0f} ms" if isinstance(p95, int | float) else "-")
    if ev.get("overloaded_treatment_rows"):  # left out of the p95, as of the latency guardrail
        c4.caption(f"{ev['overloaded_treatment_rows']} sparse-arm rows under CPU overload left out")
    money_summary(d)
    # the stored explanation, less the skip note the card's warning says (`approvals.explanation_shown`)
    st.info(fmt.plain(approvals.explanation_shown(d["explanation"], ev)))
    checks = fmt.guardrail_rows(ev)
    if checks:
        st.dataframe(pd.DataFrame(checks), hide_index=True, width="stretch")
    reasons = [str(r) for r in ev.get("reasons") or []]
    if reasons:
        st.markdown("\n".join(f"- {r}" for r in reasons))
    with st.expander("Full evidence"):
        st.json(ev, expanded=False)


def decision_card(d: dict[str, Any], ident: Identity | None, pilot_waits: str | None = None) -> None:
    """A decision an approver may act on: one waiting for a person (`waits_for`, queries.decision_waits, or
    where no signature can promote it the portfolio's way on, approvals.promotion_refused_waits),
    or the latest of a running pilot that asked nobody, which an approver may promote against the gate
    (`waits_for` None: nobody has signed it yet; `pilot_waits`: what its use case waits for, the
    portfolio's words)."""
    waits = d["waits_for"]
    override = d["awaiting"] == "none"  # asked nobody: promoting on it is an override (two approvers)
    head = (
        f"waiting for {waits}" if waits else "running pilot's latest decision; promoting on it is an override"
    )
    step = f" · step {d['step_index']} ({d['traffic_pct']:g}%)" if d.get("step_index") is not None else ""
    made = queries.decision_words(
        d["outcome"], d["kind"]
    )  # "NO-GO (monitor)": the monitor's rollback request
    st.subheader(f"#{d['id']} {d['use_case']}: {made}, {head}")
    st.caption(f"criticality {d['criticality']}{step} · decided {d['created_at']:%Y-%m-%d %H:%M} UTC")
    asks = d["awaiting"] == "approval"  # a GO that asked nobody has moved on: it cannot continue the ramp
    # continuing refused for a plan the current spec version left uncalibrated (`promotion_held_words` says
    # why): the note offers no continuing, its button disabled (it said "One approver may instead ...");
    # the info box's explanation leaves the note to the warning (`approvals.explanation_shown`)
    ramp_held = asks and d["outcome"] == "GO" and read(approvals.continue_held, d["id"])
    evidence_summary(d)
    recommended = approvals.recommended_action(
        SimpleNamespace(awaiting=d["awaiting"], outcome=d["outcome"], evidence=d["evidence"])
    )
    skips = (
        approvals.skip_note(d["evidence"], waits_for_approval=asks and not ramp_held)
        if d["outcome"] == "GO"
        else ""
    )
    if skips:  # a GO before the plan's last step (a short pilot's, or an earlier step's): what it skips
        # the evidence is a GO, but the plan's next step is more traffic, not promotion: neither button
        # is "the gate's recommendation", so none is named (approvals.recommended_action counts promoting
        # as the override and rejecting, which stops the pilot, as the single-signature action)
        st.markdown("The gate says **GO at this step**, before the plan's last.")
        st.warning(skips)
    else:
        st.markdown(approvals.recommendation_in_words(SimpleNamespace(**d), recommended, pilot_waits))
    if d["approvals"]:  # every signature, each with whether it counts (queries.signature_status)
        st.dataframe(
            pd.DataFrame(d["approvals"])[
                ["actor", "role", "action", "status", "reason", "against_recommendation", "created_at"]
            ],
            hide_index=True,
            width="stretch",
        )
        live = queries.live_signatures(d["approvals"])  # neither withdrawn nor lapsed
        firsts = [a for a in live if a["against_recommendation"]]
        if firsts:
            st.warning(
                f"{firsts[0]['actor']} signed an override ({firsts[0]['action']}) against the "
                "recommendation; "
                "a second, different approver must sign the same action before it takes effect."
            )
        for a in d["approvals"]:
            if a["lapsed"] and not a["withdrawn"]:  # rollout.approvals.counting_signatures' rule
                st.caption(
                    f"{fmt.plain(a['actor'])}'s signature ({a['action']}) no longer counts: "
                    f"{fmt.plain(a['actor'])} is {a['lapsed']}; an override needs two current approvers."
                )
    # a promotion no signature passes now (a rollback of the serving champion waits, or the plan was not
    # calibrated under the current spec version): why, and what to do, by the rules the signature is refused
    # by (`approvals.rollback_before_promotion`, `approvals.promotion_not_calibrated`); its button disabled
    held = read(approvals.promotion_held_words, d["id"])
    if held:
        st.warning(fmt.plain(held))
    if ident is None or not ident.can_approve:
        return
    reason_key = f"reason_{d['id']}"
    st.text_area("Reason (required, kept in the audit log)", key=reason_key)
    approve_label = "Approve rollback" if d["awaiting"] == "rollback_approval" else "Approve promotion"
    if override:
        signed_first = queries.live_signatures(d["approvals"])  # a withdrawn signature counts for nothing
        approve_label = "Co-sign the promotion" if signed_first else "Promote anyway"
    reject_label = "Keep the current model" if d["awaiting"] == "rollback_approval" else "Reject"
    # a first signature against the recommendation waits for a second approver: their button co-signs
    signed = {a["action"] for a in queries.live_signatures(d["approvals"]) if a["against_recommendation"]}
    if "approve" in signed:
        approve_label = "Co-sign the promotion"
    if "reject" in signed:
        keep = d["awaiting"] == "rollback_approval"
        reject_label = "Co-sign keeping the current model" if keep else "Co-sign the rejection"
    # a GO before the plan's last step that waits for approval may also go on to the plan's next step
    onward = approvals.ramp_steps_skipped(d["evidence"])[:1] if skips and asks else []
    continue_label = ""
    if onward:
        share = f" ({onward[0]['traffic_pct']:g}%)" if onward[0].get("traffic_pct") is not None else ""
        continue_label = f"Continue the ramp to step {onward[0]['index']}{share}"
    if skips:
        st.caption(f"'{approve_label}' skips the plan's later ramp steps: it needs a second approver.")
        if continue_label and not ramp_held:
            st.caption(
                f"'{continue_label}' does what the plan would: the pilot collects at that step and the gate "
                "looks again there. It promotes nothing, so one approver decides it."
            )
    elif recommended != "approve":
        st.caption(f"'{approve_label}' goes against the recommendation: it needs a second approver.")
    else:
        st.caption(f"'{reject_label}' goes against the recommendation: it needs a second approver.")
    act = {"args": (approvals.approve, d["id"]), "kwargs": {"reason_key": reason_key}}
    b1, b2, b3 = st.columns(3)
    b1.button(
        approve_label,
        key=f"approve_{d['id']}",
        type="primary",
        on_click=run_action,
        disabled=held is not None,
        **act,
    )
    if not override:  # rejecting a running pilot's decision stops it: `sparsepilot pilot NAME --abort`
        b2.button(
            reject_label,
            key=f"reject_{d['id']}",
            on_click=run_action,
            args=act["args"],
            kwargs={**act["kwargs"], "reject": True},
        )
    if continue_label:  # disabled for a plan the current spec version left uncalibrated: `held` says why
        b3.button(
            continue_label,
            key=f"continue_{d['id']}",
            disabled=ramp_held,
            on_click=run_action,
            args=act["args"],
            kwargs={**act["kwargs"], "continue_ramp": True},
        )


def rollback_section(ident: Identity | None) -> None:
    # whatever the phase: a champion of ours serving while another challenger pilots is rolled back too
    promoted = read(queries.rollback_able)
    st.subheader("Roll back a promoted use case")
    if not promoted:
        st.caption("No use case is promoted right now.")
        return
    if ident is None or not ident.can_approve:
        st.caption(f"Promoted: {', '.join(promoted)}. Only approvers can roll back.")
        return
    name = st.selectbox("Use case", promoted, key="rollback_uc")
    st.text_area("Reason for the rollback (required)", key="rollback_reason")
    st.button(
        "Trigger rollback",
        key="rollback_go",
        type="primary",
        on_click=run_action,
        args=(approvals.request_rollback, name),
        kwargs={"reason_key": "rollback_reason"},
    )


def override_section(ident: Identity | None) -> None:
    """The latest decision of each running pilot that asked nobody (EXTEND, NO-GO, INVALID, an earlier
    step's GO): an approver may start an override, promoting against the gate (two approvers); the
    first signature then lists the decision above for the second."""
    candidates = read(queries.overridable_decisions)
    if not candidates:
        return
    st.subheader("Promote a running pilot against the gate")
    st.caption(
        "The gate asks nobody about these decisions: the pilot goes on collecting. Promoting on one "
        "goes against its recommendation and takes effect only when a second, different approver signs."
    )
    waits = {r["name"]: r["waits_for"] for r in read(queries.portfolio)}  # "more samples (120/300)"
    for d in candidates:
        with st.expander(f"#{d['id']} {d['use_case']}: {queries.decision_words(d['outcome'], d['kind'])}"):
            decision_card(d, ident, waits.get(d["use_case"]))


def unapplied_text(d: dict[str, Any]) -> str:
    """What a decision that was decided but is not in effect says (queries.approved_not_applied)."""
    effect, verb = FINISHING[d["action"]]  # the one table of what each unfinished action carries out
    if d["action"] == "keep":
        effect += " (the monitor stays stopped until it does)"
    why = (
        f"its alias move failed: {d.get('move_error') or 'MLflow gave no answer'}"
        if d["failed_move"]
        else "the run carrying it out stopped before it finished"
    )
    if d["automatic"]:
        head = f"The monitor's automatic rollback of {d['use_case']} (decision #{d['id']}) did not complete"
    else:
        who = ", ".join(queries.signed_by(d["approvals"])) or "an approver"  # not a withdrawn signature
        head = f"Decision #{d['id']} of {d['use_case']} was {verb} by {who}, but {effect} did not complete"
    now = f"; an approver can finish it now with: {d['command']}" if d["command"] else ""
    return f"{head} ({why}), so it is not in effect. The use case's next scheduled cycle finishes it{now}"


def main() -> None:
    st.title("Approvals")
    show_flash()
    ident = current_identity()
    if ident is None:
        st.info("Read-only: sign in as an approver to approve, reject or roll back.")
    elif not ident.can_approve:
        st.info(f"Signed in as {ident.name} ({ident.role}): only approvers can act on decisions.")
    pending = read(queries.pending_decisions)
    unapplied = read(queries.approved_not_applied)
    if not pending and not unapplied:
        st.success("Nothing is waiting for a decision.")
    for d in pending:
        with st.container(border=True):
            decision_card(d, ident)
    for d in unapplied:  # decided, but not in effect (rollout.unfinished): it must not vanish from view
        st.warning(fmt.plain(unapplied_text(d)))
    override_section(ident)
    rollback_section(ident)


main()
