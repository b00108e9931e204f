"""`evaluate(model, tokenizer, plan, suite) -> EvaluationReport`: the evidence a gate, an approver and a
board read about one sparse plan, always against the same model run dense.

Sections (each can be switched off by the suite, and is then None in the report):
- fidelity on natural text: next-token KL, top-1 agreement, delta NLL, per-layer attention-output
  relative error (as it propagates through the sparse model);
- long-context probes scored by log-likelihood rank (dense accuracy is the reference); for a plan
  with a `decode` section also answered by greedy generation (the answer read by decode steps);
- use-case task scores on a JSONL dataset (dense vs sparse);
- speed: prefill seconds and tokens/s dense vs sparse at the dataset's length mix, a dense and a sparse
  prefill back to back per repeat (alternating order), the speed-up with a t interval over those pairs
  (sparse_core.speedup); density computed and estimator share; where the sparse prefill's time goes
  (scoring, kernel, the rest) and the speed-up a perfect kernel would give at the density
  (sparse_core.time_split);
- decode: ms per generated token dense vs sparse at the same context lengths as the speed section,
  side by side on one cache, a dense and a sparse run per repeat, the speed-up with a t interval over
  the runs (a run is the unit, not a step), the density read and the fidelity of the
  generated tokens (sparse_core.decode.measure); for a plan without a `decode` section, dense decode
  timed the same way (the output tokens' price in both arms);
- pictures: layer x head density heatmap, one sample's selected blocks over its attention map.

The model is returned dense whatever happens.
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparse_core.capture import block_attention_mass, capture_attention
from sparse_core.corpus import corpus_texts, pack_token_windows, timing_window
from sparse_core.fidelity import dense_reference, measure_fidelity
from sparse_core.fidelity_bound import bound_fields
from sparse_core.host import threads_restored
from sparse_core.plan import SparsePlan, model_shape
from sparse_core.probes import PROBE_KINDS, generate_probes, score_probes
from sparse_core.progress import Progress, counter
from sparse_core.speedup import pair_order, paired_speedup, weighted_pairs
from sparse_core.task_bound import delta_bounds
from sparse_core.tasks import TaskRow, read_dataset, score_dataset

SCHEMA_VERSION = 1
# One-sided confidence of every bound the report gives beside a mean (task-score change, fidelity)
CONFIDENCE = 0.95


@dataclass
class EvalSuite:
    """What to measure and how much of it. `quick()` fits the pilot's main job; `thorough()` is for
    the closing numbers."""

    # fidelity on natural text (default: the stdlib corpus's held-out part)
    n_fidelity_texts: int = 4
    fidelity_seq_len: int = 2048
    fidelity_texts: Sequence[str] | None = None
    fidelity_fraction: float = 0.5
    layer_errors: bool = True
    # probes
    probe_lengths: tuple[int, ...] = (2048,)
    probe_kinds: tuple[str, ...] = PROBE_KINDS
    probe_depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    probes_per_depth: int = 1
    # use-case dataset
    dataset: str | Path | None = None
    dataset_rows: Sequence[TaskRow] | None = None
    task: str | None = None  # default task for rows without one (default: loglik)
    max_dataset_rows: int | None = 16
    max_new_tokens: int = 32
    max_prompt_tokens: int | None = None
    # speed
    speed_lengths: tuple[int, ...] | None = None  # None: the dataset's length mix (or 2048); (): off
    # prompts whose lengths make that mix (default: the dataset rows): a use case's whole traffic sample
    # where the task rows are only the part kept apart from calibration
    speed_rows: Sequence[TaskRow] | None = None
    speed_weights: tuple[float, ...] | None = None
    speed_repeats: int = 3
    max_speed_buckets: int = 3
    # decode (only for plans with a decode section): tokens generated per run, 0 = off
    decode_new_tokens: int = 32
    decode_repeats: int = 4  # runs per arm: a run is the unit of the decode speed-up's interval
    # pictures
    pictures_dir: str | Path | None = None
    picture_layer: int | None = None  # default: the middle layer
    seed: int = 0

    @classmethod
    def quick(cls, **kw) -> EvalSuite:
        base: dict[str, Any] = dict(
            n_fidelity_texts=2,
            fidelity_seq_len=1024,
            probe_lengths=(1024,),
            probe_kinds=("passkey", "kv"),
            probe_depths=(0.1, 0.5, 0.9),
            max_dataset_rows=6,
            speed_repeats=2,
            max_speed_buckets=2,
        )
        base.update(kw)
        return cls(**base)

    @classmethod
    def thorough(cls, **kw) -> EvalSuite:
        base: dict[str, Any] = dict(
            n_fidelity_texts=6,
            probe_lengths=(2048, 4096, 8192),
            probe_depths=(0.1, 0.3, 0.5, 0.7, 0.9),
            max_dataset_rows=None,
            speed_lengths=(2048, 4096, 8192),
            speed_repeats=3,
        )
        base.update(kw)
        return cls(**base)


@dataclass
class SpeedRow:
    seq_len: int
    weight: float
    dense_seconds: list[float]
    sparse_seconds: list[float]
    speedup: float  # geometric mean of the pairs' dense / sparse ratios (sparse_core.speedup)
    speedup_min_based: float  # min dense / min sparse
    speedup_interval: tuple[float, float]  # 90% t interval over the pairs' log ratios
    dense_tokens_per_s: float
    sparse_tokens_per_s: float
    density: float | None
    estimator_share: float | None  # estimator + selection seconds / dense prefill seconds
    # where the time goes (sparse_core.time_split.TimeSplit.to_dict): scoring, kernel, the rest;
    # attention's inferred share of the dense prefill, its own speed-up, the speed-up a perfect kernel
    # would give at this density. None in reports written before it was measured.
    time_split: dict | None = None
    # this length's pairs on the host (`host.PairMeter.record()`: pairs timed, retimed and kept under
    # overload, the most cores the others used): the report's table marks the row with it. None in reports
    # written before review s52
    host: dict | None = None


@dataclass
class EvaluationReport:
    schema_version: int
    model: dict
    plan_hash: str
    estimator: str
    device: str
    torch_version: str
    fidelity: dict | None = None
    layer_errors: list[float] | None = None
    probes: dict | None = None
    tasks: dict | None = None
    speed: list[SpeedRow] | None = None
    speed_summary: dict | None = None
    decode: dict | None = None  # {"rows": [...], "summary": {...}}; summary["sparse_decode"]: plan's section
    density: float | None = None
    layer_density: list[float] | None = None
    head_density: list[list[float]] | None = None
    artifacts: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    suite: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Stable schema: every field, in declaration order, always present (None when a section did
        not run)."""
        return {k: _jsonable(v) for k, v in asdict(self).items()}

    def metrics(self) -> dict[str, float]:
        """Flat finite floats for MLflow (names use only [a-z0-9_.])."""
        m: dict[str, float] = {}
        if self.fidelity:
            for k in ("kl", "agree", "nll_delta", "nll_dense", "nll_sparse", "kl_upper", "agree_lower"):
                m[f"fidelity.{k}"] = self.fidelity.get(k)
        if self.layer_errors:
            m["fidelity.layer_error_max"] = max(self.layer_errors)
            m["fidelity.layer_error_mean"] = sum(self.layer_errors) / len(self.layer_errors)
        if self.probes:
            m["probes.dense_accuracy"] = self.probes["dense"]["accuracy"]
            m["probes.sparse_accuracy"] = self.probes["sparse"]["accuracy"]
            m["probes.accuracy_delta"] = self.probes["sparse"]["accuracy"] - self.probes["dense"]["accuracy"]
            m["probes.dense_margin"] = self.probes["dense"]["mean_margin"]
            m["probes.sparse_margin"] = self.probes["sparse"]["mean_margin"]
            if self.probes.get("generated"):
                m["probes.generated_dense_accuracy"] = self.probes["generated"]["dense_accuracy"]
                m["probes.generated_sparse_accuracy"] = self.probes["generated"]["sparse_accuracy"]
        if self.tasks:
            m["tasks.dense_quality"] = self.tasks["dense"]["mean_quality"]
            m["tasks.sparse_quality"] = self.tasks["sparse"]["mean_quality"]
            m["tasks.quality_delta"] = self.tasks["quality_delta"]
            m["tasks.quality_low"] = self.tasks.get("quality_low")
            m["tasks.quality_high"] = self.tasks.get("quality_high")
        for r in self.speed or []:
            p = f"speed.{r.seq_len}"
            m[f"{p}.speedup"] = r.speedup
            m[f"{p}.speedup_lo"] = r.speedup_interval[0]
            m[f"{p}.speedup_hi"] = r.speedup_interval[1]
            m[f"{p}.dense_tokens_per_s"] = r.dense_tokens_per_s
            m[f"{p}.sparse_tokens_per_s"] = r.sparse_tokens_per_s
            if r.estimator_share is not None:
                m[f"{p}.estimator_share"] = r.estimator_share
            for k in ("attention_share", "attention_speedup", "ideal_speedup"):
                if r.time_split and r.time_split.get(k) is not None:
                    m[f"{p}.{k}"] = r.time_split[k]
        if self.speed_summary:
            for k, v in self.speed_summary.items():
                if isinstance(v, (int, float)):
                    m[f"speed.{k}"] = v
        if self.decode:
            for r in self.decode["rows"]:
                p = f"decode.{r['seq_len']}"
                for k in ("speedup", "dense_tokens_per_s", "sparse_tokens_per_s", "density", "kl", "agree"):
                    m[f"{p}.{k}"] = r[k]
            for k, v in self.decode["summary"].items():
                if isinstance(v, (int, float)):
                    m[f"decode.{k}"] = v
        if self.density is not None:
            m["density"] = self.density
        return {k: float(v) for k, v in m.items() if v is not None and math.isfinite(float(v))}

    def artifact_paths(self) -> list[Path]:
        return [Path(p) for p in self.artifacts.values()]


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


