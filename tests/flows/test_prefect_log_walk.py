"""s47 flake: `pilot --batches 3` failed once in a loaded full-suite run with "RuntimeError: dictionary
changed size during iteration" raised in the flow run. `flows.common.redact_prefect_logs`, which runs at
the start of every flow and task run, walked logging's logger tree while another thread created a logger
(at a flow's start Prefect's events worker creates `EventsWorker` and `websockets.client` in its own
threads); `list(loggerDict.items())` was no snapshot, since a garbage collection in its middle can hand the
interpreter to that thread. Here the other thread gets in at the walk's first step, every time: the tree
is a dict whose iteration lets a waiting thread create its logger, as a thread switch there would."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from typing import Any

from prefect.logging.handlers import PrefectConsoleHandler

from flows.common import redact_prefect_logs
from rollout.redact import RedactingFilter

LET_IN_S = 0.3  # how long the walk gives the other thread: ample for a getLogger that is not kept waiting


class _SwitchingTree(dict):
    """logging's logger tree, letting `creator` create its logger at the first step of any walk of it
    (`dict(tree)`, `.items()`, iteration...), then going on over the live dict as CPython's own iterators
    do (so a size change then raises their RuntimeError)."""

    def __init__(self, tree: dict[str, Any], creator: threading.Thread) -> None:
        super().__init__(tree)
        self.creator = creator

    def _walk(self, step: Any) -> Iterator[Any]:
        live = iter(step(self))
        first = next(live, None)
        if not self.creator.is_alive() and self.creator.ident is None:
            self.creator.start()
            self.creator.join(LET_IN_S)  # kept waiting only where the walk holds logging's lock
        if first is not None:
            yield first
        yield from live

    def __iter__(self) -> Iterator[str]:
        return self._walk(dict.__iter__)

    def keys(self) -> Any:
        return list(self._walk(dict.keys))

    def items(self) -> Any:
        return self._walk(dict.items)

    def values(self) -> Any:
        return self._walk(dict.values)

    def copy(self) -> dict[str, Any]:
        return dict(self._walk(dict.items))


def test_a_logger_created_by_another_thread_during_the_walk_does_not_fail_the_run(monkeypatch) -> None:  # noqa: ANN001
    manager = logging.Logger.manager
    ours = logging.getLogger(f"prefect.sparsepilot-test-{uuid.uuid4().hex}")  # a Prefect handler to filter
    handler = PrefectConsoleHandler()
    ours.addHandler(handler)
    new_name = f"sparsepilot-test-created-{uuid.uuid4().hex}"  # no dots: no placeholders to leave behind
    created: dict[str, logging.Logger] = {}
    creator = threading.Thread(target=lambda: created.update(lg=logging.getLogger(new_name)), daemon=True)
    monkeypatch.setattr(manager, "loggerDict", _SwitchingTree(manager.loggerDict, creator))
    try:
        redact_prefect_logs()  # raised RuntimeError: dictionary changed size during iteration
        creator.join(5)
        assert created["lg"] is manager.loggerDict[new_name]  # the other thread's logger, made after the walk
        assert any(isinstance(f, RedactingFilter) for f in handler.filters)  # the walk found the handler
    finally:
        ours.removeHandler(handler)
        creator.join(5)
        monkeypatch.undo()
        manager.loggerDict.pop(ours.name, None)
