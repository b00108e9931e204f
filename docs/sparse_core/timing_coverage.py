"""Raw timings for the speed-up intervals' coverage on a busy host (docs/sparse_core.md, "Speed-up
intervals on a busy host").

SmolLM2-135M, one torch thread, pinned by the caller (taskset). A second process on the same CPU plays
another engineer's job: busy and idle in turns of random length (exponential, means 4 s and 6 s). It
records, in alternating order (dense first on even pairs, sparse first on odd ones):
- `prefill`: pairs of whole-model prefills of one 2,048-token window, dense and under a pooled plan;
- `decode`: pairs of 16-token decode runs from one 2,048-token cache (PagedCache in both arms, as the
  evaluation times them), dense and under a Quest plan of 512 tokens; every step's time is kept.
Each timing carries the host's load while it ran.

`analyse` then asks of every window of consecutive pairs (what one evaluation would have timed, starting
on a dense-first pair as the evaluation does) whether its interval holds the speed-up of all the pairs
together: the paired t interval now used (`sparse_core.speedup`) against the intervals used before
(a row's 90% percentile bootstrap of the median ratio, the ROI's 95% Welch interval on the mean times,
decode's 90% bootstrap over steps). It also tests for an order effect (dense-first against sparse-first
pairs). Windows overlap, so the coverage is descriptive; the simulation in tests/sparse_core/
test_speedup.py decides the claims.

    OMP_NUM_THREADS=1 taskset -c 1 python docs/sparse_core/timing_coverage.py collect RAW.json [40 150]
    python docs/sparse_core/timing_coverage.py analyse RAW.json SUMMARY.json
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import subprocess
import sys
import time

import torch

from sparse_core import DecodePlan, SparsePlan, sparsify, unsparsify
from sparse_core.corpus import timing_window
from sparse_core.decode.measure import as_paged, prefill, run_decode
from sparse_core.evaluation import _time_prefill
from sparse_core.host import HostLoadMeter
from sparse_core.loading import ensure_builtin, load_model

BURNER = """
import random, time
rng = random.Random(1)
while True:
    end = time.time() + rng.expovariate(1 / 4.0)
    while time.time() < end:
        sum(i * i for i in range(10000))
    time.sleep(rng.expovariate(1 / 6.0))
"""


def main(out: str, prefill_pairs: int = 40, decode_pairs: int = 120) -> None:
    torch.set_num_threads(1)
    model, tok = load_model(ensure_builtin("smollm2-135m"), dtype=torch.float32)
    model.eval()
    ids = torch.tensor([timing_window(tok, 2048)])
    prefill_plan = SparsePlan(tau=0.9)
    decode_plan = SparsePlan(decode=DecodePlan(page_size=16, budget_tokens=512))
    cpu = sorted(os.sched_getaffinity(0))
    burner = subprocess.Popen(["taskset", "-c", ",".join(map(str, cpu)), sys.executable, "-c", BURNER])
    record: dict = {"cpus": cpu, "threads": 1, "started": time.time(), "prefill": [], "decode": []}
    try:
        for arm in (False, True):  # warm-up, untimed
            if arm:
                sparsify(model, prefill_plan)
            _time_prefill(model, ids)
            unsparsify(model)
        for i in range(prefill_pairs):
            order = ("dense", "sparse") if i % 2 == 0 else ("sparse", "dense")
            row: dict = {"order": order}
            for arm in order:
                if arm == "sparse":
                    sparsify(model, prefill_plan)
                with HostLoadMeter(threads=1) as m:
                    row[arm] = _time_prefill(model, ids)
                unsparsify(model)
                row[arm + "_load"] = m.load.to_dict()
            record["prefill"].append(row)
            print(f"prefill {i + 1}/{prefill_pairs}: {row['dense']:.2f} / {row['sparse']:.2f} s", flush=True)
        cache, first = prefill(model, ids)
        paged = as_paged(cache)
        del cache
        for i in range(decode_pairs):
            order = ("dense", "sparse") if i % 2 == 0 else ("sparse", "dense")
            row = {"order": order}
            for arm in order:
                if arm == "sparse":
                    sparsify(model, decode_plan)
                with HostLoadMeter(threads=1) as m:
                    run = run_decode(model, paged, first, 17)
                unsparsify(model)
                row[arm] = run.step_seconds[1:]
                row[arm + "_load"] = m.load.to_dict()
            record["decode"].append(row)
            if (i + 1) % 10 == 0:
                print(f"decode {i + 1}/{decode_pairs}", flush=True)
    finally:
        burner.kill()
    record["finished"] = time.time()
    with open(out, "w") as f:
        json.dump(record, f)


def _bootstrap_median_ratio(d: list[float], s: list[float], rng: random.Random, n: int = 2000) -> tuple:
    """The interval a prefill row and a decode comparison reported before: 90% percentile bootstrap of
    median(dense) / median(sparse), each arm resampled on its own."""
    vals = sorted(
        statistics.median(rng.choices(d, k=len(d))) / statistics.median(rng.choices(s, k=len(s)))
        for _ in range(n)
    )
    return vals[int(0.05 * (n - 1))], vals[int(0.95 * (n - 1))]


def _welch_log_ratio(d: list[float], s: list[float], confidence: float = 0.95) -> tuple:
    """The ROI's interval before: the ratio of mean times, delta-method t interval on its log, Welch dof."""
    from scipy import stats

    md, ms = statistics.fmean(d), statistics.fmean(s)
    a, b = statistics.variance(d) / (len(d) * md**2), statistics.variance(s) / (len(s) * ms**2)
    se = math.sqrt(a + b)
    if se == 0:
        return md / ms, md / ms
    dof = (a + b) ** 2 / (a**2 / (len(d) - 1) + b**2 / (len(s) - 1))
    q = float(stats.t.ppf(0.5 + confidence / 2, dof))
    return md / ms * math.exp(-q * se), md / ms * math.exp(q * se)