# ----------------------------------------------------------------------------------------------------
# pieces


def device_description(model, threads: str | int | None = None) -> str:
    """`cuda:<name>`, or `cpu:<processor> x<N> threads` with the threads the timings ran on (`threads`,
    torch's current count where not given)."""
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(dev)}"
    n = torch.get_num_threads() if threads is None else threads
    return f"cpu:{platform.processor() or platform.machine()} x{n} threads"


def _threads_used(report) -> str | int | None:
    """The threads the report's timings ran on (each section's thread policy): one count, or each
    section's where they differ ("1 (prefill), 2 (decode)"); None where nothing was timed."""
    used = {}
    if report.speed_summary and (report.speed_summary.get("host") or {}).get("threads") is not None:
        used["prefill"] = report.speed_summary["host"]["threads"]
    dec = ((report.decode or {}).get("summary") or {}).get("host") or {}
    if dec.get("threads") is not None:
        used["decode"] = dec["threads"]
    if not used:
        return None
    if len(set(used.values())) == 1:
        return next(iter(used.values()))
    return ", ".join(f"{n} ({k})" for k, n in used.items())


@torch.no_grad()
def layer_output_errors(model, plan: SparsePlan, ids: Sequence[int]) -> list[float]:
    """Relative error of each layer's attention output, sparse model vs dense model, same input."""
    from sparse_core.retrofit import sparsified

    dev = next(model.parameters()).device
    x = torch.tensor([list(ids)], device=dev)
    dense: dict[int, torch.Tensor] = {}
    errs: dict[int, float] = {}

    def keep(call):
        dense[call.layer_idx] = call.output.detach().float().clone()

    def compare(call):
        ref = dense[call.layer_idx]
        errs[call.layer_idx] = float((call.output.float() - ref).norm() / ref.norm().clamp_min(1e-30))

    with capture_attention(model, keep):
        model(input_ids=x, logits_to_keep=1)
    with sparsified(model, plan):
        with capture_attention(model, compare):
            model(input_ids=x, logits_to_keep=1)
    return [errs[i] for i in sorted(errs)]


