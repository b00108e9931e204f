"""What every benchmark reports the same way: the machine it ran on (with the host load before and
after, and what the other processes did while it ran, since the machine is shared), its wall and CPU
time, and its figures."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparse_core.host import CpuSnapshot, HostLoad, loadavg, measure, snapshot
from sparse_core.kernels import synchronize

DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # the benchmarks' --dtype(s) names


def bench_device(name: str | torch.device = "auto") -> torch.device:
    """Where a benchmark runs: ``auto`` is the CUDA device when torch sees one, else the CPU; asking
    for ``cuda`` without one is an error rather than a silent CPU run."""
    if isinstance(name, torch.device):
        return name
    if name not in DEVICES:
        raise ValueError(f"device {name!r}: choose one of {', '.join(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda': torch sees no CUDA device (torch.cuda.is_available() is False)")
    return torch.device(name)


def prefill_repeats(device: torch.device) -> int:
    """Timed prefills per point, the best kept: one on the CPU (seconds each), five on CUDA
    (milliseconds each, where one run is noise)."""
    return 1 if device.type == "cpu" else 5


def environment(
    load_before: list[float] | None = None, host_load: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The machine and the load around a benchmark; `host_load` (`sparse_core.host.HostLoad` as a dict)
    is what the other processes did during it: the mean cores they kept busy on this process's CPUs
    (`affinity`: which those were),
    the share of time some task waited for a CPU, and whether the threads used then outnumbered the
    CPUs left free (`overloaded`)."""
    cuda = torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        # the CPUs this process may run on (its affinity: taskset, a cpuset); fewer than cpu_count: pinned
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cuda": cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "cuda_version": torch.version.cuda,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "host_load": host_load,
    }


def load_fields(*loads: HostLoad) -> dict[str, Any]:
    """A result row's host record: the most cores the other processes kept busy during its timings, and
    whether any of them ran overloaded (`sparse_core.host.HostLoadMeter` around each timing)."""
    busy = [x.others_busy_cores for x in loads if x.others_busy_cores is not None]
    return {"others_busy_cores": max(busy) if busy else None, "overloaded": any(x.overloaded for x in loads)}


def fit_cache_lengths(
    lengths: Sequence[int], context: int | None, new_tokens: int, *, asked: bool, what: str
) -> tuple[tuple[int, ...], dict[int, int]]:
    """The cache lengths a decode benchmark runs at, and those shortened to get there ({length: run at}).
    A length's prompt fills the cache, then `new_tokens` are generated after it: both must fit the
    model's `context` positions (max_position_embeddings). Lengths the user asked for (`asked`) are
    never shortened: one that does not fit is a ValueError naming `what`, the lengths and the context.
    The mode's defaults are shortened to fit (8,192 on SmolLM2's 8,192 positions with 64 new tokens:
    8,128), and the caller says so beside the figures. `context` None (not known): as given."""
    if not context:
        return tuple(lengths), {}
    room = context - new_tokens
    if room < 1:
        raise ValueError(
            f"{new_tokens:,} new tokens fill the model's {context:,} positions (max_position_embeddings): "
            "no room for a cache before them"
        )
    over = [x for x in lengths if x > room]
    if over and asked:
        raise ValueError(
            f"{what}: {', '.join(f'{x:,}' for x in over)} tokens + {new_tokens:,} new tokens exceed the "
            f"model's {context:,} positions (max_position_embeddings): give {what} <= {room:,}"
        )
    return tuple(sorted({min(x, room) for x in lengths})), {x: room for x in over}


@dataclass
class RunClock:
    """Started when a benchmark starts; `summary()` is the tail of its result, with the host's load over
    the whole run."""

    load_before: list[float] = field(default_factory=loadavg)
    started: float = field(default_factory=time.perf_counter)
    cpu_started: float = field(default_factory=time.process_time)
    host_started: CpuSnapshot = field(default_factory=snapshot)

    def summary(self) -> dict[str, Any]:
        host_load = measure(self.host_started, snapshot()).to_dict()
        return {
            "environment": environment(self.load_before, host_load),
            "wall_seconds": time.perf_counter() - self.started,
            # CPU time of this process (all threads): on a shared machine wall time overstates the cost
            "cpu_seconds": time.process_time() - self.cpu_started,
        }


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# the gid of a figure's overload caption (`note_overload`): `save_figure` leaves room for it under the plots
OVERLOAD_NOTE = "overload-note"
OVERLOAD_LABEL = "timed under overload"


def circle_overloaded(ax: Any, points: Sequence[tuple[float, float]]) -> None:
    """Red circles around the (x, y) points of rows timed while the host was overloaded, labelled once
    per axes for its legend: a figure is shared without its table, so its points say it themselves."""
    if points:
        xs, ys = zip(*points, strict=True)
        ax.scatter(
            xs, ys, s=150, facecolors="none", edgecolors="red", linewidths=1.3, zorder=5, label=OVERLOAD_LABEL
        )


def note_overload(fig: Any, env: dict[str, Any], rows: Sequence[dict[str, Any]], what: str) -> str | None:
    """The caption under a figure of timed `rows` when the run (`env["host_load"]`) or some of its rows were
    timed while the host was overloaded, as the command's closing warning says it; None (no caption) on a
    host that had room. `what` the figure's figures are: "speed-ups" or "times"."""
    over = sum(1 for r in rows if r.get("overloaded"))
    if (env.get("host_load") or {}).get("overloaded"):
        text = f"the host was overloaded during this run: its {what} measure the host as much as the code"
    elif over:
        text = (
            f"{over} of {len(rows)} points were timed while the host was overloaded (circled in red): their "
            f"{what} measure the host as much as the code"
        )
    else:
        return None
    fig.text(0.5, 0.01, text, ha="center", va="bottom", fontsize=8, color="red", wrap=True, gid=OVERLOAD_NOTE)
    return text


def save_figure(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    noted = any(t.get_gid() == OVERLOAD_NOTE for t in fig.texts)
    fig.tight_layout(rect=(0, 0.07, 1, 1) if noted else None)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


__all__ = [
    "DEVICES",
    "DTYPES",
    "RunClock",
    "bench_device",
    "circle_overloaded",
    "environment",
    "fit_cache_lengths",
    "load_fields",
    "note_overload",
    "prefill_repeats",
    "pyplot",
    "save_figure",
    "synchronize",
]
