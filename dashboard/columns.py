"""A table shown by its column dict: the columns in order, each with its label and format (a
`st.column_config` entry, a string for the label alone, or None for the column's own name). Columns the dict
leaves out are not shown. The pages' tables are one such dict each (`portfolio.COLUMNS`,
`use_case.STEP_COLUMNS`, ...); a new column is one entry."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd
import streamlit as st

# what a missing value reads as, as in the pages' text ("Payback -"): the grid's own is "None"
MISSING = "-"


def columned(
    df: pd.DataFrame,
    columns: dict[str, Any],
    shown: dict[str, Callable[[Any], str]] | None = None,
    **options: Any,
) -> Any:
    """`st.dataframe` of `df`'s columns named in `columns`, labelled and formatted by it, a missing value
    shown as `MISSING`; `shown`: a column's values in the words of `dashboard.fmt` (whole dollars,
    `fmt.money`), still sorted as numbers (give its `column_config` entry no `format`: that would win);
    `options` go to `st.dataframe` (a key, row selection)."""
    data: Any = df[list(columns)]
    if shown:
        data = data.style.format({c: f for c, f in shown.items() if c in columns}, na_rep=MISSING)
    return st.dataframe(
        data,
        hide_index=True,
        width="stretch",
        column_config={c: cfg for c, cfg in columns.items() if cfg is not None},
        placeholder=MISSING,
        **options,
    )
