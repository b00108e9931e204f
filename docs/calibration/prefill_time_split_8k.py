"""Where an 8k whole-model sparse prefill's time goes: scoring, kernel, the rest, against the dense
attention (the retrofit's dense kernel times each layer's SDPA). One thread; a warm-up and 2 timed runs
per arm; the dense arm timed first and last. Run from the repository root:

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python \\
        docs/calibration/prefill_time_split_8k.py PLANS/8192/sampled PLANS/8192/gate_v2 ...

(docs/calibration.md, "Where the 8k prefill's time goes"). Writes prefill_time_split_8k.json beside it; the
JSON there was written by this script's first form (the same loop, with this machine's paths written in)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from sparse_core import plan_io
from sparse_core.evaluation import _time_prefill, timing_window
from sparse_core.loading import load_model
from sparse_core.retrofit import sparse_stats, sparsified


def run(model, ids, plan, kernel: str, label: str, out: dict, reps: int = 2) -> None:  # noqa: ANN001
    for r in range(reps + 1):
        with sparsified(model, plan, kernel=kernel):
            sparse_stats(model).reset()
            t = _time_prefill(model, ids)
            st = sparse_stats(model)
            est, ker, dens = st.estimator_seconds, st.kernel_seconds, st.density
        if r == 0:
            continue  # warm-up
        row = {
            "label": label,
            "rep": r,
            "total": t,
            "estimator": est,
            "kernel": ker,
            "rest": t - est - ker,
            "density": dens,
            "loadavg": os.getloadavg()[0],
        }
        print(json.dumps(row), flush=True)
        out["rows"].append(row)


def main(plans: list[str]) -> None:
    torch.set_num_threads(1)
    model, tok = load_model("smollm2-135m", progress=False)
    ids = torch.tensor([timing_window(tok, 8192, seed=7)])  # the evaluation's 8k timing window
    out: dict = {"loadavg_start": os.getloadavg(), "rows": []}
    base = plan_io.load(plans[0], config=model.config)
    run(model, ids, base, "dense", "dense-attention", out)
    for p in plans:
        run(model, ids, plan_io.load(p, config=model.config), "auto", os.path.basename(p.rstrip("/")), out)
    run(model, ids, base, "dense", "dense-attention-again", out)
    Path(__file__).with_suffix(".json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
