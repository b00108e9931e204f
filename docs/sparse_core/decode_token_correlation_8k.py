"""How the errors of neighbouring generated tokens correlate, what sized the 8-token blocks of decode
calibration's first fidelity bound (session 15; its unit is now a prompt, decode_bound_unit.py):
`python docs/sparse_core/decode_token_correlation_8k.py PLAN_DIR OUT.json` (1 torch thread).

PLAN_DIR is a decode plan, e.g. the Quest plan `decode_calibration_8k.py quest OUT.json` saves. Four
windows of 8,128 tokens of the stdlib corpus's calibration part (seed 99) are prefilled densely; the
dense model generates 128 greedy tokens after each, and the sparse plan is fed the same tokens
(teacher forcing). Writes per-token KL(dense || sparse) and agreement per window, and prints their
lag-k autocorrelations (within windows) and the design effect of blocks of m tokens (the variance of
block means x m over the per-token variance: 1 when neighbours do not correlate)."""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

from sparse_core import load_model, plan_io
from sparse_core.corpus import corpus_texts, pack_token_windows
from sparse_core.decode.measure import prefill, run_decode
from sparse_core.retrofit import sparsified


def main(plan_dir: str, out: str, windows: int = 4, new_tokens: int = 128) -> None:
    torch.set_num_threads(1)
    model, tok = load_model("smollm2-135m", progress=False)
    plan = plan_io.load(plan_dir, config=model.config)
    plan = plan.with_(dense_layers=tuple(range(model.config.num_hidden_layers)))  # decode alone sparse
    rows = []
    for i, w in enumerate(pack_token_windows(tok, corpus_texts("calibration"), 8128, 6, seed=99)[:windows]):
        cache, first = prefill(model, torch.tensor([w]))
        ref = run_decode(model, cache, first, new_tokens)
        with sparsified(model, plan):
            run = run_decode(model, cache, first, new_tokens, forced=ref.predicted)
        kl = (ref.logprobs.exp() * (ref.logprobs - run.logprobs)).sum(-1).clamp_min(0)
        agree = [float(a == b) for a, b in zip(ref.predicted, run.predicted, strict=True)]
        rows.append({"kl": kl.tolist(), "agree": agree})
        print(
            f"window {i + 1}/{windows}: KL {float(kl.mean()):.4f}, agreement {np.mean(agree):.3f}", flush=True
        )
    summary = {}
    for key in ("kl", "agree"):
        centred = [np.array(r[key]) - np.mean(r[key]) for r in rows]
        var = np.concatenate(centred).var(ddof=1)
        acf = {
            lag: float(sum((x[:-lag] * x[lag:]).sum() for x in centred) / sum((x * x).sum() for x in centred))
            for lag in (1, 2, 4, 8)
        }
        deff = {
            m: float(
                np.concatenate([x[: len(x) // m * m].reshape(-1, m).mean(1) for x in centred]).var(ddof=1)
                * m
                / var
            )
            for m in (2, 4, 8, 16)
        }
        summary[key] = {"autocorrelation": acf, "design_effect": deff}
        print(key, summary[key])
    with open(out, "w") as fh:
        json.dump({"plan": plan_dir, "windows": rows, "summary": summary}, fh, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:3])
