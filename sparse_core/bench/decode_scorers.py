"""`sparsepilot bench decode-scorers`: decode page scorers side by side on many prompts, at equal pages read.

Every (scorer, budget) is one decode plan with the same token budget in every layer, so at a budget every
scorer reads the same number of pages and only which pages differs. On each of N prompts: one dense
prefill and one dense greedy continuation (the reference), then every plan teacher-forced on that
continuation from the same cache (a PagedCache, as serving decodes). Per prompt and plan: mean
KL(dense || sparse) over the generated tokens, top-1 agreement, the share of the cache read.

The unit of every interval is a prompt, not a token: prompts differ more than the tokens of one
prompt (docs/sparse_core.md, "The decode bound's unit is a prompt"). Against the reference scorer (the
first named), at each budget:
- the geometric mean of the per-prompt KL ratios, with a t interval over the prompts' log ratios, and
  the prompts on which the scorer's KL is lower / higher with the exact two-sided sign test;
- pages at equal KL: the budget the scorer needs for the reference's mean KL (log-log interpolation
  between its own measured budgets; none outside them), as a ratio (> 1: fewer pages), with a
  percentile bootstrap interval over prompts.

Fidelity only: nothing is timed (what a scorer's step costs is `sparsepilot bench decode`'s)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from sparse_core.bench.common import RunClock, fit_cache_lengths, pyplot, save_figure

DEFAULT_SCORERS = ("quest", "page_gate")
DEFAULT_BUDGETS = (512, 1024, 2048)
DEFAULT_PAGE_SIZE = 16
DEFAULT_PROMPT_TOKENS = 8192  # shortened to fit a model's positions with the new tokens (SmolLM2: 8,160)
LOCAL_PAGES = 4  # as sparse_core.decode.calibration.DecodeLimits
KL_FLOOR = 1e-9  # a per-prompt KL below this is rounding: ratios are taken of KL clamped to it
CONFIDENCE = 0.95
RESAMPLES = 2000
CORPUS_SEED = 7  # the packing `sparsepilot bench decode` cuts its window from

PLAN_COLUMNS = ["scorer", "budget", "density", "kl", "kl_lo", "kl_hi", "agree", "agree_lo", "agree_hi"]
PAIR_COLUMNS = [
    "scorer",
    "budget",
    "kl_ratio",
    "kl_ratio_lo",
    "kl_ratio_hi",
    "lower_kl",
    "higher_kl",
    "sign_p",
    "agree_diff",
    "equal_kl_budget",
    "pages_ratio",
    "pages_ratio_lo",
    "pages_ratio_hi",
]


# -- statistics over prompts (pure) -------------------------------------------------------------------


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean, lower, upper): Student t over the values (one per prompt); NaN bounds for one value."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    m = float(x.mean())
    if x.size < 2:
        return m, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return m, m - half, m + half


def paired_kl_ratio(
    reference: Sequence[float], other: Sequence[float], confidence: float = CONFIDENCE
) -> dict[str, float | int]:
    """`other` against `reference`, prompt by prompt (same prompts, same order): the geometric mean of
    other/reference KL with a t interval over the log ratios (exact when they are normal), and the
    prompts where other's KL is lower / higher with the exact two-sided sign test's p (ties left out)."""
    from scipy import stats

    a = np.maximum(np.asarray(reference, dtype=float), KL_FLOOR)
    b = np.maximum(np.asarray(other, dtype=float), KL_FLOOR)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values need one per prompt on both sides, got {a.shape} and {b.shape}")
    m, lo, hi = mean_interval(np.log(b / a), confidence)
    lower, higher = int((b < a).sum()), int((b > a).sum())
    p = float(stats.binomtest(lower, lower + higher, 0.5).pvalue) if lower + higher else 1.0
    return {
        "kl_ratio": math.exp(m),
        "kl_ratio_lo": math.exp(lo),
        "kl_ratio_hi": math.exp(hi),
        "lower_kl": lower,
        "higher_kl": higher,
        "sign_p": p,
    }


def budget_at_kl(budgets: Sequence[float], kls: Sequence[float], target: float) -> float | None:
    """The budget at which KL comes down to `target`: log-log interpolation between the two measured
    budgets around it (ascending budgets; the first crossing counts). None when every measured KL is
    above or every one below `target` (no extrapolation)."""
    pts = [(float(b), max(float(k), KL_FLOOR)) for b, k in zip(budgets, kls, strict=True)]
    t = max(float(target), KL_FLOOR)
    for (b0, k0), (b1, k1) in zip(pts, pts[1:], strict=False):
        if k0 >= t >= k1:
            if k0 == k1:
                return b0
            w = (math.log(k0) - math.log(t)) / (math.log(k0) - math.log(k1))
            return math.exp(math.log(b0) + w * (math.log(b1) - math.log(b0)))
    if pts and pts[0][1] == t:
        return pts[0][0]
    return None


def _pages_ratio(budgets: Sequence[float], ref_mean: np.ndarray, other_mean: np.ndarray, j: int) -> float:
    """budgets[j] / the budget `other` needs for the reference's KL at budgets[j]: inf when other's KL is
    below that at every measured budget, 0 when above it at every one, NaN when its KL curve crosses
    the target only upwards (KL rising with the budget)."""
    target = max(float(ref_mean[j]), KL_FLOOR)
    need = budget_at_kl(budgets, other_mean, target)
    if need is not None:
        return float(budgets[j]) / need
    kls = np.maximum(np.asarray(other_mean, dtype=float), KL_FLOOR)
    if (kls < target).all():
        return math.inf
    if (kls > target).all():
        return 0.0
    return math.nan


def _pages_ratios(
    budgets: Sequence[float], ref_means: np.ndarray, other_means: np.ndarray, j: int
) -> np.ndarray:
    """`_pages_ratio` of each row of `ref_means`, `other_means` ([resamples, budgets]) at once: the same
    first downward crossing, log-log interpolation and inf / 0 / NaN ends, without a Python call per
    bootstrap resample."""
    b = np.asarray(budgets, dtype=float)
    t = np.maximum(np.asarray(ref_means, dtype=float)[:, j], KL_FLOOR)
    k = np.maximum(np.asarray(other_means, dtype=float), KL_FLOOR)
    need = np.full(t.shape, np.nan)
    found = np.zeros(t.shape, dtype=bool)
    for s in range(len(b) - 1):  # the first crossing counts
        k0, k1 = k[:, s], k[:, s + 1]
        here = ~found & (k0 >= t) & (t >= k1)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            w = (np.log(k0) - np.log(t)) / (np.log(k0) - np.log(k1))
            at = np.where(k0 == k1, b[s], np.exp(np.log(b[s]) + w * (np.log(b[s + 1]) - np.log(b[s]))))
        need = np.where(here, at, need)
        found |= here
    first = ~found & (k[:, 0] == t)
    need = np.where(first, b[0], need)
    found |= first
    out = np.full(t.shape, np.nan)
    out[found] = b[j] / need[found]
    below, above = (k < t[:, None]).all(axis=1), (k > t[:, None]).all(axis=1)
    out[~found & below] = math.inf
    out[~found & above] = 0.0
    return out


def expanded_tail(confidence: float, n: int) -> float:
    """Each tail's share for a percentile bootstrap interval over n units, expanded for small n
    (Hesterberg 2015, "What teachers should know about the bootstrap", sec. 5: the percentile interval
    is too narrow by about sqrt((n-1)/n) and the t/z ratio; the expanded one takes the normal tail at
    sqrt(n/(n-1)) * t_{n-1})."""
    from scipy import stats

    if n < 2:
        return (1 - confidence) / 2
    z = math.sqrt(n / (n - 1)) * float(stats.t.ppf(0.5 + confidence / 2, n - 1))
    return float(stats.norm.sf(z))


def equal_kl_pages(
    budgets: Sequence[float],
    reference: np.ndarray,
    other: np.ndarray,
    *,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Per budget j of the reference: the budget `other` needs for the reference's mean KL there, the
    ratio budgets[j] / that (> 1: other reads fewer pages at equal KL), and an expanded percentile
    bootstrap interval over prompts (`expanded_tail`; both scorers resampled by the same prompts).
    `reference`, `other`: [prompts, budgets] per-prompt KL. A ratio or bound outside what the
    measured budgets resolve is None, with `beyond` saying which side of the point it leaves
    ("fewer": other meets the KL below its smallest budget, "more": not even at its largest)."""
    ref, oth = np.asarray(reference, dtype=float), np.asarray(other, dtype=float)
    if ref.shape != oth.shape or ref.ndim != 2 or ref.shape[1] != len(budgets):
        raise ValueError(f"need [prompts, {len(budgets)}] KL on both sides, got {ref.shape} and {oth.shape}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, ref.shape[0], size=(resamples, ref.shape[0]))
    ref_b, oth_b = ref[idx].mean(axis=1), oth[idx].mean(axis=1)  # [resamples, budgets]
    tail = expanded_tail(confidence, ref.shape[0])

    def finite(x: float) -> float | None:
        return float(x) if math.isfinite(x) and x > 0 else None

    out = []
    for j in range(len(budgets)):
        point = _pages_ratio(budgets, ref.mean(0), oth.mean(0), j)
        boot = _pages_ratios(budgets, ref_b, oth_b, j)
        boot = boot[~np.isnan(boot)]
        lo = hi = math.nan
        if boot.size:  # no interpolation between resamples, so an open end stays open (0 or inf)
            lo = float(np.quantile(boot, tail, method="lower"))
            hi = float(np.quantile(boot, 1 - tail, method="higher"))
        out.append(
            {
                "equal_kl_budget": float(budgets[j]) / point if finite(point) else None,
                "pages_ratio": finite(point),
                "pages_ratio_lo": finite(lo),
                "pages_ratio_hi": finite(hi),
                "beyond": "fewer" if point == math.inf else "more" if point == 0 else None,
                "resamples": int(boot.size),
            }
        )
    return out


def summarize(
    per_prompt: dict[str, dict[int, dict[str, list[float]]]],
    budgets: Sequence[int],
    *,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """per_prompt[scorer][budget] = {"kl": [...], "agree": [...], "density": [...]} (one value per
    prompt, same prompts in the same order everywhere) -> (plan rows, rows paired against the first
    scorer)."""
    scorers = list(per_prompt)
    plan_rows = []
    for s in scorers:
        for b in budgets:
            v = per_prompt[s][b]
            kl, kl_lo, kl_hi = mean_interval(v["kl"], confidence)
            ag, ag_lo, ag_hi = mean_interval(v["agree"], confidence)
            plan_rows.append(
                {
                    "scorer": s,
                    "budget": b,
                    "density": float(np.mean(v["density"])),
                    "kl": kl,
                    "kl_lo": kl_lo,
                    "kl_hi": kl_hi,
                    "agree": ag,
                    "agree_lo": ag_lo,
                    "agree_hi": ag_hi,
                    "prompts": len(v["kl"]),
                }
            )
    ref = scorers[0]
    ref_kl = np.array([per_prompt[ref][b]["kl"] for b in budgets]).T
    pair_rows = []
    for s in scorers[1:]:
        kl = np.array([per_prompt[s][b]["kl"] for b in budgets]).T
        pages = equal_kl_pages(budgets, ref_kl, kl, confidence=confidence, seed=seed)
        for j, b in enumerate(budgets):
            diff = np.subtract(per_prompt[s][b]["agree"], per_prompt[ref][b]["agree"])
            d, d_lo, d_hi = mean_interval(diff, confidence)
            pair_rows.append(
                {
                    "scorer": s,
                    "against": ref,
                    "budget": b,
                    **paired_kl_ratio(ref_kl[:, j], kl[:, j], confidence),
                    "agree_diff": d,
                    "agree_diff_lo": d_lo,
                    "agree_diff_hi": d_hi,
                    **pages[j],
                }
            )
    return plan_rows, pair_rows


# -- the measurement (I/O: model, corpus) -----------------------------------------------------------


def _scorer_plans(model, windows, base, scorers, budgets, page_size, say):
    """{scorer: {budget: plan}} and page_gate's training report (trained on `windows` when the base
    plan carries no page gate at this page size)."""
    from sparse_core.decode.page_gate import PAGE_SIZE_KEY, page_gate_for_plan, train_page_gate
    from sparse_core.decode.plan import TRAINED_BY_DECODE_CALIBRATION, DecodePlan

    n_layers = int(model.config.num_hidden_layers)
    weights = base.with_(dense_layers=tuple(range(n_layers)))  # prompts are prefilled dense
    gate_report = None
    if any(s in TRAINED_BY_DECODE_CALIBRATION for s in scorers):
        have = PAGE_SIZE_KEY in weights.tensors and page_gate_for_plan(weights).page_size == page_size
        if not have:
            if not windows:
                raise ValueError("the texts hold no window beyond the prompts to train page_gate on")
            gate, rep = train_page_gate(
                model, windows, page_size=page_size, progress=lambda what, d, t: say(f"{what} {d}/{t}")
            )
            weights = weights.with_(tensors={**weights.tensors, **gate.to_tensors()})
            gate_report = rep.to_dict()
    plans = {
        s: {
            b: weights.with_(
                decode=DecodePlan(estimator=s, page_size=page_size, budget_tokens=b, local_pages=LOCAL_PAGES)
            )
            for b in budgets
        }
        for s in scorers
    }
    return plans, gate_report


def measure(
    model,
    tok,
    *,
    scorers: Sequence[str],
    budgets: Sequence[int],
    prompts: int,
    prompt_tokens: int | None,
    new_tokens: int,
    page_size: int,
    base=None,
    texts: Sequence[str] | None,
    texts_source: str,
    say: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Per-prompt fidelity of every (scorer, budget) plan on `prompts` windows packed from `texts`
    (None: the bundled corpus, the packing `bench decode` cuts its window from; or a use case's own
    text); page_gate, when it is not in `base`, trains on the windows after them. `texts_source` names
    the texts in errors. `prompt_tokens` + `new_tokens` must fit the model's positions (ValueError);
    None: 8,192 shortened to fit (`fit_cache_lengths`). The benchmark's defaults are `run`'s, which
    gives this every one."""
    from sparse_core.corpus import corpus_texts, pack_token_windows
    from sparse_core.decode.measure import as_paged, fidelity, prefill, run_decode
    from sparse_core.decode.page_gate import WINDOWS
    from sparse_core.plan import SparsePlan
    from sparse_core.retrofit import decode_stats, is_sparsified, sparsified, unsparsify

    if is_sparsified(model):
        unsparsify(model)
    cap = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    # a length asked for is refused when it and the new tokens do not fit; the default is shortened
    (length,), shortened = fit_cache_lengths(
        (DEFAULT_PROMPT_TOKENS if prompt_tokens is None else prompt_tokens,),
        cap or None,
        new_tokens,
        asked=prompt_tokens is not None,
        what="--prompt-tokens",
    )
    corpus = list(texts) if texts is not None else corpus_texts("all")
    windows = pack_token_windows(tok, corpus, length, prompts + WINDOWS, seed=CORPUS_SEED)
    full = [w for w in windows[:prompts] if len(w) == length]
    if len(full) < prompts:
        raise ValueError(
            f"--prompts {prompts}: {texts_source} holds {len(full)} window(s) of {length} tokens "
            "(give fewer prompts, a shorter --prompt-tokens or more text)"
        )
    plans, gate_report = _scorer_plans(
        model, windows[prompts:], base or SparsePlan(), scorers, budgets, page_size, say
    )
    dev = next(model.parameters()).device
    per_prompt = {
        s: {b: {"kl": [], "agree": [], "nll_delta": [], "density": []} for b in budgets} for s in scorers
    }
    for i, win in enumerate(full, start=1):
        say(f"prompt {i}/{prompts}: dense prefill of {length} tokens and reference continuation")
        cache, first = prefill(model, torch.tensor([win], device=dev))
        cache = as_paged(cache)
        ref = run_decode(model, cache, first, new_tokens)
        for s in scorers:
            for b in budgets:
                with sparsified(model, plans[s][b]):
                    st = decode_stats(model)
                    st.reset()
                    run = run_decode(model, cache, first, new_tokens, forced=ref.predicted)
                    density = st.density
                kl, agree, nll = fidelity(ref, run)
                row = per_prompt[s][b]
                row["kl"].append(kl)
                row["agree"].append(agree)
                row["nll_delta"].append(nll)
                row["density"].append(density)
        say(f"prompt {i}/{prompts}: {len(scorers) * len(budgets)} plans scored")
        del cache
    return {
        "prompt_tokens": length,
        # the default shortened to fit the model's positions: {"8192": 8160}, said in the table's title
        "prompt_tokens_shortened": {str(k): v for k, v in shortened.items()},
        "per_prompt": per_prompt,
        "page_gate_training": gate_report,
    }


def run(
    *,
    model_ref: str = "smollm2-135m",
    scorers: Sequence[str] = DEFAULT_SCORERS,
    budgets: Sequence[int] = DEFAULT_BUDGETS,
    prompts: int = 12,
    prompt_tokens: int | None = None,
    new_tokens: int = 32,
    page_size: int = DEFAULT_PAGE_SIZE,
    plan=None,
    confidence: float = CONFIDENCE,
    texts: Sequence[str] | None = None,
    texts_source: str = "the bundled corpus",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    from sparse_core.loading import load_model

    say = progress or (lambda _m: None)
    clock = RunClock()
    budgets = sorted(set(budgets))
    say(f"loading {model_ref}")
    model, tok = load_model(model_ref)
    model.eval()
    measured = measure(
        model,
        tok,
        scorers=scorers,
        budgets=budgets,
        prompts=prompts,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        page_size=page_size,
        base=plan,
        texts=texts,
        texts_source=texts_source,
        say=say,
    )
    plan_rows, pair_rows = summarize(measured["per_prompt"], budgets, confidence=confidence)
    per_prompt = {s: {str(b): v for b, v in by_b.items()} for s, by_b in measured["per_prompt"].items()}
    return {
        "benchmark": "decode-scorers",
        "model": str(getattr(model.config, "_name_or_path", model_ref)),
        "model_ref": model_ref,
        "scorers": list(scorers),
        "reference": scorers[0],
        "budgets": budgets,
        "page_size": page_size,
        "local_pages": LOCAL_PAGES,
        "prompts": prompts,
        "texts": texts_source,
        "prompt_tokens": measured["prompt_tokens"],
        "prompt_tokens_shortened": measured["prompt_tokens_shortened"],
        "new_tokens": new_tokens,
        "confidence": confidence,
        "plan_rows": plan_rows,
        "pair_rows": pair_rows,
        "per_prompt": per_prompt,
        "page_gate_training": measured["page_gate_training"],
        **clock.summary(),
    }


def plot(result: dict[str, Any], path) -> Any:
    """Mean KL over prompts (with its interval) against the budget, one line per scorer, log-log."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for s in result["scorers"]:
        rows = [r for r in result["plan_rows"] if r["scorer"] == s]
        x = [r["budget"] for r in rows]
        y = [max(r["kl"], KL_FLOOR) for r in rows]
        lo = [max(r["kl"] - max(r["kl_lo"], KL_FLOOR), 0) if math.isfinite(r["kl_lo"]) else 0 for r in rows]
        hi = [r["kl_hi"] - r["kl"] if math.isfinite(r["kl_hi"]) else 0 for r in rows]
        ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=s)
    ax.set_xscale("log", base=2)
    ax.set_xticks(result["budgets"], [str(b) for b in result["budgets"]])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("page budget (tokens per KV head and layer)")
    ax.set_ylabel("KL(dense || sparse), mean over prompts")
    ax.set_title(
        f"{result.get('model_ref', result['model'])}: {result['prompts']} prompts of "
        f"{result['prompt_tokens']} tokens, {result['new_tokens']} generated each",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    return save_figure(fig, path)
