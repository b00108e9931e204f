"""The CPU the process really has, and how busy the rest of the host is: thread count and load record.

On a shared host torch's default (one thread per core) is a trap: with another process busy on one of two
cores, a SmolLM2 one-token forward took 627 ms with 2 threads and 96 ms with 1 (OpenMP threads spin waiting
for a descheduled partner). So threads are chosen from the CPUs this process may use (affinity and the
cgroup CPU quota, not os.cpu_count()) minus what other processes are using right now, and every timed
piece of work records the host's load while it ran, so a timing taken under overload can be flagged.
Where the kernel keeps scheduler statistics (/proc/self/task/*/schedstat, nanoseconds) the flag is our own
threads' waiting: the share of their runnable time spent waiting for a CPU (`wait_share`), which sees a
one-thread timing slowed by a third and a 10 ms piece alike. Elsewhere it falls back to comparing the
others' load (measured over the affinity mask in 10 ms ticks, so compared with the mask's cores) and our
threads with the cores; the quota (a container's `--cpus` without a cpuset, whose mask is the whole node)
only caps our threads. An explicit OMP_NUM_THREADS caps the automatic thread count.

Linux /proc and /sys only; elsewhere the functions fall back to os.cpu_count() and os.getloadavg().
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# A batch is "overloaded" when it ran with more threads than the cores the other processes left free on
# its affinity mask, or than its cgroup quota allows (the choice `choose_threads` would make now is fewer
# threads): our threads then waited for a core, and its latencies say more about the host than about the
# model.
OVERLOAD_MARGIN_CORES = 0.5
# A timing is overloaded when our threads spent more than this share of their runnable time waiting for a
# CPU (schedstat's run_delay against the time they ran): it then took at least 1.33x as long as on free
# cores. An idle host's waiting is well under it (a few per cent: timer ticks, kernel threads).
WAIT_SHARE_LIMIT = 0.25
# Less runnable time than this between two snapshots is too little to judge (the share of a few
# microseconds says nothing): the wait share is None and the fallback rule decides.
MIN_RUNNABLE_NS = 2_000_000
# An endpoint served by another process on this host (`measure_endpoint`): a side's wait share is judged only
# where its work is a real part of the answer, at least this share of the answer's wall time: for this
# process's threads (which mostly wait on HTTP) the time they RAN, for the server's threads the time they
# were runnable. Under it the share of a few ms is noise (0.19-0.26 read for the pilot on an idle host), and
# on a CPU the pilot shares with the server the server's own work preempts it (10 ms run, 73 ms run_delay
# per answer of 60 ms of the server's work, the two pinned to one CPU).
ANSWER_FLOOR_SHARE = WAIT_SHARE_LIMIT


def loadavg() -> list[float] | None:
    """The 1/5/15-minute load averages, rounded (None where the platform has none): the load record
    every benchmark and measurement writes beside its timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _affinity() -> set[int] | None:
    try:
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return None


CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class CpuLimits:
    """The two limits on this process's CPU: the cores it may run on (`mask`: the affinity mask, which
    is also the set of cores whose load the others' is measured over) and the cgroup CPU quota in CPUs
    (`quota`; None where none is set). A container under `docker --cpus` / a Kubernetes CPU limit has a
    quota and no cpuset: its mask is the whole node, busy with other tenants, and its quota the limit."""

    mask: float
    quota: float | None = None

    @property
    def cpus(self) -> float:
        """The CPUs the process can use at most: the mask capped by the quota (at least 1)."""
        return max(1.0, min(self.mask, self.quota)) if self.quota else self.mask


def cpu_limits() -> CpuLimits:
    mask = _affinity()
    return CpuLimits(float(len(mask)) if mask else float(os.cpu_count() or 1), _cgroup_quota())


def available_cpus() -> float:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (v2 cpu.max or v1
    cfs_quota_us / cfs_period_us) where one is set on its cgroup or an ancestor."""
    return cpu_limits().cpus


def _cgroup_quota() -> float | None:
    try:
        text = Path("/proc/self/cgroup").read_text()
    except OSError:
        text = "0::/\n"  # no /proc: the root of the hierarchy only
    return cgroup_quota(text, CGROUP_ROOT)


def cgroup_quota(self_cgroup: str, root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota (in CPUs) on a process whose /proc/self/cgroup reads `self_cgroup`, with the cgroup
    filesystem mounted at `root`: the smallest quota on its cgroup or any ancestor up to the root (a
    quota set on a parent slice limits every cgroup under it). cgroup v2 (`0::/path`: cpu.max) and v1
    (a `cpu` controller line: cpu.cfs_quota_us / cpu.cfs_period_us under `root/<controllers>`); a
    cgroup directory that is not there (the path of another namespace) is skipped, so the root's own
    files are always read. None where no quota is set."""
    quotas: list[float] = []
    lines = [ln.split(":", 2) for ln in self_cgroup.splitlines() if ln.count(":") >= 2]
    for hid, controllers, path in lines or [["0", "", "/"]]:
        if hid == "0" and controllers == "":
            for d in _cgroup_dirs(root, path):
                quotas += _v2_quota(d)
        elif "cpu" in controllers.split(","):
            mounts = [root / controllers, root / "cpu", root / "cpu,cpuacct"]
            base = next((m for m in mounts if m.is_dir()), None)
            for d in _cgroup_dirs(base, path) if base is not None else ():
                quotas += _v1_quota(d)
    return min(quotas) if quotas else None


