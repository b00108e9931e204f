"""Observations collected by a real serving system, imported for `sparsepilot pilot NAME --observations
FILE` (and the monitor): JSONL or CSV with columns request_id, arm, quality, latency_ms, error and
optionally tokens. Rows are parsed strictly (the message names the file, line and field; a JSONL object
giving a key twice and a CSV header naming a column twice are refused, never read as the last one) and
then checked with the Great Expectations observation suite (rollout.validation) before they may count."""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rollout import input_files
from rollout.json_lines import LineError, parse_object
from sparse_core.errors import SparsePilotError

if TYPE_CHECKING:
    import pandas as pd

REQUIRED = ("request_id", "arm", "quality", "latency_ms", "error")
OPTIONAL = ("tokens",)
_TRUE = {"true", "1", "yes", "t", "y"}
_FALSE = {"false", "0", "no", "f", "n"}  # an empty cell is refused: it is not "no error"
# A number as a person or a CSV writer spells it: no "1_0" (Python's digit separators), no "0x1f".
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d{1,4})?|[+-]?(?:nan|inf|infinity)", re.I)
MAX_ID_CHARS = 200  # the observations table's request_id column
MAX_LINE_CHARS = 64 * 1024


class ObservationImportError(SparsePilotError, ValueError):
    """A file that cannot be imported; nothing from it was stored."""


def not_a_file(path: str | Path) -> str | None:
    """Why `path` cannot be read as a file of observations, naming it, or None where it is a file: a
    directory (an export's folder of pages) is said as one, never "file not found"
    (`rollout.input_files.not_a_file`, the request log's words too)."""
    return input_files.not_a_file(path, hint="name each file of observations itself")


def read_observations(path: str | Path, *, require_arm: str | None = None) -> list[dict[str, Any]]:
    """Parse a JSONL (.jsonl/.ndjson/.json) or CSV (.csv) file into observation rows. `require_arm`: a
    file without a row of that arm is refused (the monitor judges the champion's rows, 'treatment')."""
    return [row for _, row in read_numbered(path, require_arm=require_arm)]


def read_numbered(path: str | Path, *, require_arm: str | None = None) -> list[tuple[int, dict[str, Any]]]:
    """`read_observations`' rows with their lines in the file, (line, row), as `iter_observations` yields
    them: what the checks name a bad row by (`pilot_batches.checked_file_rows`)."""
    numbered = [pair for chunk in iter_observations(path) for pair in chunk]
    if require_arm is not None and not any(r["arm"] == require_arm for _, r in numbered):
        arms = ", ".join(sorted({str(r["arm"]) for _, r in numbered})) or "none"
        raise ObservationImportError(
            f"{path}: no row with arm {require_arm!r} (arms in the file: {arms}); the monitor judges the "
            "champion's own answers, the dense model's rows only pair with them"
        )
    return numbered


def iter_observations(
    path: str | Path, chunk_rows: int = 50_000
) -> Iterator[list[tuple[int, dict[str, Any]]]]:
    """The file's rows as (line, row) pairs, ``chunk_rows`` at a time: a file of any size is read in
    bounded memory. Raises ObservationImportError naming the file, line and field."""
    p = Path(path)
    if why := not_a_file(p):
        raise ObservationImportError(why)
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        parse = _jsonl
    elif suffix == ".csv":
        parse = _csv
    else:
        raise ObservationImportError(f"{p}: unknown format {suffix!r}; use .jsonl or .csv")
    chunk: list[tuple[int, dict[str, Any]]] = []
    seen_any = False
    try:
        if why := input_files.compressed_file(p):  # a gzip export read as text was "not valid UTF-8"
            raise ObservationImportError(f"{p}: {why}")
        # newline="" keeps CSV's quoted newlines intact; a byte-order mark (Excel writes one) is skipped
        with p.open(encoding="utf-8-sig", newline="") as f:
            for line, obj in parse(p, f):
                chunk.append((line, _row(p, line, obj)))
                if len(chunk) >= chunk_rows:
                    seen_any = True
                    yield chunk
                    chunk = []
    except UnicodeDecodeError as exc:
        raise ObservationImportError(f"{p}: not valid UTF-8 (byte {exc.start} of a read block)") from None
    except OSError as exc:
        raise ObservationImportError(f"{p}: cannot read the file ({exc.strerror or exc})") from None
    if chunk:
        yield chunk
    elif not seen_any:
        raise ObservationImportError(f"{p}: no observations in the file")


def _bounded_lines(f: Any, limit: int) -> Iterator[str]:
    """The file's lines, none read past `limit` + 1 characters: a line of gigabytes is refused from its
    first `limit` + 1 characters, never held whole."""
    while line := f.readline(limit + 1):
        yield line
        if len(line) > limit:
            return  # the caller refuses it; the rest of the line is not read


