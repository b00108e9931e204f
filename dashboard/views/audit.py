"""Audit: the append-only log, filtered in SQL, exportable as CSV."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pandas as pd
import streamlit as st

from dashboard.columns import columned
from dashboard.data import read
from dashboard.fmt import spreadsheet_csv
from rollout import queries

LIMIT = 5000
# the table's columns (dashboard.columns); the CSV keeps the stored names. Times are stored in UTC.
COLUMNS: dict[str, Any] = {
    "id": st.column_config.NumberColumn("#", format="%d"),
    "ts": st.column_config.DatetimeColumn("When (UTC)", format="D MMM YYYY, HH:mm:ss"),
    "actor": "Actor",
    "action": "Action",
    "use_case": "Use case",
    "entity": "Entity",
    "entity_id": "Entity id",
    "details": "Details",
}


def main() -> None:
    st.title("Audit log")
    st.caption("Append-only: entries cannot be changed or deleted (enforced by the database).")
    facets = read(queries.audit_facets)
    c1, c2, c3, c4 = st.columns([2, 2, 2, 3])
    actors = c1.multiselect("Actor", facets["actors"], key="a_actor")
    actions = c2.multiselect("Action", facets["actions"], key="a_action")
    use_cases = c3.multiselect("Use case", facets["use_cases"], key="a_uc")
    today = dt.datetime.now(dt.UTC).date()
    period = c4.date_input("Between", value=(), max_value=today, key="a_period")
    since = until = None
    if isinstance(period, tuple | list) and len(period) == 2:
        since = dt.datetime.combine(period[0], dt.time.min, tzinfo=dt.UTC)
        until = dt.datetime.combine(period[1] + dt.timedelta(days=1), dt.time.min, tzinfo=dt.UTC)
    rows = read(
        queries.audit_entries,
        actors=actors or None,
        actions=actions or None,
        use_cases=use_cases or None,
        since=since,
        until=until,
        limit=LIMIT,
    )
    if not rows:
        st.info(
            "No audit entries match." if (actors or actions or use_cases or since) else "The log is empty."
        )
        return
    df = pd.DataFrame(rows)
    df["details"] = [json.dumps(d, sort_keys=True, default=str) for d in df["details"]]
    more = " (the newest only: narrow the filters to see older ones)" if len(df) >= LIMIT else ""
    st.caption(
        f"{len(df)} entries, newest first{more}. In the CSV a text starting with =, +, -, @ or a tab "
        "carries a leading ' so a spreadsheet shows it rather than running it as a formula."
    )
    columned(df, COLUMNS)
    st.download_button(
        "Download CSV",
        spreadsheet_csv(df),
        file_name=f"sparsepilot-audit-{today:%Y%m%d}.csv",
        mime="text/csv",
        key="a_csv",
    )


main()
