"""Observations collected by a real serving system, imported for `sparsepilot pilot NAME --observations
FILE` (and the monitor): JSONL or CSV with columns request_id, arm, quality, latency_ms, error and
optionally tokens. Rows are parsed strictly (the message names the file, line and field) and then checked
with the Great Expectations observation suite (rollout.validation) before they may count."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REQUIRED = ("request_id", "arm", "quality", "latency_ms", "error")
OPTIONAL = ("tokens",)
_TRUE = {"true", "1", "yes", "t", "y"}
_FALSE = {"false", "0", "no", "f", "n", ""}


class ObservationImportError(ValueError):
    """A file that cannot be imported; nothing from it was stored."""


def read_observations(path: str | Path) -> list[dict[str, Any]]:
    """Parse a JSONL (.jsonl/.ndjson/.json) or CSV (.csv) file into observation rows."""
    p = Path(path)
    if not p.is_file():
        raise ObservationImportError(f"{p}: file not found")
    suffix = p.suffix.lower()
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ObservationImportError(f"{p}: not valid UTF-8 at byte {exc.start}") from None
    if suffix in (".jsonl", ".ndjson", ".json"):
        raw = _jsonl(p, text)
    elif suffix == ".csv":
        raw = _csv(p, text)
    else:
        raise ObservationImportError(f"{p}: unknown format {suffix!r}; use .jsonl or .csv")
    if not raw:
        raise ObservationImportError(f"{p}: no observations in the file")
    return [_row(p, line, obj) for line, obj in raw]


def _jsonl(p: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ObservationImportError(f"{p}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise ObservationImportError(f"{p}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        out.append((lineno, obj))
    return out


def _csv(p: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(text.splitlines())
    missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
    if missing:
        raise ObservationImportError(f"{p}: header is missing column(s) {', '.join(missing)}")
    return [(i, dict(row)) for i, row in enumerate(reader, start=2)]


def _row(p: Path, line: int, obj: dict[str, Any]) -> dict[str, Any]:
    where = f"{p}:{line}"
    missing = [c for c in REQUIRED if c not in obj or obj[c] is None]
    if missing:
        raise ObservationImportError(f"{where}: missing field(s) {', '.join(missing)}")
    unknown = sorted(set(obj) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise ObservationImportError(
            f"{where}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(REQUIRED + OPTIONAL)}"
        )
    rid = str(obj["request_id"]).strip()
    if not rid:
        raise ObservationImportError(f"{where}: field 'request_id' is empty")
    row: dict[str, Any] = {"request_id": rid, "arm": str(obj["arm"]).strip()}
    for field in ("quality", "latency_ms"):
        try:
            row[field] = float(obj[field])
        except (TypeError, ValueError):
            raise ObservationImportError(
                f"{where}: field {field!r} must be a number, got {obj[field]!r}"
            ) from None
    err = obj["error"]
    if isinstance(err, bool):
        row["error"] = err
    elif isinstance(err, int | float) and err in (0, 1):
        row["error"] = bool(err)
    elif isinstance(err, str) and err.strip().lower() in _TRUE | _FALSE:
        row["error"] = err.strip().lower() in _TRUE
    else:
        raise ObservationImportError(f"{where}: field 'error' must be true/false (or 1/0), got {err!r}")
    tokens = obj.get("tokens")
    if tokens in (None, ""):
        row["tokens"] = 0
    else:
        try:
            t = float(tokens)
        except (TypeError, ValueError):
            raise ObservationImportError(
                f"{where}: field 'tokens' must be a whole number, got {tokens!r}"
            ) from None
        if not math.isfinite(t) or t != int(t):
            raise ObservationImportError(f"{where}: field 'tokens' must be a whole number, got {tokens!r}")
        row["tokens"] = int(t)
    return row


def validate_observation_rows(
    rows: list[dict[str, Any]],
    *,
    known_request_ids: Iterable[str],
    require_both_arms: bool,
    source: str = "observation batch",
) -> dict[str, Any]:
    """Run the GX observation suite; a JSON-ready summary with `passed` and readable `failures`."""
    import pandas as pd

    from rollout.validation import validate_observations

    df = pd.DataFrame(rows, columns=list(REQUIRED + OPTIONAL))
    result = validate_observations(df, known_request_ids, require_both_arms=require_both_arms, source=source)
    return {"passed": result.ok, "failures": result.messages(), "report": result.to_dict()}
