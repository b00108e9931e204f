"""The CPU the process really has and the load of the rest of the host (sparse_core.host)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from sparse_core.host import (
    OVERLOAD_MARGIN_CORES,
    WAIT_SHARE_LIMIT,
    CpuLimits,
    HostLoadMeter,
    available_cpus,
    busy_ticks,
    choose_threads,
    is_overloaded,
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
    not ours; with as many threads as CPUs that is an overload by the inferred rule. Where the kernel
    measured our threads' wait (any thread of ours ran 2 ms or more meanwhile), that measurement decides
    instead, and this meter's process slept: it did not wait for a core (the clean-clone CI saw
    wait_share 0.0 with 1.375 busy cores of others, and rightly no overload)."""
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
    inferred = is_overloaded(load.others_busy_cores, load.threads, CpuLimits(mask=cpus, quota=None))
    assert inferred == (load.others_busy_cores + load.threads > cpus + OVERLOAD_MARGIN_CORES)
    assert inferred
    if load.wait_share is None:
        assert load.overloaded
    else:
        assert load.overloaded == (load.wait_share > WAIT_SHARE_LIMIT)
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
    total = min(b.busy_ticks - a.busy_ticks, b.busy_cpus * wall * hz) / hz / wall  # at most the mask
    own = (b.own_ticks - a.own_ticks) / hz / wall
    assert own >= 0.1  # this process's own CPU time is read (all its threads)
    assert others_busy_cores(a, b) == pytest.approx(max(0.0, total - own), abs=1e-9)


@pytest.mark.parametrize(
    ("cpus", "wall", "busy", "own", "others"),
    [
        (1, 0.2005, 21, 0, 1.0),  # a tick more than 0.2 s holds: read 1.047 cores of 1 CPU
        (2, 0.0792, 17, 0, 2.0),  # read 2.146 of 2
        (2, 1.0, 2.03, 0.5, 1.5),  # our own taken out of what the mask could do, not of its overcount
        (2, 1.0, 1.5, 0.3, 1.2),  # under the cap: as read
        (4, 0.5, 4.0, 0.0, 4.0),  # a full mask reads all of it
    ],
)
def test_the_others_never_read_more_cores_than_the_mask_has(
    cpus: int, wall: float, busy: float, own: float, others: float
) -> None:
    """/proc/stat's counters advance in whole ticks: a short window reads a tick beyond its length, and
    the others' cores read over the mask (2.015 on 2 CPUs, 1.047 on a 1-CPU taskset). `busy` and `own` are
    cores (but the first row's ticks), turned into whole ticks as /proc reads them."""
    from sparse_core.host import CLK_TCK, CpuSnapshot

    ticks = busy if isinstance(busy, int) else round(busy * wall * CLK_TCK)
    a = CpuSnapshot(10.0, 1000, 500, None, busy_cpus=cpus)
    b = CpuSnapshot(10.0 + wall, 1000 + ticks, 500 + round(own * wall * CLK_TCK), None, busy_cpus=cpus)
    assert others_busy_cores(a, b) == pytest.approx(others, abs=1e-9)
    assert others_busy_cores(a, replace(b, busy_cpus=cpus + 1)) is None  # the mask changed: other CPUs' ticks


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


# -- a cgroup CPU quota without a cpuset (docker --cpus, a Kubernetes CPU limit) ---------------------------


@pytest.mark.parametrize(
    ("cpus", "others", "mask", "threads"),
    [
        (4, 8.0, 16, 4),  # 8 of the node's 16 cores idle: the quota is the only limit
        (4, 13.6, 16, 2),  # 2.4 idle cores on the node
        (4, 15.9, 16, 1),
        (2, 0.0, 2, 2),  # no quota: the mask is the cpus
        (1, 0.0, 16, 1),  # a quota below one CPU still runs one thread
    ],
)
def test_threads_under_a_quota_compare_the_others_with_the_mask(
    cpus: float, others: float, mask: float, threads: int
) -> None:
    assert choose_threads(cpus, others, mask=mask) == threads


