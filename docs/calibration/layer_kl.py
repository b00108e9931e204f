"""Each layer's share of a plan's output error: the plan's own setting in one layer, every other layer
dense, next-token KL / top-1 agreement against dense on held-out text; and the whole plan beside it.
Run from the worktree root:
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python docs/calibration/layer_kl.py PLAN_DIR SEQ_LEN OUT.json
The window is the corpus's held-out part (6,958 tokens at SEQ_LEN 8192: all it holds). `density` in
the JSON is the model-wide mean over layers (dense layers count 1); a layer's own density is
n_layers x (density - 1) + 1. One forward per sparse layer plus two: ~17 min at 8k on one CPU core.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from sparse_core import load_model, sparse_stats, sparsified
from sparse_core.corpus import corpus_texts, pack_token_windows
from sparse_core.fidelity import dense_reference, measure_fidelity
from sparse_core.plan_io import load

torch.set_num_threads(1)
plan_dir, seq_len, out_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
model, tok = load_model("smollm2-135m")
plan = load(plan_dir, config=model.config)
n = model.config.num_hidden_layers
wins = pack_token_windows(tok, corpus_texts("heldout", seed=0), seq_len, 1, seed=11)
t0 = time.time()
ref = dense_reference(model, wins)


def run(p):
    with sparsified(model, p):
        f = measure_fidelity(model, ref)
        d = sparse_stats(model).density
    return {"kl": f.kl, "agree": f.agree, "nll_delta": f.nll_delta, "density": d}


res = {"plan": plan_dir, "window_tokens": [len(w) for w in wins], "whole": run(plan), "layers": {}}
print("whole", res["whole"], flush=True)
for layer in range(n):
    if layer in plan.dense_layers:
        continue
    res["layers"][layer] = run(plan.with_(dense_layers=tuple(x for x in range(n) if x != layer)))
    print(layer, res["layers"][layer], round(time.time() - t0), flush=True)
    with open(out_path, "w") as fh:
        json.dump(res, fh, indent=1)
res["seconds"] = time.time() - t0
with open(out_path, "w") as fh:
    json.dump(res, fh, indent=1)
