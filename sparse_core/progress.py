"""Progress reporting for long runs: a `Progress` callback is called as `(stage, done, total)`."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]


def counter(progress: Progress | None, stage: str, total: int) -> Callable[[int], None] | None:
    """Adapt a (stage, done, total) callback to one called with increments (None stays None)."""
    if progress is None:
        return None
    state = {"done": 0}

    def step(k: int = 1) -> None:
        state["done"] += k
        progress(stage, state["done"], total)

    return step
