"""A table shown by its column dict: the columns in order, each with its label and format (a
`st.column_config` entry, a string for the label alone, or None for the column's own name). Columns the dict
leaves out are not shown. The pages' tables are one such dict each (`portfolio.COLUMNS`,
`use_case.STEP_COLUMNS`, ...); a new column is one entry."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st


def columned(df: pd.DataFrame, columns: dict[str, Any], **options: Any) -> Any:
    """`st.dataframe` of `df`'s columns named in `columns`, labelled and formatted by it; `options` go to
    `st.dataframe` (a key, row selection)."""
    return st.dataframe(
        df[list(columns)],
        hide_index=True,
        width="stretch",
        column_config={c: cfg for c, cfg in columns.items() if cfg is not None},
        **options,
    )
