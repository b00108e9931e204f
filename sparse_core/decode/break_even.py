"""The break-even cache length of sparse decode: below it a sparse decode step is not faster than the
dense one, so the plan's decode path stays dense there (`DecodePlan.break_even_tokens`).

A sparse step pays a fixed cost whatever the cache length (appending the page summaries, scoring the
pages, selecting, gathering, attending: ~15 small ops on a PagedCache, more with the two-part kernel
on transformers' DynamicCache) and saves the reads of the pages it skips. At short caches the fixed
cost wins and sparse decode is a loss; measured here, on this host, for one attention layer of the
model's shape: dense SDPA as transformers runs a decode step (GQA, no mask) against the sparse step
as the retrofit runs it, interleaved step by step so load drift hits both arms, at increasing cache
lengths. Each arm's cost is its best step: on a shared host other processes preempt the tens of
small ops of a sparse step far more often than the one SDPA call of a dense step (with two threads a
descheduled thread stalls every op), so medians measure the neighbours; the best of 24 steps
measures the code, and the break-even stays the same from one calibration to the next
(docs/sparse_core.md has both on this host).

`break_even_from(rows)` is the decision, a pure function: the smallest measured length from which on
every longer measured length is at least `min_ratio` faster sparse. "Never slower than dense" is the
rule, so one slow point at a long length pushes the break-even past it."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from sparse_core.decode.attention import sparse_decode_step
from sparse_core.decode.cache import full_attention_only, paged_buffer
from sparse_core.decode.pages import sync
from sparse_core.decode.plan import DecodeLayerParams
from sparse_core.decode.scoring import local_start
from sparse_core.host import loadavg, threads_for

LENGTHS = (256, 512, 1024, 1536, 2048, 2560, 3072, 3584, 4096, 5120, 6144, 8192, 12288, 16384)
MIN_RATIO = 1.05  # a sparse step must be this much faster to count: timing noise is not a saving


@dataclass(frozen=True)
class BreakEvenRow:
    tokens: int
    dense_us: float  # best dense step
    sparse_us: float  # best sparse step (summary append, scoring, selection, kernel)
    ratio: float  # dense / sparse
    density: float  # share of the cache the sparse step read
    dense_median_us: float = 0.0  # medians, for the record: on a busy host they measure its load
    sparse_median_us: float = 0.0


@dataclass
class BreakEven:
    tokens: int  # the break-even cache length; largest measured + 1 when never reached
    reached: bool
    min_ratio: float
    rows: list[BreakEvenRow] = field(default_factory=list)
    shape: dict[str, Any] = field(default_factory=dict)
    threads: int = 1
    load: list[float] | None = None  # host load average (1, 5, 15 min) before the measurement
    paged: bool = True  # keys read from a PagedCache layer's buffer (else contiguous, DynamicCache)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def break_even_from(rows: list[BreakEvenRow], min_ratio: float = MIN_RATIO) -> tuple[int, bool]:
    """(break-even tokens, reached): the smallest length from which every longer measured length has
    dense / sparse >= min_ratio; (largest length + 1, False) when the longest one does not."""
    if not rows:
        raise ValueError("no measurements to find a break-even in")
    ordered = sorted(rows, key=lambda r: r.tokens)
    at = None
    for r in reversed(ordered):
        if r.ratio < min_ratio:
            break
        at = r.tokens
    if at is None:
        return ordered[-1].tokens + 1, False
    return at, True


@torch.inference_mode()
def measure_break_even(
    plan: Any,
    params: DecodeLayerParams,
    *,
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    lengths: tuple[int, ...] = LENGTHS,
    steps: int = 24,
    min_ratio: float = MIN_RATIO,
    seed: int = 0,
    paged: bool = True,
    threads: int | None = None,
) -> BreakEven:
    """Time one attention layer's decode step dense vs sparse (`params` of `plan`, whose gate weights
    the 'gate' estimator reads) at each cache length on random keys; -> the break-even. `paged`: the
    keys are a view of a PagedCache layer's buffer (the cache the served model decodes on when all
    its layers read the whole cache); else contiguous, as transformers' DynamicCache hands them.
    `threads`: torch threads for the measurement (restored after); None: the evaluation's policy,
    the CPUs really free (sparse_core.host.apply_thread_policy). Two threads on a busy two-core host
    stall on every small op: a calibration at load 3.5 timed a 256-token dense step at 3.7 ms (50 us
    alone) and found no break-even up to 8k."""
    with threads_for(threads):
        return _measure(
            plan,
            params,
            q_heads=q_heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            dtype=dtype,
            lengths=lengths,
            steps=steps,
            min_ratio=min_ratio,
            seed=seed,
            paged=paged,
        )


def _measure(
    plan: Any,
    params: DecodeLayerParams,
    *,
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    lengths: tuple[int, ...],
    steps: int,
    min_ratio: float,
    seed: int,
    paged: bool,
) -> BreakEven:
    if q_heads % kv_heads:
        raise ValueError(f"q_heads {q_heads} is not a multiple of kv_heads {kv_heads}")
    params = replace(params, break_even_tokens=0, dense=False)
    gen = torch.Generator().manual_seed(seed)
    ps = params.page_size
    load = loadavg()
    rows: list[BreakEvenRow] = []
    for length in sorted(set(int(x) for x in lengths)):
        if length < 2 * ps:
            continue
        k_all = torch.randn(1, kv_heads, length + steps, head_dim, generator=gen).to(dtype)
        v_all = torch.randn(1, kv_heads, length + steps, head_dim, generator=gen).to(dtype)
        if paged:  # both arms read a PagedCache layer's buffer, as the served model's decode does
            k_all, v_all = paged_buffer(k_all), paged_buffer(v_all)
        qs = [torch.randn(1, q_heads, 1, head_dim, generator=gen).to(dtype) for _ in range(steps)]
        pages = sync(None, k_all[:, :, :length], ps)
        dense_t, sparse_t, read = [], [], []
        for warm in (True, False):
            for i, q in enumerate(qs):
                k, v = k_all[:, :, : length + i + 1], v_all[:, :, : length + i + 1]
                if not paged:  # contiguous, as transformers' DynamicCache hands the layer its keys
                    k, v = k.contiguous(), v.contiguous()
                t0 = time.perf_counter()
                F.scaled_dot_product_attention(q, k, v, enable_gqa=True).transpose(1, 2).contiguous()
                t1 = time.perf_counter()
                n = k.shape[2]
                pages = sync(pages, k, ps)
                start = local_start(n, ps, params.local_pages)
                keep = params.keep_pages(pages.n_pages)
                if start == 0 or (keep is not None and keep >= pages.n_pages and params.tau is None):
                    # the retrofit runs the dense path here: nothing to skip
                    F.scaled_dot_product_attention(q, k, v, enable_gqa=True).transpose(1, 2).contiguous()
                    kept = n
                else:
                    out, kept, _ = sparse_decode_step(plan, params, pages, q, k, v, start)
                    out.transpose(1, 2).contiguous()
                t2 = time.perf_counter()
                if not warm:
                    dense_t.append(t1 - t0)
                    sparse_t.append(t2 - t1)
                    read.append(kept / n)
            pages = sync(None, k_all[:, :, :length], ps)
        d, s = min(dense_t) * 1e6, min(sparse_t) * 1e6
        dm, sm = statistics.median(dense_t) * 1e6, statistics.median(sparse_t) * 1e6
        density = round(statistics.fmean(read), 4)
        med = {"dense_median_us": round(dm, 1), "sparse_median_us": round(sm, 1)}
        rows.append(BreakEvenRow(length, round(d, 1), round(s, 1), round(d / s, 3), density, **med))
    tokens, reached = break_even_from(rows, min_ratio)
    return BreakEven(
        tokens=tokens,
        reached=reached,
        min_ratio=min_ratio,
        rows=rows,
        shape={"q_heads": q_heads, "kv_heads": kv_heads, "head_dim": head_dim, "dtype": str(dtype)},
        threads=torch.get_num_threads(),
        load=load,
        paged=paged,
    )


def measure_for_model(model: Any, plan: Any, budget_tokens: int | None = None, **kw: Any) -> BreakEven:
    """`measure_break_even` for `model`'s attention shape at `plan`'s decode settings with
    `budget_tokens` (default: the plan's top-level budget)."""
    cfg = model.config
    q_heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or q_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // q_heads)
    dtype = next(model.parameters()).dtype
    n_layers = int(cfg.num_hidden_layers)
    layer = next((i for i in range(n_layers) if i not in plan.decode.dense_layers), 0)
    params = replace(
        plan.decode.layer_params(layer, plan.block_size),
        budget_tokens=plan.decode.budget_tokens if budget_tokens is None else budget_tokens,
        density=plan.decode.density,
        tau=plan.decode.tau,
    )
    cap = int(getattr(cfg, "max_position_embeddings", 0) or 0)
    lengths = kw.pop("lengths", LENGTHS)
    if cap:
        lengths = tuple(x for x in lengths if x <= cap) or (cap,)
    shape = {"q_heads": q_heads, "kv_heads": kv_heads, "head_dim": head_dim}
    kw.setdefault("paged", full_attention_only(cfg))
    return measure_break_even(plan, params, **shape, dtype=dtype, lengths=lengths, **kw)
