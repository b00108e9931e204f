"""Captured production prompts as pilot traffic: a JSONL or CSV file (by extension) with `id` (or
`request_id`), `prompt` and optionally `reference`, streamed row by row (never loaded whole). Handed out in
the pilot's order (`traffic_order_key`, a salted hash of the id), not the file's: the gate's sequences may
reject at any row of the stream, so the order must carry nothing about the outcomes, and a file's may (a
log exported sorted by prompt length hands out the short prompts first, where a sparse plan loses least).
Each `take` is one pass over the file keeping the n smallest keys. Bad rows stop the read with the file,
line and field named. A request whose prompt is one of `exclude_prompts` (the prompts calibration read,
rollout.traffic.source_for) is passed over: the plan was fitted to it, so its answer is no evidence of how
the plan does on new traffic. So is a request whose prompt an earlier line of the log already had
(`prompt_key`: the same text up to whitespace and Unicode normalisation): production logs repeat popular
prompts, and each repeat would add a copy of the same paired difference to the gate's stream, not
evidence."""

from __future__ import annotations

import csv
import heapq
import json
from collections.abc import Iterable, Iterator, Set
from pathlib import Path

from rollout.traffic.base import (
    Request,
    TrafficError,
    first_of_each_prompt,
    prompt_key,
    traffic_order_key,
)

MAX_FIELD = 1_000_000  # characters in one prompt / reference (a CSV field stops at csv's 128 KiB limit:
# that limit is process-wide and guards the observation import too, so long prompts belong in JSONL)


class RequestLogSource:
    name = "request-log"

    def __init__(self, path: Path | str, salt: str, exclude_prompts: Iterable[str] = ()) -> None:
        self.path = Path(path)
        self._salt = salt
        self._excluded = frozenset(prompt_key(p) for p in exclude_prompts)
        if not self.path.is_file():
            raise TrafficError(f"{self.path}: request log not found")
        suffix = self.path.suffix.lower()
        if suffix not in (".jsonl", ".csv"):
            raise TrafficError(
                f"{self.path}: a request log is .jsonl or .csv, got {suffix or 'no extension'}"
            )
        self._csv = suffix == ".csv"

    def requests(self) -> Iterator[Request]:
        """Every request of the log, in file order; a repeated id is an error (a request is evidence once)."""
        seen: set[str] = set()
        for line, record in self._records():
            req = self._request(line, record)
            if req.id in seen:
                raise TrafficError(f"{self.path}:{line}: field 'id': {req.id!r} appears twice in the log")
            seen.add(req.id)
            yield req

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

    def _records(self) -> Iterator[tuple[int, dict]]:
        with self.path.open(encoding="utf-8-sig", newline="") as fh:
            if self._csv:
                try:
                    reader = csv.DictReader(fh)
                    for record in reader:
                        yield reader.line_num, record
                except csv.Error as exc:
                    line = reader.line_num + 1  # the line being read when the parser gave up
                    raise TrafficError(f"{self.path}:{line}: not valid CSV: {exc}") from exc
                return
            for line, text in enumerate(fh, start=1):
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                except (json.JSONDecodeError, RecursionError) as exc:
                    raise TrafficError(f"{self.path}:{line}: not valid JSON: {exc}") from exc
                if not isinstance(record, dict):
                    raise TrafficError(f"{self.path}:{line}: each line must be a JSON object")
                yield line, record

    def _request(self, line: int, record: dict) -> Request:
        rid = record.get("id", record.get("request_id"))
        if isinstance(rid, bool) or not isinstance(rid, str | int) or not str(rid).strip():
            raise TrafficError(f"{self.path}:{line}: field 'id': a non-empty string is required")
        prompt = record.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise TrafficError(f"{self.path}:{line}: field 'prompt': a non-empty string is required")
        reference = record.get("reference")
        if reference is not None and not isinstance(reference, str):
            raise TrafficError(f"{self.path}:{line}: field 'reference': must be a string")
        for name, value in (("prompt", prompt), ("reference", reference or "")):
            if len(value) > MAX_FIELD:
                raise TrafficError(f"{self.path}:{line}: field {name!r}: longer than {MAX_FIELD} characters")
        return Request(str(rid).strip(), prompt, reference or None)
