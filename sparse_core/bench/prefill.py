"""End-to-end prefill of a real model on natural English (the standard library's documentation
topics, no download): dense SDPA vs the model sparsified with `pooled` at a few tau.

Prefill time is what serving pays: the decoder stack over the prompt plus the LM head on the last
position. Quality is measured against dense on every position (next-token KL, top-1 agreement,
delta NLL), with the LM head applied in chunks so 8k x 49k-vocab logits never sit in memory twice.
Dense is timed before and after the sparse runs of each length and the faster time is used."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from sparse_core.bench.common import (
    DTYPES,
    RunClock,
    bench_device,
    circle_overloaded,
    load_fields,
    note_overload,
    prefill_repeats,
    pyplot,
    save_figure,
    synchronize,
)
from sparse_core.evaluation import within_context
from sparse_core.host import HostLoad, HostLoadMeter
from sparse_core.kernels import sparse_attention
from sparse_core.loading import load_model
from sparse_core.plan import SparsePlan
from sparse_core.retrofit import sparse_stats, sparsified
from sparse_core.testing import sample_text

FULL_LENGTHS = (2048, 4096, 8192)
QUICK_LENGTHS = (8192,)
FULL_TAUS = (0.9, 0.95, 0.97, 0.99, 0.995)
QUICK_TAUS = (0.97, 0.99)
TEXT_SOURCE = "pydoc_data.topics (Python documentation topics)"
_CHUNK = 1024

TABLE_COLUMNS = [
    "seq_len",
    "plan",
    "density",
    "estimator_share",
    "seconds",
    "dense_seconds",
    "speedup",
    "kl",
    "top1_agreement",
    "delta_nll",
    "others_busy_cores",
    "overloaded",
]


def natural_text_ids(tokenizer, n_tokens: int) -> torch.Tensor:
    text = sample_text(n_tokens * 6)
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :n_tokens]
    if ids.shape[1] < n_tokens:
        raise ValueError(f"the standard-library text gives only {ids.shape[1]} tokens, {n_tokens} asked")
    return ids


@torch.no_grad()
def _prefill(model, ids: torch.Tensor, repeats: int = 1) -> tuple[float, torch.Tensor, HostLoad]:
    """Best wall time of ``repeats`` prefills (device-synchronised), the last one's hidden states, and
    what the other processes did meanwhile."""
    best, hidden = float("inf"), None
    with HostLoadMeter() as meter:
        for _ in range(repeats):
            synchronize(ids.device)
            t0 = time.perf_counter()
            hidden = model.model(input_ids=ids).last_hidden_state
            model.lm_head(hidden[:, -1:])  # what a prefill for generation computes
            synchronize(ids.device)
            best = min(best, time.perf_counter() - t0)
    return best, hidden, meter.load


@torch.no_grad()
def fidelity(model, ids: torch.Tensor, dense_hidden: torch.Tensor, hidden: torch.Tensor) -> dict[str, float]:
    """Next-token KL(dense || sparse), top-1 agreement and NLL of the real next token, over all
    positions, computed in chunks."""
    kl_sum = agree = nll_d = nll_s = 0.0
    n = ids.shape[1]
    targets = ids[0, 1:]
    for a in range(0, n, _CHUNK):
        b = min(n, a + _CHUNK)
        ld = F.log_softmax(model.lm_head(dense_hidden[0, a:b]).float(), -1)
        ls = F.log_softmax(model.lm_head(hidden[0, a:b]).float(), -1)
        kl_sum += (ld.exp() * (ld - ls)).sum(-1).sum().item()
        agree += (ld.argmax(-1) == ls.argmax(-1)).sum().item()
        t_end = min(b, n - 1)
        if t_end > a:
            tgt = targets[a:t_end, None]
            nll_d += -ld[: t_end - a].gather(-1, tgt).sum().item()
            nll_s += -ls[: t_end - a].gather(-1, tgt).sum().item()
    nll_dense = nll_d / (n - 1)
    nll_sparse = nll_s / (n - 1)
    return {
        "kl": kl_sum / n,
        "top1_agreement": agree / n,
        "nll_dense": nll_dense,
        "nll_sparse": nll_sparse,
        "delta_nll": (nll_sparse - nll_dense) / nll_dense,
    }


def run(
    *,
    model_ref: str = "smollm2-135m",
    quick: bool = False,
    lengths: tuple[int, ...] | None = None,
    taus: tuple[float, ...] | None = None,
    base_plan: SparsePlan | None = None,
    kernels: tuple[str, ...] = ("gather", "flex"),
    device: str | torch.device = "cpu",
    dtype: str = "fp32",
    repeats: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``repeats``: timed prefills per point, the best kept (default: 1 on the CPU, where one 8k
    prefill takes seconds; 5 on CUDA, where it takes milliseconds and one run is noise). ``dtype``:
    the model's weights and activations (fp32 or bf16; a GPU serves in bf16, where dense SDPA runs
    the flash kernel), dense and sparse alike."""
    dev = bench_device(device)
    repeats = repeats or prefill_repeats(dev)
    say = progress or (lambda _msg: None)
    lengths = lengths or (QUICK_LENGTHS if quick else FULL_LENGTHS)
    taus = taus or (QUICK_TAUS if quick else FULL_TAUS)
    base_plan = base_plan or SparsePlan()
    short = [x for x in lengths if x <= base_plan.block_size]
    if short:  # one block is all dense: nothing sparse to time (and one token has no next-token NLL)
        raise ValueError(
            f"{', '.join(map(str, short))} tokens: each length must exceed the plan's block size "
            f"{base_plan.block_size}"
        )
    clock = RunClock()
    say(f"loading {model_ref}")
    model, tok = load_model(model_ref, device=dev, dtype=DTYPES[dtype])
    ctx = getattr(model.config, "max_position_embeddings", None)
    lengths, over = within_context(lengths, ctx, f"{model_ref} lengths")
    rows: list[dict[str, Any]] = []
    cfg = model.config
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    compile_seconds: dict[str, float] = {}
    for s in lengths:
        ids = natural_text_ids(tok, s).to(dev)
        say(f"{s} tokens: dense SDPA (warm-up)")
        _prefill(model, ids[:, : min(s, 512)])
        say(f"{s} tokens: dense SDPA")
        d0, dense_hidden, load0 = _prefill(model, ids, repeats)
        sparse_rows = []
        if "flex" in kernels:  # compile for this shape outside the timed runs (one layer's call)
            say(f"{s} tokens: compiling the flex kernel for this shape")
            t0 = time.perf_counter()
            q = torch.randn(1, n_heads, s, head_dim, device=dev, dtype=model.dtype)
            kv = torch.randn(1, n_kv, s, head_dim, device=dev, dtype=model.dtype)
            sparse_attention(q, kv, kv, base_plan, kernel="flex")
            synchronize(dev)
            compile_seconds[str(s)] = time.perf_counter() - t0
        for kern in kernels:
            for tau in taus:
                plan = base_plan.with_(tau=tau)
                say(f"{s} tokens: sparse ({kern}), tau={tau}")
                with sparsified(model, plan, kernel=kern):
                    secs, hidden, load = _prefill(model, ids, repeats)
                    stats = sparse_stats(model)  # every call of the repeats: the mean prefill's share
                    density, est = stats.density, stats.estimator_seconds / repeats
                fid = fidelity(model, ids, dense_hidden, hidden)
                sparse_rows.append((kern, tau, secs, density, est, fid, load))
        say(f"{s} tokens: dense SDPA (again)")
        d1, _, load1 = _prefill(model, ids, repeats)
        rows.extend(length_rows(s, (d0, load0), (d1, load1), sparse_rows))
    return {
        "benchmark": "prefill",
        "model": model_ref,
        "text_source": TEXT_SOURCE,
        "base_plan": base_plan.to_dict(),
        "device": str(dev),
        "dtype": dtype,
        "repeats": repeats,
        "rows": rows,
        "lengths_over_context": over,  # not timed: longer than the model's positions
        "context": ctx,
        "flex_compile_seconds": compile_seconds,
        **clock.summary(),
    }


