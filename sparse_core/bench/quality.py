"""`sparsepilot bench quality`: pooled vs antidiagonal vs gate on the same held-out texts.

Two comparisons, side by side in one run:
- same budget: each estimator is calibrated to the budget on the stdlib corpus's calibration part;
  columns: density reached, held-out KL / agreement (as the calibration measured them), probes;
- same density: each estimator gets the one uniform tau that gives a target density on the held-out
  windows (bisection on the selection density of captured q/k, no forwards per step); columns: KL,
  agreement, delta NLL, probe accuracy at that density.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

ESTIMATORS = ("pooled", "antidiagonal", "gate")


@dataclass
class QualityBenchSettings:
    model: str = "smollm2-135m"
    budget: str = "kl=0.01,agree=0.98"
    estimators: tuple[str, ...] = ESTIMATORS
    seq_len: int = 2048
    max_texts: int = 8
    gate_steps: int = 200
    probe_lengths: tuple[int, ...] = (2048, 4096)
    probe_kinds: tuple[str, ...] = ("passkey", "multikey", "kv", "vartrack")
    probe_depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    target_density: float | None = None  # default: the densest plan any estimator reached at the budget
    seed: int = 0

    @classmethod
    def quick(cls, **kw: Any) -> QualityBenchSettings:
        base: dict[str, Any] = dict(
            seq_len=1024, max_texts=4, gate_steps=100, probe_lengths=(1024,), probe_kinds=("passkey", "kv")
        )
        base.update(kw)
        return cls(**base)


@torch.no_grad()
def _capture_qk(model, windows) -> list[dict[int, tuple[torch.Tensor, torch.Tensor, float]]]:
    from sparse_core.capture import capture_attention

    out = []
    for w in windows:
        grab: dict[int, tuple] = {}

        def on_layer(call, grab=grab):
            grab[call.layer_idx] = (call.query[:1].clone(), call.key[:1].clone(), call.scaling)

        with capture_attention(model, on_layer):
            model(input_ids=torch.tensor([w], device=next(model.parameters()).device), logits_to_keep=1)
        out.append(grab)
    return out


def _density_at(plan, captured) -> float:
    from sparse_core.kernels import estimate_and_select

    vals = []
    for grab in captured:
        for li, (q, k, s) in grab.items():
            sel = estimate_and_select(q, k, plan, plan.layer_params(li), scale=s)
            vals.append(sel.density)
    return sum(vals) / len(vals)


def tau_for_density(base_plan, captured, target: float, iters: int = 12) -> tuple[float, float]:
    """Uniform tau whose mean selection density is closest to `target` (bisection: density rises
    with tau)."""
    lo, hi = 0.05, 0.9999
    best = (hi, _density_at(base_plan.with_(tau=hi), captured))
    for _ in range(iters):
        mid = (lo + hi) / 2
        d = _density_at(base_plan.with_(tau=mid), captured)
        if abs(d - target) < abs(best[1] - target):
            best = (mid, d)
        if d < target:
            lo = mid
        else:
            hi = mid
    return best


def run_quality_bench(
    settings: QualityBenchSettings, *, progress: Callable[[str, int, int], None] | None = None
) -> dict:
    from sparse_core import SparsePlan, load_model, sparsify, unsparsify
    from sparse_core.calibration import CalibrationLimits, calibrate
    from sparse_core.corpus import corpus_texts, pack_token_windows
    from sparse_core.fidelity import dense_reference, measure_fidelity
    from sparse_core.probes import generate_probes, score_probes

    t_all = time.perf_counter()
    model, tok = load_model(settings.model)
    cal_texts = corpus_texts("calibration", seed=settings.seed)
    held_texts = corpus_texts("heldout", seed=settings.seed)
    probes = generate_probes(
        tok,
        lengths=settings.probe_lengths,
        kinds=settings.probe_kinds,
        depths=settings.probe_depths,
        seed=settings.seed,
    )
    dense_probes = score_probes(model, probes)
    held_w = pack_token_windows(tok, held_texts, settings.seq_len, 2, seed=settings.seed + 11)
    ref = dense_reference(model, held_w)

    def probe_acc(plan) -> float:
        sparsify(model, plan)
        try:
            return score_probes(model, probes).accuracy
        finally:
            unsparsify(model)

    def fidelity(plan):
        sparsify(model, plan)
        try:
            return measure_fidelity(model, ref)
        finally:
            unsparsify(model)

    same_budget, plans = [], {}
    n = len(settings.estimators)
    for i, est in enumerate(settings.estimators, start=1):
        t0 = time.perf_counter()
        lim = CalibrationLimits(
            max_texts=settings.max_texts, max_seq_len=settings.seq_len, gate_steps=settings.gate_steps
        )
        plan, rep = calibrate(
            model, tok, cal_texts, settings.budget, estimator=est, seed=settings.seed, limits=lim
        )
        plans[est] = plan
        fid = fidelity(plan)  # on the bench's own held-out windows, same for every estimator
        same_budget.append(
            {
                "estimator": est,
                "met_budget": rep.met_budget,
                "density": rep.density,
                "kl": fid.kl,
                "agree": fid.agree,
                "nll_delta": fid.nll_delta,
                "probe_acc": probe_acc(plan),
                "probe_acc_dense": dense_probes.accuracy,
                "dense_layers": len(rep.dense_layers),
                "calib_seconds": time.perf_counter() - t0,
            }
        )
        if progress:
            progress("same budget", i, n)

    target = settings.target_density
    if target is None:
        sparse_ones = [r["density"] for r in same_budget if r["met_budget"] and r["density"] < 1.0]
        target = max(sparse_ones) if sparse_ones else 0.3
    captured = _capture_qk(model, held_w[:1])
    same_density = []
    for i, est in enumerate(settings.estimators, start=1):
        base = SparsePlan(estimator=est, tau=0.9)
        if est == "gate":
            base.tensors = plans["gate"].tensors
        tau, dens = tau_for_density(base, captured, target)
        plan = base.with_(tau=tau)
        fid = fidelity(plan)
        same_density.append(
            {
                "estimator": est,
                "target_density": target,
                "tau": tau,
                "density": dens,
                "kl": fid.kl,
                "agree": fid.agree,
                "nll_delta": fid.nll_delta,
                "probe_acc": probe_acc(plan),
                "probe_acc_dense": dense_probes.accuracy,
            }
        )
        if progress:
            progress("same density", i, n)

    by = {r["estimator"]: r for r in same_budget}
    ratio = None
    if "gate" in by and "pooled" in by and by["gate"]["density"] > 0:
        ratio = by["pooled"]["density"] / by["gate"]["density"]
    return {
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.__dict__.items()},
        "device": str(next(model.parameters()).device),
        "same_budget": same_budget,
        "same_density": same_density,
        "pooled_over_gate_density": ratio,
        "probe_accuracy_dense": dense_probes.accuracy,
        "seconds": time.perf_counter() - t_all,
    }
