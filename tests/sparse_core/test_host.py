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
    busy_ticks,
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


PROC_STAT = """cpu  300 0 30 1000 10 0 6 4 0 0
cpu0 100 0 10 500 5 0 2 1 0 0
cpu1 200 0 20 500 5 0 4 3 0 0
intr 1 2 3
"""


def test_busy_ticks_count_only_the_cpus_asked_for() -> None:
    assert busy_ticks(PROC_STAT) == 113 + 227 == 340  # every CPU: the aggregate line's 300+30+6+4
    assert busy_ticks(PROC_STAT, {0}) == 113 and busy_ticks(PROC_STAT, {1}) == 227
    assert busy_ticks(PROC_STAT, set()) == 0


def test_a_neighbour_on_another_cpu_is_not_our_load() -> None:
    """A process pinned to CPU 1 with a spinner pinned to CPU 0: the spinner does not compete with it,
    so its meter does not count it (it did when the meter read the all-CPU line: a pilot pinned away
    from a busy neighbour had every latency flagged as overloaded). Both readings are taken in the same
    window, so whatever else runs on CPU 1 counts in both and cancels in the difference."""
    if len(os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else ()) < 2:
        pytest.skip("needs two CPUs and sched_setaffinity")
    if snapshot().busy_ticks is None:
        pytest.skip("no /proc/stat on this platform")
    cpu_a, cpu_b = sorted(os.sched_getaffinity(0))[:2]
    spin = subprocess.Popen(
        [sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<4: pass"],
        preexec_fn=lambda: os.sched_setaffinity(0, {cpu_a}),
    )
    code = "\n".join(
        [
            "import os, time",
            f"os.sched_setaffinity(0, {{{cpu_b}}})",
            "from pathlib import Path",
            "from sparse_core.host import available_cpus, busy_ticks, others_busy_cores, snapshot, CLK_TCK",
            "time.sleep(0.5)",
            "a, all_a = snapshot(), busy_ticks(Path('/proc/stat').read_text())",
            "time.sleep(1.5)",
            "b, all_b = snapshot(), busy_ticks(Path('/proc/stat').read_text())",
            "everywhere = (all_b - all_a) / CLK_TCK / (b.wall - a.wall)",
            "print(available_cpus(), others_busy_cores(a, b), everywhere)",
        ]
    )
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    finally:
        spin.kill()
        spin.wait()
    cpus, ours, everywhere = (float(x) for x in out.stdout.split())
    assert cpus == 1.0
    assert everywhere - ours >= 0.7  # the spinner's core is busy, and it is not counted as ours


def test_threads_for_sets_the_count_for_the_block_and_restores_it() -> None:
    import torch

    from sparse_core.host import threads_for

    before = torch.get_num_threads()
    with threads_for(1) as record:
        assert torch.get_num_threads() == 1 and record["threads"] == 1 and record["requested"] == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), threads_for(None) as record:
        assert record["requested"] == "auto" and torch.get_num_threads() == record["threads"]
        raise RuntimeError("the count comes back after an error too")
    assert torch.get_num_threads() == before
