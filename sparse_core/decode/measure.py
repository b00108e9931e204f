"""Decode measured side by side: a dense greedy continuation after a prompt, then the sparsified model
fed the same tokens (teacher forcing) from the same prefilled cache, so both arms do identical work
per step. From the two runs: ms per token of each arm, and fidelity per generated token (KL(dense ||
sparse), top-1 agreement with the dense greedy token, relative NLL of the dense continuation). One
free-running sparse greedy continuation gives the share of generated tokens that match dense.

The prompt is prefilled once, densely; after each run the cache is cropped back to the prompt, so the
arms alternate on the same cache (load drift on a shared machine hits both), in alternating order
(dense first on even repeats). A repeat's dense run and sparse run are one pair: the speed-up and its
interval come from the runs' mean step times (`sparse_core.speedup`), never from the steps as if they
were independent, since a run's steps share whatever the host did during it. Each arm can run on
transformers' `DynamicCache` ("dynamic", what `generate` uses by default) or on a copy of it in
`PagedCache` ("paged": appends without re-copying the cache). The first step of a run is not timed
in either arm (the sparse arm builds its page summaries there).

When no layer can decode sparsely during the run (the whole run's cache below the layers' break-even,
`DecodePlan.break_even_tokens`, or every layer a dense decode layer) and both arms use the same kind
of cache, the sparse arm runs the dense model's code path exactly (tested), so `compare_decode`
times the dense arm only and reports the sparse arm as identical: speed-up 1.00 with no interval to
it, fidelity exact; `extra["identical"]` says so, and `extra["below_break_even"]` whether it is the
cache length that keeps it dense.

Every timed pair (a dense-only run, in `dense_decode`) records the host's load while it ran
(`sparse_core.host.HostLoadMeter`), each arm's own too (`PairMeter`: a pair is overloaded where either
arm is); one timed while the host was overloaded is timed again, at most
`repeats` times, as the prefill timings are (`evaluation.measure_speed`), and `extra["host"]` says
what was measured, retimed and kept under overload."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from sparse_core.fidelity import Fidelity, block_sums
from sparse_core.host import PairMeter
from sparse_core.plan import SparsePlan
from sparse_core.speedup import pair_order, paired_speedup

Progress = Callable[[str, int, int], None]


@dataclass
class DecodeRun:
    step_seconds: list[float]
    predicted: list[int]  # argmax after each fed token
    logprobs: torch.Tensor  # float32 [n, V]


@dataclass
class DecodeComparison:
    seq_len: int
    new_tokens: int
    repeats: int
    dense_seconds_per_token: list[float]  # per repeat: mean over timed steps
    sparse_seconds_per_token: list[float]
    dense_ms_per_token: float  # median over all timed steps
    sparse_ms_per_token: float
    dense_tokens_per_s: float
    sparse_tokens_per_s: float
    speedup: float  # geometric mean of the runs' dense / sparse mean-step ratios (sparse_core.speedup)
    speedup_interval: tuple[float, float]  # 90% t interval over the runs' log ratios (a run is the unit)
    density: float  # share of cached tokens the sparse steps read (all layers)
    estimator_share: float  # scoring + selection time per step / dense step time
    kl: float
    agree: float  # teacher-forced top-1 agreement with the dense greedy token
    nll_delta: float
    greedy_match: float | None  # free-running sparse greedy tokens equal to dense, position-wise
    first_divergence: int | None  # index of the first differing generated token (None: none)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def dense_ms_run_geomean(self) -> float:
        """The geometric mean of the dense runs' mean step (ms): with `sparse_ms_run_geomean`, what
        `speedup` is made of (their quotient is it; the step medians are not)."""
        return statistics.geometric_mean(self.dense_seconds_per_token) * 1000

    @property
    def sparse_ms_run_geomean(self) -> float:
        """The geometric mean of the sparse runs' mean step (ms); `dense_ms_run_geomean`."""
        return statistics.geometric_mean(self.sparse_seconds_per_token) * 1000


