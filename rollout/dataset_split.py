"""Which of a use case's dataset rows judge the plan: rows calibration never sees.

Calibration reads every prompt it is given (its sensitivities on one part, its eps search's fidelity
checks on the other, its task bound on the first), so an evaluation or a pilot scored on those prompts
judges the plan on text it was fitted to. Until the twenty-sixth session the evaluate flow scored the
first rows of the dataset file, and until the twenty-seventh a pilot on dataset traffic replayed every
row, both reading rows calibration had read as well. Now a fixed share of the rows, those whose ids hash
lowest, is kept apart: the calibrate flow never reads them; the evaluate flow scores only them and a
pilot on dataset traffic draws only them (rollout.traffic), each prompt once. The sides depend on the
ids, not on the rows' order in the file (of two held-apart rows with one prompt, the first in the file is
judged); a new dataset version is calibrated and evaluated anew, on its own split. Pure functions; the
flows call them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

Row = TypeVar("Row", bound=Mapping[str, Any])

EVALUATION_SHARE = 0.25  # of the rows: the sample datasets' 72, 65 and 72 rows keep 18, 16 and 18 apart
MIN_CALIBRATION_ROWS = 2  # calibration holds one prompt out at least, so it needs two


def row_hash(row_id: str) -> float:
    """A row id's place in [0, 1): uniform over ids, the same on every machine and run."""
    digest = hashlib.sha256(b"sparsepilot-evaluation-split:" + str(row_id).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def held_apart_count(n_rows: int, share: float = EVALUATION_SHARE) -> int:
    """How many of n rows are kept apart: round(share x n), at least one where there are three rows or
    more, and never so many that fewer than `MIN_CALIBRATION_ROWS` are left to calibrate (0 below that)."""
    if not 0 < share < 1:
        raise ValueError(f"share must be in (0, 1), got {share}")
    if n_rows <= MIN_CALIBRATION_ROWS:
        return 0
    return min(max(round(share * n_rows), 1), n_rows - MIN_CALIBRATION_ROWS)


def split_rows(rows: Sequence[Row], share: float = EVALUATION_SHARE) -> tuple[list[Row], list[Row]]:
    """(calibration rows, held-apart rows), each in the rows' own order: the `held_apart_count` rows
    whose ids hash lowest are kept apart, less any whose prompt calibration reads or an earlier held-apart
    row has (`rollout.traffic.prompt_key`: a repeated prompt is judged once, and never on text the plan
    was fitted to; the dataset validator warns about repeats). With three rows or more calibration is
    never empty and, without repeated prompts, neither side is; with fewer, every row calibrates and
    none is left to judge on. Ids are unique (the dataset validator refuses duplicates)."""
    from rollout.traffic.base import first_of_each_prompt, prompt_key

    n_held = held_apart_count(len(rows), share)
    ranked = sorted(range(len(rows)), key=lambda i: row_hash(rows[i]["id"]))
    held = set(ranked[:n_held])
    calibration = [r for i, r in enumerate(rows) if i not in held]
    fitted = (prompt_key(str(r["prompt"])) for r in calibration)
    kept = (r for i, r in enumerate(rows) if i in held)
    return calibration, list(first_of_each_prompt(kept, lambda r: str(r["prompt"]), seen=fitted))


def nothing_to_score(n_rows: int, held_apart: int, with_reference: int) -> str | None:
    """Why an evaluation has no task score, said and recorded with it rather than an ordinary success
    with no quality figure (review W5), or None when it has rows to score: of `n_rows`, `held_apart` are
    kept apart from calibration (`split_rows`), `with_reference` of them with a reference."""
    if with_reference:
        return None
    if n_rows <= MIN_CALIBRATION_ROWS:
        why = f"the dataset's {n_rows} row(s) are all read by calibration"
    elif not held_apart:
        why = f"every row kept apart from calibration repeats a prompt calibration reads ({n_rows} rows)"
    else:
        why = f"none of the {held_apart} row(s) kept apart from calibration has a reference"
    return f"no task score: {why}; the quality budget stands on calibration's own checks alone"


def kept_apart_of(validation: Mapping[str, Any] | None) -> int | None:
    """The dataset's kept-apart distinct requests as its stored validation counted them (None for a spec
    version validated before the count existed)."""
    value = ((validation or {}).get("stats") or {}).get("kept_apart")
    return int(value) if value is not None else None


__all__ = [
    "EVALUATION_SHARE",
    "MIN_CALIBRATION_ROWS",
    "held_apart_count",
    "kept_apart_of",
    "nothing_to_score",
    "row_hash",
    "split_rows",
]
