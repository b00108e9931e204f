"""Portfolio: every use case on one screen with its decision, quality, money and what it waits for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import altair as alt
import pandas as pd
import streamlit as st

from dashboard import fmt
from dashboard.columns import columned
from dashboard.data import example_specs, read
from rollout import queries
from rollout.lifecycle import ENDED_PHASES
from rollout.words import counted

# the chart's colour per decision as it was made (`queries.decision_words`): after promotion the gate's hue,
# lighter, so a monitor's "GO" is not read as the gate's
DECISION_COLORS = {
    "GO": "#2e7d32",
    "EXTEND": "#f9a825",
    "NO-GO": "#c62828",
    "INVALID": "#6a1b9a",
    "GO (monitor)": "#81c784",
    "NO-GO (monitor)": "#e57373",
    "INVALID (monitor)": "#ba68c8",
    "NO-GO (manual rollback)": "#8d6e63",
    "-": "#9e9e9e",
}
CRITICALITY_ORDER = ["low", "medium", "high"]
USE_CASE_PAGE = Path(__file__).resolve().parent / "use_case.py"
NAMES_KEY, OPEN_KEY = "sp_portfolio_names", "sp_open_use_case"
NUMERIC_PREFIXES = ("quality_", "speedup", "savings_", "payback")  # all-None columns stay numeric


def empty_install() -> None:
    st.info("No use cases yet. Add the first one from a spec file, then run the pipeline:")
    specs = example_specs() or ["examples/usecases/<your-use-case>.yaml"]
    cmds = [f"sparsepilot usecase add {p}" for p in specs] + ["sparsepilot run"]
    st.code("\n".join(cmds), language="bash")
    st.caption(
        "Every spec field is documented in docs/usecase-spec.md; copy a sample spec and point "
        "`dataset:` at your own JSONL to add your use case."
    )


def totals_row(t: dict[str, Any]) -> None:
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Use cases", t["use_cases"], help=f"{t['evaluated']} evaluated")
    c2.metric(
        "$/month saved (established)",
        fmt.money(t["savings_month_usd"]),
        help="Sum over the use cases still in play whose savings interval lies above zero (latest "
        "evaluation); the interval sums their bounds. The others are counted apart below.",
    )
    apart = t["unestablished"]
    caveats = "".join(  # what the summed figures carry beside them (docs/roi.md)
        f"; {n} of them {what}"
        for n, what in (
            (t["established_under_overload"], "timed under overload"),
            (t["established_superseded"], "priced at a spec version no longer current"),
        )
        if n
    )
    summed = (
        f"{counted(t['established'], 'use case')}, interval {fmt.money(t['savings_month_low'])} to "
        f"{fmt.money(t['savings_month_high'])}{caveats}"
        if t["established"]
        else "no use case has an established saving yet"
    )
    not_established = f" ({fmt.money(apart['savings_month_usd'])})" if apart["use_cases"] else ""
    c2.caption(
        f"{summed}; apart: {apart['use_cases']} not established{not_established}, "
        f"{t['ended']} stopped or rolled back"
    )
    c3.metric("Waiting for approval", t["pending_approvals"])
    d = t["decisions"]
    c4.metric(
        "Latest decisions",
        # short enough for a quarter of the page at any count ("23 GO · 0 EXTE…" was cut off): the other
        # counts are the caption's
        f"{d.get('GO', 0):,} GO of {t['decided']:,}",
        help="Each use case's current decision as the table's decision column says it: the gate's that "
        "stand, those that no longer stand (rejected, aborted, superseded), and those after promotion "
        "(a monitor's look, a rollback); together, every use case with a decision.",
    )
    c4.caption(" · ".join(decision_counts(t)) + f" · {t['observations']:,} observations")


def decision_counts(t: dict[str, Any]) -> list[str]:
    """The headline's counts beside GO, so that all of them add up to the use cases with a decision:
    "0 EXTEND", "0 NO-GO", "0 INVALID", "1 no longer standing (1 GO, rejected)", "1 after promotion (1
    GO (monitor))", "3 use cases with a decision"."""
    d = t["decisions"]
    parts = [f"{d.get(o, 0):,} {o}" for o in ("EXTEND", "NO-GO", "INVALID")]
    for label, counts in (
        ("no longer standing", t["decisions_not_standing"]),
        ("after promotion", t["decisions_after_promotion"]),
    ):
        if counts:
            each = "; ".join(f"{n} {words}" for words, n in sorted(counts.items()))
            parts.append(f"{sum(counts.values())} {label} ({each})")
    return [*parts, f"{counted(t['decided'], 'use case')} with a decision"]