CACHES = ("dynamic", "paged")
# the progress stage that says a run pair was timed while the host was overloaded and is timed again
# (`PairMeter`): its runs no longer count, so `done` goes back to where the pair started
RETIMING = "decode pair timed again (host overloaded)"


@torch.inference_mode()
def prefill(model, ids: torch.Tensor):
    """Dense prefill of `ids` [1, S] -> (cache, first generated token)."""
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return out.cache, int(out.logits[0, -1].argmax())


def as_paged(cache):
    """A PagedCache holding the same keys and values as `cache` (a copy)."""
    from sparse_core.decode.cache import PagedCache

    paged = PagedCache()
    for i, layer in enumerate(cache.layers):
        paged.update(layer.keys, layer.values, i)
    return paged


@torch.inference_mode()
def run_decode(model, cache, first: int, n: int, forced: list[int] | None = None) -> DecodeRun:
    """n decode steps from `cache`, feeding `first` then the model's own argmax (or `forced[i]`).
    The cache is cropped back to its starting length afterwards."""
    dev = next(model.parameters()).device
    start = cache.get_seq_length()
    tok, secs, preds, lps = first, [], [], []
    try:
        for i in range(n):
            x = torch.tensor([[tok]], device=dev)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            out = model(input_ids=x, cache=cache, use_cache=True)
            logits = out.logits[0, -1].float()
            pred = int(logits.argmax())
            secs.append(time.perf_counter() - t0)
            preds.append(pred)
            lps.append(torch.log_softmax(logits, -1).cpu())
            tok = forced[i] if forced is not None else pred
    finally:
        grown = cache.get_seq_length() - start
        if grown > 0:
            cache.crop(-grown)
    return DecodeRun(secs, preds, torch.stack(lps))


def fidelity(dense: DecodeRun, sparse: DecodeRun) -> tuple[float, float, float]:
    """(mean KL(dense || sparse), top-1 agreement, relative NLL change of the dense tokens)."""
    f = Fidelity.from_blocks(fidelity_blocks(dense, sparse, size=len(dense.predicted)))
    return f.kl, f.agree, f.nll_delta


def fidelity_blocks(
    dense: DecodeRun, sparse: DecodeRun, size: int
) -> list[tuple[int, float, float, int, float, float]]:
    """`Fidelity.blocks` of one continuation, by `size` consecutive generated tokens: KL(dense ||
    sparse), agreement with the dense greedy token, and the NLL of that token (the next one the
    dense model generates) under both."""
    lp_d, lp_s = dense.logprobs.double(), sparse.logprobs.double()
    kl = (lp_d.exp() * (lp_d - lp_s)).sum(-1).clamp_min(0)
    pred = torch.tensor(dense.predicted)
    agree = (pred == torch.tensor(sparse.predicted)).double()
    nll_d, nll_s = -lp_d.gather(1, pred[:, None])[:, 0], -lp_s.gather(1, pred[:, None])[:, 0]
    return block_sums(kl, agree, nll_s - nll_d, nll_d, size=size)


