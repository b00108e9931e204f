"""Saved 8k plans on text their calibration never saw: fidelity, its 95% bounds and the density.

Two text sets, each judged against the dense model on the last half of every window:
- `calib-rest`: the calibration corpus part past what `bench quality` calibrated on. The bench
  calibrates on `corpus_texts("calibration")`, which calibration splits (seed 0) into a calibration
  and a held-out part and packs into N_CAL windows of the first and N_HELD of the second; packing
  more windows with the same seeds continues the same token streams, so windows N_CAL.. and N_HELD..
  are text no step of that calibration (gate training, sensitivity, eps search) read.
- `evaluate-2k`: `sparsepilot evaluate`'s own fidelity windows (the corpus's held-out part, 4 x 2,048
  tokens, seed 0): the 8k plans on shorter prompts.
Run from the worktree root, after the bench (its settings: --max-texts M gives N_HELD = round(M/4)):
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 taskset -c 0 python docs/calibration/unseen_8k.py \
        N_CAL N_HELD EXTRA_CAL OUT.json PLAN_DIR...
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from sparse_core import load_model, sparse_stats, sparsified
from sparse_core.calibration import split_texts
from sparse_core.corpus import corpus_texts, pack_token_windows
from sparse_core.fidelity import dense_reference, measure_fidelity
from sparse_core.fidelity_bound import fidelity_bound
from sparse_core.host import loadavg
from sparse_core.plan_io import load

torch.set_num_threads(1)
n_cal, n_held, extra, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
plan_dirs = sys.argv[5:]
SEQ, MIN_LEN = 8192, 128  # calibration's min_length: 2 blocks of 64

t0 = time.time()
load_before = loadavg()
model, tok = load_model("smollm2-135m", progress=False)
cal, held = split_texts([t for t in corpus_texts("calibration", seed=0) if t.strip()], 0.25, 0)
rest = pack_token_windows(tok, cal, SEQ, n_cal + extra, seed=0, min_length=MIN_LEN)[n_cal:]
rest += pack_token_windows(tok, held, SEQ, n_held + 1, seed=1, min_length=MIN_LEN)[n_held:]
sets = {
    "calib-rest": rest,
    "evaluate-2k": pack_token_windows(tok, corpus_texts("heldout", seed=0), 2048, 4, seed=0),
}
result = {"windows": {k: [len(w) for w in v] for k, v in sets.items()}, "plans": {}}
for name, windows in sets.items():
    ref = dense_reference(model, windows)
    for d in plan_dirs:
        plan = load(d, config=model.config)
        with sparsified(model, plan):
            fid = measure_fidelity(model, ref)
            density = sparse_stats(model).density
        bound = fidelity_bound(fid, 0.95)
        row = {**fid.to_dict(), "kl_upper": bound.kl, "agree_lower": bound.agree, "measured_density": density}
        result["plans"].setdefault(os.path.basename(d.rstrip("/")), {})[name] = row
        print(name, d, json.dumps({k: round(v, 4) for k, v in row.items()}), flush=True)
result.update(
    seconds=time.time() - t0,
    loadavg_before=load_before,
    loadavg_after=loadavg(),
    threads=torch.get_num_threads(),
)
with open(out, "w") as f:
    json.dump(result, f, indent=1)