def length_rows(
    s: int,
    dense0: tuple[float, HostLoad],
    dense1: tuple[float, HostLoad],
    sparse_rows: list[tuple[str, float, float, float, float, dict[str, float], HostLoad]],
) -> list[dict[str, Any]]:
    """The rows of one length: the dense row (the faster of the timings before and after the sparse
    runs) and one per (kernel, tau) timed between them, `(kernel, tau, seconds, density, estimator
    seconds, fidelity, host load)`. A sparse row's speed-up divides by the dense time, so its host
    record covers the dense timings as well as its own: a busy spell during either dense timing
    inflates or deflates every speed-up of the length, as `bench quality` records it."""
    (d0, load0), (d1, load1) = dense0, dense1
    dense_s = min(d0, d1)
    rows: list[dict[str, Any]] = [
        {
            "seq_len": s,
            "plan": "dense",
            "kernel": "sdpa",
            "tau": None,
            "density": 1.0,
            "estimator_share": 0.0,
            "seconds": dense_s,
            "dense_seconds": dense_s,
            "dense_seconds_runs": [d0, d1],
            "speedup": 1.0,
            "kl": 0.0,
            "top1_agreement": 1.0,
            "delta_nll": 0.0,
            "tokens_per_second": s / dense_s,
            **load_fields(load0, load1),
        }
    ]
    for kern, tau, secs, density, est, fid, load in sparse_rows:
        rows.append(
            {
                "seq_len": s,
                "plan": f"{kern} tau={tau}",
                "kernel": kern,
                "tau": tau,
                "density": density,
                "estimator_share": est / dense_s,
                "seconds": secs,
                "dense_seconds": dense_s,
                "speedup": dense_s / secs,
                **fid,
                "tokens_per_second": s / secs,
                **load_fields(load0, load, load1),
            }
        )
    return rows


