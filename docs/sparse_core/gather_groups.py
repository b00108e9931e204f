"""Per layer of SmolLM2 at 8k tokens, on its own q/k/v (one window of the corpus, captured from a dense
forward): dense SDPA against the gather kernel one query block a call (`gather-rows`) and four at a time
(`gather`), on the selection a training-free scorer makes at a tau. One thread; each kernel timed
interleaved, best of REPEATS after a warm-up; efficiency = kernel time / (density x dense time).

    python docs/sparse_core/gather_groups.py OUT.json [ESTIMATOR] [TAU] [LENGTH] [REPEATS]
"""

from __future__ import annotations

import json
import sys
import time


def main(
    out: str, estimator: str = "antidiagonal", tau: str = "0.99", length: str = "8192", repeats: str = "3"
):
    import torch

    from sparse_core import load_model
    from sparse_core.bench.common import environment
    from sparse_core.capture import capture_attention
    from sparse_core.corpus import corpus_texts, pack_token_windows
    from sparse_core.host import loadavg
    from sparse_core.kernels import GATHER_COUNT_LEVELS, estimate_and_select
    from sparse_core.kernels.dense import dense_attention
    from sparse_core.kernels.gather import gather_attention, gather_rows_attention
    from sparse_core.plan import SparsePlan

    torch.set_num_threads(1)
    load_before, t_start = loadavg(), time.perf_counter()
    n_tokens, reps = int(length), int(repeats)
    model, tok = load_model("smollm2-135m", progress=False)
    window = pack_token_windows(tok, corpus_texts("all"), n_tokens, 1, seed=0, min_length=n_tokens)[0]
    calls = {}

    def keep(c) -> None:
        calls[c.layer_idx] = (
            c.query.contiguous().clone(),
            c.key.contiguous().clone(),
            c.value.contiguous().clone(),
            c.scaling,
        )

    with torch.no_grad(), capture_attention(model, keep):
        model(torch.tensor([window]))
    del model
    plan = SparsePlan(estimator=estimator, tau=float(tau))

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    rows = []
    for layer in sorted(calls):
        q, k, v, scale = calls[layer]
        params = plan.layer_params(layer)
        sel = estimate_and_select(q, k, plan, params, scale=scale, count_levels=GATHER_COUNT_LEVELS)
        args = (q, k, v, sel)
        with torch.no_grad():
            diff = gather_attention(*args, scale=scale) - gather_rows_attention(*args, scale=scale)
            err = diff.abs().max().item()
            t = {
                "dense": best(lambda a=args, s=scale: dense_attention(*a[:3], scale=s)),
                "gather_rows": best(lambda a=args, s=scale: gather_rows_attention(*a, scale=s)),
                "gather": best(lambda a=args, s=scale: gather_attention(*a, scale=s)),
            }
        row = {
            "layer": layer,
            "density": sel.density,
            **{f"{key}_seconds": val for key, val in t.items()},
            "gather_rows_efficiency": t["gather_rows"] / (sel.density * t["dense"]),
            "gather_efficiency": t["gather"] / (sel.density * t["dense"]),
            "gather_vs_rows": t["gather_rows"] / t["gather"],
            "max_abs_difference": err,
        }
        rows.append(row)
        print(
            f"layer {layer:2d} density {sel.density:.3f} dense {t['dense']:.3f} s  "
            f"rows {t['gather_rows']:.3f} s (x{row['gather_rows_efficiency']:.2f})  "
            f"grouped {t['gather']:.3f} s (x{row['gather_efficiency']:.2f})  "
            f"grouped faster {row['gather_vs_rows']:.2f}x  |diff| {err:.1e}",
            flush=True,
        )
    tot = {key: sum(r[f"{key}_seconds"] for r in rows) for key in ("dense", "gather_rows", "gather")}
    summary = {
        "dense_seconds": tot["dense"],
        "gather_rows_seconds": tot["gather_rows"],
        "gather_seconds": tot["gather"],
        "mean_density": sum(r["density"] for r in rows) / len(rows),
        "speedup_gather_rows": tot["dense"] / tot["gather_rows"],
        "speedup_gather": tot["dense"] / tot["gather"],
        "gather_vs_rows": tot["gather_rows"] / tot["gather"],
    }
    print(json.dumps(summary, indent=1))
    result = {
        "estimator": estimator,
        "tau": float(tau),
        "seq_len": n_tokens,
        "repeats": reps,
        "threads": 1,
        "layers": rows,
        "summary": summary,
        "seconds": time.perf_counter() - t_start,
        "environment": environment(load_before),
    }
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