def to_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    numeric = [c for c in df.columns if c.startswith(NUMERIC_PREFIXES) or c == "density"]
    df[numeric] = df[numeric].apply(pd.to_numeric, errors="coerce")
    # the chart's colour: the outcome and who made it ("GO (monitor)"), not what became of it
    df["outcome"] = df["decision_made"].fillna("-")
    # the decision as it stands (queries.decision_standing): "GO, rejected", "GO (monitor)"
    df["decision"] = df["decision_standing"].fillna("-")
    df["step"] = [fmt.step_label(r) for r in rows]
    df["quality interval"] = [fmt.quality_interval(r["quality_low"], r["quality_high"]) for r in rows]
    df["quality from"] = [fmt.quality_source(r) for r in rows]
    df["savings interval"] = [
        fmt.interval_only(r["savings_month_low"], r["savings_month_high"], fmt.money) for r in rows
    ]
    df["caveats"] = [caveats(r) for r in rows]
    # the worst plausible quality loss: the lower bound where a gate or an evaluation gave one (an
    # evaluation's few rows bound little: 2 rows allow a loss of 0.84 at least), else the mean (an
    # evaluation recorded before its bounds were)
    worst = df["quality_low"].where(df["quality_low"].notna(), df["quality_delta"])
    df["quality risk"] = (-worst).clip(lower=0)
    return df


def caveats(row: dict[str, Any]) -> str:
    """What a row's speed-up and dollars carry beside them (docs/roi.md): a plan that saves nothing (its
    dollars are timing noise: `rollout.roi.plan_money`'s `saves_nothing`), else why no saving is
    established (`not_established`); timed under overload; priced at a spec version that is no longer
    current; "" when none. A dense plan's $201 [$68, $328] was shown with no caveat at all."""
    notes = [
        f"⚠ {row.get('saves_nothing') or row.get('not_established')}"
        if row.get("saves_nothing") or row.get("not_established")
        else None,
        "⚠ timed under overload" if row.get("measured_under_overload") else None,
        f"⚠ {row['priced_at']}" if row.get("priced_at") else None,
    ]
    return "; ".join(n for n in notes if n)


def filters(df: pd.DataFrame) -> pd.DataFrame:
    c1, c2, c3, c4 = st.columns([2, 2, 2, 3])
    crit = c1.multiselect("Criticality", CRITICALITY_ORDER, key="f_crit")
    phase = c2.multiselect("Phase", sorted(df["phase"].unique()), key="f_phase")
    dec = c3.multiselect("Decision", sorted(df["decision"].unique()), key="f_decision")
    text = c4.text_input("Name or owner contains", key="f_text")
    if crit:
        df = df[df["criticality"].isin(crit)]
    if phase:
        df = df[df["phase"].isin(phase)]
    if dec:
        df = df[df["decision"].isin(dec)]
    if text:
        df = df[name_or_owner_contains(df, text)]
    return df


def name_or_owner_contains(df: pd.DataFrame, text: str) -> pd.Series:
    """The rows whose name or owner contains `text` as typed, case aside: a literal match, never a pattern
    (the owner was matched as a regular expression: "c++" or "(" ended the page in an error, and "." kept
    every row)."""
    t = text.lower()
    name, owner = (df[c].str.lower().str.contains(t, regex=False) for c in ("name", "owner"))
    return name | owner


def _on_select() -> None:
    rows = st.session_state["portfolio_table"]["selection"]["rows"]
    names = st.session_state.get(NAMES_KEY) or []
    if rows and rows[0] < len(names):
        st.session_state[OPEN_KEY] = names[rows[0]]


# The table's columns, labels and formats (dashboard.columns). A new metric is one entry here (and its
# column in rollout.queries.portfolio).
COLUMNS: dict[str, Any] = {
    "name": st.column_config.TextColumn("Use case", pinned=True),
    "criticality": None,
    "phase": None,
    "step": None,
    "decision": None,
    "waits_for": "Waits for",
    "quality_delta": st.column_config.NumberColumn("Quality Δ", format="%+.4f"),
    "quality interval": None,
    "quality from": None,
    "speedup": st.column_config.NumberColumn(
        "Prefill speed-up",
        format="%.2fx",
        help="measured prefill speed-up; the $/month rest on the per-request speed-up (prefill and decode "
        "together), shown on the use case's page",
    ),
    # whole dollars as everywhere else (`SHOWN`); "dollar" showed cents, "$1,840.00"
    "savings_month_usd": st.column_config.NumberColumn("$/month saved"),
    "savings interval": None,
    "payback_days": st.column_config.NumberColumn("Payback (days)", format="%.0f"),
    "caveats": st.column_config.TextColumn(
        "Speed-up and $ caveats",
        help="a plan that saves nothing (its $ are timing noise), a saving not established and why, timed "
        "under overload, or priced at a superseded spec version",
    ),
    "owner": None,
    "observations": st.column_config.NumberColumn("Observations", format="%d"),
}