def test_overload_under_a_quota_is_judged_against_the_mask_and_the_quota() -> None:
    from sparse_core.host import CpuLimits, is_overloaded

    limits = CpuLimits(mask=16.0, quota=4.0)
    assert limits.cpus == 4.0
    assert not is_overloaded(8.0, 4, limits)  # 8 idle cores, 4 threads within the quota
    assert is_overloaded(13.0, 4, limits)  # 3 idle cores for 4 threads
    assert is_overloaded(0.0, 6, limits)  # more threads than the quota gives
    assert not is_overloaded(1.4, 1, CpuLimits(mask=2.0))
    assert is_overloaded(1.6, 1, CpuLimits(mask=2.0))


def test_under_a_quota_the_processes_sharing_it_count() -> None:
    """Under a quota the processes of our own cgroup (a pytest worker, a second pipeline in the same
    container) use the same CPU time as our threads: with 3 of 4 quota CPUs in use by them, 1 thread
    (OpenMP threads spin waiting for a descheduled partner: 627 ms vs 96 ms here), and a timing with 4
    threads then is overloaded, however idle the node."""
    from sparse_core.host import (
        CLK_TCK,
        CpuLimits,
        CpuSnapshot,
        cgroup_usage,
        is_overloaded,
        quota_others_cores,
    )

    assert choose_threads(4, 2.0, mask=16, quota_others=3.0) == 1
    assert choose_threads(4, 2.0, mask=16, quota_others=0.2) == 4
    limits = CpuLimits(mask=16.0, quota=4.0)
    assert is_overloaded(3.0, 4, limits, quota_others=3.0) and not is_overloaded(3.0, 4, limits, 0.2)
    # the cgroup's usage less our own, per wall second: 2 s of wall, the cgroup used 5 CPU-s, we 1
    a = CpuSnapshot(0.0, None, 0, None, 0)
    b = CpuSnapshot(2.0, None, CLK_TCK, None, 5_000_000)
    assert quota_others_cores(a, b) == pytest.approx(2.0)
    assert quota_others_cores(a, CpuSnapshot(2.0, None, CLK_TCK, None, None)) is None
    assert cgroup_usage("usage_usec 123\nuser_usec 100\nsystem_usec 23\n") == 123


def _quota_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as a container on a 16-CPU node limited to 4 CPUs by a quota, no cpuset."""
    from sparse_core import host

    monkeypatch.setattr(host, "_affinity", lambda: set(range(16)))
    monkeypatch.setattr(host, "_cgroup_quota", lambda: 4.0)


def test_a_timing_under_a_quota_on_a_half_busy_node_is_not_flagged(monkeypatch: pytest.MonkeyPatch) -> None:
    from sparse_core.host import CLK_TCK, CpuSnapshot, measure

    _quota_node(monkeypatch)
    a = CpuSnapshot(wall=0.0, busy_ticks=0, own_ticks=0, psi_some_us=0)
    b = CpuSnapshot(wall=1.0, busy_ticks=int(12 * CLK_TCK), own_ticks=int(4 * CLK_TCK), psi_some_us=0)
    load = measure(a, b, threads=4)
    assert load.others_busy_cores == pytest.approx(8.0) and load.cpus == 4.0 and not load.overloaded
    busy = CpuSnapshot(wall=1.0, busy_ticks=int(18 * CLK_TCK), own_ticks=int(4 * CLK_TCK), psi_some_us=0)
    assert measure(a, busy, threads=4).overloaded  # the others kept 14 of 16 cores busy


@pytest.mark.parametrize("endpoint", [False, True], ids=["measure", "measure_endpoint"])
@pytest.mark.parametrize("load_avg", [[0.5, 0.25, 1.75], None], ids=["loadavg", "no-loadavg"])
def test_a_timing_records_the_hosts_side_alike_in_process_and_for_an_endpoint(
    monkeypatch: pytest.MonkeyPatch, endpoint: bool, load_avg: list[float] | None
) -> None:
    from sparse_core import host
    from sparse_core.host import CLK_TCK, CpuSnapshot, measure, measure_endpoint

    _quota_node(monkeypatch)
    monkeypatch.setattr(host, "loadavg", lambda: load_avg)
    a = CpuSnapshot(wall=0.0, busy_ticks=0, own_ticks=0, psi_some_us=0)
    b = CpuSnapshot(wall=2.0, busy_ticks=int(7 * CLK_TCK / 3), own_ticks=0, psi_some_us=1_234_567)
    load = measure_endpoint(a, b, None) if endpoint else measure(a, b, threads=1)
    assert (load.seconds, load.cpu_pressure) == (2.0, 0.617)  # 1.23 s of 2 some task waited
    assert load.others_busy_cores == round(int(7 * CLK_TCK / 3) / CLK_TCK / 2.0, 3)
    assert load.loadavg == (None if load_avg is None else (0.5, 0.25, 1.75))


def test_the_thread_policy_under_a_quota_uses_the_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from sparse_core import host

    _quota_node(monkeypatch)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # no cap (the test workers set one)
    monkeypatch.setattr(host, "_others_now", lambda _s: (8.0, 0.1))  # the node half busy, our cgroup idle
    before = torch.get_num_threads()
    try:
        policy = host.apply_thread_policy(0.0)
    finally:
        torch.set_num_threads(before)
    assert policy == {"cpus": 4.0, "threads": 4, "others_busy_cores": 8.0}


def _write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_quota_is_read_along_the_process_cgroup_path(tmp_path) -> None:
    """cgroup v2 without a private namespace (a systemd service with CPUQuota=, a process in a slice):
    the quota sits on the process's own cgroup or a parent, not at the root of the mount."""
    from sparse_core.host import cgroup_quota

    _write(tmp_path / "cpu.max", "max 100000\n")
    _write(tmp_path / "system.slice" / "cpu.max", "300000 100000\n")
    _write(tmp_path / "system.slice" / "app.service" / "cpu.max", "max 100000\n")
    assert cgroup_quota("0::/system.slice/app.service\n", tmp_path) == 3.0  # a parent's quota
    _write(tmp_path / "system.slice" / "app.service" / "cpu.max", "150000 100000\n")
    assert cgroup_quota("0::/system.slice/app.service\n", tmp_path) == 1.5  # the smallest wins
    assert cgroup_quota("0::/\n", tmp_path) is None  # the root itself has none
    # a path of another namespace that is not mounted here: the root's files still count
    _write(tmp_path / "cpu.max", "200000 100000\n")
    assert cgroup_quota("0::/../../elsewhere\n", tmp_path) == 2.0
    assert cgroup_quota("0::/not/mounted\n", tmp_path) == 2.0


