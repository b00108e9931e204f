"""The CPU the process really has and the load of the rest of the host (sparse_core.host)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from sparse_core.host import (
    OVERLOAD_MARGIN_CORES,
    HostLoadMeter,
    available_cpus,
    choose_threads,
    others_busy_cores,
    snapshot,
)


@pytest.mark.parametrize(
    ("cpus", "others", "threads"),
    [
        (2, 0.0, 2),
        (2, 0.4, 2),
        (2, 0.6, 1),
        (2, 1.0, 1),
        (2, 3.5, 1),
        (4, 1.2, 3),
        (1, 0.0, 1),
        (2.5, 0.0, 2),
    ],
)
def test_threads_are_the_cpus_the_others_leave(cpus: float, others: float, threads: int) -> None:
    assert choose_threads(cpus, others) == threads


def test_available_cpus_follow_the_affinity_mask() -> None:
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no sched_setaffinity on this platform")
    code = "\n".join(
        [
            "import os",
            "os.sched_setaffinity(0, {0})",
            "from sparse_core import host",
            "print(host.available_cpus())",
        ]
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout) == 1.0
    assert available_cpus() <= (os.cpu_count() or 1)


def test_a_busy_neighbour_is_seen_and_flags_overload() -> None:
    """A real process spinning on one core for a second: the meter sees about one busy core that is
    not ours; with as many threads as CPUs that is an overload."""
    if snapshot().busy_ticks is None:
        pytest.skip("no /proc/stat on this platform")
    spin = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<3: pass"])
    try:
        time.sleep(0.5)
        cpus = available_cpus()
        with HostLoadMeter(threads=int(cpus)) as meter:
            time.sleep(1.0)
    finally:
        spin.kill()
        spin.wait()
    load = meter.load
    assert load.others_busy_cores is not None and load.others_busy_cores >= 0.7
    assert load.overloaded == (load.others_busy_cores + load.threads > cpus + OVERLOAD_MARGIN_CORES)
    assert load.overloaded
    assert load.to_dict()["threads"] == int(cpus)


def test_our_own_work_is_not_counted_as_the_others() -> None:
    a = snapshot()
    t = time.monotonic()
    while time.monotonic() - t < 0.5:  # busy in this process only
        pass
    b = snapshot()
    if a.busy_ticks is None:
        pytest.skip("no /proc/stat on this platform")
    hz, wall = os.sysconf("SC_CLK_TCK"), b.wall - a.wall
    total = (b.busy_ticks - a.busy_ticks) / hz / wall
    own = (b.own_ticks - a.own_ticks) / hz / wall
    assert own >= 0.1  # this process's own CPU time is read (all its threads)
    assert others_busy_cores(a, b) == pytest.approx(max(0.0, total - own), abs=1e-9)
