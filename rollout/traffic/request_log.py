"""Captured production prompts as pilot traffic: a JSONL or CSV file (by extension) with `id` (or
`request_id`; a row holding both is refused unless they agree), `prompt` and optionally `reference`, streamed
row by row (never loaded whole). Handed out in the pilot's order (`traffic_order_key`, a salted hash of the
id), not the file's: the gate's sequences may reject at any row of the stream, so the order must carry nothing
about the outcomes, and a file's may (a log exported sorted by prompt length hands out the short prompts
first, where a sparse plan loses least). Each `take` is one pass over the file keeping the n smallest keys.
Bad rows stop the read with the file, line and field named. A request whose prompt is one of `exclude_prompts`
(the prompts calibration read, rollout.traffic.source_for) is passed over: the plan was fitted to it, so its
answer is no evidence of how the plan does on new traffic. So is a request whose prompt an earlier line of the
log already had (`prompt_key`: the same text up to whitespace and Unicode normalisation): production logs
repeat popular prompts, and each repeat would add a copy of the same paired difference to the gate's stream,
not evidence."""

from __future__ import annotations

import csv
import heapq
from collections.abc import Iterable, Iterator, Set
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from rollout.input_files import compressed_file, not_a_file
from rollout.json_lines import LINE_END, LineError, parse_object
from rollout.spec import has_visible_text
from rollout.traffic.base import (
    Request,
    TrafficError,
    first_of_each_prompt,
    prompt_key,
    traffic_order_key,
)
from rollout.validation import is_valid_unicode

MAX_FIELD = 1_000_000  # characters in one prompt / reference (a CSV field stops at csv's 128 KiB limit:
# that limit is process-wide and guards the observation import too, so long prompts belong in JSONL)
MAX_LINE_BYTES = 16 * MAX_FIELD  # a JSONL line: id, prompt and reference, escaped (\\uXXXX), fit well within
MAX_LISTED = 8  # bad lines `check` lists (it counts them all)


@dataclass(frozen=True)
class LogCheck:
    """What one pass over a request log found (`RequestLogSource.check`)."""

    requests: int  # readable requests (each id once)
    distinct_prompts: int  # their distinct prompts (`prompt_key`): what a pilot may draw at most
    bad_lines: int
    problems: tuple[str, ...]  # the first MAX_LISTED bad lines, each "path:line: field ...: why"


CHUNK = 1 << 20


def raw_lines(fh: BinaryIO, limit: int) -> Iterator[bytes]:
    """A binary stream's lines, each with its ending, split at CRLF, LF or a lone CR (the old Mac
    ending some spreadsheets still write: text mode's universal newlines, which the byte-wise reader
    lost), read in chunks. A line longer than `limit` is yielded cut at `limit + 1` bytes (so the caller
    sees it is too long) and ends the stream: a file without line breaks is never read whole."""
    buf, pos = b"", 0
    while True:
        m = LINE_END.search(buf, pos)
        if m is not None and not (m.group() == b"\r" and m.end() == len(buf)):  # a CR may start a CRLF
            yield buf[pos : m.end()]
            pos = m.end()
            continue
        if len(buf) - pos > limit:
            yield buf[pos : pos + limit + 1]
            return
        chunk = fh.read(CHUNK)
        if not chunk:
            if pos < len(buf):
                yield buf[pos:]
            return
        buf, pos = buf[pos:] + chunk, 0


def header_problem(header: list[str]) -> str | None:
    """What is wrong with a CSV request log's header (its names stripped, as the observation import's):
    it lacks `id` (or `request_id`) or `prompt` (naming what it holds), or it names a column twice (a row
    read by name would keep the last of the two silently); None when it is fine. A header of one cell
    holding ';' or a tab is a file split by another separator (a spreadsheet's export in many locales): the
    log must be comma-separated. Empty names (a spreadsheet's trailing empty columns) name no column."""
    names = set(header)
    missing = [what for what, ok in (("'id' (or 'request_id')", names & {"id", "request_id"}),
                                     ("'prompt'", "prompt" in names)) if not ok]  # fmt: skip
    if not missing:
        twice = sorted({c for c in header if c and header.count(c) > 1})
        return f"the header names column(s) {', '.join(map(repr, twice))} more than once" if twice else None
    found = ", ".join(repr(c) for c in header) or "an empty line"
    problem = f"the header has no {' and no '.join(missing)} column (found {found})"
    seps = [name for sep, name in ((";", "';'"), ("\t", "a tab")) if len(header) == 1 and sep in header[0]]
    return problem + (f"; the file must be comma-separated (its header holds {seps[0]})" if seps else "")


