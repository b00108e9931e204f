"""Whether a file of observations is evidently sorted by an outcome (pure): its rows, in the file's order,
monotone in latency, in the quality score or in the error flag (read as 0/1), an arrangement a random order
gives with probability below `SORTED_LEVEL`. Exactly: n values with tie groups of sizes g_1..g_k lie
non-decreasing in prod(g_i!) of the n! orders, non-increasing in as many, so P(monotone either way) =
2 prod(g_i!) / n! (1 where every value is equal). For the error flag, k errors among n rows, that is
2 / C(n, k): a page of 20 rows is never refused on it (at best 2 / C(20, 10) = 1.1e-5), one of 40 with its
10 errors first is (2.4e-9). A file that is a slice of traffic in time is refused with at most that
probability (its rows' values exchangeable in time); a page of an export sorted by the outcome, judged as
its own monitor look, judges a sorted order (docs/gate.md "The order of the evidence")."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

SORTED_LEVEL = 1e-6
OUTCOME_COLUMNS = ("latency_ms", "quality", "error")  # error: a bool (observations_io), read as 0/1


def log_p_monotone(values: Sequence[float]) -> float:
    """log P(a uniformly random order of `values` is non-decreasing or non-increasing), exactly."""
    groups = Counter(values)
    if len(groups) <= 1:
        return 0.0
    return math.log(2) + sum(math.lgamma(g + 1) for g in groups.values()) - math.lgamma(len(values) + 1)


def _monotone(values: Sequence[float]) -> bool:
    pairs = list(zip(values, values[1:], strict=False))
    return all(a <= b for a, b in pairs) or all(a >= b for a, b in pairs)


def sorted_column(rows: Sequence[Mapping[str, Any]]) -> tuple[str, float] | None:
    """The first outcome column (`OUTCOME_COLUMNS`) the rows, in their order, are monotone in with an exact
    probability under random order below `SORTED_LEVEL`, and that probability; None when there is none."""
    for column in OUTCOME_COLUMNS:
        values = [float(r[column]) for r in rows]
        if not _monotone(values):
            continue
        log_p = log_p_monotone(values)
        if log_p < math.log(SORTED_LEVEL):
            return column, math.exp(log_p)
    return None


def sorted_file_problem(path: str, rows: Sequence[Mapping[str, Any]]) -> str | None:
    """The refusal of a monitor file evidently sorted by an outcome (`sorted_column`), naming the file and
    the column; None when it is not."""
    found = sorted_column(rows)
    if found is None:
        return None
    column, p = found
    return (
        f"{path}: its {len(rows)} rows are sorted by {column} (a random order of these values is this "
        f"monotone with probability {p:.1g}, refused below {SORTED_LEVEL:g}); a file is one monitor look, "
        "and a page of an export sorted by an outcome judges a sorted order: import all pages in one "
        "command (monitor NAME --observations PAGE1 --observations PAGE2 ...: one look, the rows in "
        "stream-key order together), or export in time slices; nothing was stored and no look was recorded"
    )
