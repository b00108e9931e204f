"""A scratch SPARSEPILOT_HOME for the benches that time the state DB's paths (`bench import`, `bench
monitor`): a use case on a model that is only a config.json (no weights are read: these paths run no model),
a plan-less challenger and its calibration run."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from queue import Empty
from typing import Any

DATASET_ROWS = 200


def setup_home(home: Path, name: str = "bench-import") -> str:
    """A use case with a challenger and a calibration run in a fresh home; returns its name."""
    import yaml

    from rollout import runs
    from rollout.db import migrate
    from rollout.settings import configure_environment
    from rollout.usecases import add_usecase

    os.environ["SPARSEPILOT_HOME"] = str(home)
    os.environ.pop("SPARSEPILOT_DATABASE_URL", None)
    settings = configure_environment()
    migrate.upgrade(settings.database_url)
    # a model ref needs only its config.json to be checked (no weights are read at `usecase add`, and an
    # import runs no model): the bench process stays free of torch, as `sparsepilot pilot
    # --observations` is
    model = home / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 2048}))
    ids = [f"q{i}" for i in range(DATASET_ROWS)]
    (home / "data.jsonl").write_text(
        "".join(json.dumps({"id": i, "prompt": f"question {i}?", "reference": "yes"}) + "\n" for i in ids)
    )
    spec = {
        "name": name, "owner": "bench", "criticality": "low", "model": str(model),
        "dataset": {"path": str(home / "data.jsonl"), "task": "exact_match"},
        "traffic": {"requests_per_day": 1000, "prompt_tokens": {"p50": 20}, "output_tokens": {"p50": 8}},
        "latency_slo_ms": {"p95": 1000},
        "cost": {"gpu_usd_per_hour": 2.0, "utilisation": 0.5, "pilot_one_off_usd": 0},
        "rollout": {"shadow": {"min_samples": 10}, "steps": [{"traffic_pct": 50, "min_samples": 10}]},
        "gate": {"non_inferiority_margin": 0.05},
    }  # fmt: skip
    (home / "spec.yaml").write_text(yaml.safe_dump(spec))
    add_usecase(home / "spec.yaml", actor="bench")
    runs.record_unregistered_challenger(name, str(model), key="bench")
    return name


def in_fresh_processes(
    target: Callable[..., None],
    calls: Iterable[tuple],
    progress: Callable[[str], None] | None = None,
    describe: Callable[[tuple], str] = str,
) -> list[dict[str, Any]]:
    """`target(*args, queue)` for each `args` of `calls`, each in a process of its own (spawned, one after
    another: a size's peak RSS and its scratch home are its own); what each put on the queue, in order. A
    process that dies before it answers is a RuntimeError naming its arguments and exit code (its traceback
    is on stderr), not a wait for ever. `progress` hears each call's start and end (`describe(args)`)."""
    say = progress or (lambda _msg: None)
    ctx = mp.get_context("spawn")
    results = []
    for args in calls:
        say(f"{describe(args)}: started")
        t0 = time.perf_counter()
        queue = ctx.Queue()
        process = ctx.Process(target=target, args=(*args, queue))
        process.start()
        while True:
            try:
                results.append(queue.get(timeout=1.0))
                break
            except Empty:
                if not process.is_alive() and queue.empty():
                    raise RuntimeError(
                        f"the bench's process for {args} exited with code {process.exitcode} "
                        "before it answered"
                    ) from None
        process.join()
        say(f"{describe(args)}: done in {time.perf_counter() - t0:.1f} s")
    return results


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages, as numbers (`sparse_core.host.loadavg`; they were /proc/loadavg's
    strings)."""
    from sparse_core.host import loadavg

    return loadavg()


def host_fields(load: Any) -> dict[str, Any]:
    """What a size's row says of the host while it was timed (`load`: its `HostLoad`): the table's
    `others_busy_cores`, `overloaded` and `wait_share` (our threads' share of their runnable time spent
    waiting for a CPU, which decides the flag where measured), and the whole record as the other
    benchmarks keep it (`host_load`: CPU pressure, load averages)."""
    return {
        "others_busy_cores": load.others_busy_cores,
        "overloaded": load.overloaded,
        "wait_share": load.wait_share,
        "host_load": load.to_dict(),
    }