def _jsonl(p: Path, f: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    for lineno, line in enumerate(_bounded_lines(f, MAX_LINE_CHARS), start=1):
        if not line.strip():
            continue
        if len(line) > MAX_LINE_CHARS:
            raise ObservationImportError(f"{p}:{lineno}: line longer than {MAX_LINE_CHARS} characters")
        try:  # a key given twice is refused: json keeps the last silently ({"quality": 0.1, "quality": 0.9})
            obj = parse_object(line)
        except LineError as exc:
            where = "" if exc.field == "line" else f"field {exc.field!r}: "
            raise ObservationImportError(f"{p}:{lineno}: {where}{exc.message}"[:300]) from None
        yield lineno, obj


def _csv(p: Path, f: Iterable[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """The CSV's rows, each with the physical line it starts on: the header, blank lines (skipped) and
    quoted multi-line cells counted, as an editor numbers them (`reader.line_num` counts the lines read
    before the row; csv.DictReader's record count does not)."""
    reader = csv.reader(f)
    start = 1
    try:
        fields = [c.strip() for c in next(reader, [])]
        missing = [c for c in REQUIRED if c not in fields]
        if missing:
            raise ObservationImportError(f"{p}: header is missing column(s) {', '.join(missing)}")
        # a spreadsheet's trailing empty columns (`...,tokens,,`) name no column: not a repeat, and a value
        # under one is refused below (it was "header names column(s) ,  more than once")
        twice = sorted({c for c in fields if c and fields.count(c) > 1})
        if twice:  # a dict of the row would keep the last one silently
            raise ObservationImportError(f"{p}: header names column(s) {', '.join(twice)} more than once")
        while True:
            start = reader.line_num + 1
            values = next(reader, None)
            if values is None:
                return
            if not values:  # a blank line
                continue
            if len(values) > len(fields):
                raise ObservationImportError(f"{p}:{start}: more values than header columns")
            unnamed = [i + 1 for i, c in enumerate(fields) if not c and i < len(values) and values[i].strip()]
            if unnamed:
                raise ObservationImportError(
                    f"{p}:{start}: a value under a column the header does not name (column {unnamed[0]})"
                )
            yield start, {c: values[i] if i < len(values) else None for i, c in enumerate(fields) if c}
    except csv.Error as exc:  # e.g. a field over the csv module's 128 KiB limit
        raise ObservationImportError(f"{p}:{start}: not valid CSV ({exc})") from None


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
    for field in ("request_id", "arm"):
        if not isinstance(obj[field], str | int) or isinstance(obj[field], bool):
            raise ObservationImportError(f"{where}: field {field!r} must be a string")
    rid = str(obj["request_id"]).strip()
    if not rid:
        raise ObservationImportError(f"{where}: field 'request_id' is empty")
    if len(rid) > MAX_ID_CHARS:
        raise ObservationImportError(f"{where}: field 'request_id' is longer than {MAX_ID_CHARS} characters")
    row: dict[str, Any] = {"request_id": rid, "arm": str(obj["arm"]).strip()[:20]}
    for field in ("quality", "latency_ms"):
        row[field] = _number(obj[field], field, where)
    err = obj["error"]
    if isinstance(err, bool):
        row["error"] = err
    elif isinstance(err, int | float) and err in (0, 1):
        row["error"] = bool(err)
    elif isinstance(err, str) and err.strip().lower() in _TRUE | _FALSE:
        row["error"] = err.strip().lower() in _TRUE
    elif isinstance(err, str) and not err.strip():
        raise ObservationImportError(
            f"{where}: field 'error' is empty; write false (or 0) for a request answered without an error"
        )
    else:
        raise ObservationImportError(f"{where}: field 'error' must be true/false (or 1/0), got {_shown(err)}")
    tokens = obj.get("tokens")
    if tokens in (None, ""):
        row["tokens"] = 0
    else:
        t = _number(tokens, "tokens", where)
        if not math.isfinite(t) or t != int(t) or abs(t) > 2**31:
            raise ObservationImportError(
                f"{where}: field 'tokens' must be a whole number, got {_shown(tokens)}"
            )
        row["tokens"] = int(t)
    return row


def _number(value: Any, field: str, where: str) -> float:
    """A JSON number, or a string spelled as a plain decimal number; never a bool ("quality: true")."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ObservationImportError(f"{where}: field {field!r} must be a number, got {_shown(value)}")
    if isinstance(value, str) and not _NUMBER.fullmatch(value.strip()):
        raise ObservationImportError(f"{where}: field {field!r} must be a number, got {_shown(value)}")
    try:
        return float(value)
    except (OverflowError, ValueError):
        raise ObservationImportError(f"{where}: field {field!r} is out of range") from None


def _shown(value: Any) -> str:
    from rollout.spec import short_repr

    return short_repr(value)


def validate_observation_rows(
    rows: pd.DataFrame | list[dict[str, Any]],
    *,
    known_request_ids: Iterable[str],
    require_both_arms: bool,
    source: str = "observation batch",
    first_row: int = 1,
    refused_request_ids: Mapping[str, str] | None = None,
    lines: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Run the GX observation suite; a JSON-ready summary with `passed` and readable `failures` (naming
    `source:LINE` where `lines`, each row's line in the file `iter_observations` read, is given)."""
    import pandas as pd

    from rollout.validation import validate_observations

    df = pd.DataFrame(rows, columns=list(REQUIRED + OPTIONAL))
    result = validate_observations(
        df,
        known_request_ids,
        require_both_arms=require_both_arms,
        source=source,
        first_row=first_row,
        refused_request_ids=refused_request_ids,
        lines=lines,
    )
    return {"passed": result.ok, "failures": result.messages(), "report": result.to_dict()}
