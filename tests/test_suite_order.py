"""The suite's order (tests/conftest.py): the tests marked `slow` run first, the rest after them in their
collected order, so that under `make test` no minutes-long test starts last while the other worker idles."""

from __future__ import annotations

import pytest


def test_no_slow_test_is_collected_after_a_quick_one(request: pytest.FixtureRequest) -> None:
    items = request.session.items
    quick = [k for k, item in enumerate(items) if item.get_closest_marker("slow") is None]
    late = [item.nodeid for item in items[quick[0] :] if item.get_closest_marker("slow")] if quick else []
    assert not late, f"slow tests collected after a quick one: {late}"
