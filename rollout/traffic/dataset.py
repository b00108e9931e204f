"""The use case's dataset as pilot traffic: finite, each row at most once per pilot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from typing import Any

from rollout.traffic.base import Request, traffic_order_key


class DatasetSource:
    """Rows in the pilot's order (`traffic_order_key`, a salted hash of the id)."""

    name = "dataset"

    def __init__(self, rows: Sequence[Mapping[str, Any]], salt: str) -> None:
        ordered = sorted(rows, key=lambda r: traffic_order_key(str(r["id"]), salt))
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
