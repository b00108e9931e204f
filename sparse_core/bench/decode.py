"""`sparsepilot bench decode`: what sparse decode saves per generated token.

1. One attention layer of SmolLM2's shape (9 query heads, 3 KV heads, head_dim 64), one query token
   against a cache of 16k (and 32k) tokens: dense SDPA as transformers runs a decode step (GQA, no
   mask) vs the sparse decode step (page-summary append, page scoring, selection, gather kernel) at a
   few densities, both arms reading views of a PagedCache layer's buffer (as the served model decodes).
   Each step appends one key, so summary maintenance is in the time; dense is timed before and after
   the sparse runs and the faster is kept.
2. The real SmolLM2 end to end at a few context lengths: dense greedy decode on transformers'
   DynamicCache (what `generate` runs) vs the sparsified model on the same prompt and tokens
   (sparse_core.decode.measure), ms per token side by side, with the fidelity of the generated tokens
   (KL, teacher-forced top-1 agreement, free-running greedy match). The sparse arm runs on the same
   DynamicCache (the attention saving alone) and on PagedCache (what sparse decode can use); the row
   "dense attention, paged cache" separates what the cache alone saves, and each budget's row
   "paged cache, vs dense paged" times sparse against dense attention both on PagedCache, in the same
   interleaved pairs: what sparse attention alone saves on the cache it decodes from.

The layer rows' timings are medians over steps; run with one torch thread on a shared machine (the CLI
sets it). A model row's speed-up is the geometric mean over `runs` paired dense/sparse runs of their
mean-step ratios, its interval Student t over their log ratios with runs - 1 degrees of freedom
(`sparse_core.speedup`): 2 runs give t = 6.31 at 90%, 3 give 2.92, so the default is 3. Its ms columns
are what that speed-up is made of, the geometric mean over the runs of each arm's mean step
(dense_ms_per_token / ms_per_token is the speed-up); the medians over all steps are in the JSON
(`median_step_ms`, `dense_median_step_ms`)."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sparse_core.bench.attention import HEAD_DIM, KV_HEADS, Q_HEADS
from sparse_core.bench.common import (
    RunClock,
    circle_overloaded,
    fit_cache_lengths,
    load_fields,
    note_overload,
    pyplot,
    save_figure,
)
from sparse_core.decode.attention import sparse_decode_step
from sparse_core.decode.cache import paged_buffer
from sparse_core.decode.page_gate import PAGE_SIZE_KEY
from sparse_core.decode.pages import sync
from sparse_core.decode.plan import TRAINED_BY_DECODE_CALIBRATION, DecodePlan
from sparse_core.decode.scoring import local_start
from sparse_core.host import HostLoadMeter
from sparse_core.plan import SparsePlan

QUICK_LAYER_LENGTHS = (16384,)
FULL_LAYER_LENGTHS = (16384, 32768)
LAYER_DENSITIES = (0.05, 0.10, 0.25)
QUICK_MODEL_LENGTHS = (8192,)
FULL_MODEL_LENGTHS = (1024, 2048, 4096, 8192)
DEFAULT_PAGE_SIZE = 16
DEFAULT_BUDGETS = (1024, 2048)
# a model row whose dense arm runs on PagedCache too: what sparse attention saves over dense attention on
# the same cache, timed in interleaved pairs (the other rows' dense arm is stock decode on DynamicCache)
VS_DENSE_PAGED = "paged cache, vs dense paged"
LOCAL_PAGES = 4  # as sparse_core.decode.calibration.DecodeLimits

LAYER_COLUMNS = [
    "seq_len",
    "page_size",
    "density",
    "estimator_share",
    "ms_per_step",
    "dense_ms_per_step",
    "speedup",
    "others_busy_cores",
    "overloaded",
]
DEFAULT_RUNS = 3  # paired runs per model row (the interval's t: 6.31 at 2 runs, 2.92 at 3)
MODEL_COLUMNS = [
    "seq_len",
    "plan",
    "density",
    "estimator_share",
    "ms_per_token",
    "dense_ms_per_token",
    "speedup",
    "speedup_lo",
    "speedup_hi",
    "kl",
    "agree",
    "greedy_match",
    "pairs_kept_under_overload",
    "overloaded",
]


@dataclass
class LayerRow:
    seq_len: int
    page_size: int
    target_density: float
    density: float
    estimator_ms: float
    estimator_share: float
    ms_per_step: float
    dense_ms_per_step: float
    speedup: float
    # the host during the sparse steps and the dense ones its speed-up divides by (`load_fields`)
    others_busy_cores: float | None = None
    overloaded: bool = False


def host_fields(host: dict[str, Any] | None) -> dict[str, Any]:
    """A model row's host record from its `compare_decode` run pairs (`extra["host"]`, a
    `PairMeter.record()`): the most cores the others used, pairs retimed and kept under overload, and
    `overloaded` (a pair kept under overload: the speed-up is then partly the host's)."""
    h = host or {}
    kept = int(h.get("pairs_kept_under_overload") or 0)
    return {
        "others_busy_cores": h.get("max_others_busy_cores"),
        "pairs_timed": h.get("pairs_timed"),
        "pairs_retimed_for_overload": h.get("pairs_retimed_for_overload"),
        "pairs_kept_under_overload": kept,
        "max_wait_share": h.get("max_wait_share"),
        "overloaded": kept > 0,
    }


def _median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1000


@torch.inference_mode()
def layer_bench(
    lengths: tuple[int, ...],
    *,
    page_size: int = DEFAULT_PAGE_SIZE,
    densities: tuple[float, ...] = LAYER_DENSITIES,
    steps: int = 12,
    estimator: str = "quest",
    seed: int = 0,
    say: Callable[[str], None] = lambda _m: None,
) -> list[LayerRow]:
    gen = torch.Generator().manual_seed(seed)
    rows: list[LayerRow] = []
    for length in lengths:
        say(f"attention layer, {length} cached tokens: building the cache")
        base_k = torch.randn(1, KV_HEADS, length, HEAD_DIM, generator=gen)
        base_v = torch.randn(1, KV_HEADS, length, HEAD_DIM, generator=gen)
        extra_k = torch.randn(1, KV_HEADS, steps, HEAD_DIM, generator=gen)
        extra_v = torch.randn(1, KV_HEADS, steps, HEAD_DIM, generator=gen)
        # both arms read views of a PagedCache layer's buffer, as the served model's decode does
        kbuf = paged_buffer(torch.cat([base_k, extra_k], 2))
        vbuf = paged_buffer(torch.cat([base_v, extra_v], 2))
        ks = [kbuf[:, :, : length + i] for i in range(1, steps + 1)]
        vs = [vbuf[:, :, : length + i] for i in range(1, steps + 1)]
        qs = [torch.randn(1, Q_HEADS, 1, HEAD_DIM, generator=gen) for _ in range(steps)]

        def dense_pass(qs=qs, ks=ks, vs=vs) -> list[float]:
            out = []
            for q, k, v in zip(qs, ks, vs, strict=True):
                t0 = time.perf_counter()
                F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                out.append(time.perf_counter() - t0)
            return out

        say(f"attention layer, {length} cached tokens: dense")
        dense_pass()  # warm-up
        with HostLoadMeter() as dense0:
            d0 = dense_pass()
        pending = []
        for target in densities:
            say(f"attention layer, {length} cached tokens: sparse at ~{target:.0%}")
            plan = SparsePlan(
                decode=DecodePlan(
                    estimator=estimator, page_size=page_size, budget_tokens=None, density=target
                )
            )
            params = plan.decode.layer_params(0, plan.block_size)
            for warm in (True, False):
                pages = sync(None, ks[0][:, :, :-1], page_size)
                times, est, kept = [], [], []
                with HostLoadMeter() as meter:
                    for q, k, v in zip(qs, ks, vs, strict=True):
                        t0 = time.perf_counter()
                        pages = sync(pages, k, page_size)
                        start = local_start(k.shape[2], page_size, params.local_pages)
                        _, read, t1 = sparse_decode_step(plan, params, pages, q, k, v, start)
                        times.append(time.perf_counter() - t0)
                        est.append(t1 - t0)
                        kept.append(read / k.shape[2])
                if not warm:
                    pending.append((target, times, est, kept, meter.load))
        with HostLoadMeter() as dense1:
            d1 = dense_pass()
        dense_ms = min(_median_ms(d0), _median_ms(d1))
        for target, times, est, kept, load in pending:
            ms = _median_ms(times)
            rows.append(
                LayerRow(
                    seq_len=length,
                    page_size=page_size,
                    target_density=target,
                    density=round(statistics.fmean(kept), 4),
                    estimator_ms=_median_ms(est),
                    estimator_share=_median_ms(est) / dense_ms,
                    ms_per_step=ms,
                    dense_ms_per_step=dense_ms,
                    speedup=dense_ms / ms,
                    **load_fields(dense0.load, load, dense1.load),
                )
            )
    return rows


def model_bench(
    model_ref: str,
    lengths: tuple[int, ...],
    *,
    budgets: tuple[int, ...] = DEFAULT_BUDGETS,
    page_size: int = DEFAULT_PAGE_SIZE,
    estimator: str | tuple[str, ...] = "quest",
    plan: SparsePlan | None = None,
    new_tokens: int = 64,
    repeats: int = 2,
    say: Callable[[str], None] = lambda _m: None,
) -> tuple[list[dict[str, Any]], str]:
    """Rows per context length: dense attention on the paged cache, then the given plan's decode or,
    without one, each estimator's budget rows (several estimators: side by side in this one run)."""
    from sparse_core.corpus import corpus_texts, timing_window
    from sparse_core.decode.measure import RETIMING, compare_decode
    from sparse_core.loading import load_model

    say(f"loading {model_ref}")
    model, tok = load_model(model_ref)
    model.eval()
    cap = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    texts = corpus_texts("all")
    n_layers = int(model.config.num_hidden_layers)
    # (name, plan, dense-arm cache, sparse-arm cache): the dense arm on transformers' DynamicCache (what
    # `generate` runs), or on PagedCache in the "vs dense paged" rows, which time what sparse attention
    # alone saves on the cache sparse decode uses, in interleaved pairs
    plans: list[tuple[str, SparsePlan, str, str]] = [
        (
            "dense attention, paged cache",
            SparsePlan(decode=DecodePlan(dense_layers=tuple(range(n_layers)))),
            "dynamic",
            "paged",
        )
    ]
    gate_report = None
    if plan is not None and plan.decode is not None:
        plans += [
            ("given plan, dynamic cache", plan, "dynamic", "dynamic"),
            ("given plan, paged cache", plan, "dynamic", "paged"),
            (f"given plan, {VS_DENSE_PAGED}", plan, "paged", "paged"),
        ]
    else:
        # a plan without a decode section lends its learned weights to the budget rows
        weights = plan or SparsePlan()
        names = (estimator,) if isinstance(estimator, str) else tuple(estimator)
        trained = any(e in TRAINED_BY_DECODE_CALIBRATION for e in names)
        if trained and PAGE_SIZE_KEY not in weights.tensors:
            weights, gate_report = _trained_page_gate(
                model, tok, texts, weights, max(lengths), page_size, say
            )
        for est in names:
            for i, b in enumerate(budgets):
                dp = DecodePlan(estimator=est, page_size=page_size, budget_tokens=b, local_pages=LOCAL_PAGES)
                name = f"{est} p{page_size} budget {b}"
                budget_plan = weights.with_(decode=dp)
                if i == 0:
                    plans.append((f"{name}, dynamic cache", budget_plan, "dynamic", "dynamic"))
                plans.append((f"{name}, paged cache", budget_plan, "dynamic", "paged"))
                plans.append((f"{name}, {VS_DENSE_PAGED}", budget_plan, "paged", "paged"))
    rows = []
    for length in lengths:
        if cap and length + new_tokens > cap:  # `run` fits its lengths first (`fit_cache_lengths`)
            raise ValueError(
                f"{length:,} cache tokens + {new_tokens:,} new tokens exceed {model_ref}'s {cap:,} "
                "positions (max_position_embeddings)"
            )
        win = timing_window(tok, length, seed=7)
        ids = torch.tensor([win])
        for name, p, dense_kind, kind in plans:
            say(f"{model_ref}: {length} tokens, {name}")
            r = compare_decode(
                model,
                p,
                ids,
                new_tokens=new_tokens,
                repeats=repeats,
                dense_cache=dense_kind,
                sparse_cache=kind,
                free_running=p.decode.dense_layers != tuple(range(n_layers)),
                progress=lambda s, d, t, name=name, length=length: say(
                    f"{length} tokens, {name}: "
                    + (f"run {d}/{t}" if s != RETIMING else f"{s}, from run {d + 1}/{t}")
                ),
            )
            rows.append(
                {
                    "seq_len": r.seq_len,
                    "plan": name,
                    "dense_cache": dense_kind,
                    "sparse_cache": kind,
                    "new_tokens": r.new_tokens,
                    "density": round(r.density, 4),
                    "estimator_share": r.estimator_share,
                    # the speed-up's own parts: dense_ms_per_token / ms_per_token is `speedup`
                    "ms_per_token": r.sparse_ms_run_geomean,
                    "dense_ms_per_token": r.dense_ms_run_geomean,
                    "sparse_tokens_per_s": 1000 / r.sparse_ms_run_geomean,
                    "dense_tokens_per_s": 1000 / r.dense_ms_run_geomean,
                    "median_step_ms": r.sparse_ms_per_token,
                    "dense_median_step_ms": r.dense_ms_per_token,
                    "speedup": r.speedup,
                    "speedup_lo": r.speedup_interval[0],
                    "speedup_hi": r.speedup_interval[1],
                    "kl": r.kl,
                    "agree": r.agree,
                    "nll_delta": r.nll_delta,
                    "greedy_match": r.greedy_match,
                    "first_divergence": r.first_divergence,
                    "dense_seconds_per_token": r.dense_seconds_per_token,
                    "sparse_seconds_per_token": r.sparse_seconds_per_token,
                    **host_fields(r.extra.get("host")),
                }
            )
    return rows, str(getattr(model.config, "_name_or_path", model_ref)), gate_report


def _trained_page_gate(model, tok, texts, weights: SparsePlan, length: int, page_size: int, say):
    """`weights` + a page gate trained as decode calibration trains it, on the windows that follow the
    benchmark's own in the same packing (text no timed run reads). -> (plan, training report dict)."""
    from sparse_core.corpus import pack_token_windows
    from sparse_core.decode.page_gate import WINDOWS, train_page_gate

    cap = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    length = min(length, cap) if cap else length
    windows = pack_token_windows(tok, texts, length, 1 + WINDOWS, seed=7)[1:]
    if not windows:
        raise ValueError(
            f"the corpus holds no {length}-token window beyond the benchmark's to train page_gate on"
        )

    def progress(what: str, done: int, total: int) -> None:
        say(f"{what} {done}/{total}")

    gate, rep = train_page_gate(model, windows, page_size=page_size, progress=progress)
    return weights.with_(tensors={**weights.tensors, **gate.to_tensors()}), rep.to_dict()


def run(
    *,
    quick: bool = False,
    model_ref: str = "smollm2-135m",
    page_size: int = DEFAULT_PAGE_SIZE,
    budgets: tuple[int, ...] = DEFAULT_BUDGETS,
    estimator: str | tuple[str, ...] = "quest",
    plan: SparsePlan | None = None,
    new_tokens: int = 64,
    runs: int = DEFAULT_RUNS,
    layer: bool = True,
    model: bool = True,
    lengths: tuple[int, ...] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``lengths``: the model rows' cache lengths; each plus ``new_tokens`` must fit the model's
    positions (ValueError otherwise). None: the mode's, those over the model's positions shortened to
    fit, which `model_lengths` in the result records."""
    from sparse_core.loading import resolve_model_ref

    say = progress or (lambda _m: None)
    model_lengths: dict[str, Any] = {"asked": list(lengths) if lengths else None}
    if model:  # checked before any work: the model's positions from its config, no weights read
        context = resolve_model_ref(model_ref).context_length
        timed, shortened = fit_cache_lengths(
            lengths or (QUICK_MODEL_LENGTHS if quick else FULL_MODEL_LENGTHS),
            context,
            new_tokens,
            asked=bool(lengths),
            what="lengths",
        )
        model_lengths |= {
            "timed": list(timed),
            "context": context,
            "new_tokens": new_tokens,
            # a default length over the model's positions: {asked: timed}, said in the table's title
            "shortened": {str(k): v for k, v in shortened.items()},
        }
    clock = RunClock()
    layer_rows = (
        layer_bench(QUICK_LAYER_LENGTHS if quick else FULL_LAYER_LENGTHS, page_size=page_size, say=say)
        if layer
        else []
    )
    model_rows: list[dict[str, Any]] = []
    name, gate_report = model_ref, None
    if model:
        model_rows, name, gate_report = model_bench(
            model_ref,
            tuple(model_lengths["timed"]),
            budgets=budgets,
            page_size=page_size,
            estimator=estimator,
            plan=plan,
            new_tokens=new_tokens,
            repeats=runs,
            say=say,
        )
    return {
        "benchmark": "decode",
        "quick": quick,
        "layer_shape": {"q_heads": Q_HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "batch": 1},
        "estimator": (estimator if isinstance(estimator, str) else ",".join(estimator))
        if plan is None or plan.decode is None
        else "from plan",
        "layer_estimator": "quest",  # the one-layer rows score with Quest (random keys: no learned weights)
        "model": name,
        "model_lengths": model_lengths,
        "runs": runs,  # paired dense/sparse runs per model row: the speed-up interval has runs - 1 dof
        "layer_rows": [asdict(r) for r in layer_rows],
        "model_rows": model_rows,
        "page_gate_training": gate_report,  # --estimator page_gate without weights: trained here
        **clock.summary(),
    }


def plot(result: dict[str, Any], path) -> Any:
    return save_figure(figure(result), path)


def figure(result: dict[str, Any]) -> Any:
    """ms per generated token vs context length, dense and each sparse plan (model rows); the rows whose
    pairs were kept under overload circled (their sparse point and the dense one it is paired with), and
    the caption of an overloaded run or of its overloaded rows (`note_overload`)."""
    plt = pyplot()

    rows = result["model_rows"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    if rows:
        # the dense line is stock decode (DynamicCache); a "vs dense paged" row's dense arm is not it
        stock = [r for r in rows if r.get("dense_cache", "dynamic") == "dynamic"]
        dense = sorted({(r["seq_len"], r["dense_ms_per_token"]) for r in stock})
        by_len: dict[int, float] = {}
        for s, ms in dense:
            by_len[s] = min(ms, by_len.get(s, math.inf))
        ax.plot(list(by_len), list(by_len.values()), "k-o", label="dense")
        for name in sorted({r["plan"] for r in rows}):
            pts = sorted((r["seq_len"], r["ms_per_token"]) for r in rows if r["plan"] == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        over = [r for r in rows if r.get("overloaded")]
        # a dense point is the fastest of its length's stock rows: circled where that row was overloaded
        dense_over = {
            (r["seq_len"], r["dense_ms_per_token"])
            for r in over
            if r.get("dense_cache", "dynamic") == "dynamic"
        }
        circle_overloaded(
            ax,
            [(r["seq_len"], r["ms_per_token"]) for r in over]
            + [p for p in by_len.items() if p in dense_over],
        )
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("ms per generated token")
    ax.set_title(f"decode, {result['model']}")
    ax.legend(fontsize=7)
    note_overload(fig, result.get("environment") or {}, rows, "times")
    return fig