def _coverage(windows: list[tuple[float, float]], truth: float) -> dict:
    hits = [lo <= truth <= hi for lo, hi in windows]
    widths = sorted(hi / lo for lo, hi in windows)
    return {"coverage": sum(hits) / len(hits), "windows": len(hits), "median_width": widths[len(widths) // 2]}


def _order_effect(pairs: list[tuple[str, float, float]]) -> dict:
    """Mean log(dense / sparse) of dense-first against sparse-first pairs (Welch t-test)."""
    from scipy import stats

    first = [math.log(d / s) for o, d, s in pairs if o == "dense"]
    second = [math.log(d / s) for o, d, s in pairs if o == "sparse"]
    t = stats.ttest_ind(first, second, equal_var=False)
    return {
        "dense_first_speedup": math.exp(statistics.fmean(first)),
        "sparse_first_speedup": math.exp(statistics.fmean(second)),
        "p_value": float(t.pvalue),
    }


def analyse(raw: str, out: str) -> None:
    from sparse_core.speedup import ARMS, paired_speedup

    rec = json.load(open(raw))
    rng = random.Random(0)
    summary: dict = {"source": raw, "prefill": {}, "decode": {}}
    pre = [(r["order"][0], r["dense"], r["sparse"]) for r in rec["prefill"]]
    dec = [(r["order"][0], r["dense"], r["sparse"]) for r in rec["decode"]]
    for name, rows, sizes in (("prefill", pre, (2, 3, 4, 5)), ("decode", dec, (2, 3, 4, 6))):
        if not rows:
            continue
        # a decode pair is two runs: their mean step times
        means = [
            (o, d, s) if name == "prefill" else (o, statistics.fmean(d), statistics.fmean(s))
            for o, d, s in rows
        ]
        whole = paired_speedup([d for _, d, _ in means], [s for _, _, s in means], confidence=0.95)
        sec = summary[name]
        sec["pairs"] = len(rows)
        sec["all_pairs"] = whole.to_dict()
        sec["order"] = _order_effect(means)
        sec["others_busy_cores"] = [
            statistics.fmean(r[a + "_load"]["others_busy_cores"] or 0.0 for r in rec[name]) for a in ARMS
        ]
        sec["by_pairs"] = {}
        for n in sizes:
            starts = range(0, len(rows) - n + 1, 2)  # an evaluation's first pair is dense-first
            new90, new95, old = [], [], []
            for i in starts:
                w = means[i : i + n]
                d, s = [x[1] for x in w], [x[2] for x in w]
                new90.append(paired_speedup(d, s, 0.90).interval)
                new95.append(paired_speedup(d, s, 0.95).interval)
                if name == "prefill":
                    old.append(_bootstrap_median_ratio(d, s, rng))
                else:  # the steps of the window's runs, as if independent
                    steps_d = [x for _, dd, _ in rows[i : i + n] for x in dd]
                    steps_s = [x for _, _, ss in rows[i : i + n] for x in ss]
                    old.append(_bootstrap_median_ratio(steps_d, steps_s, rng, n=500))
            row = {
                "paired_t_90": _coverage(new90, whole.estimate),
                "paired_t_95": _coverage(new95, whole.estimate),
                "median_bootstrap_90" if name == "prefill" else "step_bootstrap_90": _coverage(
                    old, whole.estimate
                ),
            }
            if name == "prefill":
                row["welch_95"] = _coverage(
                    [
                        _welch_log_ratio([x[1] for x in means[i : i + n]], [x[2] for x in means[i : i + n]])
                        for i in starts
                    ],
                    whole.estimate,
                )
            sec["by_pairs"][n] = row
    with open(out, "w") as f:
        json.dump(summary, f, indent=2)
    for name in ("prefill", "decode"):
        sec = summary[name]
        if not sec:
            continue
        a, o = sec["all_pairs"], sec["order"]
        print(
            f"{name}: {sec['pairs']} pairs, all together {a['estimate']:.3f} "
            f"[{a['low']:.3f}, {a['high']:.3f}]; "
            f"dense-first {o['dense_first_speedup']:.3f}, sparse-first {o['sparse_first_speedup']:.3f} "
            f"(p = {o['p_value']:.2f}); other processes' cores (dense, sparse runs) "
            f"{sec['others_busy_cores'][0]:.2f}, {sec['others_busy_cores'][1]:.2f}"
        )
        for n, row in sec["by_pairs"].items():
            cells = ", ".join(
                f"{k} {v['coverage']:.0%} (width x{v['median_width']:.2f})" for k, v in row.items()
            )
            print(f"  {n} pairs ({row['paired_t_90']['windows']} windows): {cells}")


if __name__ == "__main__":
    if sys.argv[1] == "collect":
        main(sys.argv[2], *(int(x) for x in sys.argv[3:5]))
    elif sys.argv[1] == "analyse":
        analyse(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(__doc__)