@torch.no_grad()
def selection_density(
    model, plan: SparsePlan, windows: Sequence[Sequence[int]]
) -> tuple[list[list[float]], float]:
    """Per layer x selection head density of the plan's selection on these windows (the model's own
    dense q/k; dense layers and one-block windows count 1.0), each window weighted by its causal blocks
    as `SparseStats.density` weighs calls, and the overall density: kept over causal blocks."""
    from sparse_core.kernels import causal_block_count, estimate_and_select

    n_layers = int(model.config.num_hidden_layers)
    kept: dict[int, torch.Tensor | float] = {}  # per layer: kept blocks per head (or all, when dense)
    causal: dict[int, int] = {}

    def on_layer(call):
        li = call.layer_idx
        params = plan.layer_params(li)
        s = call.query.shape[2]
        blocks = causal_block_count(1, 1, s, plan.block_size)
        share: torch.Tensor | float = 1.0
        if not (params.dense or s <= plan.block_size):
            sel = estimate_and_select(call.query[:1], call.key[:1], plan, params, scale=call.scaling)
            share = sel.head_density.double()
        kept[li] = kept.get(li, 0.0) + share * blocks
        causal[li] = causal.get(li, 0) + blocks

    dev = next(model.parameters()).device
    for w in windows:
        with capture_attention(model, on_layer):
            model(input_ids=torch.tensor([list(w)], device=dev), logits_to_keep=1)
    width = max((len(v) for v in kept.values() if isinstance(v, torch.Tensor)), default=1)
    table = []
    for li in range(n_layers):
        k = kept.get(li)
        if isinstance(k, torch.Tensor):
            table.append((k / causal[li]).tolist())
        else:  # a dense layer (or every window one block): all of it computed
            table.append([1.0] * width)
    # every layer and head covers the same causal blocks, so the plain mean of the table is their ratio
    flat = [x for row in table for x in row]
    return table, sum(flat) / len(flat)


def fidelity_bounds(fid) -> dict[str, Any]:
    """One-sided `CONFIDENCE` bounds on the fidelity means, blocks of `prefill_bound.BLOCK_POSITIONS`
    scored positions as the unit (`fidelity_bound`: asymptotic; infinite, i.e. None in the report, with
    fewer blocks than `fidelity_bound.min_blocks`, 6 at 95%: the evaluate flow's quick setting, one 1k
    window, has 2 blocks and `EvalSuite.quick()` 4, and they bound nothing); none for a plan identical
    to dense."""
    return {"confidence": CONFIDENCE, **bound_fields(fid, CONFIDENCE)} if fid.blocks else {}