# the columns shown in `dashboard.fmt`'s words, sorted as numbers (dashboard.columns.columned)
SHOWN = {"savings_month_usd": fmt.money}


def table(df: pd.DataFrame) -> None:
    """Sortable, filterable table; selecting a row opens that use case in this session."""
    st.session_state[NAMES_KEY] = list(df["name"])
    columned(df, COLUMNS, SHOWN, key="portfolio_table", on_select=_on_select, selection_mode="single-row")


def plotted(df: pd.DataFrame) -> pd.DataFrame:
    """The rows the chart plots as expected savings: evaluated, not stopped or rolled back (an ended use
    case saves nothing; the headline sets it apart too), and not a plan that saves nothing (`left_out`)."""
    return df[df["savings_month_usd"].notna() & ~df["phase"].isin(ENDED_PHASES) & df["saves_nothing"].isna()]


def left_out(df: pd.DataFrame) -> str | None:
    """The chart's note on the rows in play it leaves out, or None: a plan that keeps every block and
    decodes densely saves nothing, and its $/month is timing noise (`rollout.roi.plan_money`), which the
    chart plotted as an "Expected $/month saved" of $201 [$68, $328] while its page said it saves nothing."""
    noise = df[
        df["savings_month_usd"].notna() & ~df["phase"].isin(ENDED_PHASES) & df["saves_nothing"].notna()
    ]
    if not len(noise):
        return None
    return (
        f"Not plotted: {counted(len(noise), 'use case')} whose plan keeps every block and decodes densely, "
        f"so it saves nothing; its $/month is timing noise ({', '.join(noise['name'])})"
    )


def savings_vs_risk(df: pd.DataFrame) -> alt.Chart:
    data = plotted(df).copy()
    data["$/month saved"] = [fmt.money(x) for x in data["savings_month_usd"]]
    # the legend names the decisions plotted; one no colour is kept for shows grey rather than nothing
    shown = {k: c for k, c in DECISION_COLORS.items() if k in set(data["outcome"])}
    shown |= {k: DECISION_COLORS["-"] for k in data["outcome"] if k not in DECISION_COLORS}
    base = alt.Chart(data).encode(
        x=alt.X("quality risk:Q", title="Quality risk (worst plausible quality loss)"),
        tooltip=[
            "name",
            "decision",
            "phase",
            "criticality",
            "$/month saved",
            "savings interval",
            "quality interval",
            "quality from",
            "caveats",
        ],
    )
    bars = base.mark_rule(opacity=0.5).encode(y="savings_month_low:Q", y2="savings_month_high:Q")
    points = base.mark_point(filled=True).encode(
        y=alt.Y("savings_month_usd:Q", title="Expected $/month saved"),
        color=alt.Color(
            "outcome:N",
            title="decision",
            scale=alt.Scale(domain=list(shown), range=list(shown.values())),
        ),
        size=alt.Size("criticality:N", sort=CRITICALITY_ORDER, scale=alt.Scale(range=[60, 260])),
    )
    return (bars + points).properties(height=320)


def main() -> None:
    wanted = st.session_state.pop(OPEN_KEY, None)
    if wanted:  # a row was selected in the table: open it in this session (signed-in state kept)
        st.switch_page(USE_CASE_PAGE, query_params={"name": wanted})
    st.title("Portfolio")
    rows = read(queries.portfolio)
    if not rows:
        empty_install()
        return
    totals_row(read(queries.portfolio_totals))
    df = filters(to_frame(rows))
    st.caption(f"{len(df)} of {len(rows)} use cases · click a column header to sort, select a row to open it")
    table(df)
    st.subheader("Expected savings against risk")
    note = left_out(df)  # a plan that saves nothing: its $/month is timing noise, not plotted
    if len(plotted(df)):
        st.altair_chart(savings_vs_risk(df), width="stretch")
        marked = plotted(df)[plotted(df)["caveats"] != ""]
        if len(marked):  # a saving not established, a busy host's figures, a superseded spec's
            st.caption(
                "Caveats on the plotted figures: "
                + "; ".join(f"{n}: {c}" for n, c in zip(marked["name"], marked["caveats"], strict=True))
            )
    elif not df["savings_month_usd"].notna().any():
        st.caption("No use case in this view has been evaluated yet, so there are no savings to plot.")
    elif note is None:
        st.caption("Every evaluated use case in this view is stopped or rolled back: no savings to expect.")
    if note:
        st.caption(note)


main()
