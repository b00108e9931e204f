"""Plain-text formatting of numbers with their intervals, so every page says them the same way."""

from __future__ import annotations

import re
from typing import Any

from rollout import queries
from rollout.queries import bounding_sides, known, quality_interval  # noqa: F401 (the pages' spelling of the rule)
from rollout.roi import NO_INTERVAL, usd
from rollout.words import counted

# what Streamlit's markdown reads as markup inside a line: links and images ([..](..)), emphasis, code,
# headings, tables, and $...$ (LaTeX: "$1,200 ... $3,400" in an ROI verdict rendered as a formula); HTML
# is escaped by Streamlit itself
_MARKUP = re.compile(r"([\\`*_{}\[\]()#!|~$])")


def plain(text: Any) -> str:
    """`text` shown as written by st.markdown / st.info: an owner, a reason or an explanation is data a
    person typed, never markup (a link or a remote image in an owner's name rendered as one)."""
    return _MARKUP.sub(r"\\\1", str(text))


# what a spreadsheet reads as the start of a formula in a cell (OWASP "CSV injection")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_csv(df: Any) -> bytes:
    """`df` as CSV that a spreadsheet opens as text: a text cell starting like a formula gets a leading
    `'` (an anonymous sign-in attempt named `=HYPERLINK(...)` in the audit log is shown, not run, by the
    business owner who opens the export). Numbers stay numbers; the dashboard's tables are unchanged."""
    safe = df.copy()
    for col in safe.columns:
        safe[col] = [f"'{v}" if isinstance(v, str) and v.startswith(_FORMULA_START) else v for v in safe[col]]
    return safe.to_csv(index=False).encode("utf-8")


def money(x: Any) -> str:
    if not known(x):
        return "-"
    return usd(x)


def money_interval(saved: Any, lo: Any, hi: Any) -> str | None:
    """The caption under a $/month figure: "interval $lo to $hi", or where no interval was measured (one
    timing pair: the state DB stores no ends, rollout.runs) that there is none, in the words the evaluate
    flow's closing line uses (`rollout.roi.NO_INTERVAL`), where it said "interval - to -"; None where
    there is no figure to caption."""
    if not known(saved):
        return None
    if known(lo) and known(hi):
        return f"interval {money(lo)} to {money(hi)}"
    return NO_INTERVAL


def rate(x: Any) -> str:
    """A price per unit (the GPU's $/hour) with its cents, as the spec gives it: "$2.50", not the "$2"
    whole dollars make of it (monthly totals stay in whole dollars: `money`)."""
    if not known(x):
        return "-"
    return f"-${-x:,.2f}" if x < 0 else f"${x:,.2f}"


def num_interval(x: Any, lo: Any, hi: Any, fmt: str = "{:+.4f}") -> str:
    if not known(x):
        return "-"
    s = fmt.format(x)
    return f"{s} [{fmt.format(lo)}, {fmt.format(hi)}]" if known(lo) and known(hi) else s


def days(x: Any) -> str:
    return f"{x:,.0f} d" if known(x) else "-"


def step_label(row: dict[str, Any]) -> str:
    if row.get("step_index") is None:
        return "-"
    pct = row.get("traffic_pct") or 0.0
    return f"{row['step_index']}: {row.get('step_kind') or row.get('kind')} {pct:g}%"


def interval_only(lo: Any, hi: Any, one: Any = None) -> str:
    """'[lo, hi]' where both ends are known, else '-' (no interval is claimed without one)."""
    one = one or (lambda v: f"{v:+.4f}")
    return f"[{one(lo)}, {one(hi)}]" if known(lo) and known(hi) else "-"


def quality_source(row: dict[str, Any]) -> str:
    """Where a use case's quality numbers come from (rollout.queries.quality_from), "pilot gate" for the
    gate's look on a page that shows the offline evaluation beside it."""
    source = queries.quality_from(row)
    return "pilot gate" if source == "gate" else (source or "-")


def guardrail_rows(ev: dict[str, Any]) -> list[dict[str, Any]]:
    """Every guardrail the decision judged (the gate's list, or the monitor's `checks`), whatever its name:
    a guardrail added to rollout.gate.guardrails shows on the approvals page as it is."""
    found = ev.get("guardrails") or []
    checks = found.get("checks", []) if isinstance(found, dict) else found
    return [
        {
            "guardrail": str(c.get("name", "")).replace("_", " "),
            "status": "breached" if c.get("breached") else ("holds" if c.get("evaluated") else "not judged"),
            "value": c.get("value"),
            "limit": c.get("threshold"),
            "note": c.get("note") or "",
        }
        for c in checks
    ]


def latency_left_out(overloaded: dict[str, int]) -> str | None:
    """The latency chart's note on the rows it leaves out (`overloaded`: per arm, timed while the host was
    overloaded), as the gate leaves them out of its p95s and latency guardrail; None where there are none."""
    total = sum(overloaded.values())
    if not total:
        return None
    arms = ", ".join(f"{arm} {n:,}" for arm, n in sorted(overloaded.items()))
    return (
        f"Left out: {counted(total, 'row')} timed while the host was overloaded ({arms}): their latency is "
        "the host's, not the model's, and the gate's p95s and latency guardrail leave them out too."
    )