def plot(result: dict[str, Any], path) -> Any:
    return save_figure(figure(result), path)


def figure(result: dict[str, Any]) -> Any:
    """Speed-up against top-1 agreement and KL against density per length; the sparse rows timed under
    overload circled, and the caption of an overloaded run or of its overloaded rows (`note_overload`)."""
    plt = pyplot()

    rows = [r for r in result["rows"] if r["tau"] is not None]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    for s in sorted({r["seq_len"] for r in rows}):
        sub = sorted((r for r in rows if r["seq_len"] == s), key=lambda r: r["density"])
        ax1.plot(
            [r["top1_agreement"] for r in sub], [r["speedup"] for r in sub], marker="o", label=f"{s} tokens"
        )
        ax2.plot([r["density"] for r in sub], [r["kl"] for r in sub], marker="o", label=f"{s} tokens")
        for r in sub:
            ax1.annotate(f"{r['tau']}", (r["top1_agreement"], r["speedup"]), fontsize=6)
    circle_overloaded(ax1, [(r["top1_agreement"], r["speedup"]) for r in rows if r.get("overloaded")])
    ax1.axhline(1.0, color="grey", lw=0.8)
    ax1.set_xlabel("top-1 agreement with dense")
    ax1.set_ylabel("prefill speed-up over dense SDPA")
    ax2.set_xlabel("density (share of causal blocks)")
    ax2.set_ylabel("next-token KL vs dense (nats)")
    ax2.set_yscale("log")
    for ax in (ax1, ax2):
        ax.legend(fontsize=7)
    fig.suptitle(f"{result['model']} prefill, pooled estimator", fontsize=9)
    note_overload(fig, result.get("environment") or {}, rows, "speed-ups")
    return fig