def quota_holder(self_cgroup: str, root: Path = CGROUP_ROOT) -> tuple[str, str] | None:
    """Where the quota `cgroup_quota` reads for a process is set: (hierarchy, path), the hierarchy "0" for
    cgroup v2 or the v1 `cpu` controller line's controllers, the path that of the cgroup (the process's own
    or an ancestor) holding the smallest quota; None where no quota is set."""
    best: tuple[float, str, str] | None = None
    lines = [ln.split(":", 2) for ln in self_cgroup.splitlines() if ln.count(":") >= 2]
    for hid, controllers, path in lines or [["0", "", "/"]]:
        if hid == "0" and controllers == "":
            key, base, read = "0", root, _v2_quota
        elif "cpu" in controllers.split(","):
            mounts = [root / controllers, root / "cpu", root / "cpu,cpuacct"]
            found = next((m for m in mounts if m.is_dir()), None)
            if found is None:
                continue
            key, base, read = controllers, found, _v1_quota
        else:
            continue
        for d in _cgroup_dirs(base, path):
            for q in read(d):
                if best is None or q < best[0]:
                    best = (q, key, "/" + d.relative_to(base).as_posix().strip("."))
    return None if best is None else (best[1], best[2].rstrip("/") or "/")


def shares_quota(self_cgroup: str, other_cgroup: str, root: Path = CGROUP_ROOT) -> bool:
    """Whether a process whose /proc/<pid>/cgroup reads `other_cgroup` spends the same CPU quota as one that
    reads `self_cgroup`: it is in the cgroup holding that quota (`quota_holder`) or below it, in the same
    hierarchy (the v1 `cpu` controller's line, whatever its memory or pids cgroups). A process in another
    cgroup with a quota of its own (another container, another pod's) spends another budget. False where
    the first has no quota."""
    holder = quota_holder(self_cgroup, root)
    if holder is None:
        return False
    key, path = holder
    for line in other_cgroup.splitlines():
        hid, controllers, other = (line.split(":", 2) + ["", ""])[:3]
        if (key == "0" and hid == "0" and controllers == "") or (key != "0" and controllers == key):
            other = "/" + "/".join(x for x in other.strip().split("/") if x)
            return path == "/" or other == path or other.startswith(path + "/")
    return False