def _id_text(value: object) -> str:
    """An id as the log's reader takes it (`Request.id`): its text, stripped; a missing one is ''."""
    return "" if value is None else str(value).strip()


class RequestLogSource:
    name = "request-log"

    def __init__(self, path: Path | str, salt: str, exclude_prompts: Iterable[str] = ()) -> None:
        self.path = Path(path)
        self._salt = salt
        self._excluded = frozenset(prompt_key(p) for p in exclude_prompts)
        if why := not_a_file(self.path, what="request log", hint="a request log is one .jsonl or .csv file"):
            raise TrafficError(why)
        suffix = self.path.suffix.lower()
        if suffix not in (".jsonl", ".csv"):
            raise TrafficError(
                f"{self.path}: a request log is .jsonl or .csv, got {suffix or 'no extension'}"
            )
        self._csv = suffix == ".csv"
        try:  # a compressed log was "not valid UTF-8" once for each of its first lines
            why = compressed_file(self.path)
        except OSError:
            why = None  # reading it says why it cannot be read, naming the file
        if why:
            raise TrafficError(f"{self.path}: {why}")

    def requests(self) -> Iterator[Request]:
        """Every request of the log, in file order; the first bad line stops the read (TrafficError naming
        the file, line and field); a repeated id is an error (a request is evidence once)."""
        for item in self._scan():
            if isinstance(item, TrafficError):
                raise item
            yield item

    def check(self, max_listed: int = MAX_LISTED) -> LogCheck:
        """One pass over the whole log, as `usecase add` makes it: the requests it holds, their distinct
        prompts (`prompt_key`), and its bad lines (the first `max_listed` messages, each naming the file,
        line and field, and how many in all), read on past a bad line where the format allows (a CSV the
        parser gives up on, or an overlong line, ends the pass). Streams, as `requests` does."""
        requests, bad, problems, keys = 0, 0, [], set()
        for item in self._scan():
            if isinstance(item, TrafficError):
                bad += 1
                if len(problems) < max_listed:
                    problems.append(str(item))
                continue
            requests += 1
            keys.add(prompt_key(item.prompt))
        return LogCheck(requests, len(keys), bad, tuple(problems))

    def take(self, n: int, used: Set[str]) -> list[Request]:
        """The n unused requests first in the pilot's order (`traffic_order_key`), in that order: one pass
        over the file, holding n requests at a time."""
        if n <= 0:
            return []
        return heapq.nsmallest(n, self._usable(used), key=lambda r: traffic_order_key(r.id, self._salt))

    def remaining(self, used: Set[str]) -> int:
        return sum(1 for _ in self._usable(used))

    def request_ids(self) -> set[str]:
        return {r.id for r in self._usable(frozenset())}

    def _usable(self, used: Set[str]) -> Iterator[Request]:
        """The log's requests not used yet, in file order: each prompt's first line only, and none that
        calibration read (`take` puts them in the pilot's order)."""
        for r in first_of_each_prompt(self.requests(), lambda r: r.prompt, seen=self._excluded):
            if r.id not in used:
                yield r

    def _scan(self) -> Iterator[Request | TrafficError]:
        """The log's requests in file order, and in their place an error for each bad line."""
        seen: set[str] = set()
        for line, record in self._records():
            if isinstance(record, TrafficError):
                yield record
                continue
            try:
                req = self._request(line, record)
            except TrafficError as exc:
                yield exc
                continue
            if req.id in seen:
                yield TrafficError(f"{self.path}:{line}: field 'id': {req.id!r} appears twice in the log")
                continue
            seen.add(req.id)
            yield req

    def _lines(self, fh: BinaryIO) -> Iterator[tuple[int, str | TrafficError]]:
        """The file's lines, decoded one at a time, so that a bad byte names its line and the lines after
        it still read; none longer than MAX_LINE_BYTES, so a file without line breaks is never read whole
        (such a line is the last item)."""
        for number, raw in enumerate(raw_lines(fh, MAX_LINE_BYTES), start=1):
            if len(raw) > MAX_LINE_BYTES:
                yield number, TrafficError(f"{self.path}:{number}: line longer than {MAX_LINE_BYTES:,} bytes")
                return
            if number == 1:
                raw = raw.removeprefix(
                    b"\xef\xbb\xbf"
                )  # a byte-order mark (Excel's UTF-8 CSV) is not content
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield (
                    number,
                    TrafficError(
                        f"{self.path}:{number}: not valid UTF-8 at byte {exc.start} of the line (a request "
                        "log is UTF-8: save a spreadsheet's Latin-1 or UTF-16 export as UTF-8)"
                    ),
                )

    def _records(self) -> Iterator[tuple[int, dict | TrafficError]]:
        """(line, record) per row, or (line, error) for a row that cannot be read."""
        with self.path.open("rb") as fh:
            if self._csv:
                yield from self._csv_records(self._lines(fh))
                return
            for line, text in self._lines(fh):
                if isinstance(text, TrafficError):
                    yield line, text
                elif text.strip():
                    try:
                        yield line, parse_object(text)
                    except LineError as exc:
                        where = "" if exc.field == "line" else f"field {exc.field!r}: "
                        yield line, TrafficError(f"{self.path}:{line}: {where}{exc.message}")

    def _csv_records(
        self, lines: Iterator[tuple[int, str | TrafficError]]
    ) -> Iterator[tuple[int, dict | TrafficError]]:
        """A CSV's rows, each with the physical line it starts on (a quoted field may span lines), read by
        the header's names, stripped (`header_problem`); a row with more values than the header has columns
        is an error in its place (its extra values are never dropped); a line that cannot be decoded, or a
        row the parser gives up on, ends the read (there is no telling where the next row starts)."""
        stop: list[TrafficError] = []

        def texts() -> Iterator[str]:
            for _, text in lines:
                if isinstance(text, TrafficError):
                    stop.append(text)
                    return
                yield text

        reader = csv.reader(texts())
        start = (
            1  # the physical line the record being read starts on (blank lines and quoted newlines counted)
        )
        try:
            header = next(reader, None)
            if header is not None:
                header = [c.strip() for c in header]  # `id, prompt` names `prompt`
            problem = None if header is None else header_problem(header)
            if problem:  # said once, where every row would be refused for it
                yield 1, TrafficError(f"{self.path}:1: {problem}")
                return
            while header is not None:
                start = reader.line_num + 1
                values = next(reader, None)
                if values is None:
                    break
                if len(values) > len(header):  # the extra values would be dropped silently
                    why = f"{len(values)} values, {len(header)} columns; a value holding a comma is quoted"
                    yield start, TrafficError(f"{self.path}:{start}: more values than header columns ({why})")
                elif values:  # not a blank line
                    yield start, {c: values[i] if i < len(values) else None for i, c in enumerate(header)}
        except csv.Error as exc:
            yield start, TrafficError(f"{self.path}:{start}: not valid CSV: {exc}")
            return
        if stop:
            yield 0, stop[0]

    def _request(self, line: int, record: dict) -> Request:
        """The row as a request, as the dataset reader (rollout.validation.read_dataset) holds a row: a
        visible id and prompt (U+200B alone is an empty prompt), text that can be written as UTF-8 (no
        lone surrogate), no field longer than MAX_FIELD."""
        rid = record.get("id", record.get("request_id"))
        if "id" in record and "request_id" in record and _id_text(rid) != _id_text(record["request_id"]):
            raise TrafficError(
                f"{self.path}:{line}: fields 'id' and 'request_id' both name the request and disagree "
                f"({_id_text(rid)!r}, {_id_text(record['request_id'])!r}); keep one of the two columns, or "
                "give both the same value on every row"
            )
        if isinstance(rid, bool) or not isinstance(rid, str | int) or not has_visible_text(str(rid)):
            raise TrafficError(f"{self.path}:{line}: field 'id': a non-empty string is required")
        prompt = record.get("prompt")
        if not isinstance(prompt, str) or not has_visible_text(prompt):
            raise TrafficError(
                f"{self.path}:{line}: field 'prompt': a non-empty string is required (spaces or invisible "
                "characters alone are an empty prompt)"
            )
        reference = record.get("reference")
        if reference is not None and not isinstance(reference, str):
            raise TrafficError(f"{self.path}:{line}: field 'reference': must be a string")
        for name, value in (("id", str(rid)), ("prompt", prompt), ("reference", reference or "")):
            if len(value) > MAX_FIELD:
                raise TrafficError(f"{self.path}:{line}: field {name!r}: longer than {MAX_FIELD} characters")
            if not is_valid_unicode(value):
                raise TrafficError(
                    f"{self.path}:{line}: field {name!r}: contains a lone surrogate escape (not valid UTF-8)"
                )
        return Request(str(rid).strip(), prompt, reference or None)
