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
(docs/sparse_core.md has both on this host). The best step still depends on the host: each length's
timed steps run under the project's meter (`sparse_core.host.PairMeter`), timed again when our threads
waited for a CPU, and kept flagged after RETIMES tries; the record says so per length (`overloaded`,
`wait_share`) and in all (`BreakEven.host`), and `break_even_host` sums it for the plan's metadata,
with the span each budget's break-even could lie in had its overloaded lengths been quiet
(`overload_span`: only lengths at or above the longest one not faster can move it), so the ROI's
decode line says when its break-even came from a busy host in a way that matters to it.

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
from sparse_core.host import PairMeter, host_totals, loadavg, threads_for

LENGTHS = (256, 512, 1024, 1536, 2048, 2560, 3072, 3584, 4096, 5120, 6144, 8192, 12288, 16384)
MIN_RATIO = 1.05  # a sparse step must be this much faster to count: timing noise is not a saving
RETIMES = 2  # a length's steps timed while the host was overloaded are timed again at most this often


@dataclass(frozen=True)
class BreakEvenRow:
    tokens: int
    dense_us: float  # best dense step
    sparse_us: float  # best sparse step (summary append, scoring, selection, kernel)
    ratio: float  # dense / sparse
    density: float  # share of the cache the sparse step read
    dense_median_us: float = 0.0  # medians, for the record: on a busy host they measure its load
    sparse_median_us: float = 0.0
    # the host while the kept steps ran (`HostLoad`): our threads waited for a CPU (None: not recorded,
    # a record written before the meter), and the share of their runnable time they waited
    overloaded: bool | None = None
    wait_share: float | None = None


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
    # some length's steps were kept under overload after RETIMES retimes (None: not recorded, a record
    # written before the meter); the most waiting share of any kept length; `host_totals` of the lengths
    overloaded: bool | None = None
    wait_share: float | None = None
    host: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BreakEven:
        """A `to_dict()` record, also one written before the load fields (they are then None)."""
        row_keys = set(BreakEvenRow.__dataclass_fields__)
        rows = [BreakEvenRow(**{k: v for k, v in r.items() if k in row_keys}) for r in data.get("rows", [])]
        keys = set(cls.__dataclass_fields__) - {"rows"}
        return cls(rows=rows, **{k: v for k, v in data.items() if k in keys})


def break_even_host(records: dict[str, dict[str, Any]] | None) -> dict[str, Any] | None:
    """What the host did while the break-evens behind a plan were timed, from calibration's records
    (`BreakEven.to_dict()` per budget): budgets measured, lengths timed, lengths kept under overload, the
    most waiting share, `overloaded` (None where no record says: written before the meter). None when
    nothing was measured (a given break-even)."""
    if not records:
        return None
    measured = [BreakEven.from_dict(r) for r in records.values()]
    rows = [row for m in measured for row in m.rows]
    waits = [r.wait_share for r in rows if r.wait_share is not None]
    known = [m.overloaded for m in measured if m.overloaded is not None]
    spans = {b: overload_span(m.rows, m.min_ratio) for b, m in zip(records, measured, strict=True)}
    return {
        "budgets": len(measured),
        "lengths_timed": len(rows),
        "lengths_kept_under_overload": sum(1 for r in rows if r.overloaded),
        "max_wait_share": max(waits, default=None),
        "overloaded": any(known) if known else None,
        # per budget whose break-even an overloaded length could have moved: `overload_span`
        "overload_spans": {b: span for b, span in spans.items() if span is not None},
    }


