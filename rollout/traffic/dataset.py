"""The use case's dataset as pilot traffic: finite, each row at most once per pilot."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence, Set
from typing import Any

from rollout.traffic.base import Request


def _order_key(request_id: str, salt: str) -> str:
    # A separate hash domain from the arm assignment (rollout.pilots.hash_unit): ordering traffic by the
    # assignment hash itself would put the lowest hashes (all treatment) first and break the split.
    return hashlib.sha256(f"{salt}:traffic-order:{request_id}".encode()).hexdigest()


class DatasetSource:
    """Rows in a pilot-specific order (salted hash of the id), so two pilots see different sequences and
    a retried batch sees the same one."""

    name = "dataset"

    def __init__(self, rows: Sequence[Mapping[str, Any]], salt: str) -> None:
        ordered = sorted(rows, key=lambda r: _order_key(str(r["id"]), salt))
        self._requests = [
            Request(str(r["id"]), str(r["prompt"]), (r.get("reference") or None)) for r in ordered
        ]

    def take(self, n: int, used: Set[str]) -> list[Request]:
        out: list[Request] = []
        seen = set(used)
        for req in self._requests:
            if len(out) >= n:
                break
            if req.id not in seen:
                out.append(req)
                seen.add(req.id)
        return out

    def remaining(self, used: Set[str]) -> int:
        return sum(1 for r in self._requests if r.id not in used)

    def request_ids(self) -> set[str]:
        return {r.id for r in self._requests}

    def __len__(self) -> int:
        return len(self._requests)