def _time_prefill(model, ids: torch.Tensor) -> float:
    dev = ids.device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model(input_ids=ids, logits_to_keep=1)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t0


def _reset_stats(model) -> None:
    from sparse_core.retrofit import sparse_stats

    sparse_stats(model).reset()


@threads_restored()  # the thread policy below is for this call; the caller's count is restored
def measure_speed(
    model,
    tokenizer,
    plan: SparsePlan,
    lengths: Sequence[int],
    weights: Sequence[float] | None = None,
    *,
    repeats: int = 3,
    seed: int = 0,
    progress: Progress | None = None,
    policy: dict | None = None,
) -> tuple[list[SpeedRow], dict]:
    """Prefill timings dense vs sparse, one back-to-back pair per repeat in alternating order (so the
    host's drift hits both arms of a pair, and neither arm always runs second), after one untimed
    warm-up each; each row's speed-up and interval, and the mix's, come from the pairs
    (sparse_core.speedup). Torch's threads are `policy`'s (the evaluation's, `timing_threads`), else
    chosen now from the CPUs really free (sparse_core.host); a dense/sparse pair timed while the host
    was overloaded (the pair, or either arm on its own: `host.pair_load`) is timed again (at most
    `repeats` times per length), and the summary records the host's load and what was retimed."""
    from sparse_core.host import PairMeter, host_totals
    from sparse_core.retrofit import sparse_stats, sparsified
    from sparse_core.time_split import split_prefill

    policy = timing_threads(policy)
    meters: list[PairMeter] = []

    weights = list(weights) if weights else [1.0] * len(lengths)
    total_w = sum(weights)
    dev = next(model.parameters()).device
    rows: list[SpeedRow] = []
    done, total = 0, len(lengths) * repeats
    for L, w in zip(lengths, weights, strict=True):
        win = timing_window(tokenizer, int(L), seed=seed + 7)
        ids = torch.tensor([win], device=dev)
        _time_prefill(model, ids)  # warm-up dense
        with sparsified(model, plan):
            _time_prefill(model, ids)  # warm-up sparse (compiles kernels where they compile)
        d_times, s_times, est, ker = [], [], [], []
        meter = PairMeter(repeats, threads=policy["threads"])  # at most `repeats` retimings per length
        meters.append(meter)
        while len(d_times) < repeats:
            timed: dict[str, float] = {}
            e = kt = None
            with meter.pair() as keep:
                # alternating order: a warm-cache or load-ramp effect cancels over the pairs
                for arm in pair_order(len(d_times)):
                    if arm == "dense":
                        with keep.arm():  # each arm judged on its own: a busy spell in one moves the ratio
                            timed[arm] = _time_prefill(model, ids)
                        continue
                    with sparsified(model, plan):
                        _reset_stats(model)
                        with keep.arm():
                            timed[arm] = _time_prefill(model, ids)
                        stats = sparse_stats(model)
                        e, kt = stats.estimator_seconds, stats.kernel_seconds
            if not keep():  # the host, not the model: the pair is timed again
                continue
            d_times.append(timed["dense"])
            s_times.append(timed["sparse"])
            if e is not None:
                est.append(e)
                ker.append(kt)
            done += 1
            if progress:
                progress("speed", done, total)
        dm, sm = statistics.median(d_times), statistics.median(s_times)
        paired = paired_speedup(d_times, s_times)
        _, dens = selection_density(model, plan, [win])
        rows.append(
            SpeedRow(
                seq_len=len(win),
                weight=w / total_w,
                dense_seconds=d_times,
                sparse_seconds=s_times,
                speedup=paired.estimate,
                speedup_min_based=min(d_times) / min(s_times),
                speedup_interval=paired.interval,
                dense_tokens_per_s=len(win) / dm,
                sparse_tokens_per_s=len(win) / sm,
                density=dens,
                estimator_share=(statistics.median(est) / dm) if est else None,
                time_split=split_prefill(d_times, s_times, est, ker, dens).to_dict() if est else None,
                host=meter.record(),
            )
        )
    dense_t = sum(r.weight * statistics.median(r.dense_seconds) for r in rows)
    sparse_t = sum(r.weight * statistics.median(r.sparse_seconds) for r in rows)
    # the mix's throughput is its tokens over its seconds (a request-weighted mean of each length's
    # tokens/s overstates it: on 512 / 8,192 tokens at half and half, 1,222 tokens/s against 692)
    tokens = sum(r.weight * r.seq_len for r in rows)
    # the mix's speed-up from its pairs: round i's weighted dense and sparse totals (sparse_core.speedup)
    mix = paired_speedup(*weighted_pairs([(r.weight, r.dense_seconds, r.sparse_seconds) for r in rows]))
    summary = {
        "weighted_speedup": mix.estimate,
        "weighted_speedup_low": mix.low,
        "weighted_speedup_high": mix.high,
        "speedup_confidence": mix.confidence,
        "speedup_pairs": mix.pairs,
        "weighted_dense_seconds": dense_t,
        "weighted_sparse_seconds": sparse_t,
        "weighted_dense_tokens_per_s": tokens / dense_t if dense_t > 0 else 0.0,
        "weighted_sparse_tokens_per_s": tokens / sparse_t if sparse_t > 0 else 0.0,
        "host": {**policy, **host_totals(m.record() for m in meters)},
    }
    return rows, summary


