"""Calibrate the decode budget: the sparsest per-layer page budget whose generated tokens stay within
a fidelity budget, measured on continuations the dense model generates after long prompts.

1. Prompts: `n_prompts` windows of `prompt_tokens` tokens from the use case's texts; each is prefilled
   densely once and the dense model generates `new_tokens` greedy tokens (the reference).
2. Sensitivity, from one dense pass over those tokens with a capture on every layer: for each layer
   and candidate budget, the share of the dense attention mass of the decode queries that the
   estimator's page selection at that budget drops (exact dense page masses vs the selection, no
   extra forwards per budget).
3. Allocation by one error level eps: each layer takes the smallest budget whose dropped mass is
   <= eps, else it reads the whole cache (a dense decode layer).
4. Joint check: binary search over eps (the measured errors, thinned) with the sparsified model fed
   the dense continuation (teacher forcing): mean KL(dense || sparse) per generated token, top-1
   agreement with the dense greedy token, relative NLL change. The largest eps whose plan meets the
   budget wins; none: no decode section (decode stays dense). With `confidence` a step passes only
   when one-sided bounds meet the budget (KL's and delta NLL's upper, agreement's lower;
   `sparse_core.fidelity_bound`), each step judged at `eps_search.step_alpha`'s level so that the
   plan returned holds them at `confidence`: the largest eps whose tokens happened to go well is
   otherwise what the search returns. The unit of the bound is a prompt (its whole continuation),
   not a token or a run of tokens: prompts differ (on SmolLM2 at 8k one Quest plan's mean KL per
   continuation ran from 0.015 to 0.036 over four prompts), and a bound whose unit is the token of a
   few prompts says nothing of the next prompt (simulated with that spread, KL's bound over 8-token
   blocks of 2-4 prompts missed the prompts' mean 25-27% of the time at 95%). So it needs
   `decode.bound.prompts_needed` prompts (10 at 95% over 5 steps) and is cheapest with many
   short continuations. It costs density (docs/sparse_core.md, "A margin for the decode budget").
   With `confidence` the candidates' sensitivities (step 2) come from `sensitivity_prompts` more
   windows of the texts, packed after the judged prompts, never from the prompts that judge them:
   the search's guarantee (sparse_core.eps_search) holds for a candidate set fixed before the
   judging data is read, as prefill calibration's calibration / held-out split gives it. They are
   page_gate's training windows where it trains (no more text needed; its sensitivities there may
   flatter it, which costs density at worst, since the judged prompts decide), or with
   `sensitivity_apart` the windows after them (more text). Without `confidence`
   the sensitivities come from the judged prompts themselves (their means are what is judged, and
   no level is claimed).
5. Break-even: on this host, one attention layer of the model's shape at each budget the plan uses,
   dense vs sparse step at increasing cache lengths (sparse_core.decode.break_even); below the length
   where sparse starts to win, a layer's decode stays dense (`DecodePlan.break_even_tokens`, a layer's
   own in `layer_overrides` when its budget breaks even elsewhere). The fidelity
   checks above run sparse at every length (break-even 0), so the budget is checked where it is used.
6. The whole model, where the plan decodes sparsely at the calibration length: `whole_model_repeats`
   paired runs of the model's decode, dense and with the plan, on the cache the served model uses
   (`decode.measure.compare_decode`). One layer's best step at 1.05x does not make the model faster: a
   step of the whole model pays the sparse path's fixed cost in every layer, and a plan that reads most
   of the cache saves little (docs-qa's read 89% of it at 3k tokens and decoded at 0.98x [0.97, 1.00]
   end to end). Unless the runs' 95% interval lies above 1 the break-even moves past the calibration
   length, so decode stays dense there: "never slower than dense", measured where it is used.

Before all this, when the break-even is measured: if even the smallest candidate budget does not
break even within the calibration's cache length (the use case's own), no budget is searched (that
costs minutes of generation for a budget nothing would use): the decode section keeps every layer
dense and records the break-even, so the evaluation and the ROI can say why decode saves nothing.

The search is deterministic for a seed."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from sparse_core.decode import bound, page_gate
from sparse_core.decode.plan import DECODE_ESTIMATORS, TRAINED_BY_DECODE_CALIBRATION, DecodePlan
from sparse_core.eps_search import largest_passing, search_steps
from sparse_core.fidelity_bound import judged, judged_dict
from sparse_core.plan import SparsePlan

Progress = Callable[[str, int, int], None]


@dataclass
class DecodeLimits:
    prompt_tokens: int = 2048
    n_prompts: int = 2
    new_tokens: int = 64
    page_size: int = 16
    estimator: str = "quest"
    budgets: tuple[int, ...] = (128, 256, 512, 1024, 2048, 4096)
    sink_pages: int = 1
    local_pages: int = 4
    max_joint_checks: int = bound.SEARCH_STEPS
    # cache length below which decode stays dense; None: measured on this host (break_even.py)
    break_even_tokens: int | None = None
    break_even_lengths: tuple[int, ...] | None = None  # cache lengths measured (None: break_even.LENGTHS)
    # estimator page_gate: trained first on this many more windows of the texts (beyond the prompts)
    page_gate_windows: int = page_gate.WINDOWS
    page_gate_rows: int = page_gate.ROWS_PER_WINDOW  # decode rows sampled per window
    page_gate_steps: int = page_gate.STEPS  # Adam steps per layer
    # judge the budget on one-sided bounds at this confidence (agree's lower, kl's and nll_delta's
    # upper; `sparse_core.fidelity_bound`, over prompts: one block a prompt's continuation) instead
    # of the means of the generated tokens; None: the means
    confidence: float | None = None
    # with confidence: the windows (beyond the judged prompts) the candidates' sensitivities come from
    sensitivity_prompts: int = 2
    # with confidence and a trained estimator: those windows come after page_gate's training windows
    # (more text) instead of being them
    sensitivity_apart: bool = False
    # with a measured break-even: paired runs of the whole model's decode, dense and with the plan, at
    # the calibration length (step 6); 0: none (the per-layer break-even alone)
    whole_model_repeats: int = 4

    def __post_init__(self) -> None:
        if self.n_prompts < 1:
            raise ValueError(f"decode.n_prompts must be >= 1, got {self.n_prompts}")
        if self.new_tokens < 2:
            raise ValueError(f"decode.new_tokens must be >= 2, got {self.new_tokens}")
        if self.page_size < 1 or self.prompt_tokens < 4 * self.page_size:
            raise ValueError(
                f"decode.prompt_tokens must be >= 4 pages ({4 * self.page_size} tokens), "
                f"got {self.prompt_tokens}"
            )
        if self.estimator not in DECODE_ESTIMATORS:
            raise ValueError(
                f"decode.estimator must be one of {list(DECODE_ESTIMATORS)}, got {self.estimator!r}"
            )
        if not self.budgets or any(int(b) < 1 for b in self.budgets):
            raise ValueError(f"decode.budgets must be token counts >= 1, got {self.budgets!r}")
        self.budgets = tuple(sorted({int(b) for b in self.budgets}))
        if self.break_even_tokens is not None and self.break_even_tokens < 0:
            raise ValueError(f"decode.break_even_tokens must be >= 0, got {self.break_even_tokens}")
        if self.whole_model_repeats != 0 and self.whole_model_repeats < 2:
            raise ValueError(
                f"decode.whole_model_repeats must be 0 or >= 2 (an interval needs 2 runs), "
                f"got {self.whole_model_repeats}"
            )
        for name in ("page_gate_windows", "page_gate_rows", "page_gate_steps", "sensitivity_prompts"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"decode.{name} must be >= 1, got {getattr(self, name)}")
        if self.confidence is not None:
            if not 0 < self.confidence < 1:
                raise ValueError(f"decode.confidence must be in (0, 1) or None, got {self.confidence}")
            bound.check_prompts(self.confidence, self.n_prompts, self.max_joint_checks)

    def step_confidence(self, steps: int | None = None) -> float:
        """The level each of the search's `steps` checks (default: at most max_joint_checks) is judged
        at, so that the plan it returns holds its bound at `confidence` (sparse_core.eps_search)."""
        assert self.confidence is not None
        return bound.step_confidence(self.confidence, self.max_joint_checks if steps is None else steps)

    def check_prefill(self, candidates: Sequence[str], block_size: int) -> None:
        """A page scorer that reads a learned prefill estimator's weights needs that estimator among
        the calibrated ones, and pages pooled like its blocks (page_size == block_size)."""
        learned = DECODE_ESTIMATORS[self.estimator]
        if learned is None:
            return
        if learned not in candidates:
            raise ValueError(
                f"decode estimator {self.estimator!r} reuses the learned {learned}: "
                f"calibrate with estimator={learned!r}"
            )
        if self.page_size != block_size:
            raise ValueError(
                f"decode estimator {self.estimator!r} needs page_size == block_size ({block_size}): the "
                f"{learned}'s key features are pooled over blocks; got page_size {self.page_size}"
            )

    @classmethod
    def quick(cls, **kw) -> DecodeLimits:
        base: dict[str, Any] = dict(
            prompt_tokens=1024, n_prompts=1, new_tokens=32, max_joint_checks=3, page_gate_windows=1
        )
        base.update(kw)
        return cls(**base)


@dataclass
class DecodeCalibrationReport:
    met_budget: bool
    budget: dict
    fidelity: dict  # of the returned decode plan (identical when none)
    layer_budgets: list[int | None]  # None: dense decode layer
    density: float  # mean share of the cache the plan reads at the calibration length
    eps: float | None
    search: list[dict] = field(default_factory=list)
    prompt_tokens: int = 0
    new_tokens: int = 0
    n_prompts: int = 0
    # windows the candidates' sensitivities came from beyond the judged prompts (0: the prompts)
    sensitivity_prompts: int = 0
    sensitivity_apart: bool = False  # those windows were not page_gate's training windows
    seconds: dict = field(default_factory=dict)
    # per budget (str tokens): sparse_core.decode.break_even.BreakEven; None: given, not measured
    break_even: dict | None = None
    skipped: str | None = None  # why no budget was searched (the cache never reaches the break-even)
    page_gate: dict | None = None  # estimator page_gate: its training (decode.page_gate.PageGateReport)
    # step 6: the whole model's decode at the calibration length (`whole_model_check`); None: not run
    whole_model: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def whole_model_check(
    model, plan: SparsePlan, ids: torch.Tensor, new_tokens: int, repeats: int
) -> dict | None:
    """Step 6: the whole model's decode after `ids` [1, S], dense against `plan`, `repeats` paired runs on
    the cache the served model uses, under the evaluation's thread policy. Returns the measurement and
    `faster` (the runs' 95% interval lies above 1: `sparse_core.speedup`, a run is the unit), or None
    when the plan decodes no layer sparsely there (nothing to time: the sparse arm is the dense code)."""
    from sparse_core.decode.cache import full_attention_only
    from sparse_core.decode.measure import compare_decode
    from sparse_core.host import loadavg, threads_for
    from sparse_core.speedup import paired_speedup

    end = int(ids.shape[1]) + new_tokens
    if plan.decode is None or not plan.decode.sparse_at(int(model.config.num_hidden_layers), end):
        return None
    kind = "paged" if full_attention_only(model.config) else "dynamic"
    with threads_for() as policy:
        load_before = loadavg()
        r = compare_decode(
            model,
            plan,
            ids,
            new_tokens=new_tokens,
            repeats=repeats,
            free_running=False,
            dense_cache=kind,
            sparse_cache=kind,
        )
    s = paired_speedup(r.dense_seconds_per_token, r.sparse_seconds_per_token, 0.95)
    return {
        "cache_tokens": [int(ids.shape[1]), end],
        "repeats": repeats,
        "speedup": s.estimate,
        "speedup_low": s.low,
        "speedup_high": s.high,
        "dense_ms_per_token": r.dense_ms_per_token,
        "sparse_ms_per_token": r.sparse_ms_per_token,
        "density": r.density,
        "faster": s.low > 1.0,
        "cache": kind,
        "host": {**policy, "loadavg_before": load_before, "loadavg_after": loadavg()},
    }


def past_break_even(dp: DecodePlan, tokens: int) -> None:
    """Move every break-even of `dp` (the plan's and the layers' own) to at least `tokens`: decode stays
    dense below it."""
    dp.break_even_tokens = max(dp.break_even_tokens, tokens)
    for ov in dp.layer_overrides.values():
        if "break_even_tokens" in ov:
            ov["break_even_tokens"] = max(int(ov["break_even_tokens"]), tokens)


def _layer_errors(
    model, prompts, refs, lim: DecodeLimits, base: SparsePlan
) -> tuple[torch.Tensor, torch.Tensor]:
    """[L, n_budgets] mean dense attention mass dropped by the selection, and kept share."""
    from sparse_core.capture import capture_attention
    from sparse_core.decode.measure import prefill, run_decode
    from sparse_core.decode.pages import summarize
    from sparse_core.decode.scoring import local_start, page_logits, page_mass, select_pages

    n_layers = int(model.config.num_hidden_layers)
    nb = len(lim.budgets)
    err = torch.zeros(n_layers, nb, dtype=torch.float64)
    kept = torch.zeros(n_layers, nb, dtype=torch.float64)
    count = torch.zeros(n_layers, dtype=torch.float64)
    ps = lim.page_size

    def on_layer(call) -> None:
        q, k = call.query, call.key
        if q.shape[2] != 1 or k.shape[2] <= 1:
            return
        li = call.layer_idx
        b, hq, _, d = q.shape
        hkv, length = k.shape[1], k.shape[2]
        qv = q[:, :, 0].float()
        logits = torch.einsum("bhd,bhld->bhl", qv, k.float().repeat_interleave(hq // hkv, 1)) * call.scaling
        probs = torch.softmax(logits, -1)
        n = math.ceil(length / ps)
        pm = torch.nn.functional.pad(probs, (0, n * ps - length)).view(b, hq, n, ps).sum(-1)  # [B, Hq, n]
        pages = summarize(k, ps)
        est = page_logits(lim.estimator, base, li, qv, k, pages, call.scaling)
        mass = page_mass(est, hkv)
        start = local_start(length, ps, lim.local_pages)
        for bi, budget in enumerate(lim.budgets):
            keep_pages = math.ceil(budget / ps)
            sel = select_pages(
                mass, sink_pages=lim.sink_pages, local_pages=lim.local_pages, keep_pages=keep_pages, tau=None
            )
            keep = torch.zeros(b, hkv, n, dtype=torch.bool)
            keep[:, :, start // ps :] = True
            keep.scatter_(2, sel, True)
            covered = (pm * keep.repeat_interleave(hq // hkv, 1)).sum(-1)  # [B, Hq]
            err[li, bi] += float((1.0 - covered).clamp_min(0).mean())
            kept[li, bi] += float(keep.float().mean())
        count[li] += 1

    for ids, ref in zip(prompts, refs, strict=True):
        cache, first = prefill(model, ids)
        with capture_attention(model, on_layer, prefill_only=False):
            run_decode(model, cache, first, lim.new_tokens, forced=ref.predicted)
    c = count.clamp_min(1)[:, None]
    return (err / c).float(), (kept / c).float()


def allocate(err: torch.Tensor, kept: torch.Tensor, budgets: Sequence[int], eps: float):
    """Per layer the smallest budget with dropped mass <= eps (None: dense). -> (budgets, density)."""
    out: list[int | None] = []
    dens = []
    for li in range(err.shape[0]):
        ok = [bi for bi in range(len(budgets)) if float(err[li, bi]) <= eps]
        if ok:
            out.append(int(budgets[ok[0]]))
            dens.append(float(kept[li, ok[0]]))
        else:
            out.append(None)
            dens.append(1.0)
    return out, sum(dens) / len(dens)


def decode_plan_for(layer_budgets: list[int | None], lim: DecodeLimits) -> DecodePlan | None:
    sparse = [b for b in layer_budgets if b is not None]
    if not sparse:
        return None
    top = max(sparse)
    return DecodePlan(
        estimator=lim.estimator,
        page_size=lim.page_size,
        budget_tokens=top,
        sink_pages=lim.sink_pages,
        local_pages=lim.local_pages,
        layer_overrides={
            li: {"budget_tokens": b} for li, b in enumerate(layer_budgets) if b is not None and b != top
        },
        dense_layers=tuple(li for li, b in enumerate(layer_budgets) if b is None),
    )


def _window_counts(lim: DecodeLimits) -> tuple[int, int, bool]:
    """(page_gate's training windows, sensitivity windows, whether those are apart) beyond the prompts."""
    n_gate = lim.page_gate_windows if lim.estimator in TRAINED_BY_DECODE_CALIBRATION else 0
    n_sens = lim.sensitivity_prompts if lim.confidence is not None else 0
    return n_gate, n_sens, lim.sensitivity_apart and n_gate > 0


def windows_needed(lim: DecodeLimits) -> int:
    """How many packed windows `split_windows` reads: the prompts, then page_gate's training windows
    and the sensitivity windows, the same ones unless `sensitivity_apart`."""
    n_gate, n_sens, apart = _window_counts(lim)
    return lim.n_prompts + (n_gate + n_sens if apart else max(n_gate, n_sens))


def split_windows(
    packed: list[list[int]], lim: DecodeLimits, length: int
) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """The packed windows -> (judged prompts, page_gate's training windows, sensitivity windows).

    The prompts come first; the windows beyond them are page_gate's training windows (where it
    trains) and, with a confidence, the windows the candidates' sensitivities come from: the same
    windows where both are asked for, or with `sensitivity_apart` the windows after the training
    ones. Neither is judged: what matters is that the judged prompts are not read before they judge.
    Raises ValueError naming the setting when the text runs out."""
    n_gate, n_sens, apart = _window_counts(lim)
    prompts, beyond = packed[: lim.n_prompts], packed[lim.n_prompts :]
    gate = beyond[:n_gate]
    sens = beyond[n_gate : n_gate + n_sens] if apart else beyond[:n_sens]
    filled = f"they fill {len(packed)} window(s) of {length} tokens"
    if n_gate and not gate:
        raise ValueError(
            f"texts too short to train the decode page_gate: {filled}, all taken by the calibration "
            f"prompts; page_gate trains on {lim.page_gate_windows} more (give more text, or fewer "
            "decode.n_prompts)"
        )
    if len(sens) < n_sens:
        after = f" and page_gate's {n_gate} training windows (decode.sensitivity_apart)" if apart else ""
        raise ValueError(
            f"texts too short for decode.confidence: {filled}; the {lim.n_prompts} judged prompts"
            f"{after} come first, and the candidates' sensitivities need {n_sens} more "
            "(decode.sensitivity_prompts), read before the prompts judge (give more text, fewer "
            "decode.n_prompts, or a shorter decode.prompt_tokens)"
        )
    return prompts, gate, sens


def _lengths(lim: DecodeLimits) -> dict:
    return {} if lim.break_even_lengths is None else {"lengths": tuple(lim.break_even_lengths)}


def _with_page_gate(base: SparsePlan, model, page_size: int) -> SparsePlan:
    """`base` with an untrained page gate's tensors (for timing the scoring path: same ops)."""
    from sparse_core.estimators.learned_gate import GateShape
    from sparse_core.estimators.learned_gate_v2 import model_rope

    gate = page_gate.PageGate(GateShape.from_config(model.config), page_size, *model_rope(model))
    return base.with_(tensors={**base.tensors, **gate.to_tensors()})


def _smallest_break_even(model, base, lim: DecodeLimits, length: int, n_layers: int, budget, seed: int):
    """(the smallest candidate budget's break-even, and (an all-dense decode plan, its report) when it
    lies beyond `length` + the generated tokens, else None)."""
    from sparse_core.decode.break_even import measure_for_model

    t0 = time.perf_counter()
    smallest = min(lim.budgets)
    probe = DecodePlan(
        estimator=lim.estimator,
        page_size=lim.page_size,
        budget_tokens=smallest,
        sink_pages=lim.sink_pages,
        local_pages=lim.local_pages,
    )
    measured = measure_for_model(
        model, base.with_(decode=probe), budget_tokens=smallest, seed=seed, **_lengths(lim)
    )
    if length + lim.new_tokens >= measured.tokens:
        return measured, None
    probe.dense_layers = tuple(range(n_layers))
    probe.break_even_tokens = measured.tokens
    report = DecodeCalibrationReport(
        met_budget=True,
        budget=budget.to_dict(),
        fidelity={"kl": 0.0, "agree": 1.0, "nll_delta": 0.0, "n_positions": 0},  # the dense path
        layer_budgets=[None] * n_layers,
        density=1.0,
        eps=None,
        prompt_tokens=length,
        new_tokens=lim.new_tokens,
        seconds={"break_even": time.perf_counter() - t0},
        break_even={str(smallest): measured.to_dict()},
        skipped=(
            f"not searched: a {length + lim.new_tokens:,}-token cache is below the break-even of the "
            f"smallest budget ({smallest:,} tokens): {measured.tokens:,} tokens; decode stays dense"
        ),
    )
    return measured, (probe, report)


def calibrate_decode(
    model,
    tokenizer,
    texts: Sequence[str],
    budget: Any,
    *,
    base: SparsePlan | None = None,
    limits: DecodeLimits | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> tuple[DecodePlan | None, DecodeCalibrationReport]:
    """The sparsest per-layer decode budget meeting `budget` (a calibration.Budget, dict or string).
    `base` supplies a learned page scorer's weights (gate, gate_v2); its prefill part is not used here
    (prompts are prefilled densely so the search sees decode alone). With estimator `page_gate` the
    scorer is trained first, on windows of the texts after the prompts', and its weights are added to
    `base.tensors` when a budget passes. The model is left dense."""
    from sparse_core.calibration import Budget
    from sparse_core.corpus import pack_token_windows
    from sparse_core.decode.measure import fidelity_blocks, prefill, run_decode
    from sparse_core.fidelity import Fidelity
    from sparse_core.retrofit import is_sparsified, sparsified, unsparsify

    lim = limits or DecodeLimits()
    if isinstance(budget, str):
        budget = Budget.parse(budget)
    elif isinstance(budget, dict):
        budget = Budget.from_mapping(budget)
    if is_sparsified(model):
        unsparsify(model)
    if lim.estimator in TRAINED_BY_DECODE_CALIBRATION and base is None:
        raise ValueError(f"decode estimator {lim.estimator!r} trains weights into the plan: pass base=")
    base = base or SparsePlan()
    n_layers = int(model.config.num_hidden_layers)
    cap = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    length = min(lim.prompt_tokens, cap - lim.new_tokens) if cap else lim.prompt_tokens
    budgets = tuple(b for b in lim.budgets if b < length) or (lim.budgets[0],)
    lim = DecodeLimits(**{**asdict(lim), "budgets": budgets})
    t_start = time.perf_counter()
    secs: dict[str, float] = {}
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    trained = lim.estimator in TRAINED_BY_DECODE_CALIBRATION
    # one packing: the prompts first, then the windows beyond them (`split_windows`)
    packed = pack_token_windows(
        tokenizer,
        texts,
        length,
        windows_needed(lim),
        seed=seed + 11,
        min_length=max(8 * lim.page_size, length // 4),
    )
    if not packed:
        raise ValueError(f"texts too short to calibrate decode on: need windows of {length} tokens")
    windows, gate_windows, sens_windows = split_windows(packed, lim, length)
    dev = next(model.parameters()).device
    prompts = [torch.tensor([w], device=dev) for w in windows]
    smallest_be = None
    if lim.break_even_tokens is None:
        # the break-even times the scoring ops, not the weights: an untrained page gate times the same
        probe = _with_page_gate(base, model, lim.page_size) if trained else base
        smallest_be, skipped = _smallest_break_even(model, probe, lim, length, n_layers, budget, seed)
        if skipped is not None:
            skipped[1].n_prompts = len(prompts)
            skipped[1].seconds = {**skipped[1].seconds, "total": time.perf_counter() - t_start}
            return skipped
    gate_report = None
    if trained:
        gate, rep = page_gate.train_page_gate(
            model,
            gate_windows,
            page_size=lim.page_size,
            rows_per_window=lim.page_gate_rows,
            steps=lim.page_gate_steps,
            seed=seed,
            progress=progress,
        )
        caller, base = base, base.with_(tensors={**base.tensors, **gate.to_tensors()})
        gate_report = rep.to_dict()
        secs["page_gate"] = rep.seconds

    t0 = time.perf_counter()
    sens_prompts = [torch.tensor([w], device=dev) for w in sens_windows]
    refs, caches, sens_refs = [], [], []
    for i, ids in enumerate(prompts + sens_prompts, start=1):
        cache, first = prefill(model, ids)
        ref = run_decode(model, cache, first, lim.new_tokens)
        if i <= len(prompts):
            refs.append(ref)
            caches.append((cache, first))
        else:
            sens_refs.append(ref)
        if progress:
            progress("decode reference", i, len(prompts) + len(sens_prompts))
    secs["reference"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if sens_prompts:  # candidates fixed before the judged prompts are read
        err, kept = _layer_errors(model, sens_prompts, sens_refs, lim, base)
    else:
        err, kept = _layer_errors(model, prompts, refs, lim, base)
    secs["sensitivity"] = time.perf_counter() - t0

    nll_ref = sum(
        float(-r.logprobs.gather(1, torch.tensor(r.predicted)[:, None]).mean()) for r in refs
    ) / len(refs)
    dense_fid = Fidelity(0.0, 1.0, nll_ref, nll_ref, 0.0, len(prompts) * lim.new_tokens)

    def check(layer_budgets) -> Fidelity:
        dp = decode_plan_for(layer_budgets, lim)
        plan = base.with_(dense_layers=tuple(range(n_layers)), decode=dp)
        blocks: list = []
        with sparsified(model, plan):
            for (cache, first), ref in zip(caches, refs, strict=True):
                run = run_decode(model, cache, first, lim.new_tokens, forced=ref.predicted)
                blocks += fidelity_blocks(ref, run, size=lim.new_tokens)  # a prompt
        return Fidelity.from_blocks(blocks)

    vals = sorted({float(x) for x in err.flatten().tolist() if math.isfinite(x)})
    limit = max(1, 2**lim.max_joint_checks - 1)
    if len(vals) > limit:
        vals = (
            [vals[round(i * (len(vals) - 1) / (limit - 1))] for i in range(limit)] if limit > 1 else vals[:1]
        )
    # each step judged at the level that makes the returned plan's bounds hold (eps_search)
    step_conf = (
        None if lim.confidence is None else lim.step_confidence(search_steps(len(vals), lim.max_joint_checks))
    )

    search: list[dict] = []
    cache_res: dict[int, tuple[bool, Fidelity, list, float]] = {}

    def passes(i: int) -> bool:
        if i not in cache_res:
            t1 = time.perf_counter()
            lb, dens = allocate(err, kept, budgets, vals[i])
            fid = check(lb) if any(b is not None for b in lb) else dense_fid
            ok = budget.met_by(judged(fid, step_conf))
            cache_res[i] = (ok, fid, lb, dens)
            search.append(
                {
                    "eps": vals[i],
                    "density": dens,
                    "fidelity": judged_dict(fid, lim.confidence, step_conf),
                    "passed": ok,
                    "seconds": time.perf_counter() - t1,
                }
            )
            if progress:
                progress("decode joint check", len(search), min(lim.max_joint_checks, len(vals)))
        return cache_res[i][0]

    t0 = time.perf_counter()
    lo = largest_passing(len(vals), passes, max_checks=lim.max_joint_checks)
    secs["search"] = time.perf_counter() - t0
    secs["total"] = time.perf_counter() - t_start
    if lo >= 0 and any(b is not None for b in cache_res[lo][2]):
        _, fid, lb, dens = cache_res[lo]
        dp = decode_plan_for(lb, lim)
        met = True
    else:
        fid, lb, dens, dp, met = dense_fid, [None] * n_layers, 1.0, None, False
    break_even = whole = None
    if dp is not None:
        t0 = time.perf_counter()
        if lim.break_even_tokens is None:
            from sparse_core.decode.break_even import measure_for_model

            plan = base.with_(decode=dp)
            measured = {
                b: (
                    smallest_be
                    if smallest_be is not None and b == min(budgets)
                    else measure_for_model(model, plan, budget_tokens=b, seed=seed, **_lengths(lim))
                )
                for b in sorted({b for b in lb if b is not None})
            }
            break_even = {str(b): m.to_dict() for b, m in measured.items()}
            dp.break_even_tokens = measured[dp.budget_tokens].tokens
            for ov in dp.layer_overrides.values():
                own = measured[ov["budget_tokens"]].tokens
                if own != dp.break_even_tokens:
                    ov["break_even_tokens"] = own
        else:
            dp.break_even_tokens = lim.break_even_tokens
        secs["break_even"] = time.perf_counter() - t0
        if lim.break_even_tokens is None and lim.whole_model_repeats:
            t0 = time.perf_counter()
            # the judged continuations reach length + new_tokens; 32 timed tokens a run are enough
            reach = int(prompts[0].shape[1]) + lim.new_tokens
            whole = whole_model_check(
                model, base.with_(decode=dp), prompts[0], min(lim.new_tokens, 32), lim.whole_model_repeats
            )
            if whole is not None:
                whole["break_even_before"] = dp.first_break_even()
                if not whole["faster"]:
                    past_break_even(dp, reach + 1)
                whole["break_even_after"] = dp.first_break_even()
            secs["whole_model"] = time.perf_counter() - t0
        secs["total"] = time.perf_counter() - t_start
    report = DecodeCalibrationReport(
        met_budget=met,
        budget=budget.to_dict(),
        fidelity=judged_dict(fid, lim.confidence, step_conf),
        layer_budgets=lb,
        density=dens,
        eps=vals[lo] if lo >= 0 else None,
        search=search,
        prompt_tokens=length,
        new_tokens=lim.new_tokens,
        n_prompts=len(prompts),
        sensitivity_prompts=len(sens_prompts),
        sensitivity_apart=lim.sensitivity_apart and trained and bool(sens_prompts),
        seconds=secs,
        break_even=break_even,
        page_gate=gate_report,
        whole_model=whole,
    )
    if trained and dp is not None:  # the caller's plan carries the weights its decode was judged with
        caller.tensors.update(gate.to_tensors())
    return dp, report
