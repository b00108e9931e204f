"""`sparsepilot bench import`: the streaming observation import (rollout.pilot_batches.import_file) on
generated files of N rows, each size in a fresh process (so its peak RSS is its own) with a scratch
SPARSEPILOT_HOME: a use case on a tiny local model, a challenger, a pilot at its shadow step."""

from __future__ import annotations

import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rollout.bench_home import host_fields, in_fresh_processes, load_average, setup_home


def _request_ids(rows: int) -> list[str]:
    """rows/2 distinct requests: what a pilot's traffic source would hand out for such an import (a request
    is evidence once, so a large import is many distinct requests, never one request replayed)."""
    return [f"req-{i}" for i in range(rows // 2)]


def _write_observations(path: Path, ids: list[str]) -> None:
    """Every request in both arms (a shadow step)."""
    with path.open("w") as f:
        for i, rid in enumerate(ids):
            q = 0.5 + (i % 97) / 400
            f.write(
                f'{{"request_id": "{rid}", "arm": "control", "quality": {q:.4f}, '
                f'"latency_ms": {100 + i % 50}, "error": false, "tokens": 120}}\n'
                f'{{"request_id": "{rid}", "arm": "treatment", "quality": {q - 0.01:.4f}, '
                f'"latency_ms": {80 + i % 40}, "error": false, "tokens": 120}}\n'
            )


def _one(rows: int, chunk_rows: int, out: Any) -> None:
    from rollout.pilot_batches import import_file
    from sparse_core.host import HostLoadMeter

    home = Path(tempfile.mkdtemp(prefix="sparsepilot-bench-import-"))
    name = setup_home(home)
    ids = _request_ids(rows)
    path = home / "observations.jsonl"
    t = time.perf_counter()
    _write_observations(path, ids)
    write_s = time.perf_counter() - t
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    with HostLoadMeter(threads=1) as meter:  # the import is one thread of this process
        done = import_file(name, str(path), set(ids), chunk_rows=chunk_rows)
    seconds = time.perf_counter() - t
    out.put(
        {
            "rows": rows,
            "inserted": done["stored"]["inserted"],
            "file_mib": round(path.stat().st_size / 2**20, 1),
            "write_file_s": round(write_s, 1),
            "import_s": round(seconds, 1),
            "rows_per_s": round(rows / seconds),
            "peak_rss_mib_before_import": round(rss_before / 1024),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "chunk_rows": chunk_rows,
            "database": "sqlite",
            "torch_loaded": "torch" in __import__("sys").modules,
            **host_fields(meter.load),
        }
    )


def run_import_bench(
    sizes: list[int], chunk_rows: int = 50_000, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """One fresh process per size; `progress` hears each size's start and end."""
    calls = [(rows, chunk_rows) for rows in sizes]
    results = in_fresh_processes(_one, calls, progress, lambda a: f"import of {a[0]:,} rows")
    return {
        "results": results,
        "loadavg": load_average(),
        "targets": {"rows_per_s_at_1m": 1_000_000 / 60, "peak_rss_mib": 1024},
    }
