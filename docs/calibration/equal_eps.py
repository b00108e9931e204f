"""Every estimator and two selection rules at equal dropped attention mass, on one dense forward.

For every layer and selection head of SmolLM2 on one window of held-out natural text (the corpus's
held-out part, 6,958 tokens: SEQ_LEN 8192 reads all of it, 4096 its first 4,096): the dense
attention mass each (estimator, rule) drops and the density it keeps, over a fine grid of tau
(tau-mass: keep the fewest blocks holding tau of the estimated mass) and of thresholds
(SeerAttention's rule: keep every block whose row-normalised estimated probability is >= th); sink
and local blocks always kept. Then, as calibration's per-head allocation does, per (layer, head) the
lowest density whose dropped mass is <= eps (1.0 when none is), averaged over heads and layers; the
per-layer choice "a+b" takes per layer the lower of a's and b's. This is calibration's sensitivity
level (what the eps search allocates from), not a fidelity-checked plan: it needs one forward instead
of one per search step, which is what made 8k affordable on a loaded 2-core CPU.
Run from the worktree root:
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python docs/calibration/equal_eps.py SEQ_LEN [PLAN_DIR] [POWERS [GRID]]
PLAN_DIR: a saved plan whose gate_v2 weights to include (e.g. bench quality --plans DIR/4096/gate_v2).
POWERS (e.g. 0.7,1.4,2): also every estimator with its estimate raised to each power before selection
(`selection.sharpen`, tau-mass only), and "name^T*" (per head the best power, 1 included) and
"name^T*/layer" (one power per layer, calibration's choice). GRID: "fine" (default, 23 taus to
0.9999), "product" (calibration's default 8, to 0.995) or "product+" (those and 0.998-0.9999).
"""

from __future__ import annotations

import json
import sys
import time

import torch

from sparse_core import load_model
from sparse_core.capture import block_attention_mass, capture_attention
from sparse_core.corpus import corpus_texts, pack_token_windows
from sparse_core.estimators import EstimatorContext, get_estimator
from sparse_core.plan import SparsePlan
from sparse_core.selection import group_scores, select_blocks, sharpen

torch.set_num_threads(1)
seq_len = int(sys.argv[1])
plan_dir = sys.argv[2] if len(sys.argv) > 2 else None
BS = 64
TAUS = [1 - 10 ** (-x / 6) for x in range(2, 25)]  # 0.54 ... 0.9999, 23 values (as fine as THS)
THS = [10 ** (-x / 4) for x in range(2, 25)]  # 0.32 ... 1e-6, 23 values
EPS = (0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05)
POWERS = [float(x) for x in sys.argv[3].split(",")] if len(sys.argv) > 3 else []
GRID = sys.argv[4] if len(sys.argv) > 4 else "fine"
if GRID != "fine":
    TAUS = [0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995] + (
        [0.998, 0.999, 0.9995, 0.9999] if GRID == "product+" else []
    )

t0 = time.time()
model, tok = load_model("smollm2-135m")
base = SparsePlan(block_size=BS, estimator="pooled")
names = ["pooled", "antidiagonal", "quest", "oracle"]
if plan_dir:
    from sparse_core.plan_io import load

    base = load(plan_dir, config=model.config)
    names.append("gate_v2")
plain = list(names)
names += [f"{n}^{p:g}" for n in plain for p in POWERS]
(window,) = pack_token_windows(tok, corpus_texts("heldout", seed=0), seq_len, 1, seed=11)
hq, hkv = model.config.num_attention_heads, model.config.num_key_value_heads
group = hq // hkv
res = {n: {r: [] for r in ("tau", "threshold")} for n in names}  # per layer: [H, grid] err / dens