def _cgroup_dirs(base: Path, path: str) -> list[Path]:
    """`base/path` and each of its parents up to `base` (only `base` for a path that climbs out)."""
    parts = [x for x in path.strip().split("/") if x and x != "."]
    if ".." in parts:
        parts = []
    return [base.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _v2_quota(d: Path) -> list[float]:
    try:
        text = (d / "cpu.max").read_text().split()
        if text and text[0] != "max" and float(text[1]) > 0:
            return [float(text[0]) / float(text[1])]
    except (OSError, ValueError, IndexError):
        pass
    return []


def _v1_quota(d: Path) -> list[float]:
    try:
        quota = int((d / "cpu.cfs_quota_us").read_text())
        period = int((d / "cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return [quota / period]
    except (OSError, ValueError):
        pass
    return []


@dataclass(frozen=True)
class CpuSnapshot:
    wall: float  # time.monotonic(), read just before /proc/stat (`snapshot`)
    busy_ticks: int | None  # the CPUs this process may run on (busy_ticks of /proc/stat)
    own_ticks: int | None  # this process, all threads (/proc/self/stat utime + stime)
    psi_some_us: int | None  # /proc/pressure/cpu "some" total: time some task waited for a CPU
    # CPU time of this process's own cgroup (v2 cpu.stat usage_usec): what shares its quota with it
    cgroup_usage_us: int | None = None
    # this process's threads, summed (/proc/self/task/*/schedstat): time run on a CPU and time spent
    # runnable but waiting for one, in nanoseconds
    run_ns: int | None = None
    run_delay_ns: int | None = None
    # the same per thread id: `wait_share` takes the differences of the threads alive at both snapshots
    # (and a new thread's whole life), so a thread that ends between them takes nothing out of the sums
    threads_ns: tuple[tuple[int, int, int], ...] | None = None  # (tid, run, run_delay)
    # how many CPUs busy_ticks summed (the affinity mask then): the most ticks a window can hold
    # (`others_busy_cores`); None where not known
    busy_cpus: int | None = None


def busy_ticks(proc_stat: str, cpus: Collection[int] | None = None) -> int:
    """Busy clock ticks (user + nice + system + irq + softirq + steal: all but idle and iowait) summed over
    the per-CPU lines of a /proc/stat text, only those of `cpus` where given. A process pinned to some
    CPUs competes only with what runs on those: a neighbour busy on another CPU is not its load."""
    total = 0
    for line in proc_stat.splitlines()[1:]:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu"):
            break
        if cpus is not None and int(name[3:]) not in cpus:
            continue
        values = [int(x) for x in rest.split()]
        total += sum(values) - values[3] - (values[4] if len(values) > 4 else 0)
    return total


def snapshot() -> CpuSnapshot:
    """This moment's counters. The clock, /proc/stat and /proc/self/stat are read first, one after the
    other, so the others' cores (`others_busy_cores`: their ticks over the wall time) divide the ticks of
    one window by that window's seconds: with the clock read last, after every thread's schedstat, a
    snapshot preempted on a busy host between its /proc/stat read and its clock read had a window's ticks
    over a shorter span (2.015 cores read on 2 CPUs)."""
    busy = own = psi = None
    mask = _affinity()
    wall = time.monotonic()
    try:
        busy = busy_ticks(Path("/proc/stat").read_text(), mask)
    except (OSError, ValueError, IndexError):
        pass
    try:
        stat = Path("/proc/self/stat").read_text()
        after = stat[stat.rindex(")") + 2 :].split()
        own = int(after[11]) + int(after[12])  # utime, stime (fields 14 and 15)
    except (OSError, ValueError, IndexError):
        pass
    try:
        for line in Path("/proc/pressure/cpu").read_text().splitlines():
            if line.startswith("some"):
                psi = int(line.rsplit("total=", 1)[1])
    except (OSError, ValueError, IndexError):
        pass
    threads = _thread_schedstat()
    run_ns = delay_ns = None
    if threads:
        run_ns, delay_ns = sum(t[1] for t in threads), sum(t[2] for t in threads)
    cpus = len(mask) if mask else None
    return CpuSnapshot(wall, busy, own, psi, _cgroup_usage_us(), run_ns, delay_ns, threads, cpus)


def _thread_schedstat(pid: int | str = "self") -> tuple[tuple[int, int, int], ...] | None:
    """(tid, run, run_delay) in ns of each thread of a process (this one by default); None without
    schedstat, or where the process is gone."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    out = []
    for tid in tasks:
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
            out.append((int(tid), int(fields[0]), int(fields[1])))
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile, or no schedstat on this kernel
    return tuple(out) or None


def wait_share(a: CpuSnapshot, b: CpuSnapshot) -> float | None:
    """The share of our threads' runnable time between two snapshots that they spent waiting for a CPU
    (run_delay / (run + run_delay)); None without schedstat or with too little runnable time to judge.
    Per thread where the snapshots carry threads: the differences of the threads alive at both and the
    whole of a thread born between them; a thread that ended between them is left out (its last stretch is
    gone with it), where the process's sums would have lost its whole life's times."""
    times = _own_times(a, b)
    return None if times is None else _share(*times)


def _own_times(a: CpuSnapshot, b: CpuSnapshot) -> tuple[int, int] | None:
    """(run, run_delay) in ns of our threads between two snapshots (None without schedstat)."""
    if a.threads_ns is not None and b.threads_ns is not None:
        return thread_times(a.threads_ns, b.threads_ns)
    if None in (a.run_ns, b.run_ns, a.run_delay_ns, b.run_delay_ns):
        return None
    return b.run_ns - a.run_ns, b.run_delay_ns - a.run_delay_ns  # type: ignore[operator]


def thread_times(a: Iterable[tuple[int, int, int]], b: Iterable[tuple[int, int, int]]) -> tuple[int, int]:
    """(run, run_delay) in ns between two per-thread schedstat readings `(tid, run, run_delay)`: the
    differences of the threads in both, the whole of a thread only in `b` (born between them)."""
    before = {tid: (run, delay) for tid, run, delay in a}
    ran = waited = 0
    for tid, run, delay in b:
        r0, d0 = before.get(tid, (0, 0))
        ran, waited = ran + run - r0, waited + delay - d0
    return ran, waited


def _share(ran: int, waited: int) -> float | None:
    """run_delay / (run + run_delay); None under MIN_RUNNABLE_NS of runnable time (too little to judge)."""
    if ran < 0 or waited < 0 or ran + waited < MIN_RUNNABLE_NS:
        return None
    return waited / (ran + waited)


def _cgroup_usage_us() -> int | None:
    """usage_usec of this process's cgroup (v2), None where it cannot be read."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            hid, _, path = line.split(":", 2)
            if hid == "0":
                stat = (CGROUP_ROOT / path.strip().lstrip("/") / "cpu.stat").read_text()
                return cgroup_usage(stat)
    except (OSError, ValueError):
        pass
    return None


def cgroup_usage(cpu_stat: str) -> int | None:
    """usage_usec of a cgroup v2 cpu.stat text."""
    for line in cpu_stat.splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            return int(value)
    return None


def quota_others_cores(a: CpuSnapshot, b: CpuSnapshot) -> float | None:
    """Cores of its CPU quota the other processes of this process's own cgroup used between two
    snapshots: under a quota they, not the node's other tenants, are what our threads wait for (None
    where the cgroup's usage cannot be read)."""
    wall = b.wall - a.wall
    if wall <= 0 or None in (a.cgroup_usage_us, b.cgroup_usage_us, a.own_ticks, b.own_ticks):
        return None
    cgroup = (b.cgroup_usage_us - a.cgroup_usage_us) / 1e6  # type: ignore[operator]
    own = (b.own_ticks - a.own_ticks) / CLK_TCK  # type: ignore[operator]
    return max(0.0, (cgroup - own) / wall)


def others_busy_cores(a: CpuSnapshot, b: CpuSnapshot) -> float | None:
    """Cores of ours (the affinity mask) the other processes kept busy between two snapshots (None where
    /proc is not available, or where the mask changed between them: their ticks are of other CPUs).

    The mask's busy ticks are capped at the ticks its CPUs had in the window (`busy_cpus` x seconds x
    CLK_TCK) before our own are taken out: /proc/stat's counters advance in whole ticks (10 ms) and each
    field is truncated when read, so a short window can read a tick or more beyond its length per CPU
    (21 busy ticks in a 0.2 s window on 1 CPU read 1.047 cores; 2.015 on 2), more than the CPUs could be
    busy. The cap takes out only what no CPU could have done: the others and our threads together never
    read more than the mask, and a busy mask still reads all of it less our own. Whether our threads
    waited for a CPU is measured apart (`wait_share`), not from this."""
    wall = b.wall - a.wall
    if wall <= 0 or None in (a.busy_ticks, b.busy_ticks, a.own_ticks, b.own_ticks):
        return None
    if a.busy_cpus != b.busy_cpus:
        return None
    busy = b.busy_ticks - a.busy_ticks  # type: ignore[operator]
    if b.busy_cpus is not None:
        busy = min(busy, b.busy_cpus * wall * CLK_TCK)
    others = busy - (b.own_ticks - a.own_ticks)  # type: ignore[operator]
    return max(0.0, others / CLK_TCK / wall)


def choose_threads(
    cpus: float, others: float | None, *, mask: float | None = None, quota_others: float | None = None
) -> int:
    """Threads for torch: the cores of the mask the other processes leave idle (rounded to the nearest
    core), at most `cpus` (the mask capped by the cgroup quota), at least 1. `others` is measured over
    the mask, so it is compared with the mask (`mask`, `cpus` where not given): under a quota without a
    cpuset the mask is the whole node, and its other tenants' load is not taken from the quota; what the
    other processes of our own cgroup use (`quota_others`) is, since they share it with our threads.
    Without a measurement of the others, the load average stands in for it."""
    if others is None:
        try:
            others = os.getloadavg()[0]
        except OSError:
            others = 0.0
    free = (cpus if mask is None else mask) - others
    if quota_others is not None:
        free = min(free, cpus - quota_others)
    return max(1, min(int(math.floor(cpus)), int(math.floor(free + 0.5))))


def is_overloaded(
    others: float,
    threads: int,
    limits: CpuLimits,
    quota_others: float | None = None,
    waited: float | None = None,
) -> bool:
    """Our threads waited for a core. Measured where the kernel says (`waited`, the `wait_share`): more
    than WAIT_SHARE_LIMIT of their runnable time; else inferred: the others and our threads need more
    cores than the mask has. Either way also when our threads and the other processes of our cgroup
    (`quota_others`) need more CPU than the quota gives (each with OVERLOAD_MARGIN_CORES of slack)."""
    if waited is not None:
        over_mask = waited > WAIT_SHARE_LIMIT
    else:
        over_mask = others + threads > limits.mask + OVERLOAD_MARGIN_CORES
    over_quota = (
        limits.quota is not None and threads + (quota_others or 0.0) > limits.quota + OVERLOAD_MARGIN_CORES
    )
    return over_mask or over_quota


def apply_thread_policy(sample_seconds: float = 0.2) -> dict[str, Any]:
    """Measure the other processes for a moment, then set torch's intra-op threads accordingly."""
    import torch

    others, quota_others = _others_now(sample_seconds)
    limits = cpu_limits()
    shared = quota_others if limits.quota is not None else None
    threads = choose_threads(limits.cpus, others, mask=limits.mask, quota_others=shared)
    cap = omp_threads_cap()
    out: dict[str, Any] = {"cpus": limits.cpus, "threads": threads, "others_busy_cores": _rounded(others)}
    if cap is not None and cap < threads:  # the user (or a test runner) asked for at most this many
        out |= {"threads": cap, "capped_by": f"OMP_NUM_THREADS={cap}"}
    torch.set_num_threads(out["threads"])
    return out


def omp_threads_cap(environ: Any = None) -> int | None:
    """OMP_NUM_THREADS as a whole number >= 1 (its first entry: OpenMP allows a nested list "2,1"), the
    most threads the automatic choice may take; None where it is unset or not a count."""
    text = (os.environ if environ is None else environ).get("OMP_NUM_THREADS", "")
    try:
        n = int(text.split(",")[0].strip())
    except ValueError:
        return None
    return n if n >= 1 else None


def set_threads(requested: int | None, sample_seconds: float = 0.2) -> dict[str, Any]:
    """torch's intra-op threads for a benchmark: `requested` as given (a `--threads N`), or None for the
    policy above. Either way the other processes are measured first, so the record says what the host
    was doing when the count was set: `{"requested": "auto" | N, "cpus", "threads", "others_busy_cores"}`."""
    if requested is None:
        return {"requested": "auto", **apply_thread_policy(sample_seconds)}
    if requested < 1:
        raise ValueError(f"threads must be >= 1, got {requested}")
    import torch

    others, _ = _others_now(sample_seconds)
    torch.set_num_threads(requested)
    return {
        "requested": requested,
        "cpus": available_cpus(),
        "threads": requested,
        "others_busy_cores": _rounded(others),
    }


@contextmanager
def threads_restored() -> Iterator[None]:
    """torch's intra-op thread count as the block found it, restored after whatever the block set (the
    thread policy of a library call: a caller's count is the caller's). Also a decorator:
    `@threads_restored()` on a function that applies the policy."""
    import torch

    prev = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(prev)


@contextmanager
def threads_for(requested: int | None = None) -> Iterator[dict[str, Any]]:
    """torch's intra-op threads for the block (`set_threads`: `requested`, or None for the CPUs really
    free), the previous count restored after; yields `set_threads`'s record."""
    with threads_restored():
        yield set_threads(requested)


def _others_now(sample_seconds: float) -> tuple[float | None, float | None]:
    """Cores of ours the other processes keep busy over the next `sample_seconds`: on the mask, and of
    our own cgroup (`quota_others_cores`)."""
    a = snapshot()
    time.sleep(sample_seconds)
    b = snapshot()
    return others_busy_cores(a, b), quota_others_cores(a, b)


def _rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


@dataclass(frozen=True)
class HostLoad:
    """What the host did while a piece of work ran."""

    cpus: float
    threads: int
    seconds: float
    others_busy_cores: float | None  # mean cores used by other processes during the work
    cpu_pressure: float | None  # share of the time some task waited for a CPU (PSI "some")
    loadavg: tuple[float, float, float] | None
    # wait_share > WAIT_SHARE_LIMIT (0.25) where schedstat measures it, else others_busy_cores + threads >
    # the mask's cores + OVERLOAD_MARGIN_CORES (0.5); or threads > the cgroup quota + 0.5 (`is_overloaded`;
    # without a quota the mask is `cpus`)
    overloaded: bool
    # share of our threads' runnable time spent waiting for a CPU (None: no schedstat, or too short); for
    # an endpoint served by other processes here (`EndpointMeter`), their threads' share
    wait_share: float | None = None
    # an endpoint served by other processes on this host: the cores they used while it answered, the
    # arm's own work (not in others_busy_cores); None for work in this process
    endpoint_busy_cores: float | None = None
    # why an endpoint's processes were not measured ("endpoint process not visible ..."); None otherwise
    endpoint_note: str | None = None
    # an endpoint's answer timed concurrently: the most of its arm's answers in flight at once during it
    # (itself included); its endpoint_busy_cores are its share of the server's CPU, its wait_share the
    # share of the server's CPUs the other processes took (`crowded_share`). None: timed alone
    endpoint_in_flight: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The record; the endpoint fields only where set (a timing in this process has none)."""
        out = asdict(self)
        endpoint = ("endpoint_busy_cores", "endpoint_note", "endpoint_in_flight")
        return {k: v for k, v in out.items() if v is not None or k not in endpoint}


class HostLoadMeter:
    """`with HostLoadMeter() as m: ...; m.load` -> HostLoad of the block."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads
        self.load: HostLoad | None = None

    def __enter__(self) -> HostLoadMeter:
        self._start = snapshot()
        return self

    def __exit__(self, *exc: object) -> None:
        end = snapshot()
        self.load = measure(self._start, end, threads=self.threads)


@dataclass(frozen=True)
class ProcessesSnapshot:
    """Other processes at one moment (the server of an endpoint on this host and its workers): each one's
    CPU ticks (`(pid, utime + stime)`), each of their threads' schedstat (`(tid, run, run_delay)`, ns;
    None without schedstat), and whether one of them spends this process's CPU quota (`shares_quota`)."""

    ticks: tuple[tuple[int, int], ...]
    threads_ns: tuple[tuple[int, int, int], ...] | None
    shares_cgroup: bool = False
    # the CPUs they may run on (the union of their affinity masks) and the busy ticks of /proc/stat over
    # those CPUs: what the other processes took of the server's CPUs (`others_on_server_cpus`)
    cpus: frozenset[int] | None = None
    cpus_busy_ticks: int | None = None


def processes_snapshot(pids: Iterable[int]) -> ProcessesSnapshot:
    ticks, threads, shares = [], [], False
    cpus: set[int] = set()
    try:
        ours = Path("/proc/self/cgroup").read_text()
    except OSError:
        ours = None
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            after = stat[stat.rindex(")") + 2 :].split()
            ticks.append((pid, int(after[11]) + int(after[12])))
            shares = shares or (
                ours is not None and shares_quota(ours, Path(f"/proc/{pid}/cgroup").read_text())
            )
            cpus |= os.sched_getaffinity(pid) if hasattr(os, "sched_getaffinity") else set()
        except (OSError, ValueError, IndexError):
            continue  # ended meanwhile
        threads += _thread_schedstat(pid) or ()
    busy = None
    if cpus:
        try:
            busy = busy_ticks(Path("/proc/stat").read_text(), cpus)
        except (OSError, ValueError, IndexError):
            pass
    return ProcessesSnapshot(tuple(ticks), tuple(threads) or None, shares, frozenset(cpus) or None, busy)


def others_on_server_cpus(a: ProcessesSnapshot, b: ProcessesSnapshot) -> float | None:
    """CPU seconds the other processes (this one among them) ran on the server's CPUs between two of its
    snapshots: the CPUs' busy ticks less the server's own; None where the CPUs are not known or changed."""
    if a.cpus is None or a.cpus != b.cpus or a.cpus_busy_ticks is None or b.cpus_busy_ticks is None:
        return None
    before = dict(a.ticks)
    server = sum(max(0, t - before.get(pid, 0)) for pid, t in b.ticks)
    return max(0, b.cpus_busy_ticks - a.cpus_busy_ticks - server) / CLK_TCK


def crowded_share(ran_ns: float, waited_ns: float, others_ns: float) -> float | None:
    """The share of the CPU the server could have had that the other processes took, for answers timed
    concurrently: its threads also waited for EACH OTHER (4 answers in flight on one CPU read a wait share
    of 0.53 where one at a time read 0.05), so their waiting only bounds the others' part, which is at most
    the time the others ran on the server's CPUs (`others_ns`): min(others, waited) / (ran + that). One
    thread alone, waiting only while the others ran, reads its wait share. None under MIN_RUNNABLE_NS."""
    taken = max(0.0, min(others_ns, waited_ns))
    if ran_ns < 0 or ran_ns + taken < MIN_RUNNABLE_NS:
        return None
    return taken / (ran_ns + taken)


def segment_cpu_s(a: ProcessesSnapshot, b: ProcessesSnapshot) -> float:
    """CPU seconds the processes ran between two snapshots: their threads' schedstat run time where both
    have it (nanoseconds), else their ticks."""
    if a.threads_ns is not None and b.threads_ns is not None:
        return thread_times(a.threads_ns, b.threads_ns)[0] / 1e9
    before = dict(a.ticks)
    return sum(max(0, t - before.get(pid, 0)) for pid, t in b.ticks) / CLK_TCK


class InFlight:
    """The answers of one endpoint in flight at once (an arm's `max_concurrency` > 1): every start and end
    of an answer takes a snapshot of the server (`take`), and the server's CPU between two of them is split
    evenly among the answers in flight then, so each is charged in proportion to its overlap with the
    others (each one's meter read the server's CPU for every answer in flight: 4 in flight, up to 4
    answers' work). `begin` -> (key, snapshot); `end(key)` -> (snapshot, CPU seconds charged, the most
    answers in flight at once during it, itself included)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: ProcessesSnapshot | None = None
        self._open: dict[int, list[float]] = {}  # key -> [CPU seconds charged, most in flight]
        self._next = 0

    def begin(self, take: Callable[[], ProcessesSnapshot]) -> tuple[int, ProcessesSnapshot]:
        with self._lock:
            snap = self._advance(take())
            key, self._next = self._next, self._next + 1
            self._open[key] = [0.0, 0]
            for entry in self._open.values():
                entry[1] = max(entry[1], len(self._open))
            return key, snap

    def end(self, key: int, take: Callable[[], ProcessesSnapshot]) -> tuple[ProcessesSnapshot, float, int]:
        with self._lock:
            snap = self._advance(take())
            charged, most = self._open.pop(key)
            return snap, charged, int(most)

    def _advance(self, snap: ProcessesSnapshot) -> ProcessesSnapshot:
        if self._last is not None and self._open:
            share = segment_cpu_s(self._last, snap) / len(self._open)
            for entry in self._open.values():
                entry[0] += share
        self._last = snap
        return snap


def processes_busy_cores(a: ProcessesSnapshot, b: ProcessesSnapshot, wall: float) -> float:
    """Cores the processes used between two snapshots (a process born between them: its whole life)."""
    before = dict(a.ticks)
    ticks = sum(max(0, t - before.get(pid, 0)) for pid, t in b.ticks)
    return ticks / CLK_TCK / max(wall, 1e-9)


def _host_side(
    start: CpuSnapshot, end: CpuSnapshot, wall: float, others: float | None
) -> tuple[dict[str, Any], float]:
    """What a timing records of the host around it, as HostLoad's fields: the wall seconds, the CPU
    pressure share (PSI "some", None without it) and the load average; and the others' busy cores the
    overload rule reads (the 1-minute load average standing in where /proc/stat could not be read)."""
    pressure = None
    if start.psi_some_us is not None and end.psi_some_us is not None:
        pressure = min(1.0, (end.psi_some_us - start.psi_some_us) / 1e6 / wall)
    load = loadavg()
    busy = others if others is not None else (load[0] if load else 0.0)
    recorded = {
        "seconds": wall,
        "cpu_pressure": _rounded(pressure),
        "loadavg": tuple(load) if load else None,
    }
    return recorded, busy


def measure_endpoint(
    start: CpuSnapshot,
    end: CpuSnapshot,
    served: tuple[ProcessesSnapshot, ProcessesSnapshot] | None,
    *,
    threads: int = 1,
    note: str | None = None,
    charged_s: float | None = None,
    in_flight: int = 1,
    limits: CpuLimits | None = None,
) -> HostLoad:
    """The load while an endpoint served by other processes on this host answered (`served`: their
    snapshots around the answer; None where they could not be seen, `note` says why). This process only
    waits for the answer, so its threads' few milliseconds of runnable time say nothing of the answer's
    slowing (an idle host read wait shares of 0.19-0.26 from them), and the server's CPU is the arm's own
    work, not the others' load (counted as the others', a server busy on both cores of an idle two-core
    host flagged 3 of 8 answers). So:

    - the server's threads' wait share decides where they were runnable at least `ANSWER_FLOOR_SHARE` of
      the answer's wall time (WAIT_SHARE_LIMIT); else (a server that mostly sleeps, no schedstat) the
      inferred rule with the server's cores (rounded, at least 1) as the threads and the others less the
      server;
    - our own threads' wait share counts only where they ran at least `ANSWER_FLOOR_SHARE` of the answer's
      wall time (the client's own work a real part of its latency): else their waiting is noise, or the
      server's own work preempting them on a shared CPU;
    - with the server not visible, only our own threads (with that floor) and the quota rule judge: the
      others' cores would include the server's own work;
    - where the inferred rule flags while the server's threads were runnable under that floor (it hardly
      ran: the process listening on the port is a forwarder, the model server another process), it is
      judged as not visible and `NOT_THE_SERVER` is the note: the others' cores may be the real server's.
    - an answer timed with others of its arm in flight (`in_flight` > 1, `InFlight`): the server's CPU in
      the window served them all, so the answer records its share (`charged_s`, split by overlap); and its
      threads also waited for each other (4 answers on one CPU, no other process able to take it: wait
      share 0.53, 19 of 20 flagged; one at a time 0.05), so the share of the server's CPUs the other
      processes took decides (`crowded_share`), or without the server's CPUs' ticks the inferred rule.
    The quota rule (`limits.quota`, this process's cgroup CPU quota) counts the server's CPU where the server
    spends that quota (`ProcessesSnapshot.shares_cgroup`, `shares_quota`: in the cgroup holding it or
    below); a server in another cgroup (its own container's quota) spends another budget: its CPU is not
    taken from ours, and our quota judges our side only (this process's client thread and the rest of our
    cgroup), as for a server not visible."""
    limits = cpu_limits() if limits is None else limits
    wall = max(end.wall - start.wall, 1e-9)
    others = others_busy_cores(start, end)
    quota_others = quota_others_cores(start, end)
    own = _own_wait_share(start, end, ANSWER_FLOOR_SHARE * wall * 1e9)
    own_over = own is not None and own > WAIT_SHARE_LIMIT
    host, busy = _host_side(start, end, wall, others)
    if served is None:
        # the mask's rule off (waited=0.0): the others' cores include the server's own work
        over = own_over or is_overloaded(0.0, threads, limits, quota_others, waited=0.0)
        cores = waited = None
    else:
        a, b = served
        cores = processes_busy_cores(a, b, wall)
        busy = max(0.0, busy - cores)
        others = None if others is None else max(0.0, others - cores)
        waited = None
        ran = delay = 0
        if a.threads_ns is not None and b.threads_ns is not None:
            ran, delay = thread_times(a.threads_ns, b.threads_ns)
            if ran + delay >= ANSWER_FLOOR_SHARE * wall * 1e9:
                if in_flight <= 1:
                    waited = _share(ran, delay)
                elif (taken := others_on_server_cpus(a, b)) is not None:
                    waited = crowded_share(ran, delay, taken * 1e9)
        threads = max(1, round(cores))
        quota = None if quota_others is None else max(0.0, quota_others - cores)
        if b.shares_cgroup:  # the server spends our quota: its cores are our threads there
            over = is_overloaded(busy, threads, limits, quota, waited)
        else:  # another budget: our quota judges our side only (one client thread and our cgroup's others)
            over = is_overloaded(busy, threads, replace(limits, quota=None), None, waited)
            over = over or is_overloaded(0.0, 1, limits, quota_others, waited=0.0)
        schedstat = a.threads_ns is not None and b.threads_ns is not None
        runnable_ns = ran + delay if schedstat else cores * wall * 1e9
        if over and waited is None and runnable_ns < ANSWER_FLOOR_SHARE * wall * 1e9:
            # flagged by the mask's rule from the others' cores while "the server" hardly ran: it did not
            # do the answer's work (a port forwarder listens for it), so the others' cores may be its
            # real server's: judged as not visible, and said
            over = is_overloaded(0.0, threads, limits, quota_others, waited=0.0)
            note = note or NOT_THE_SERVER
        over = over or own_over
        if in_flight > 1 and charged_s is not None:
            cores = charged_s / wall  # this answer's share; the whole server's is out of the others' above
    return HostLoad(
        cpus=limits.cpus,
        threads=threads,
        others_busy_cores=_rounded(others),
        **host,
        overloaded=over,
        wait_share=_rounded(waited if served is not None else own),
        endpoint_busy_cores=_rounded(cores),
        endpoint_note=note,
        endpoint_in_flight=in_flight if in_flight > 1 and served is not None else None,
    )


def _own_wait_share(a: CpuSnapshot, b: CpuSnapshot, min_run_ns: float) -> float | None:
    """Our threads' wait share where they ran at least `min_run_ns` between the snapshots, else None."""
    times = _own_times(a, b)
    return None if times is None or times[0] < min_run_ns else _share(*times)


NOT_VISIBLE = "endpoint process not visible: its answers' overload is judged from this process's threads only"
# an endpoint's processes seen at neither end or only one (a server restarted, or ended, during the answer)
SERVER_GONE = (
    "endpoint process not visible: the server's processes ended during the answer (restarted?), "
    "so it is judged from this process's threads only"
)
# `measure_endpoint`: the listening process hardly ran while the others' cores would flag the answer
NOT_THE_SERVER = (
    "endpoint process not visible: the process listening on the port did not do the work (a forwarder? "
    "ssh -L, kubectl port-forward, docker-proxy), so it is judged from this process's threads only"
)


class EndpointMeter:
    """`with EndpointMeter(pids) as m: ...; m.load` -> HostLoad of an endpoint's answer
    (`measure_endpoint`): `pids()` gives the processes serving it now (read at both ends, so a worker
    forked meanwhile counts); None where they cannot be seen (`note` says why). `in_flight`: the arm's
    answers in flight at once share the server's CPU (`InFlight`; one per arm). Where no process of
    them is seen at both ends (ended, restarted meanwhile) the answer is judged as not visible
    (`SERVER_GONE`), never as a server that used 0 cores."""

    def __init__(
        self,
        pids: Callable[[], Iterable[int]] | None,
        *,
        threads: int = 1,
        note: str | None = None,
        in_flight: InFlight | None = None,
    ) -> None:
        self.pids, self.threads, self.note, self.in_flight = pids, threads, note, in_flight
        self.load: HostLoad | None = None

    def _take(self) -> ProcessesSnapshot:
        assert self.pids is not None
        return processes_snapshot(self.pids())

    def __enter__(self) -> EndpointMeter:
        self._served = self._key = None
        if self.pids is not None and self.in_flight is not None:
            self._key, self._served = self.in_flight.begin(self._take)
        elif self.pids is not None:
            self._served = self._take()
        self._start = snapshot()
        return self

    def __exit__(self, *exc: object) -> None:
        end = snapshot()
        served, note, charged, most = None, self.note, None, 1
        if self.pids is not None and self._served is not None:
            if self.in_flight is not None and self._key is not None:
                last, charged, most = self.in_flight.end(self._key, self._take)
            else:
                last = self._take()
            served = (self._served, last)
            if not {pid for pid, _ in served[0].ticks} & {pid for pid, _ in served[1].ticks}:
                served, note = None, note or SERVER_GONE  # never silently 0 cores
        self.load = measure_endpoint(
            self._start, end, served, threads=self.threads, note=note, charged_s=charged, in_flight=most
        )


def pair_load(span: HostLoad, arms: Iterable[HostLoad]) -> HostLoad:
    """A pair's load from the meter around the whole pair (`span`) and each arm's own (`arms`): overloaded
    where the span is or where an arm's own threads waited (its wait share measured) over the limit;
    `wait_share` the most of them. A busy spell during one arm only is diluted by the other arm's quiet
    time over the span: a dense arm slowed 1.4x (wait share 0.29) beside a quiet sparse one read 0.21 for
    the pair, unflagged, and its speed-up 2.8x for a 2.0x kernel. An arm without a measured wait share
    (no schedstat, or under 2 ms runnable) adds nothing: the fallback rule's 10 ms ticks over a short
    arm are noise, so the span's judgement stands."""
    measured = [a for a in arms if a.wait_share is not None]
    waits = [w for w in (span.wait_share, *(a.wait_share for a in measured)) if w is not None]
    return replace(
        span,
        overloaded=span.overloaded or any(a.overloaded for a in measured),
        wait_share=max(waits, default=None),
    )


class Pair:
    """One timed pair of `PairMeter.pair`: `with pair.arm(): ...` around each arm's timed work meters
    that arm on its own; `pair()` after the block: False where the pair is to be timed again."""

    def __init__(self, threads: int | None) -> None:
        self.threads = threads
        self.arms: list[HostLoad] = []
        self.verdict: bool | None = None

    @contextmanager
    def arm(self) -> Iterator[None]:
        with HostLoadMeter(threads=self.threads) as meter:
            yield
        assert meter.load is not None
        self.arms.append(meter.load)

    def __call__(self) -> bool:
        assert self.verdict is not None, "the pair's verdict is known after its block"
        return self.verdict


class PairMeter:
    """The rule every paired timing follows (the evaluation's prefill pairs, the decode run pairs): the
    host's load while each pair ran (`HostLoadMeter`), and each arm's own where the caller meters its arms
    (`pair.arm()`; `pair_load`: the pair is overloaded where either arm is); a pair timed while the host
    was overloaded is timed again, at most `retries` times per measurement, and kept (flagged) after that.
    `record()` is what the measurement carries: threads, pairs timed, retimed and kept under overload, the
    most cores the others used and the most CPU pressure, the last load average."""

    def __init__(self, retries: int, threads: int | None = None) -> None:
        self.retries = retries
        self.threads = threads
        self.retimed = 0
        self.loads: list[dict[str, Any]] = []

    @contextmanager
    def pair(self) -> Iterator[Pair]:
        """`with m.pair() as keep: with keep.arm(): ...` per arm, then `keep()`: False where the pair is
        to be timed again."""
        pair = Pair(self.threads)
        with HostLoadMeter(threads=self.threads) as meter:
            yield pair
        assert meter.load is not None
        load = pair_load(meter.load, pair.arms)
        if load.overloaded and self.retimed < self.retries:
            self.retimed += 1
            pair.verdict = False
        else:
            self.loads.append(load.to_dict())
            pair.verdict = True

    def record(self) -> dict[str, Any]:
        busy = [x["others_busy_cores"] for x in self.loads if x["others_busy_cores"] is not None]
        pressure = [x["cpu_pressure"] for x in self.loads if x["cpu_pressure"] is not None]
        waits = [x["wait_share"] for x in self.loads if x.get("wait_share") is not None]
        return {
            "threads": self.loads[0]["threads"] if self.loads else None,
            "pairs_timed": len(self.loads),
            "pairs_retimed_for_overload": self.retimed,
            "pairs_kept_under_overload": sum(1 for x in self.loads if x["overloaded"]),
            "max_others_busy_cores": max(busy, default=None),
            "max_cpu_pressure": max(pressure, default=None),
            "max_wait_share": max(waits, default=None),
            "overloaded": any(x["overloaded"] for x in self.loads),
            "loadavg": self.loads[-1]["loadavg"] if self.loads else None,
        }


def host_totals(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """`PairMeter.record()`s of several measurements (one per length) summed: pairs timed, retimed and
    kept under overload, the most cores the others used."""
    records = list(records)
    busy = [h["max_others_busy_cores"] for h in records if h.get("max_others_busy_cores") is not None]
    waits = [h["max_wait_share"] for h in records if h.get("max_wait_share") is not None]
    return {
        "pairs_timed": sum(h.get("pairs_timed", 0) for h in records),
        "pairs_retimed_for_overload": sum(h.get("pairs_retimed_for_overload", 0) for h in records),
        "pairs_kept_under_overload": sum(h.get("pairs_kept_under_overload", 0) for h in records),
        "max_others_busy_cores": max(busy, default=None),
        "max_wait_share": max(waits, default=None),
    }


def measure(start: CpuSnapshot, end: CpuSnapshot, *, threads: int | None = None) -> HostLoad:
    if threads is None:
        try:
            import torch

            threads = torch.get_num_threads()
        except ImportError:
            threads = 1
    limits = cpu_limits()
    wall = max(end.wall - start.wall, 1e-9)
    others = others_busy_cores(start, end)
    host, busy = _host_side(start, end, wall, others)
    waited = wait_share(start, end)
    return HostLoad(
        cpus=limits.cpus,
        threads=threads,
        others_busy_cores=_rounded(others),
        **host,
        overloaded=is_overloaded(busy, threads, limits, quota_others_cores(start, end), waited),
        wait_share=_rounded(waited),
    )
