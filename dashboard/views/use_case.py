"""One use case: quality vs density, latency per arm, pilot timeline, ROI breakdown, pictures, the
decision's explanation and where its MLflow run lives."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import altair as alt
import pandas as pd
import streamlit as st
from pydantic import ValidationError

from dashboard import fmt
from dashboard.columns import columned
from dashboard.data import read
from dashboard.timeline import timeline_chart
from rollout import queries
from rollout.gate.spending import account, describe
from rollout.pilot_plan import describe_monitor_cadence, monitor_days, plan_summary, traffic_time
from rollout.redact import redact
from rollout.roi import timing_overload
from rollout.settings import get_settings
from rollout.spec import UseCaseSpec

# the picker's widget, and the ?name= it last followed or wrote (a different one is a link to follow)
PICKER_KEY, LINK_KEY = "uc_name", "uc_link"
ARM_COLORS = alt.Scale(domain=["control", "treatment"], range=["#607d8b", "#1e88e5"])


def pick_use_case() -> str | None:
    names = read(queries.use_case_names)
    if not names:
        st.info("No use cases yet: see the Portfolio page for how to add the first one.")
        return None
    wanted = st.query_params.get("name")
    stale = wanted is not None and wanted not in names
    note = st.empty()  # above the picker, said once it is known that nothing is picked
    if wanted != st.session_state.get(LINK_KEY):
        # a link followed while on this page (another ?name=): it picks, not the picker's earlier choice,
        # whose state would keep showing the use case the reader came from
        st.session_state.pop(PICKER_KEY, None)
    index = None if stale else names.index(wanted) if wanted in names else 0
    name = st.selectbox("Use case", names, index=index, key=PICKER_KEY)
    if stale and name is None:
        # a stale or mistyped link: another use case's decision, shown without a word, read as its own
        note.warning(fmt.plain(f"No use case is named '{wanted}': pick one below."))
    if name is not None and name != wanted:
        st.query_params["name"] = name
    st.session_state[LINK_KEY] = st.query_params.get("name")
    return name


def mlflow_link(run_id: str | None) -> None:
    if not run_id:
        st.caption("No MLflow run recorded.")
        return
    # a page anyone may open: the store's password never shows (the reader supplies their own)
    ui = redact(os.environ.get("SPARSEPILOT_MLFLOW_UI_URL") or get_settings().mlflow_tracking_uri)
    if ui.startswith(("http://", "https://")):
        st.markdown(f"MLflow run: [{run_id}]({ui.rstrip('/')}/#/runs/{run_id})")
    else:
        st.markdown(f"MLflow run `{run_id}` in the local store; browse it with:")
        st.code(f"mlflow ui --backend-store-uri {ui}", language="bash")


def decision_block(decs: list[dict[str, Any]], row: dict[str, Any] | None) -> None:
    """The use case's current decision (`row`: its portfolio row, `queries.portfolio`'s
    `decision_id`, of its latest pilot) and what it waits for, in the portfolio's words
    (`queries.waits_for`). A decision of an earlier pilot (another plan) is not the latest decision."""
    st.subheader("Latest decision")
    d = next((x for x in decs if row is not None and x["id"] == row["decision_id"]), None)
    if d is None:
        earlier = " of the current pilot" if decs else ""
        st.caption(f"No gate decision{earlier} yet.")
        st.caption(f"Waits for: {row['waits_for'] if row else '-'}")  # queries.waits_for
        return
    q = d["evidence"].get("quality", {})
    c1, c2, c3 = st.columns(3)
    # the portfolio's words: "GO, rejected", "GO (monitor)"
    standing = queries.decision_standing(d["outcome"], d["resolution"], kind=d["kind"])
    c1.metric("Outcome", standing, help=f"decision #{d['id']} ({d['kind']}), look {d['look_index']}")
    c2.metric("Quality Δ (sparse - dense)", fmt.num_interval(q.get("estimate"), None, None))
    c2.caption(f"interval {fmt.quality_interval(q.get('interval_low'), q.get('interval_high'))}")
    c3.metric("Waits for", row["waits_for"])  # queries.waits_for: the portfolio's words
    st.info(fmt.plain(d["explanation"]))
    with st.expander("Full evidence"):
        st.json(d["evidence"], expanded=False)


def _num(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def quality_points(evals: list[dict[str, Any]]) -> pd.DataFrame:
    """Long-form (evaluation, density, measure, value, low, high): every quality measure the report
    carries, with the one-sided 95% bounds it gives beside the mean (None where it gives none, or where
    a bound sits at the scale's end, -1 or +1, and so bounds nothing)."""
    out = []
    for e in evals:
        if e["density"] is None:
            continue
        rep = e["report"]
        probes = rep.get("probes") or {}
        fid = rep.get("fidelity") or {}
        sparse_acc = (probes.get("sparse") or {}).get("accuracy")
        dense_acc = (probes.get("dense") or {}).get("accuracy")
        agree, agree_low = fid.get("agree"), fid.get("agree_lower")
        q_low, q_high = e.get("quality_low"), e.get("quality_high")
        if not all(fmt.bounding_sides(q_low, q_high)):  # a bar needs both ends inside the scale
            q_low = q_high = None
        measures = {
            "task quality Δ": (e["quality_delta"], q_low, q_high),
            "probe accuracy Δ": (
                sparse_acc - dense_acc if _num(sparse_acc) and _num(dense_acc) else None,
                None,
                None,
            ),
            "top-1 agreement - 1": (
                agree - 1.0 if _num(agree) else None,
                agree_low - 1.0 if _num(agree_low) else None,
                0.0 if _num(agree_low) else None,
            ),
        }
        for measure, (value, low, high) in measures.items():
            if _num(value):
                row = {"evaluation": e["id"], "density": e["density"], "measure": measure, "value": value}
                out.append({**row, "low": low if _num(low) else None, "high": high if _num(high) else None})
    return pd.DataFrame(out)


def quality_vs_density(evals: list[dict[str, Any]]) -> None:
    st.subheader("Quality against density")
    df = quality_points(evals)
    if df.empty:
        st.caption("No evaluation with a measured density yet.")
        return
    base = alt.Chart(df).encode(
        x=alt.X("density:Q", title="Attention density kept", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("measure:N", title=None),
        tooltip=["evaluation", "density", "measure", "value", "low", "high"],
    )
    lines = base.mark_line(point=True).encode(y=alt.Y("value:Q", title="Sparse minus dense"))
    bounds = base.transform_filter("isValid(datum.low) && isValid(datum.high)").mark_rule(opacity=0.5)
    chart = (lines + bounds.encode(y="low:Q", y2="high:Q")).properties(height=260)
    st.altair_chart(chart, width="stretch")
    st.caption(
        "Bars: one-sided 95% bounds where the evaluation gives them (task quality: valid at any number of "
        "rows; agreement: the lower bound, from enough held-out text). A mean without a bar vouches for "
        "nothing beyond its own rows."
    )


def latency(use_case_id: int) -> None:
    """The latencies the gate judges: rows timed while the host was overloaded are left out, and counted."""
    st.subheader("Latency per arm")
    latencies = read(queries.latency_histogram, use_case_id)
    hist = pd.DataFrame(latencies["bins"])
    left_out = fmt.latency_left_out(latencies["overloaded"])
    if hist.empty:
        st.caption(
            "No latency measured on a host not overloaded." if left_out else "No pilot observations yet."
        )
    else:
        chart = (
            alt.Chart(hist)
            .mark_bar(opacity=0.6)
            .encode(
                x=alt.X("latency_ms:Q", title="Latency (ms)", bin=False),
                y=alt.Y("count:Q", stack=None, title="Requests"),
                color=alt.Color("arm:N", scale=ARM_COLORS),
                tooltip=["arm", "latency_ms", "count"],
            )
            .properties(height=240)
        )
        st.altair_chart(chart, width="stretch")
    if left_out:
        st.caption(left_out)


def timeline(use_case_id: int, decs: list[dict[str, Any]]) -> None:
    st.subheader("Pilot timeline")
    stats = read(queries.step_arm_stats, use_case_id)
    moves = read(queries.alias_moves, use_case_id)
    events: list[dict[str, Any]] = []
    steps_seen: set[int] = set()
    for r in stats:
        if r["step_id"] not in steps_seen:
            steps_seen.add(r["step_id"])
            label = f"step {r['step_index']} {r['kind']} {r['traffic_pct']:g}%"
            events.append({"time": r["started_at"], "lane": "steps", "event": label})
    for d in decs:
        made = queries.decision_words(d["outcome"], d["kind"])  # "GO (monitor)": not the gate's GO
        events.append({"time": d["created_at"], "lane": "decisions", "event": f"#{d['id']} {made}"})
    for m in moves:
        text = f"{m['alias']}: {m['from_version'] or '-'} → {m['to_version'] or '-'} ({m['status']})"
        events.append({"time": m["created_at"], "lane": "alias moves", "event": text})
    if not events:
        st.caption("No pilot yet.")
        return
    st.altair_chart(timeline_chart(pd.DataFrame(events)), width="stretch")
    if stats:
        st.markdown("**Steps and arms**")
        columned(pd.DataFrame(stats), STEP_COLUMNS)
        for v in read(queries.step_voids, use_case_id):  # reference-free: in neither arm's rows above
            st.caption(f"Pilot {v['pilot_number']} step {v['step_index']}: {v['note']}")
    if moves:
        st.markdown("**Alias history**")
        columned(pd.DataFrame(moves), MOVE_COLUMNS)


# Each table's columns, labels and formats (dashboard.columns). Times are stored in UTC.
WHEN = "D MMM YYYY, HH:mm:ss"
STEP_COLUMNS: dict[str, Any] = {
    "pilot_number": st.column_config.NumberColumn("Pilot", format="%d"),
    "step_index": st.column_config.NumberColumn("Step", format="%d"),
    "kind": "Kind",
    "traffic_pct": st.column_config.NumberColumn("Traffic", format="%g%%"),
    "min_samples": st.column_config.NumberColumn("Min. requests", format="%d"),
    "status": "Status",
    "arm": "Arm",
    "n": st.column_config.NumberColumn("Requests", format="%d"),
    "quality_mean": st.column_config.NumberColumn("Mean quality", format="%.3f"),
    "latency_mean": st.column_config.NumberColumn(
        "Mean latency (ms)",
        format="%,.0f",
        help="over the rows the gate judges: timed on a host not overloaded",
    ),
    "latency_left_out": st.column_config.NumberColumn(
        "Latency left out",
        format="%d",
        help="rows timed while the host was overloaded: not in the mean latency",
    ),
    "error_rate": st.column_config.NumberColumn("Error rate", format="percent"),
    "started_at": st.column_config.DatetimeColumn("Started (UTC)", format=WHEN),
}
MOVE_COLUMNS: dict[str, Any] = {
    "created_at": st.column_config.DatetimeColumn("When (UTC)", format=WHEN),
    "alias": "Alias",
    "from_version": "From version",
    "to_version": "To version",
    "actor": "By",
    "reason": "Reason",
    "status": "Status",
    "error": "Error",
}
PILOT_COLUMNS: dict[str, Any] = {
    "pilot_number": st.column_config.NumberColumn("Pilot", format="%d"),
    "mlflow_version": "Challenger version",
    "status": "Status",
    "started_at": st.column_config.DatetimeColumn("Started (UTC)", format=WHEN),
    "ended_at": st.column_config.DatetimeColumn("Ended (UTC)", format=WHEN),
    "looks": st.column_config.NumberColumn("Gate looks", format="%d"),
    "last_outcome": "Last outcome",
    "GO level": st.column_config.NumberColumn(
        "GO level", format="%.4f", help="the alpha this pilot's GO is held to (its share of the use case's)"
    ),
}


@st.cache_data(show_spinner="Simulating what each step needs...")
def _plan(
    spec_json: str, dataset_rows: int | None, kept_apart: int | None, planned: tuple[int | None, float]
) -> dict[str, Any]:
    spec = UseCaseSpec.model_validate(json.loads(spec_json))
    return plan_summary(
        spec,
        dataset_rows=dataset_rows,
        kept_apart=kept_apart,
        pilot_number=planned[0],
        go_alpha=planned[1],
        with_monitor=True,
    )


def pilots_block(uc: dict[str, Any]) -> None:
    """The use case's pilots and the share of its false-GO risk (alpha) they have spent
    (rollout.gate.spending)."""
    st.subheader("Pilots")
    rows = read(queries.pilot_history, uc["id"])
    budget = account((uc["spec"] or {}).get("gate") or {}, (r["go_alpha"] for r in rows))
    if rows:
        table = pd.DataFrame(rows)
        table["GO level"] = budget["levels"]
        columned(table, PILOT_COLUMNS)
    st.caption(describe(budget))


def collected_per_step(stats: list[dict[str, Any]]) -> tuple[int | None, dict[int, int]]:
    """The latest pilot's number and the requests it collected per step index (`step_arm_stats` rows):
    shadow steps count pairs (the smaller arm), split steps every row."""
    latest = max(stats, key=lambda r: r["pilot_id"], default=None)
    if latest is None:
        return None, {}
    have: dict[int, int] = {}
    for r in stats:
        if r["pilot_id"] != latest["pilot_id"] or r["arm"] is None:
            continue
        i, n = r["step_index"], int(r["n"])
        have[i] = min(have.get(i, n), n) if r["kind"] == "shadow" else have.get(i, 0) + n
    return latest["pilot_number"], have


def decision_needs(uc: dict[str, Any]) -> None:
    """Per step, the requests its GO needs (rollout.pilot_plan) beside what the latest pilot collected:
    the running pilot's plan (its own spec version and GO level) where one runs under an earlier version
    than the current (`running_pilot`), else the plan of the active or next pilot under the current one."""
    st.subheader("What a decision takes")
    running = uc.get("running_pilot")
    src = running or uc
    try:
        spec_json = json.dumps(src["spec"], sort_keys=True)
        plan = _plan(spec_json, src["dataset_rows"], src.get("kept_apart"), tuple(src["planned_pilot"]))
    except ValidationError as exc:  # a stored spec validated when it was added; say so if it no longer does
        st.caption(
            f"No plan: the stored spec v{src['spec_version']} does not validate "
            f"({exc.error_count()} problems)."
        )
        return
    number, have = collected_per_step(read(queries.step_arm_stats, uc["id"]))
    collected = "collected" if number is None else f"collected (pilot {number})"
    rows = [
        {
            "step": s["label"],
            f"requests to GO ({plan['power']:.0%} power)": s["requests"],
            "mean requests to GO": round(s["expected"]),
            collected: have.get(i, 0),
            "at the spec's traffic": traffic_time(s["days"]),
        }
        for i, s in enumerate(plan["steps"])
    ]
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    which = "a pilot" if plan["pilot_number"] is None else f"pilot {plan['pilot_number']} of this use case"
    st.caption(
        f"Simulated with the gate's own test at a true difference of {plan['planned_effect']:+g} (margin "
        f"{plan['margin']:g}) for {which}, whose GO is held to alpha {plan['go_alpha']:.3g}; shadow counts "
        "pairs. Each request is evidence once per pilot."
    )
    if running:  # a spec version added while the pilot runs applies to the next pilot
        st.caption(queries.describe_running_pilot(running, uc["spec_version"], tuple(uc["planned_pilot"])))
    elif (
        number is not None
        and plan["pilot_number"] is not None
        and number != plan["pilot_number"]
        and uc.get("latest_pilot_ended")
    ):
        st.caption(
            f"Pilot {number} has ended: its counts are shown for comparison only. Pilot "
            f"{plan['pilot_number']} starts from none of them."
        )
    for w in plan["warnings"]:
        st.warning(w)
    if plan.get("monitor"):
        st.markdown("**After promotion: how fast the monitor reacts**")
        st.dataframe(
            pd.DataFrame(
                [
                    {
                        "check": m["check"],
                        "limit": m["threshold"],
                        "breach simulated": m["breach"],
                        "looks to alarm (half)": m["looks_half"],
                        "looks to alarm (90%)": m["looks_most"],
                        "rows to alarm (90%)": None
                        if m["looks_most"] is None
                        else m["looks_most"] * m["batch"],
                        "days to alarm (half)": _days(monitor_days(m["looks_half"], m)),
                        "days to alarm (90%)": _days(monitor_days(m["looks_most"], m)),
                    }
                    for m in plan["monitor"]
                ]
            ),
            hide_index=True,
            width="stretch",
        )
        st.caption(
            f"Simulated monitors of a champion that breaches from its first look, "
            f"{describe_monitor_cadence(plan['monitor'][0])}, judged by the monitor's change detector: each "
            f"check's false alarm stays within alpha however long it runs. Empty: not within "
            f"{plan['monitor'][0]['horizon']} looks (days: or no schedule)."
        )


def _days(days: float | None) -> float | None:
    return None if days is None else round(days, 1)


def _kv(d: dict[str, Any], label: str) -> pd.DataFrame:
    def show(key: str, v: Any) -> str:
        if "usd" in key and key.endswith("per_hour"):  # a rate: its cents matter ($2.50/h, not $2)
            return fmt.rate(v)
        if "usd" in key:
            return fmt.money(v)
        if key.startswith("payback"):
            return fmt.days(v)
        if isinstance(v, float):
            return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return "-" if v is None else str(v)

    return pd.DataFrame({label: list(d), "value": [show(k, v) for k, v in d.items()]})


def shown_roi(
    roi: dict[str, Any], inputs: dict[str, Any] | None, *, payback: bool = True
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The stored ROI's breakdown and inputs as the page may show them (docs/roi.md): no interval ends
    where none was measured (one timing pair: the ends are the estimate), and no payback where the saving
    is not established, nor where `payback` is False (the evaluation's money, `rollout.roi.plan_money`,
    claims none: a plan that keeps every block), as the figures above them say; and not the timing host's
    raw record (`timing_host`), which the overload warning above them reads."""
    measured = (inputs or {}).get("interval_measured", True)

    def keep(key: str) -> bool:
        if key == "timing_host":  # raw host data; the overload warning above says what matters of it
            return False
        if not measured and key.endswith(("_low", "_high")):
            return False
        return (payback and roi.get("certain", True)) or not key.startswith("payback")

    return (
        {k: v for k, v in roi.items() if keep(k)},
        {k: v for k, v in (inputs or {}).items() if keep(k)},
    )


def roi_breakdown(ev: dict[str, Any] | None) -> None:
    st.subheader("ROI")
    if ev is None:
        st.caption("Not evaluated yet.")
        return
    c0, c1, c2, c3 = st.columns(4)
    per_request = [(ev.get("roi") or {}).get(f"effective_speedup{k}") for k in ("", "_low", "_high")]
    c0.metric(  # what the dollars rest on (rollout.roi: prefill and decode together, t_dense / t_sparse)
        "Per-request speed-up",
        fmt.num_interval(*per_request, "{:.2f}x"),
        help="prefill and decode together, per request: what the $/month rest on",
    )
    c1.metric(
        "Prefill speed-up",
        fmt.num_interval(ev["speedup"], ev["speedup_low"], ev["speedup_high"], "{:.2f}x"),
        help="the measured prefill speed-up alone (the decode line below says what decode does)",
    )
    c2.metric(
        "$/month saved",
        fmt.money(ev["savings_month_usd"]),
        help="interval from the measured speed-up's interval",
    )
    interval = fmt.money_interval(ev["savings_month_usd"], ev["savings_month_low"], ev["savings_month_high"])
    if interval:
        c2.caption(interval)
    c3.metric("Payback", fmt.days(ev["payback_days"]))
    roi = dict(ev["roi"])
    overload = timing_overload(roi.get("timing_host"))
    if overload:  # the figures above are a busy host's (docs/roi.md, "Timings under overload")
        st.warning(f"Speed-up and $/month {fmt.plain(overload)}.")
    if ev.get("priced_at"):  # dollars at a superseded spec's traffic and cost (rollout.roi.priced_at)
        st.warning(f"$/month {fmt.plain(ev['priced_at'])}.")
    inputs = roi.pop("inputs", None)
    verdict = roi.pop("verdict", None)
    if ev.get("saves_nothing") or verdict:  # a plan that keeps every block: its timing noise is no saving
        st.markdown(f"**Verdict:** {fmt.plain(ev.get('saves_nothing') or verdict)}")
    decode = roi.pop("decode", None)  # sparse decode's line (rollout.roi.decode_outcome)
    if decode:
        st.markdown(f"**Decode:** {fmt.plain(decode['line'].removeprefix('decode: '))}")
    roi, inputs = shown_roi(roi, inputs, payback=ev["payback_days"] is not None)
    left, right = st.columns(2)
    if inputs:
        left.markdown("**Inputs**")
        left.dataframe(_kv(inputs, "input"), hide_index=True, width="stretch")
    if roi:
        right.markdown("**Breakdown**")
        right.dataframe(_kv(roi, "item"), hide_index=True, width="stretch")
    st.caption(f"Evaluation #{ev['id']} on {ev['device'] or 'unknown device'}")


def pictures(ev: dict[str, Any] | None) -> None:
    st.subheader("Density heatmap and block masks")
    arts = (ev or {}).get("artifacts") or {}
    shown = 0
    cols = st.columns(3)
    for name, ref in sorted(arts.items()):
        path = Path(str(ref).removeprefix("file://"))
        if path.suffix.lower() == ".png" and path.is_file():
            cols[shown % 3].image(str(path), caption=name, width="stretch")
            shown += 1
        elif str(ref).lower().endswith(".png"):
            st.caption(f"{name}: {ref} (not readable from this server)")
    if not shown:
        st.caption("No pictures recorded for the latest evaluation.")


def main() -> None:
    st.title("Use case")
    name = pick_use_case()
    if name is None:
        return
    uc = read(queries.use_case, name)
    if uc is None:
        st.error(f"Use case {name!r} does not exist.")
        return
    st.markdown(
        f"**{uc['name']}** · owner {fmt.plain(uc['owner'])} · criticality **{uc['criticality']}** · phase "
        f"**{uc['phase']}** · spec v{uc['spec_version']}"
    )
    if uc["working_now"]:  # a run holds the use case's lease (rollout.leases): it is changing it now
        st.info(f"Working now: {uc['working_now']}")
    monitored = queries.describe_monitor_state(uc.get("monitor"))
    if monitored:  # a promoted champion: when its monitor last looked (or that it has not)
        (st.info if uc["monitor"]["last_look_at"] is not None else st.warning)(monitored)
    evals = read(queries.evaluations, uc["id"])
    done = [e for e in evals if e["status"] == "succeeded"]
    # the evaluation the portfolio shows (newest at the current spec version), not the newest by id
    latest = next((e for e in done if e["shown"]), done[-1] if done else None)
    decs = read(queries.decisions, uc["id"])
    decision_block(decs, next(iter(read(queries.portfolio, use_case_id=uc["id"])), None))
    left, right = st.columns(2)
    with left:
        quality_vs_density(done)
    with right:
        latency(uc["id"])
    timeline(uc["id"], decs)
    pilots_block(uc)
    decision_needs(uc)
    roi_breakdown(latest)
    pictures(latest)
    st.subheader("MLflow")
    mlflow_link(latest["mlflow_run_id"] if latest else None)
    with st.expander("Spec"):
        st.json(uc["spec"], expanded=False)


main()
