"""`sparsepilot bench gate`: how long `decide` takes at 10k / 100k / 1M rows, and (with --simulate) the
table of false GO, power and sample size to GO that docs/gate.md carries. Returns plain rows; the CLI
prints the table and writes the JSON. Timings come with the host's load, measured before and after."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import pandas as pd

from rollout.gate.decide import decide
from rollout.gate.settings import GateSettings
from rollout.gate.simulation import DESIGNS, SCORE_MODELS, simulate
from sparse_core.host import loadavg

BENCH_SETTINGS = GateSettings(alpha=0.05, margin=0.03, min_samples_per_arm=100, latency_slo_ms=2000.0)


def observations(n_rows: int, mode: str, seed: int = 0) -> pd.DataFrame:
    """A realistic step: skewed scores, gamma latencies, rare errors; split at 50% or paired rows."""
    rng = np.random.default_rng(seed)
    if mode == "paired":
        n = n_rows // 2
        rid = np.repeat(np.char.add("req-", np.arange(n).astype(str)), 2)
        arm = np.tile(np.array(["control", "treatment"]), n)
    else:
        rid = np.char.add("req-", np.arange(n_rows).astype(str))
        arm = np.where(rng.random(n_rows) < 0.5, "treatment", "control")
    size = len(rid)
    return pd.DataFrame(
        {
            "request_id": rid,
            "arm": arm,
            "quality": rng.beta(8, 2, size),
            "latency_ms": rng.gamma(2.0, 150.0, size),
            "error": rng.random(size) < 0.002,
        }
    )


def time_decide(
    sizes: Sequence[int] = (10_000, 100_000, 1_000_000),
    modes: Sequence[str] = ("split", "paired"),
    repeats: int = 3,
) -> dict[str, Any]:
    rows = []
    load_before = loadavg()
    for mode in modes:
        for n in sizes:
            df = observations(n, mode)
            kw = {"mode": mode, "planned_treatment_share": 0.5 if mode == "split" else None}
            times, outcome = [], ""
            for _ in range(repeats):
                t0 = time.perf_counter()
                outcome = decide(df, BENCH_SETTINGS, **kw).outcome
                times.append(time.perf_counter() - t0)
            rows.append(
                {
                    "mode": mode,
                    "rows": n,
                    "best_s": round(min(times), 3),
                    "median_s": round(statistics.median(times), 3),
                    "outcome": outcome,
                    "target_s": 1.0 if n >= 1_000_000 else None,
                    "within_target": (min(times) <= 1.0) if n >= 1_000_000 else None,
                }
            )
    return {
        "rows": rows,
        "environment": {
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
            "cpu_count": os.cpu_count(),
        },
    }


def _scenario(args: tuple[str, str, int, int, int]) -> dict[str, Any]:
    design, scores, per_look, reps_null, reps_power = args
    s = BENCH_SETTINGS
    common = {"design": design, "scores": scores, "per_look": per_look, "looks": 10}
    null = simulate(s, truth=-s.margin, replications=reps_null, seed=1, **common)
    beyond = simulate(s, truth=-1.2 * s.margin, replications=reps_null // 2, seed=2, **common)
    power = simulate(s, truth=0.0, replications=reps_power, seed=3, **common)
    return {
        **common,
        "false_go_look1": null.go_by_look[0],
        "false_go_look5": null.go_by_look[4],
        "false_go_look10": null.go_by_look[9],
        "false_go_upper95": null.upper95[9],
        "false_go_1.2x_margin": beyond.go_by_look[9],
        "power_look10": power.go_by_look[9],
        "mean_requests_to_go": round(power.mean_units_to_go, 1),
        "replications": null.replications,
    }


def simulation_table(
    per_look: Sequence[int] = (8, 12, 20, 50, 200),
    replications: int = 1000,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """False GO (truth = -margin, and -1.2 x margin), power at truth 0 and mean requests (pairs) to GO,
    for every design and score model of `rollout.gate.simulation`, 10 looks of `per_look` each."""
    jobs = [
        (d, s, n, replications, max(100, replications // 2))
        for d in DESIGNS
        for s in SCORE_MODELS
        for n in per_look
    ]
    rows: list[dict[str, Any]] = []
    load_before = loadavg()
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        for row in pool.map(_scenario, jobs):
            rows.append(row)
            if progress:
                progress(len(rows), len(jobs))
    return {
        "settings": BENCH_SETTINGS.to_dict(),
        "rows": rows,
        "environment": {
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
            "cpu_count": os.cpu_count(),
        },
    }