@threads_restored()  # the thread policy below is for this call; the caller's count is restored
def measure_decode_speed(
    model,
    tokenizer,
    plan: SparsePlan,
    lengths: Sequence[int],
    weights: Sequence[float] | None,
    *,
    suite: EvalSuite,
    cap: int | None = None,
    progress: Progress | None = None,
    policy: dict | None = None,
) -> dict:
    """Decode tokens/s dense vs sparse after a prompt of each length (sparse_core.decode.measure),
    weighted like the prefill speed; the summary's interval combines the rows' intervals. A length at
    which no layer decodes sparsely (below the break-even, or every layer dense) is timed dense only
    (the sparse arm runs the same code): its row says `identical`, and the summary counts such rows.
    A plan without a decode section is timed dense only at every length (`summary["sparse_decode"]`
    False): the price of output tokens in both arms. Both arms run on the cache the served model
    uses (PagedCache where every layer reads the whole cache: score_request, the pyfunc), under the
    prefill timing's thread policy (`policy`: the evaluation chooses the threads once, `timing_threads`;
    chosen now where none is given), dense and sparse interleaved per repeat, so neither the cache nor
    the threads favour an arm. Each run pair records the host's load and is timed again when overloaded
    (sparse_core.decode.measure); the summary's `host` sums the rows' records like the prefill's."""
    from sparse_core.decode.cache import full_attention_only
    from sparse_core.decode.measure import compare_decode, dense_decode
    from sparse_core.host import host_totals, loadavg

    kind = "paged" if full_attention_only(model.config) else "dynamic"
    policy = timing_threads(policy)
    load_before = loadavg()

    dev = next(model.parameters()).device
    weights = list(weights) if weights else [1.0] * len(lengths)
    total_w = sum(weights)
    rows = []
    for i, (L, w) in enumerate(zip(lengths, weights, strict=True), start=1):
        n = int(L) if not cap else min(int(L), cap - suite.decode_new_tokens)
        win = timing_window(tokenizer, n, seed=suite.seed + 7)
        ids = torch.tensor([win], device=dev)
        if plan.decode is None:
            r = dense_decode(
                model, ids, new_tokens=suite.decode_new_tokens, repeats=suite.decode_repeats, cache=kind
            ).to_dict()
        else:
            r = compare_decode(
                model,
                plan,
                ids,
                new_tokens=suite.decode_new_tokens,
                repeats=suite.decode_repeats,
                dense_cache=kind,
                sparse_cache=kind,
            ).to_dict()
        r["weight"] = w / total_w
        rows.append(r)
        if progress:
            progress("decode speed", i, len(lengths))
    # each row's dense time is the geometric mean of its runs' mean steps, what its speed-up is made of
    # (`DecodeComparison.dense_ms_run_geomean`: dense / speed-up is then the sparse runs' own geometric
    # mean; the step median is not), and its sparse time comes from its paired speed-up, so the estimate
    # lies inside its interval
    dense_row_s = [statistics.geometric_mean(r["dense_seconds_per_token"]) for r in rows]
    dense_s = sum(r["weight"] * t for r, t in zip(rows, dense_row_s, strict=True))
    sparse_s = sum(r["weight"] * t / r["speedup"] for r, t in zip(rows, dense_row_s, strict=True))
    at_lo = sum(r["weight"] * t / r["speedup_interval"][0] for r, t in zip(rows, dense_row_s, strict=True))
    at_hi = sum(r["weight"] * t / r["speedup_interval"][1] for r, t in zip(rows, dense_row_s, strict=True))
    summary = {
        "weighted_dense_tokens_per_s": 1.0 / dense_s,
        "weighted_sparse_tokens_per_s": 1.0 / sparse_s,
        "weighted_sparse_tokens_per_s_low": 1.0 / at_lo,
        "weighted_sparse_tokens_per_s_high": 1.0 / at_hi,
        "weighted_speedup": dense_s / sparse_s,
        "weighted_speedup_low": dense_s / at_lo,
        "weighted_speedup_high": dense_s / at_hi,
        "agree": sum(r["weight"] * r["agree"] for r in rows),
        "kl": sum(r["weight"] * r["kl"] for r in rows),
        "new_tokens": suite.decode_new_tokens,
        "density": sum(r["weight"] * r["density"] for r in rows),
        "sparse_decode": plan.decode is not None,
        "break_even_tokens": plan.decode.first_break_even() if plan.decode is not None else None,
        # the host while calibration timed that break-even (`break_even.break_even_host`; None: given)
        "break_even_host": (plan.metadata.get("decode_calibration") or {}).get("break_even_host"),
        "rows_below_break_even": sum(1 for r in rows if r["extra"].get("below_break_even")),
        "rows_identical": sum(1 for r in rows if r["extra"].get("identical")),
        "context_tokens": [
            min(r["seq_len"] for r in rows),
            max(r["seq_len"] for r in rows) + suite.decode_new_tokens,
        ],
        "host": {
            **policy,
            "cache": kind,
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
            # the runs themselves (each row's extra["host"]): what the prefill block records
            **host_totals(r["extra"].get("host") or {} for r in rows),
        },
    }
    return {"rows": rows, "summary": summary}