def compare_decode(
    model,
    plan: SparsePlan,
    ids: torch.Tensor,
    *,
    new_tokens: int = 64,
    repeats: int = 2,
    free_running: bool = True,
    kernel: str = "auto",
    dense_cache: str = "dynamic",
    sparse_cache: str = "dynamic",
    progress: Progress | None = None,
) -> DecodeComparison:
    """Dense vs `plan`'s sparse decode after the prompt `ids` [1, S]; the model is left dense."""
    from sparse_core.retrofit import decode_stats, is_sparsified, sparsified, unsparsify

    if plan.decode is None:
        raise ValueError("the plan has no decode section: nothing sparse to measure in decode")
    if new_tokens < 2:
        raise ValueError("new_tokens must be >= 2 (the first step of a run is not timed)")
    if dense_cache not in CACHES or sparse_cache not in CACHES:
        raise ValueError(f"caches must be one of {CACHES}, got {dense_cache!r} / {sparse_cache!r}")
    if is_sparsified(model):
        unsparsify(model)
    n_layers = int(model.config.num_hidden_layers)
    if dense_cache == sparse_cache and not plan.decode.sparse_at(n_layers, ids.shape[1] + new_tokens):
        return dense_decode(
            model,
            ids,
            new_tokens=new_tokens,
            repeats=repeats,
            cache=dense_cache,
            free_running=free_running,
            plan=plan,
            progress=progress,
        )
    cache, first = prefill(model, ids)
    caches = {"dynamic": cache}
    if "paged" in (dense_cache, sparse_cache):
        caches["paged"] = as_paged(cache)
    d_cache, s_cache = caches[dense_cache], caches[sparse_cache]
    d_steps: list[float] = []
    s_steps: list[float] = []
    d_rep: list[float] = []
    s_rep: list[float] = []
    est = kept = cached = 0.0
    dense_run = sparse_run = None
    total = repeats * 2 + (1 if free_running else 0)
    done = 0
    meter = PairMeter(repeats, threads=torch.get_num_threads())
    rep = 0
    while rep < repeats:
        # alternating order (sparse_core.speedup.pair_order); the sparse run is fed the dense greedy
        # tokens, so the first pair times dense first and later ones reuse its (deterministic) tokens
        pair: dict[str, DecodeRun] = {}
        p_est = p_kept = p_cached = 0.0
        with meter.pair() as keep:
            for arm in pair_order(rep):
                if arm == "dense":
                    with keep.arm():  # each arm judged on its own: a busy spell in one moves the ratio
                        dense_run = pair["dense"] = run_decode(model, d_cache, first, new_tokens)
                else:
                    assert dense_run is not None
                    with sparsified(model, plan, kernel=kernel):
                        st = decode_stats(model)
                        st.reset()
                        with keep.arm():
                            pair["sparse"] = run_decode(
                                model, s_cache, first, new_tokens, forced=dense_run.predicted
                            )
                        p_est, p_kept, p_cached = st.estimator_seconds, st.kept_tokens, st.cached_tokens
                done += 1
                if progress:
                    progress("decode", min(done, total), total)
        if not keep():  # timed while the host was overloaded: the pair is timed again
            done -= len(pair)
            if progress:
                progress(RETIMING, done, total)
            continue
        sparse_run = pair["sparse"]
        d_steps += pair["dense"].step_seconds[1:]
        d_rep.append(statistics.fmean(pair["dense"].step_seconds[1:]))
        s_steps += sparse_run.step_seconds[1:]
        s_rep.append(statistics.fmean(sparse_run.step_seconds[1:]))
        est += p_est
        kept += p_kept
        cached += p_cached
        rep += 1
    assert dense_run is not None and sparse_run is not None
    kl, agree, nll_delta = fidelity(dense_run, sparse_run)
    match = first_div = None
    if free_running:
        with sparsified(model, plan, kernel=kernel):
            free = run_decode(model, s_cache, first, new_tokens)
        same = [a == b for a, b in zip(dense_run.predicted, free.predicted, strict=True)]
        match = sum(same) / len(same)
        first_div = next((i for i, s in enumerate(same) if not s), None)
        if progress:
            progress("decode", total, total)
    dm, sm = statistics.median(d_steps), statistics.median(s_steps)
    # a run is the unit: its steps share the run's load (sparse_core.speedup), so the pairs are runs
    paired = paired_speedup(d_rep, s_rep)
    steps = repeats * new_tokens
    return DecodeComparison(
        **_timings(ids, new_tokens, repeats, (d_rep, s_rep), (dm, sm)),
        speedup=paired.estimate,
        speedup_interval=paired.interval,
        density=kept / cached if cached else 1.0,
        estimator_share=(est / steps) / dm,
        kl=kl,
        agree=agree,
        nll_delta=nll_delta,
        greedy_match=match,
        first_divergence=first_div,
        extra={
            "dense_cache": dense_cache,
            "sparse_cache": sparse_cache,
            "identical": False,
            "decode_section": True,
            "below_break_even": False,
            "break_even_tokens": plan.decode.first_break_even(),
            "host": meter.record(),
        },
    )


