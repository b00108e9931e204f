"""The CPU the process really has, and how busy the rest of the host is: thread count and load record.

On a shared host torch's default (one thread per core) is a trap: with another process busy on one of two
cores, a SmolLM2 one-token forward took 627 ms with 2 threads and 96 ms with 1 (OpenMP threads spin waiting
for a descheduled partner). So threads are chosen from the CPUs this process may use (affinity and the
cgroup CPU quota, not os.cpu_count()) minus what other processes are using right now, and every timed
piece of work records the host's load while it ran, so a timing taken under overload can be flagged.

Linux /proc and /sys only; elsewhere the functions fall back to os.cpu_count() and os.getloadavg().
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# A batch is "overloaded" when it ran with more threads than the CPUs the other processes left free (the
# choice `choose_threads` would make now is fewer threads): our threads then waited for a core, and its
# latencies say more about the host than about the model.
OVERLOAD_MARGIN_CORES = 0.5


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


def available_cpus() -> float:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (v2 cpu.max or v1
    cfs_quota_us / cfs_period_us) where one is set."""
    mask = _affinity()
    cpus = float(len(mask)) if mask else float(os.cpu_count() or 1)
    quota = _cgroup_quota()
    return max(1.0, min(cpus, quota)) if quota else cpus


def _cgroup_quota() -> float | None:
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            return float(text[0]) / float(text[1])
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return quota / period
    except (OSError, ValueError):
        pass
    return None


@dataclass(frozen=True)
class CpuSnapshot:
    wall: float  # time.monotonic()
    busy_ticks: int | None  # the CPUs this process may run on (busy_ticks of /proc/stat)
    own_ticks: int | None  # this process, all threads (/proc/self/stat utime + stime)
    psi_some_us: int | None  # /proc/pressure/cpu "some" total: time some task waited for a CPU


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
    busy = own = psi = None
    try:
        busy = busy_ticks(Path("/proc/stat").read_text(), _affinity())
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
    return CpuSnapshot(time.monotonic(), busy, own, psi)


def others_busy_cores(a: CpuSnapshot, b: CpuSnapshot) -> float | None:
    """Cores of ours (the affinity mask) the other processes kept busy between two snapshots (None where
    /proc is not available)."""
    wall = b.wall - a.wall
    if wall <= 0 or None in (a.busy_ticks, b.busy_ticks, a.own_ticks, b.own_ticks):
        return None
    others = (b.busy_ticks - a.busy_ticks) - (b.own_ticks - a.own_ticks)
    return max(0.0, others / CLK_TCK / wall)


def choose_threads(cpus: float, others: float | None) -> int:
    """Threads for torch: the CPUs left after what the other processes use (rounded to the nearest core),
    at least 1. Without a measurement of the others, the load average stands in for it."""
    if others is None:
        try:
            others = os.getloadavg()[0]
        except OSError:
            others = 0.0
    return max(1, min(int(math.floor(cpus)), int(math.floor(cpus - others + 0.5))))


def apply_thread_policy(sample_seconds: float = 0.2) -> dict[str, Any]:
    """Measure the other processes for a moment, then set torch's intra-op threads accordingly."""
    import torch

    others = _others_now(sample_seconds)
    cpus = available_cpus()
    threads = choose_threads(cpus, others)
    torch.set_num_threads(threads)
    return {"cpus": cpus, "threads": threads, "others_busy_cores": _rounded(others)}


def set_threads(requested: int | None, sample_seconds: float = 0.2) -> dict[str, Any]:
    """torch's intra-op threads for a benchmark: `requested` as given (a `--threads N`), or None for the
    policy above. Either way the other processes are measured first, so the record says what the host
    was doing when the count was set: `{"requested": "auto" | N, "cpus", "threads", "others_busy_cores"}`."""
    if requested is None:
        return {"requested": "auto", **apply_thread_policy(sample_seconds)}
    if requested < 1:
        raise ValueError(f"threads must be >= 1, got {requested}")
    import torch

    others = _others_now(sample_seconds)
    torch.set_num_threads(requested)
    return {
        "requested": requested,
        "cpus": available_cpus(),
        "threads": requested,
        "others_busy_cores": _rounded(others),
    }


@contextmanager
def threads_for(requested: int | None = None) -> Iterator[dict[str, Any]]:
    """torch's intra-op threads for the block (`set_threads`: `requested`, or None for the CPUs really
    free), the previous count restored after; yields `set_threads`'s record."""
    import torch

    prev = torch.get_num_threads()
    try:
        yield set_threads(requested)
    finally:
        torch.set_num_threads(prev)


def _others_now(sample_seconds: float) -> float | None:
    """Cores of ours the other processes keep busy, over the next `sample_seconds`."""
    a = snapshot()
    time.sleep(sample_seconds)
    return others_busy_cores(a, snapshot())


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
    overloaded: bool  # others_busy_cores + threads > cpus + OVERLOAD_MARGIN_CORES (0.5)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def measure(start: CpuSnapshot, end: CpuSnapshot, *, threads: int | None = None) -> HostLoad:
    if threads is None:
        try:
            import torch

            threads = torch.get_num_threads()
        except ImportError:
            threads = 1
    cpus = available_cpus()
    wall = max(end.wall - start.wall, 1e-9)
    others = others_busy_cores(start, end)
    pressure = None
    if start.psi_some_us is not None and end.psi_some_us is not None:
        pressure = min(1.0, (end.psi_some_us - start.psi_some_us) / 1e6 / wall)
    load = loadavg()
    busy = others if others is not None else (load[0] if load else 0.0)
    return HostLoad(
        cpus=cpus,
        threads=threads,
        seconds=wall,
        others_busy_cores=_rounded(others),
        cpu_pressure=None if pressure is None else round(pressure, 3),
        loadavg=tuple(load) if load else None,  # type: ignore[arg-type]
        overloaded=busy + threads > cpus + OVERLOAD_MARGIN_CORES,
    )
