"""The traffic-source interface and the choice of source from a spec."""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from sparse_core.errors import SparsePilotError

T = TypeVar("T")


class TrafficError(SparsePilotError, ValueError):
    """A traffic source that cannot be read: the message names the file, line and field."""


def prompt_key(prompt: str) -> bytes:
    """What makes two prompts one for evidence: the same text after Unicode NFC normalisation, with every
    run of whitespace one space and the ends stripped (a client's retry, a copy with a trailing newline).
    Greedy decoding answers one prompt the same way every time, in both arms, so a repeated prompt adds
    a copy of its paired difference, not evidence (docs/flows.md, "Traffic"). A 16-byte digest, so the
    keys of a long log stay small."""
    text = " ".join(unicodedata.normalize("NFC", prompt).split())
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def first_of_each_prompt(
    items: Iterable[T], prompt_of: Callable[[T], str], seen: Iterable[bytes] = ()
) -> Iterator[T]:
    """The items in order, each prompt's first only (`prompt_key`), none whose prompt is in `seen` (keys
    of prompts already judged or fitted to): the one rule a dataset's kept-apart rows and a request log
    hand out their requests by."""
    keys = set(seen)
    for item in items:
        key = prompt_key(prompt_of(item))
        if key not in keys:
            keys.add(key)
            yield item


def traffic_order_key(request_id: str, salt: str) -> str:
    """Where a request stands in a pilot's order of traffic: a salted hash of its id (the pilot's secret
    salt), so two pilots see different sequences, a retried batch the same one, and the order carries
    nothing of the source's own (a log sorted by prompt length hands out its short prompts first, and the
    gate's sequences may reject at any row of the stream: docs/gate.md, "The order of the evidence"). A
    hash domain apart from the arm assignment (rollout.pilots.hash_unit): ordering by the assignment hash
    itself would put the lowest hashes, all treatment, first and break the split."""
    return hashlib.sha256(f"{salt}:traffic-order:{request_id}".encode()).hexdigest()


@dataclass(frozen=True)
class Request:
    id: str
    prompt: str
    reference: str | None = None

    def as_row(self) -> dict[str, Any]:
        """The row shape the pilot's answer step reads (id, prompt, reference)."""
        return {"id": self.id, "prompt": self.prompt, "reference": self.reference}


class TrafficSource(Protocol):
    name: str

    def take(self, n: int, used: Set[str]) -> list[Request]:
        """Up to n requests whose ids are not in `used` (nor repeated among themselves); fewer, or none,
        when the source is exhausted."""
        ...

    def remaining(self, used: Set[str]) -> int:
        """How many distinct requests the source can still hand out."""
        ...

    def request_ids(self) -> set[str]:
        """Every request id the source may hand out, used or not: the requests an imported observation may
        be about (`importable`)."""
        ...


def source_for(
    spec: Any, *, rows: Sequence[Mapping[str, Any]], salt: str, spec_dir: Path | None
) -> TrafficSource:
    """The pilot's source from the spec's `rollout.traffic_source` (default: the dataset). `rows` are the
    use case's dataset rows, all of them: the pilot is judged only on prompts calibration never read
    (rollout.dataset_split), so the dataset source draws the rows kept apart from calibration and a
    request log skips any request whose prompt is one calibration read. Neither hands out a prompt twice
    (`prompt_key`)."""
    from rollout.dataset_split import split_rows
    from rollout.traffic.dataset import DatasetSource
    from rollout.traffic.request_log import RequestLogSource

    calibration, held_apart = split_rows(rows)
    cfg = spec.rollout.traffic_source
    if cfg.kind == "dataset":
        return DatasetSource(held_apart, salt)
    path = request_log_path(spec, spec_dir)
    return RequestLogSource(path, salt, exclude_prompts=[str(r["prompt"]) for r in calibration])


def request_log_path(spec: Any, spec_dir: Path | None) -> Path:
    """The spec's `rollout.traffic_source.path`, resolved against the spec file's folder."""
    path = Path(spec.rollout.traffic_source.path).expanduser()
    return path if path.is_absolute() else (spec_dir or Path.cwd()) / path


def importable(source: TrafficSource, rows: Sequence[Mapping[str, Any]]) -> tuple[set[str], dict[str, str]]:
    """Which request ids a pilot's imported observations may carry: those its traffic source may hand out
    (`source.request_ids()`), so an import is held to what the pilot's own traffic is held to. And, for
    the use case's other dataset ids, why not (the import's refusal names it): a row calibration read, a
    kept-apart row whose prompt calibration read or an earlier kept-apart row has (`prompt_key`), or, on
    request-log traffic, any dataset row that is not one of the log's requests."""
    from rollout.dataset_split import split_rows

    allowed = source.request_ids()
    calibration, _ = split_rows(rows)
    why = {str(r["id"]): "a request calibration read: the plan was fitted to its prompt" for r in calibration}
    fitted = {prompt_key(str(r["prompt"])) for r in calibration}
    for r in rows:
        rid = str(r["id"])
        if rid in allowed or rid in why:
            continue
        if source.name != "dataset":
            why[rid] = "a dataset request, not one of the request log's: the pilot's traffic is the log"
        elif prompt_key(str(r["prompt"])) in fitted:
            why[rid] = "a request whose prompt calibration read: the plan was fitted to it"
        else:
            why[rid] = (
                "a dataset request whose prompt another kept-apart request has: a prompt is evidence once"
            )
    return allowed, {k: v for k, v in why.items() if k not in allowed}


# What a source hands out, for the exhaustion note: never a prompt calibration read (source_for), never
# a prompt twice.
_SOURCE_TEXT = {
    "dataset": "the dataset's rows kept apart from calibration",
    "request-log": "the request log (less repeated prompts and the prompts calibration read)",
}


def exhaustion_note(outcome: str, status: Mapping[str, Any] | None, projected: int | None) -> str | None:
    """The sentence an EXTEND carries when the source has no unused request left (None otherwise): the
    step cannot settle on this traffic, and replaying requests would count the same evidence twice."""
    if outcome != "EXTEND" or not status or status.get("remaining") != 0:
        return None
    need = f"; the gate projects ~{projected} would settle it" if projected else ""
    source = _SOURCE_TEXT.get(status["source"], f"the {status['source']}")
    return (
        f"Traffic exhausted: all {status['distinct_used']} distinct requests of {source} were used{need}. "
        "More distinct traffic is needed (a larger dataset or a request log); replaying requests would "
        "count the same evidence twice."
    )
