"""Decode calibration at 8k, one decode page scorer: `python docs/sparse_core/decode_calibration_8k.py
ESTIMATOR OUT.json [BUDGET [CONFIDENCE [HELDOUT_TOKENS [N_PROMPTS [NEW_TOKENS [SENS_PROMPTS [apart]]]]]]]`
(1 torch thread; pin it with taskset on a shared machine).

Calibrates a decode section (sparse_core.decode.calibration.calibrate_decode, 16-token pages) on the
stdlib corpus's calibration part: N_PROMPTS (default 2) prompts of 8,128 tokens, NEW_TOKENS (default
64) generated tokens each, the fidelity budget BUDGET (default kl=0.01,agree=0.95), judged on the
means or, with CONFIDENCE (e.g. 0.95), on one-sided bounds over the prompts (DecodeLimits.confidence;
at least 10 prompts; the candidates' sensitivities then come from SENS_PROMPTS (default 2) more
windows, page_gate's own training windows where it trains, or with `apart` the windows after them);
page_gate trains on 2 more windows of that part (the part holds 13 windows of 8,128 tokens, the last
7,846 tokens long). The break-even is not measured (given as 0): this compares what share of the
cache each scorer's plan reads at the budget, not this host's timing. Then the plan decodes after
the held-out part's one window (6,880 tokens, text no calibration step read) beside dense,
HELDOUT_TOKENS (default 64) generated tokens: density, KL, top-1 agreement, greedy match, ms per
token (interleaved, PagedCache). Writes OUT.json and the plan to OUT-plan/.

`python docs/sparse_core/decode_calibration_8k.py --heldout PLAN_DIR OUT.json [HELDOUT_TOKENS]`: only
the held-out part, for a plan saved before (e.g. one calibrated on the means, measured beside one
calibrated on bounds on the same continuation)."""

from __future__ import annotations

import json
import sys
import time

import torch

from sparse_core import SparsePlan, load_model, plan_io
from sparse_core.bench.common import environment
from sparse_core.corpus import corpus_texts, pack_token_windows
from sparse_core.decode.calibration import DecodeLimits, calibrate_decode
from sparse_core.decode.measure import compare_decode
from sparse_core.host import loadavg


def main(
    estimator: str,
    out: str,
    budget: str = "kl=0.01,agree=0.95",
    confidence: str = "",
    heldout_tokens: str = "64",
    n_prompts: str = "2",
    new_tokens: str = "64",
    sensitivity_prompts: str = "2",
    apart: str = "",
) -> None:
    torch.set_num_threads(1)
    load_before = loadavg()
    t0 = time.perf_counter()
    model, tok = load_model("smollm2-135m", progress=False)
    lim = DecodeLimits(
        estimator=estimator,
        prompt_tokens=8128,
        n_prompts=int(n_prompts),
        new_tokens=int(new_tokens),
        page_size=16,
        budgets=(256, 512, 1024, 1536, 2048, 3072, 4096),
        break_even_tokens=0,
        confidence=float(confidence) if confidence else None,
        sensitivity_prompts=int(sensitivity_prompts),
        sensitivity_apart=apart == "apart",
    )

    def say(what: str, done: int, total: int) -> None:
        print(f"{time.strftime('%H:%M:%S')} {estimator}: {what} {done}/{total}", flush=True)

    base = SparsePlan()
    dp, rep = calibrate_decode(
        model, tok, corpus_texts("calibration"), budget, base=base, limits=lim, progress=say
    )
    result = {
        "estimator": estimator,
        "budget": budget,
        "confidence": lim.confidence,
        "sensitivity_apart": lim.sensitivity_apart,
        "calibration": rep.to_dict(),
    }
    if dp is not None:
        plan = base.with_(decode=dp)
        plan_io.save(plan, out.removesuffix(".json") + "-plan", config=model.config)
        result["heldout"] = heldout(model, tok, plan, int(heldout_tokens))
    _write(out, result, t0, load_before)


def heldout(model, tok, plan: SparsePlan, new_tokens: int) -> dict:
    """The plan's decode after the held-out part's window, beside dense."""
    (held,) = pack_token_windows(tok, corpus_texts("heldout"), 6880, 1)
    r = compare_decode(
        model,
        plan,
        torch.tensor([held]),
        new_tokens=new_tokens,
        repeats=2,
        sparse_cache="paged",
        dense_cache="paged",
    )
    return {
        "seq_len": r.seq_len,
        "new_tokens": new_tokens,
        "density": r.density,
        "kl": r.kl,
        "agree": r.agree,
        "greedy_match": r.greedy_match,
        "ms_per_token": r.sparse_ms_per_token,
        "dense_ms_per_token": r.dense_ms_per_token,
        "speedup": r.speedup,
        "speedup_interval": list(r.speedup_interval),
        "estimator_share": r.estimator_share,
    }


def heldout_only(plan_dir: str, out: str, heldout_tokens: str = "64") -> None:
    torch.set_num_threads(1)
    load_before = loadavg()
    t0 = time.perf_counter()
    model, tok = load_model("smollm2-135m", progress=False)
    plan = plan_io.load(plan_dir, config=model.config)
    result = {"plan": plan_dir, "heldout": heldout(model, tok, plan, int(heldout_tokens))}
    _write(out, result, t0, load_before)


def _write(out: str, result: dict, t0: float, load_before) -> None:
    result["seconds"] = time.perf_counter() - t0
    result["environment"] = environment(load_before)
    with open(out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(json.dumps({k: result[k] for k in ("estimator", "plan", "heldout") if k in result}, indent=1))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--heldout"]:
        heldout_only(*sys.argv[2:])
    else:
        main(*sys.argv[1:])