def timing_threads(policy: dict | None = None) -> dict:
    """Torch's threads for a timing: `policy` (`sparse_core.host.apply_thread_policy`'s record, chosen
    earlier in the same evaluation) set again, so the prefill and the decode speed-ups are timed on the
    same threads; where none is given, chosen now from the CPUs really free. Returns the policy used."""
    from sparse_core.host import apply_thread_policy

    if policy is None:
        return apply_thread_policy()
    torch.set_num_threads(policy["threads"])
    return policy


def within_context(lengths: Sequence[int], cap: int | None, what: str) -> tuple[tuple[int, ...], list[int]]:
    """(the lengths that fit the model's `cap` positions, those over it): a length over the context cannot
    be timed, and is reported, never dropped silently; ValueError naming `what` and the limit when none
    fits (an empty table is no result)."""
    over = [x for x in lengths if cap and x > cap]
    kept = tuple(x for x in lengths if not cap or x <= cap)
    if lengths and not kept:
        raise ValueError(
            f"{what}: {', '.join(f'{x:,}' for x in over)} tokens; the model has {cap:,} positions "
            f"(max_position_embeddings): give lengths <= {cap:,}"
        )
    return kept, over


def length_mix(tokenizer, rows: Sequence[TaskRow], *, max_buckets: int = 3, cap: int | None = None):
    """The dataset's prompt-length mix as up to `max_buckets` representative lengths with weights
    (quantile buckets; each length is the bucket's median rounded to a block multiple)."""
    lens = sorted(len(tokenizer(r.prompt, add_special_tokens=False)["input_ids"]) for r in rows)
    if cap:
        lens = [min(x, cap) for x in lens]
    k = max(1, min(max_buckets, len(lens)))
    buckets = [lens[i * len(lens) // k : (i + 1) * len(lens) // k] for i in range(k)]
    out: dict[int, float] = {}
    for b in buckets:
        if not b:
            continue
        L = max(128, int(round(statistics.median(b) / 64)) * 64)
        out[L] = out.get(L, 0.0) + len(b) / len(lens)
    return tuple(out), tuple(out.values())


# ----------------------------------------------------------------------------------------------------


def suite_probes(model, tokenizer, suite: EvalSuite) -> list:
    """The suite's long-context probes at its lengths that fit the model's context (a probe's
    answer tokens follow its prompt: prompt + answer stay inside the trained positions). Raises
    ValueError for a length too short for a kind's fixed text (`sparse_core.probes`): cheap, so the
    CLI builds them once before any model work to refuse such a length up front."""
    cap = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
    lengths = tuple(min(x, cap - 16) if cap else x for x in suite.probe_lengths if not cap or x <= cap)
    if not lengths or not suite.probe_kinds:
        return []
    return generate_probes(
        tokenizer,
        lengths=lengths,
        kinds=suite.probe_kinds,
        depths=suite.probe_depths,
        per_depth=suite.probes_per_depth,
        seed=suite.seed,
    )


@threads_restored()  # the timings' thread policy below is for this call; the caller's count is restored
def evaluate(
    model,
    tokenizer,
    plan: SparsePlan,
    suite: EvalSuite | None = None,
    *,
    progress: Progress | None = None,
) -> EvaluationReport:
    """Evaluate `plan` on `model` (left dense afterwards). The timings' threads are chosen once, before the
    prefill timing, and the decode timing reuses them (`timing_threads`); each records the host's load."""
    from sparse_core.retrofit import is_sparsified, sparsified, unsparsify

    suite = suite or EvalSuite()
    plan.validate_for(model.config)
    if is_sparsified(model):
        unsparsify(model)
    cap = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
    if suite.speed_lengths and suite.speed_repeats > 0:  # refused before any work when none fits
        within_context(suite.speed_lengths, cap, "speed_lengths")
    t_all = time.perf_counter()
    secs: dict[str, float] = {}
    report = EvaluationReport(
        schema_version=SCHEMA_VERSION,
        model={**model_shape(model.config), "name": str(getattr(model.config, "_name_or_path", ""))},
        plan_hash=plan.content_hash(),
        estimator=plan.estimator,
        device=device_description(model),
        torch_version=torch.__version__,
        suite=_jsonable(
            {
                k: v
                for k, v in asdict(suite).items()
                if k not in ("fidelity_texts", "dataset_rows", "speed_rows")
            }
        ),
    )

    # --- fidelity -------------------------------------------------------------------------------
    windows: list[list[int]] = []
    if suite.n_fidelity_texts > 0:
        t0 = time.perf_counter()
        texts = (
            list(suite.fidelity_texts) if suite.fidelity_texts else corpus_texts("heldout", seed=suite.seed)
        )
        L = min(suite.fidelity_seq_len, cap) if cap else suite.fidelity_seq_len
        windows = pack_token_windows(tokenizer, texts, L, suite.n_fidelity_texts, seed=suite.seed)
        n = len(windows)
        ref = dense_reference(
            model, windows, fraction=suite.fidelity_fraction, progress=counter(progress, "fidelity dense", n)
        )
        with sparsified(model, plan):
            fid = measure_fidelity(model, ref, progress=counter(progress, "fidelity sparse", n))
        report.fidelity = {**fid.to_dict(), **fidelity_bounds(fid), "windows": [len(w) for w in windows]}
        del ref
        if suite.layer_errors and windows:
            report.layer_errors = layer_output_errors(model, plan, windows[0])
        report.head_density, report.density = selection_density(model, plan, windows)
        report.layer_density = [sum(r) / len(r) for r in report.head_density]
        secs["fidelity"] = time.perf_counter() - t0

    # --- probes ---------------------------------------------------------------------------------
    # A probe's answer tokens follow its prompt: keep prompt + answer inside the trained positions.
    probes = suite_probes(model, tokenizer, suite)
    if probes:
        t0 = time.perf_counter()
        n = len(probes)
        dense_p = score_probes(model, probes, progress=counter(progress, "probes dense", n))
        with sparsified(model, plan):
            sparse_p = score_probes(model, probes, progress=counter(progress, "probes sparse", n))
        dd, sd = dense_p.to_dict(), sparse_p.to_dict()
        generated = None
        if plan.decode is not None:  # the answer generated, so decode reads the long context
            from sparse_core.decode.measure import probe_generation_accuracy

            gen_d = probe_generation_accuracy(model, tokenizer, probes)
            with sparsified(model, plan):
                gen_s = probe_generation_accuracy(model, tokenizer, probes)
            generated = {"n": n, "dense_accuracy": gen_d["accuracy"], "sparse_accuracy": gen_s["accuracy"]}
        report.probes = {
            "n": n,
            "lengths": list(dict.fromkeys(pr.length for pr in probes)),  # the capped suite lengths
            "dense": {k: dd[k] for k in ("accuracy", "by_kind_length", "mean_margin", "seconds")},
            "sparse": {k: sd[k] for k in ("accuracy", "by_kind_length", "mean_margin", "seconds")},
            "agreement": sum(
                a.correct == b.correct for a, b in zip(dense_p.outcomes, sparse_p.outcomes, strict=True)
            )
            / n,
        }
        if generated is not None:
            report.probes["generated"] = generated
        secs["probes"] = time.perf_counter() - t0

    # --- use-case dataset ------------------------------------------------------------------------
    rows: list[TaskRow] | None = None
    if suite.dataset_rows is not None:
        rows = list(suite.dataset_rows)
    elif suite.dataset is not None:
        rows = read_dataset(suite.dataset, default_task=suite.task)
    if rows:
        t0 = time.perf_counter()
        used = rows[: suite.max_dataset_rows] if suite.max_dataset_rows else rows
        kw = dict(
            task=suite.task or "loglik",
            max_new_tokens=suite.max_new_tokens,
            max_prompt_tokens=suite.max_prompt_tokens or cap,
        )
        # a score that is not a number in [0, 1] is the plan failing that row (scored as a failed
        # answer), or an error naming the row from the dense model (sparse_core.tasks.checked)
        tick = counter(progress, "tasks dense", len(used))
        dense_t = score_dataset(model, tokenizer, used, progress=tick, reference_model=True, **kw)
        with sparsified(model, plan):
            tick = counter(progress, "tasks sparse", len(used))
            sparse_t = score_dataset(model, tokenizer, used, progress=tick, reference_model=False, **kw)
        low, high = delta_bounds(
            [r.quality for r in dense_t.per_row], [r.quality for r in sparse_t.per_row], alpha=1 - CONFIDENCE
        )
        report.tasks = {
            "dense": dense_t.to_dict(),
            "sparse": sparse_t.to_dict(),
            "quality_delta": sparse_t.mean_quality - dense_t.mean_quality,
            "quality_low": low,
            "quality_high": high,
            "confidence": CONFIDENCE,
            "n_rows": len(used),
            "sparse_failed_rows": sum(r.failed for r in sparse_t.per_row),
        }
        secs["tasks"] = time.perf_counter() - t0

    # --- speed ----------------------------------------------------------------------------------
    lengths_w: tuple[tuple[int, ...], tuple[float, ...] | None]
    if suite.speed_lengths is not None:
        lengths_w = (tuple(suite.speed_lengths), suite.speed_weights)
    elif suite.speed_rows or rows:
        mix_rows = list(suite.speed_rows or rows)
        lengths_w = length_mix(tokenizer, mix_rows, max_buckets=suite.max_speed_buckets, cap=cap)
    else:  # no mix to follow: 2,048 tokens, or the model's positions where fewer
        lengths_w = ((min(2048, cap or 2048),), None)
    sl, over = within_context(lengths_w[0], cap, "speed_lengths")  # explicit ones were checked above
    policy: dict | None = None  # the timings' threads, chosen once: prefill and decode ratios comparable
    if sl and suite.speed_repeats > 0:
        t0 = time.perf_counter()
        w = lengths_w[1] if lengths_w[1] and len(lengths_w[1]) == len(lengths_w[0]) else None
        if w is not None:
            w = tuple(wt for x, wt in zip(lengths_w[0], w, strict=True) if not cap or x <= cap)
        policy = timing_threads()
        report.speed, report.speed_summary = measure_speed(
            model,
            tokenizer,
            plan,
            sl,
            w,
            repeats=suite.speed_repeats,
            seed=suite.seed,
            progress=progress,
            policy=policy,
        )
        if over:  # said beside the figures: the mix they weigh lacks these lengths
            report.speed_summary["lengths_over_context"] = {"lengths": over, "positions": cap}
        secs["speed"] = time.perf_counter() - t0

    # --- decode (every plan: without a decode section it prices output tokens in both arms) -----
    if suite.decode_new_tokens >= 2 and suite.decode_repeats > 0 and sl:
        t0 = time.perf_counter()
        w = report.speed and [r.weight for r in report.speed]
        report.decode = measure_decode_speed(
            model, tokenizer, plan, sl, w or None, suite=suite, cap=cap, progress=progress, policy=policy
        )
        secs["decode"] = time.perf_counter() - t0

    # --- pictures -------------------------------------------------------------------------------
    if suite.pictures_dir is not None:
        t0 = time.perf_counter()
        report.artifacts = make_pictures(model, plan, report, windows, tokenizer, suite)
        secs["pictures"] = time.perf_counter() - t0
    secs["total"] = time.perf_counter() - t_all
    report.seconds = secs
    report.device = device_description(model, threads=_threads_used(report))
    return report


@torch.no_grad()
def make_pictures(
    model, plan, report: EvaluationReport, windows, tokenizer, suite: EvalSuite
) -> dict[str, str]:
    from sparse_core.kernels import estimate_and_select
    from sparse_core.pictures import block_mask_over_attention, density_heatmap

    out_dir = Path(suite.pictures_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arts: dict[str, str] = {}
    if not windows:
        windows = pack_token_windows(
            tokenizer, corpus_texts("heldout"), suite.fidelity_seq_len, 1, seed=suite.seed
        )
    if report.head_density is None:
        report.head_density, report.density = selection_density(model, plan, windows[:1])
    label = (
        "kv head"
        if plan.group_heads and model.config.num_key_value_heads != model.config.num_attention_heads
        else "head"
    )
    arts["density_heatmap"] = str(
        density_heatmap(report.head_density, out_dir / "density_heatmap.png", head_label=label)
    )
    n_layers = int(model.config.num_hidden_layers)
    sparse_layers = [i for i in range(n_layers) if i not in plan.dense_layers]
    layer = (
        suite.picture_layer
        if suite.picture_layer is not None
        else (sparse_layers[len(sparse_layers) // 2] if sparse_layers else n_layers // 2)
    )
    grab: dict = {}

    def on_layer(call):
        if call.layer_idx == layer:
            grab["q"], grab["k"], grab["s"] = call.query[:1].clone(), call.key[:1].clone(), call.scaling

    dev = next(model.parameters()).device
    with capture_attention(model, on_layer, layers={layer}):
        model(input_ids=torch.tensor([windows[0]], device=dev), logits_to_keep=1)
    mass = block_attention_mass(grab["q"], grab["k"], plan.block_size, grab["s"])[0, 0]
    params = plan.layer_params(layer)
    if params.dense:
        kept = torch.tril(torch.ones_like(mass, dtype=torch.bool))
    else:
        sel = estimate_and_select(grab["q"], grab["k"], plan, params, scale=grab["s"])
        kept = sel.mask()[0, 0]
    arts["block_mask"] = str(
        block_mask_over_attention(
            mass.cpu().numpy(),
            kept.cpu().numpy(),
            out_dir / "block_mask.png",
            title=f"layer {layer}, head 0, {len(windows[0])} tokens, estimator {params.estimator}",
        )
    )
    return arts