def _timings(ids, new_tokens: int, repeats: int, per_rep: tuple, median_s: tuple) -> dict[str, Any]:
    """The timing fields of a DecodeComparison: per-repeat means and medians (s) of (dense, sparse)."""
    dm, sm = median_s
    return {
        "seq_len": int(ids.shape[1]),
        "new_tokens": new_tokens,
        "repeats": repeats,
        "dense_seconds_per_token": per_rep[0],
        "sparse_seconds_per_token": per_rep[1],
        "dense_ms_per_token": dm * 1000,
        "sparse_ms_per_token": sm * 1000,
        "dense_tokens_per_s": 1.0 / dm,
        "sparse_tokens_per_s": 1.0 / sm,
    }


def dense_decode(
    model,
    ids: torch.Tensor,
    *,
    new_tokens: int = 64,
    repeats: int = 2,
    cache: str = "dynamic",
    free_running: bool = False,
    plan: SparsePlan | None = None,
    progress: Progress | None = None,
) -> DecodeComparison:
    """Decode timed densely only, as a comparison whose sparse arm is the dense one (speed-up 1.00,
    fidelity exact): a plan without a decode section (`plan` None or decode-less: the evaluation's
    decode price for both arms), or a run in which no layer of `plan` decodes sparsely (below its
    break-even, or every layer dense). `extra["decode_section"]` says which."""
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
    if new_tokens < 2:
        raise ValueError("new_tokens must be >= 2 (the first step of a run is not timed)")
    dec = plan.decode if plan is not None else None
    kv, first = prefill(model, ids)
    if cache == "paged":
        kv = as_paged(kv)
    steps: list[float] = []
    per_rep: list[float] = []
    run = None
    meter = PairMeter(repeats, threads=torch.get_num_threads())
    while len(per_rep) < repeats:
        with meter.pair() as keep:
            run = run_decode(model, kv, first, new_tokens)
        if not keep():  # timed while the host was overloaded: timed again
            if progress:
                progress(RETIMING, len(per_rep), repeats)
            continue
        steps += run.step_seconds[1:]
        per_rep.append(statistics.fmean(run.step_seconds[1:]))
        if progress:
            progress("decode", len(per_rep), repeats)
    assert run is not None
    dm = statistics.median(steps)
    return DecodeComparison(
        **_timings(ids, new_tokens, repeats, (per_rep, per_rep), (dm, dm)),
        speedup=1.0,
        speedup_interval=(1.0, 1.0),
        density=1.0,
        estimator_share=0.0,
        kl=0.0,
        agree=1.0,
        nll_delta=0.0,
        greedy_match=1.0 if free_running else None,
        first_divergence=None,
        extra={
            "dense_cache": cache,
            "sparse_cache": cache,
            "identical": True,
            "decode_section": dec is not None,
            "below_break_even": dec is not None and ids.shape[1] + new_tokens < dec.first_break_even(),
            "break_even_tokens": dec.first_break_even() if dec is not None else None,
            "host": meter.record(),
        },
    )


def probe_generation_accuracy(model, tokenizer, probes, *, extra_tokens: int = 2) -> dict[str, Any]:
    """Long-context probes answered by generation: greedy decode after each probe's prompt (the answer
    is read out of the KV cache by decode steps, which a sparse decode plan makes sparse); correct when
    the generated text starts with the answer. -> {"accuracy", "n", "answers"}."""
    dev = next(model.parameters()).device
    correct, answers = 0, []
    for p in probes:
        n = len(tokenizer(" " + p.answer_text, add_special_tokens=False)["input_ids"]) + extra_tokens
        cache, first = prefill(model, torch.tensor([list(p.prompt_ids)], device=dev))
        run = run_decode(model, cache, first, max(1, n - 1))
        text = tokenizer.decode([first, *run.predicted], skip_special_tokens=True).strip()
        ok = text.startswith(p.answer_text.strip())
        correct += ok
        answers.append(text)
    return {
        "accuracy": correct / len(probes) if probes else float("nan"),
        "n": len(probes),
        "answers": answers,
    }
