"""The test servers' ports (tests/fixtures/ports.py): under pytest-xdist each worker probes only its own
range, below the kernel's ephemeral range, and never hands out one port twice."""

from __future__ import annotations

import socket

import pytest

from tests.fixtures import ports


def test_a_worker_takes_distinct_free_ports_from_its_own_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    monkeypatch.setattr(ports, "_given", set())
    monkeypatch.setattr(ports, "SPAN", 50)  # a small range, so a test can use it up
    lo, hi = ports.BASE + 50, ports.BASE + 100
    got: list[int] = []
    with socket.socket() as taken:  # a port some server already holds is passed over
        taken.bind(("127.0.0.1", lo))
        taken.listen()
        with pytest.raises(RuntimeError, match=f"no free loopback port in {lo}-{hi - 1} for test worker gw1"):
            while True:
                got.append(ports.free_port())
    assert len(set(got)) == len(got) and all(lo < p < hi for p in got)
    assert len(got) >= 40  # nearly all of the range (other processes may hold a few of its ports)


def test_the_workers_ranges_sit_below_the_kernels_ephemeral_ports() -> None:
    # `make test` runs at most 4 workers; Linux hands out client ports from 32768 up by default
    assert ports.BASE + 4 * ports.SPAN <= 32768


def test_without_workers_the_kernel_chooses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    port = ports.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # free: the probe released it