def test_the_quota_is_read_from_cgroup_v1(tmp_path) -> None:
    from sparse_core.host import cgroup_quota

    base = tmp_path / "cpu,cpuacct"
    _write(base / "cpu.cfs_quota_us", "-1\n")
    _write(base / "cpu.cfs_period_us", "100000\n")
    _write(base / "docker" / "abc" / "cpu.cfs_quota_us", "250000\n")
    _write(base / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    text = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n"
    assert cgroup_quota(text, tmp_path) == 2.5
    assert cgroup_quota("4:cpu,cpuacct:/\n", tmp_path) is None


def test_the_overload_flag_is_our_own_threads_waiting_where_schedstat_measures_it() -> None:
    """The others' achieved load can never exceed what our thread leaves them, so a one-thread timing
    slowed 1.5x (the others 0.5 core of a 2-core mask) passed as clean, and 10 ms tick counts read a
    short piece under full load as idle. Where the kernel keeps schedstat, the flag is the share of our
    threads' runnable time spent waiting for a CPU."""
    from sparse_core.host import WAIT_SHARE_LIMIT, CpuLimits, CpuSnapshot, is_overloaded, wait_share

    two = CpuLimits(mask=2.0)
    assert not is_overloaded(0.5, 1, two)  # inferred: 0.5 + 1 <= 2.5
    assert is_overloaded(0.5, 1, two, waited=0.33)  # measured: a third of its time waiting (1.5x)
    assert not is_overloaded(1.6, 1, two, waited=0.02)  # the others busy elsewhere, ours ran freely
    assert is_overloaded(0.0, 6, CpuLimits(mask=16.0, quota=4.0), waited=0.0)  # the quota rule stands
    a = CpuSnapshot(0.0, None, None, None, run_ns=1_000_000_000, run_delay_ns=0)
    b = CpuSnapshot(1.0, None, None, None, run_ns=1_020_000_000, run_delay_ns=10_000_000)
    assert wait_share(a, b) == pytest.approx(10 / 30)
    assert wait_share(a, CpuSnapshot(1.0, None, None, None, run_ns=1_001_000_000, run_delay_ns=0)) is None
    assert wait_share(a, CpuSnapshot(1.0, None, None, None)) is None  # no schedstat: the fallback rule
    assert WAIT_SHARE_LIMIT == 0.25


def _spin_on(cpu: int) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", "while 1: pass"])
    os.sched_setaffinity(p.pid, {cpu})
    return p


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity")
def test_a_short_timing_sharing_its_cpu_with_a_busy_process_is_flagged() -> None:
    """A real busy process pinned to the CPU our thread is pinned to: the 30 ms pieces of one-thread work
    are flagged (each ran about half the time). Not every one: the scheduler may run one piece almost
    alone (a clean-clone CI saw wait shares 0.501, 0.847, 0.013, 0.373, 0.506, 0.504), so 8 of 10 are
    flagged and the pieces waited 0.3 of their time on average; a meter that did not see the waiting fails
    both."""
    import torch

    if snapshot().run_ns is None:
        pytest.skip("no schedstat on this kernel")
    cpu = max(os.sched_getaffinity(0))
    before_mask, before_threads = os.sched_getaffinity(0), torch.get_num_threads()
    a = torch.randn(128, 128)

    def piece() -> HostLoadMeter:
        with HostLoadMeter(threads=1) as m:
            t = time.perf_counter()
            while time.perf_counter() - t < 0.03:
                a @ a
        return m

    os.sched_setaffinity(0, {cpu})
    torch.set_num_threads(1)
    spin = _spin_on(cpu)
    try:
        time.sleep(0.2)
        loads = [piece().load for _ in range(10)]
    finally:
        spin.kill()
        spin.wait()
        os.sched_setaffinity(0, before_mask)
        torch.set_num_threads(before_threads)
    shares = [x.wait_share for x in loads]
    assert sum(x.overloaded for x in loads) >= 8 and sum(shares) / len(shares) > 0.3, shares


def test_an_explicit_omp_num_threads_caps_the_automatic_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from sparse_core import host

    assert host.omp_threads_cap({"OMP_NUM_THREADS": "1"}) == 1
    assert host.omp_threads_cap({"OMP_NUM_THREADS": "3,1"}) == 3
    assert host.omp_threads_cap({"OMP_NUM_THREADS": "zero"}) is None
    assert host.omp_threads_cap({"OMP_NUM_THREADS": "0"}) is None and host.omp_threads_cap({}) is None
    _quota_node(monkeypatch)
    monkeypatch.setattr(host, "_others_now", lambda _s: (0.0, 0.0))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    before = torch.get_num_threads()
    try:
        policy = host.apply_thread_policy(0.0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert policy == {"cpus": 4.0, "threads": 2, "others_busy_cores": 0.0, "capped_by": "OMP_NUM_THREADS=2"}
    monkeypatch.delenv("OMP_NUM_THREADS")
    try:
        assert host.apply_thread_policy(0.0)["threads"] == 4
    finally:
        torch.set_num_threads(before)


def test_a_thread_that_ends_between_two_snapshots_takes_nothing_out_of_the_wait_share() -> None:
    """The process's sums lost an ended thread's whole life: a helper that had run 0.5 s and ended inside
    a 0.6 s one-thread piece made its wait share 0.557 (flagged) against the piece's own 0.19. Per thread,
    only the threads alive at both snapshots (and new ones) count."""
    import threading

    from sparse_core.host import CpuSnapshot, wait_share

    a = CpuSnapshot(0.0, None, None, None, threads_ns=((1, 1_000_000_000, 50_000_000), (2, 500_000_000, 0)))
    b = CpuSnapshot(1.0, None, None, None, threads_ns=((1, 1_600_000_000, 200_000_000), (3, 10_000_000, 0)))
    assert wait_share(a, b) == pytest.approx(150 / (600 + 10 + 150))
    if snapshot().threads_ns is None:
        pytest.skip("no schedstat on this kernel")
    done = threading.Event()

    def helper() -> None:
        t = time.thread_time()
        while time.thread_time() - t < 0.3:
            pass
        done.wait()

    th = threading.Thread(target=helper)
    th.start()
    time.sleep(0.5)
    with HostLoadMeter(threads=1) as m:
        done.set()
        th.join()  # the helper ends inside the measured piece
        t = time.thread_time()
        while time.thread_time() - t < 0.3:
            pass
    own = m.load.wait_share
    assert own is not None and own < 0.9 and (m.load.overloaded == (own > 0.25))


# -- an endpoint's answers in flight at once, and whose quota its server spends (review s50 B) ------------


def _served(run_ms: float, delay_ms: float, cpu_busy_ms: float, ticks_ms: float) -> tuple:
    """A server's snapshots around an answer: its threads' run and run_delay, its CPUs' busy time (all the
    processes on them) and its own ticks, all from 0."""
    from sparse_core.host import CLK_TCK, ProcessesSnapshot

    tick = 1000 / CLK_TCK  # ms
    cpus = frozenset({1})
    a = ProcessesSnapshot(((10, 0),), ((10, 0, 0),), cpus=cpus, cpus_busy_ticks=0)
    b = ProcessesSnapshot(
        ((10, round(ticks_ms / tick)),),
        ((10, int(run_ms * 1e6), int(delay_ms * 1e6)),),
        cpus=cpus,
        cpus_busy_ticks=round(cpu_busy_ms / tick),
    )
    return a, b


@pytest.mark.parametrize(
    ("run_ms", "delay_ms", "others_ms", "overloaded"),
    [
        (900, 1500, 0, False),  # 4 in flight on the server's one CPU, alone on it: they waited for each other
        (900, 1500, 50, False),  # a tick or five of someone else's: noise
        (400, 2000, 600, True),  # the others took 0.6 of its CPU
    ],
)
def test_answers_in_flight_are_judged_by_what_the_others_took_of_the_servers_cpus(
    run_ms: float, delay_ms: float, others_ms: float, overloaded: bool
) -> None:
    """Review s50 B1: 4 answers in flight on a server with one CPU, no other process able to take it
    (real-time), read a wait share of 0.53 and 19 of 20 were flagged (one at a time: 0.05, 1 of 20): its
    threads waited for each other. Concurrent answers are judged by the share of the server's CPUs the
    other processes took; each records its share of the server's CPU (`charged_s`) and the answers in
    flight."""
    from sparse_core.host import CLK_TCK, CpuSnapshot, crowded_share, measure_endpoint

    a, b = _served(run_ms, delay_ms, run_ms + others_ms, run_ms)
    start = CpuSnapshot(0.0, 0, 0, None, threads_ns=((1, 0, 0),))
    end = CpuSnapshot(1.0, round((run_ms + others_ms) / 1000 * CLK_TCK), 0, None, threads_ns=((1, 10**6, 0),))
    limits = CpuLimits(2.0)
    load = measure_endpoint(start, end, (a, b), charged_s=run_ms / 4000, in_flight=4, limits=limits)
    assert load.overloaded is overloaded, load
    assert load.wait_share == pytest.approx(
        crowded_share(run_ms * 1e6, delay_ms * 1e6, others_ms * 1e6), abs=1e-3
    )
    assert load.endpoint_in_flight == 4 and load.endpoint_busy_cores == pytest.approx(run_ms / 4000)
    alone = measure_endpoint(start, end, (a, b), limits=limits)  # read as one answer's: its threads' wait
    assert alone.overloaded and alone.endpoint_in_flight is None
    assert alone.endpoint_busy_cores == pytest.approx(run_ms / 1000)
    assert crowded_share(60e6, 60e6, 80e6) == pytest.approx(0.5)  # one thread: its wait share


def test_answers_in_flight_share_the_servers_cpu_by_their_overlap() -> None:
    """Each answer is charged the server's CPU between any two starts or ends split among the answers in
    flight then: A alone for 30 ms, with B for 60 ms, B alone for 30 ms: 60 ms each, not A 90 and B 90."""
    from sparse_core.host import InFlight, ProcessesSnapshot

    def at(run_ms: int) -> ProcessesSnapshot:
        return ProcessesSnapshot(((10, 0),), ((10, run_ms * 10**6, 0),))

    meter = InFlight()
    ka, _ = meter.begin(lambda: at(0))
    kb, _ = meter.begin(lambda: at(30))
    _, charged_a, most_a = meter.end(ka, lambda: at(90))
    _, charged_b, most_b = meter.end(kb, lambda: at(120))
    assert (charged_a, most_a) == (pytest.approx(0.06), 2) and (charged_b, most_b) == (pytest.approx(0.06), 2)
    kc, _ = meter.begin(lambda: at(500))  # alone: the server's CPU before it is no one's
    assert meter.end(kc, lambda: at(560))[1:] == (pytest.approx(0.06), 1)


def test_a_server_spends_our_quota_only_under_the_cgroup_that_holds_it(tmp_path) -> None:
    """Review s50 B2: whether the server spends our quota was the whole /proc/<pid>/cgroup text equal to
    ours: a worker in a child cgroup under our container's quota, or on cgroup v1 in another memory cgroup,
    spent it unseen. It spends our quota where it is in the cgroup holding it or below; a server in its
    own container (its own quota) spends another budget."""
    from sparse_core.host import quota_holder, shares_quota

    _write(tmp_path / "pod" / "pilot" / "cpu.max", "100000 100000\n")  # our container: --cpus 1
    _write(tmp_path / "pod" / "server" / "cpu.max", "200000 100000\n")  # the server's: --cpus 2
    ours = "0::/pod/pilot\n"
    assert quota_holder(ours, tmp_path) == ("0", "/pod/pilot")
    assert shares_quota(ours, "0::/pod/pilot\n", tmp_path)
    assert shares_quota(ours, "0::/pod/pilot/worker\n", tmp_path)  # a child cgroup spends its parent's
    assert not shares_quota(ours, "0::/pod/server\n", tmp_path)  # its own container: another budget
    assert not shares_quota(ours, "0::/pod/pilot2\n", tmp_path)  # a name beginning like ours is not ours
    assert not shares_quota("0::/pod/other\n", "0::/pod/other\n", tmp_path)  # no quota: nothing shared
    _write(tmp_path / "pod" / "pilot" / "cpu.max", "max 100000\n")
    _write(tmp_path / "pod" / "cpu.max", "150000 100000\n")  # the pod's quota binds both containers
    assert quota_holder(ours, tmp_path) == ("0", "/pod") and shares_quota(ours, "0::/pod/server\n", tmp_path)
    v1 = tmp_path / "v1" / "cpu,cpuacct"
    _write(v1 / "docker" / "abc" / "cpu.cfs_quota_us", "100000\n")
    _write(v1 / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    ours = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n"
    sidecar = "12:memory:/docker/abc/sidecar\n4:cpu,cpuacct:/docker/abc\n"  # same CPU cgroup, own memory
    assert shares_quota(ours, sidecar, tmp_path / "v1")
    assert not shares_quota(ours, "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/def\n", tmp_path / "v1")


@pytest.mark.parametrize(
    ("shares", "cgroup_others", "overloaded"),
    [
        (True, 0.0, False),  # the server's 0.9 core within our 1-CPU quota
        (True, 1.0, True),  # and our cgroup's others 1.0 beside it: over the quota
        (False, 1.2, True),  # its own budget, but our cgroup's others leave our client thread no quota
        (False, 0.2, False),  # its own budget: its 1.8 cores are not taken from ours
    ],
)
def test_our_quota_judges_the_server_where_it_spends_it_and_our_side_where_not(
    shares: bool, cgroup_others: float, overloaded: bool
) -> None:
    """Review s50 B2: a server outside our cgroup turned the quota rule off altogether, so our own client
    thread, starved of our quota by the rest of our cgroup, was never judged (a server not visible was)."""
    from sparse_core.host import CLK_TCK, CpuSnapshot, ProcessesSnapshot, measure_endpoint

    cores = 0.9 if shares else 1.8
    ticks = round(cores * CLK_TCK)
    usage_us = round((cgroup_others + (cores if shares else 0.0)) * 1e6)
    start = CpuSnapshot(0.0, 0, 0, None, 0, threads_ns=((1, 0, 0),))
    end = CpuSnapshot(1.0, ticks, 0, None, usage_us, threads_ns=((1, 10**6, 0),))
    a = ProcessesSnapshot(((10, 0),), ((10, 0, 0),), shares)
    b = ProcessesSnapshot(((10, ticks),), ((10, int(cores * 1e9), 10**7),), shares)
    load = measure_endpoint(start, end, (a, b), limits=CpuLimits(16.0, 1.0))  # --cpus 1 on a 16-core node
    assert load.overloaded is overloaded, load
    assert load.wait_share is not None and load.wait_share < WAIT_SHARE_LIMIT  # the server never waited
