"""Approvals: pending decisions with their evidence; approve, reject or roll back with a reason.
Buttons are drawn only for approvers, and every action goes through rollout.approvals, which checks
the role again on the server side and resumes the paused Prefect flow."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pandas as pd
import streamlit as st

from dashboard import fmt
from dashboard.data import read
from dashboard.identity import current_identity
from rollout import approvals, lifecycle, queries
from rollout.auth import Identity, PermissionDenied

FLASH_KEY = "sp_approvals_flash"


def flash(kind: str, text: str) -> None:
    st.session_state[FLASH_KEY] = (kind, text)


def show_flash() -> None:
    item = st.session_state.pop(FLASH_KEY, None)
    if item:
        kind, text = item
        {"success": st.success, "warning": st.warning, "error": st.error}[kind](fmt.plain(text))


def run_action(fn: Any, *args: Any, **kwargs: Any) -> None:
    """Call rollout.approvals and turn every refusal into a message the person can act on."""
    try:
        result = fn(*args, **kwargs)
    except PermissionDenied as exc:
        flash("error", f"Refused: {exc}")
    except approvals.FlowNotWaiting as exc:
        flash("error", f"The flow is no longer waiting, so nothing was recorded. {exc}")
    except approvals.ApprovalError as exc:
        flash("error", f"Not accepted: {exc}")
    except Exception as exc:  # noqa: BLE001 - show the failure instead of a stack trace page
        flash("error", f"The action failed: {type(exc).__name__}: {exc}")
    else:
        if isinstance(result, approvals.ApprovalResult) and result.needs_second_approver:
            flash("warning", f"Signature recorded, not yet in effect: {result.message}")
        elif isinstance(result, approvals.ApprovalResult):
            flash("success", f"Done: {result.message}")
        else:
            flash("success", f"Done: rollback recorded as decision #{result} and applied")
    st.rerun()


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
    st.info(fmt.plain(d["explanation"]))
    checks = fmt.guardrail_rows(ev)
    if checks:
        st.dataframe(pd.DataFrame(checks), hide_index=True, width="stretch")
    reasons = [str(r) for r in ev.get("reasons") or []]
    if reasons:
        st.markdown("\n".join(f"- {r}" for r in reasons))
    with st.expander("Full evidence"):
        st.json(ev, expanded=False)


def decision_card(d: dict[str, Any], ident: Identity | None) -> None:
    waits = queries.WAITING_LABELS.get(d["awaiting"], d["awaiting"])
    step = f" · step {d['step_index']} ({d['traffic_pct']:g}%)" if d.get("step_index") is not None else ""
    st.subheader(f"#{d['id']} {d['use_case']}: {d['outcome']}, waiting for {waits}")
    st.caption(f"criticality {d['criticality']}{step} · decided {d['created_at']:%Y-%m-%d %H:%M} UTC")
    evidence_summary(d)
    recommended = approvals.recommended_action(SimpleNamespace(awaiting=d["awaiting"], outcome=d["outcome"]))
    st.markdown(f"The gate recommends: **{recommended}**.")
    if d["approvals"]:
        st.dataframe(
            pd.DataFrame(d["approvals"])[
                ["actor", "role", "action", "reason", "against_recommendation", "created_at"]
            ],
            hide_index=True,
            width="stretch",
        )
        firsts = [a for a in d["approvals"] if a["against_recommendation"]]
        if firsts:
            st.warning(
                f"{firsts[0]['actor']} signed an override ({firsts[0]['action']}) against the "
                "recommendation; "
                "a second, different approver must sign the same action before it takes effect."
            )
    if ident is None or not ident.can_approve:
        return
    reason = st.text_area("Reason (required, kept in the audit log)", key=f"reason_{d['id']}")
    approve_label = "Approve rollback" if d["awaiting"] == "rollback_approval" else "Approve promotion"
    reject_label = "Keep the current model" if d["awaiting"] == "rollback_approval" else "Reject"
    if recommended != "approve":
        st.caption(f"'{approve_label}' goes against the recommendation: it needs a second approver.")
    else:
        st.caption(f"'{reject_label}' goes against the recommendation: it needs a second approver.")
    b1, b2 = st.columns(2)
    if b1.button(approve_label, key=f"approve_{d['id']}", type="primary"):
        run_action(approvals.approve, d["id"], current_identity(), reason)
    if b2.button(reject_label, key=f"reject_{d['id']}"):
        run_action(approvals.approve, d["id"], current_identity(), reason, reject=True)


def rollback_section(ident: Identity | None) -> None:
    promoted = [r["name"] for r in read(queries.portfolio) if lifecycle.can(r["phase"], "rollback")]
    st.subheader("Roll back a promoted use case")
    if not promoted:
        st.caption("No use case is promoted right now.")
        return
    if ident is None or not ident.can_approve:
        st.caption(f"Promoted: {', '.join(promoted)}. Only approvers can roll back.")
        return
    name = st.selectbox("Use case", promoted, key="rollback_uc")
    reason = st.text_area("Reason for the rollback (required)", key="rollback_reason")
    if st.button("Trigger rollback", key="rollback_go", type="primary"):
        run_action(approvals.request_rollback, name, current_identity(), reason)


def unapplied_text(d: dict[str, Any]) -> str:
    """What a decision that was decided but is not in effect says (queries.approved_not_applied)."""
    what = {
        "promote": ("approved", "the promotion"),
        "rollback": ("approved", "the rollback"),
        "keep": ("rejected", "keeping the champion (the monitor stays stopped until it does)"),
        "reject": ("rejected", "stopping the pilot"),
    }[d["action"]]
    why = (
        "its alias move failed: MLflow unreachable?"
        if d["failed_move"]
        else "the run carrying it out stopped before it finished"
    )
    if d["automatic"]:
        head = f"The monitor's automatic rollback of {d['use_case']} (decision #{d['id']}) did not complete"
    else:
        who = ", ".join(a["actor"] for a in d["approvals"]) or "an approver"
        head = (
            f"Decision #{d['id']} of {d['use_case']} was {what[0]} by {who}, but {what[1]} did not complete"
        )
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
    rollback_section(ident)


main()
