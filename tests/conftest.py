"""Shared fixtures. Each area keeps its fixtures in tests/fixtures/<area>.py, loaded here."""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs a worker process per core: each worker's torch (and the commands it starts) on one
    # intra-op thread, since two workers each spinning torch's default one-thread-per-core OpenMP pool
    # on a 2-core host wait on descheduled partners (a SmolLM2 one-token forward: 627 ms vs 96 ms)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

pytest_plugins = [
    "tests.fixtures.env",
    "tests.fixtures.postgres",
    "tests.fixtures.dashboard",
    "tests.fixtures.sparse_quality",
    "tests.fixtures.mlflow",
    "tests.fixtures.flows",
    "tests.fixtures.stack",
    "tests.fixtures.models",
    "tests.fixtures.trust",
]


def pytest_collection_modifyitems(items: list) -> None:
    """The tests marked `slow` run first, in their collected order, and the rest after them in theirs. Under
    `make test` (xdist's worksteal) a minutes-long test that starts late sets the finish while the other
    worker idles; started first, it runs while the other worker takes the short tests, which either
    worker steals at the end. Every worker sorts alike, so their collections stay the same."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