def threshold_keep(scores: torch.Tensor, th: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, H, nb, nb] -> (keep mask, per-head density): p / row total >= th, plus sink + diagonal."""
    n = scores.shape[-1]
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    causal = j <= i
    p = torch.where(causal, scores.float().clamp_min(0.0), 0.0)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
    keep = causal & ((p >= th) | (j < 1) | (j == i))
    dens = keep.sum((-1, -2)).float()[0] / float(n * (n + 1) // 2)
    return keep, dens


def on_layer(call):
    q, k = call.query[:1], call.key[:1]
    mass = block_attention_mass(q, k, BS, call.scaling)
    ctx = EstimatorContext(
        block_size=BS, layer_idx=call.layer_idx, plan=base, scale=call.scaling, module=call.module
    )
    grouped = {}
    for name in names:
        est, _, power = name.partition("^")
        if not power:
            raw = mass if name == "oracle" else get_estimator(name)(q, k, ctx)  # oracle = the exact mass
            grouped[name] = group_scores(raw, hkv)
        sc = sharpen(grouped[est], float(power or 1))
        rules = (("tau", TAUS), ("threshold", THS)) if not power else (("tau", TAUS),)
        for rule, grid in rules:
            err, dens = [], []
            for g in grid:
                if rule == "tau":
                    sel = select_blocks(sc, block_size=BS, seq_len=q.shape[2], tau=g)
                    keep, d = sel.mask(), sel.head_density[:hkv]
                else:
                    keep, d = threshold_keep(sc, g)
                dropped = (1.0 - (mass * keep.repeat_interleave(group, dim=1)).sum(-1)).clamp_min(0.0)
                err.append(dropped.view(hkv, -1).mean(-1))
                dens.append(d)
            res[name][rule].append((torch.stack(err, -1), torch.stack(dens, -1)))


with torch.no_grad(), capture_attention(model, on_layer):
    model(input_ids=torch.tensor([window]), logits_to_keep=1)

# the held-out part holds 6,958 SmolLM2 tokens: at 8192 the window is that long, not 8,192
out = {"seq_len": seq_len, "window_tokens": len(window), "eps": list(EPS), "plan": plan_dir, "density": {}}
layer_density = {}  # (name, rule) -> [eps][L]
for name in names:
    out["density"][name] = {}
    for rule in ("tau", "threshold"):
        if not res[name][rule]:
            continue
        err = torch.stack([e for e, _ in res[name][rule]])  # [L, H, G]
        dens = torch.stack([d for _, d in res[name][rule]])
        per_layer = [
            torch.where(err <= eps, dens, torch.ones_like(dens)).min(-1).values.mean(-1) for eps in EPS
        ]
        layer_density[name, rule] = per_layer
        out["density"][name][rule] = [round(float(x.mean()), 4) for x in per_layer]
for name in plain if POWERS else []:  # the best power per head, and one power per layer
    parts = [name] + [f"{name}^{p:g}" for p in POWERS]
    errs = [torch.stack([e for e, _ in res[p]["tau"]]) for p in parts]  # each [L, H, G]
    denss = [torch.stack([d for _, d in res[p]["tau"]]) for p in parts]
    err, dens = torch.cat(errs, -1), torch.cat(denss, -1)
    per_head = [torch.where(err <= eps, dens, torch.ones_like(dens)).min(-1).values.mean(-1) for eps in EPS]
    per_layer = []
    for eps in EPS:
        each = [
            torch.where(e <= eps, d, torch.ones_like(d)).min(-1).values.mean(-1)
            for e, d in zip(errs, denss, strict=True)
        ]
        per_layer.append(torch.stack(each).min(0).values)
    out["density"][f"{name}^T*"] = {"tau": [round(float(x.mean()), 4) for x in per_head]}
    out["density"][f"{name}^T*/layer"] = {"tau": [round(float(x.mean()), 4) for x in per_layer]}
out["powers"], out["grid"] = POWERS, GRID
for a, b in (("gate_v2", "pooled"), ("gate_v2", "antidiagonal"), ("oracle", "pooled")):
    if a in names:
        out["density"][f"{a}+{b}"] = {
            rule: [
                round(float(torch.minimum(x, y).mean()), 4)
                for x, y in zip(layer_density[a, rule], layer_density[b, rule], strict=True)
            ]
            for rule in ("tau", "threshold")
        }
with open("/proc/loadavg") as fh:
    out["loadavg_after"] = " ".join(fh.read().split()[:3])
out["seconds"] = round(time.time() - t0, 1)
print(json.dumps(out))