def overload_span(rows: list[BreakEvenRow], min_ratio: float = MIN_RATIO) -> dict[str, Any] | None:
    """Where a break-even could lie had its overloaded lengths been timed on a quiet host, or None when
    no overloaded length could have moved it. Pure; the rule is `break_even_from`'s.

    The break-even is the length just after the longest length M that was not `min_ratio` faster
    (the shortest length when every one was). A length below M cannot move it: whatever its ratio, M
    still pins the break-even above it. An overloaded length at M could have been faster on a quiet
    host, which lowers the break-even; one above M (counted faster) could have been slower, which
    raises it past that length. So the overloaded lengths at or above M decide (`lengths`), and the
    break-even lies between `low` (every overloaded slow length faster) and `high` (every overloaded
    faster length slower), both `break_even_from` of the rows so changed; `break_even` is as measured."""
    if not rows:
        return None
    slow = [r.tokens for r in rows if r.ratio < min_ratio]
    last_slow = max(slow, default=None)
    deciding = sorted(r.tokens for r in rows if r.overloaded and (last_slow is None or r.tokens >= last_slow))
    if not deciding:
        return None
    faster = [replace(r, ratio=max(r.ratio, min_ratio)) if r.overloaded else r for r in rows]
    slower = [replace(r, ratio=0.0) if r.overloaded else r for r in rows]
    return {
        "break_even": break_even_from(rows, min_ratio)[0],
        "low": break_even_from(faster, min_ratio)[0],
        "high": break_even_from(slower, min_ratio)[0],
        "lengths": deciding,
    }


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
    hosts: list[dict[str, Any]] = []
    for length in sorted(set(int(x) for x in lengths)):
        if length < 2 * ps:
            continue
        k_all = torch.randn(1, kv_heads, length + steps, head_dim, generator=gen).to(dtype)
        v_all = torch.randn(1, kv_heads, length + steps, head_dim, generator=gen).to(dtype)
        if paged:  # both arms read a PagedCache layer's buffer, as the served model's decode does
            k_all, v_all = paged_buffer(k_all), paged_buffer(v_all)
        qs = [torch.randn(1, q_heads, 1, head_dim, generator=gen).to(dtype) for _ in range(steps)]
        _steps(plan, params, qs, k_all, v_all, length, paged)  # warm-up, untimed
        meter = PairMeter(RETIMES)
        while True:  # the timed steps, again where the host was overloaded while they ran
            with meter.pair() as keep:
                dense_t, sparse_t, read = _steps(plan, params, qs, k_all, v_all, length, paged)
            if keep():
                break
        hosts.append(meter.record())
        kept = meter.loads[-1]
        d, s = min(dense_t) * 1e6, min(sparse_t) * 1e6
        dm, sm = statistics.median(dense_t) * 1e6, statistics.median(sparse_t) * 1e6
        density = round(statistics.fmean(read), 4)
        med = {"dense_median_us": round(dm, 1), "sparse_median_us": round(sm, 1)}
        host = {"overloaded": bool(kept["overloaded"]), "wait_share": kept.get("wait_share")}
        rows.append(BreakEvenRow(length, round(d, 1), round(s, 1), round(d / s, 3), density, **med, **host))
    tokens, reached = break_even_from(rows, min_ratio)
    waits = [r.wait_share for r in rows if r.wait_share is not None]
    return BreakEven(
        tokens=tokens,
        reached=reached,
        min_ratio=min_ratio,
        rows=rows,
        shape={"q_heads": q_heads, "kv_heads": kv_heads, "head_dim": head_dim, "dtype": str(dtype)},
        threads=torch.get_num_threads(),
        load=load,
        paged=paged,
        overloaded=any(r.overloaded for r in rows),
        wait_share=max(waits, default=None),
        host=host_totals(hosts),
    )


def _steps(
    plan: Any,
    params: DecodeLayerParams,
    qs: list[torch.Tensor],
    k_all: torch.Tensor,
    v_all: torch.Tensor,
    length: int,
    paged: bool,
) -> tuple[list[float], list[float], list[float]]:
    """One pass of the interleaved steps at `length` cached tokens, one per query (the cache growing by
    one each): (dense seconds, sparse seconds, share of the cache the sparse step read) per step."""
    ps = params.page_size
    pages = sync(None, k_all[:, :, :length], ps)
    dense_t, sparse_t, read = [], [], []
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
        dense_t.append(t1 - t0)
        sparse_t.append(t2 - t1)
        read.append(kept / n)
    return dense_t, sparse_t, read


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
