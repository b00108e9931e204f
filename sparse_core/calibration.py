"""Calibrate a sparse plan to a use case's quality budget on its own texts.

Search, built to stay cheap on 30 layers:

1. Split the texts (deterministically, by seed) into calibration and held-out parts and pack each into
   token windows of `max_seq_len`.
2. (learned estimators only) Train each on the calibration windows through its registry hook
   (`sparse_core.estimators.get_training_hook`; the learned gates: `sparse_core.scorer_training`),
   the last window it reads being its early-stopping set. With `limits.sensitivity_windows` = N the
   last N calibration windows are kept apart from training, for step 3 alone.
3. Sensitivity, measured once: one dense forward per calibration window (with
   `limits.sensitivity_windows` and a learned candidate: per window kept apart) with a capture on every
   layer; the layer's dense block-mass map and, for each tau candidate, its selection are computed
   from the captured q/k (no extra forwards), giving per layer x selection head x tau the kept
   density and the dense attention mass the selection drops (`limits.drop_measure="output"`: the
   relative error of the attention output itself, from one more per-block P.V product per layer).
4. Allocation by one global error level eps: every (layer, head) takes the sparsest tau whose
   dropped mass is <= eps (else it stays dense; a layer whose heads all stay dense is listed in dense_layers).
   A larger eps means a sparser plan. With `limits.layer_weights="kl"` each layer's errors are first
   scaled by what its error does to the output (its KL alone at a reference plan, measured on one
   sensitivity window; `sparse_core.layer_weights`), so eps bounds every layer's share of the KL.
5. Joint check: binary search over eps (a thinned, sorted set of the measured errors) with full
   sparse forwards on the held-out windows against the dense reference; the largest eps whose plan
   meets the budget (mean next-token KL, top-1 agreement, relative delta NLL) wins. Each check is one
   forward per held-out window, so the search costs ~log2(#eps) x held-out forwards. With
   `limits.confidence` the budget is judged on one-sided bounds of those means (`sparse_core.fidelity_bound`),
   by blocks of positions or, with `limits.bound_unit="window"`, by held-out windows
   (`sparse_core.prefill_bound`), so the plan picked does not sit at the budget's edge on the
   held-out windows only because their noise favoured it. Every bound a step is judged on
   (this margin, the task bound) is taken at `eps_search.step_alpha`'s per-step level, so that the
   plan the search returns holds it, not only each step.

Per-layer estimator choice: `estimator` may name candidates joined by "+" (e.g. "gate_v2+pooled"):
the sensitivity is measured for each candidate in the same dense forwards, and at every eps each
layer takes the candidate that keeps the fewest blocks there (ties: the first). The plan's estimator is
the first candidate; layers that chose another carry it in `layer_overrides[layer]["estimator"]`.
With `limits.sharpen` (powers besides 1.0), every candidate is also measured with its estimate raised
to each power (`selection.sharpen`) and a layer may take a power as it takes an estimator
(`layer_overrides[layer]["sharpen"]`).

Task bound: a budget with `task_delta` also bounds the drop of the task score on the given task rows
(the calibration split of the use case's dataset, scored with its task): at every point of the eps
search that passes the fidelity check, a valid one-sided upper confidence bound on the mean paired
drop (dense - sparse per row, in [-1, 1]; `sparse_core.task_bound`, by betting, for any distribution)
must be < `task_delta`, at level 0.05 / steps, so the plan returned is bounded at 95%. A Student t
limit was used before and was no bound: on docs-qa 4 calibration rows gave a mean drop of -0.0002 and
a t limit of 0.0064, the held-out rows dropped 0.098. A valid bound costs rows: even rows that drop
nothing certify `task_delta` only from `task_bound.rows_to_certify(task_delta, alpha=0.05 / steps)`
rows on (277 for 0.02 with 7 steps); with fewer rows the search is skipped and the plan stays dense,
with `task.rows_needed` in the report saying why.

Deterministic for a seed: the split, the windows, gate training and the search have no other
randomness.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from sparse_core.capture import capture_attention
from sparse_core.corpus import pack_token_windows, split_texts, text_fingerprint
from sparse_core.eps_search import largest_passing, search_steps, step_alpha
from sparse_core.errors import SparsePilotError
from sparse_core.fidelity import DenseReference, Fidelity, dense_reference, measure_fidelity
from sparse_core.fidelity_bound import by_window, judged, judged_dict
from sparse_core.host import threads_restored
from sparse_core.layer_weights import check_mode as check_layer_weights
from sparse_core.layer_weights import layer_scales, reference_eps
from sparse_core.plan import DEFAULT_BLOCK_SIZE, SparsePlan, check_sharpen, model_shape
from sparse_core.prefill_bound import (
    FIDELITY_FRACTION,
    SEARCH_STEPS,
    blocks_per_window,
    check_unit,
    heldout_shortfall,
    heldout_windows,
)
from sparse_core.progress import Progress, counter
from sparse_core.task_bound import ALPHA as TASK_ALPHA
from sparse_core.task_bound import certify_in_order, rows_to_certify

# what the allocation's error level bounds (`measure_sensitivities`)
DROP_MEASURES = ("mass", "output")


class BudgetError(SparsePilotError, ValueError):
    """A malformed quality budget."""


@dataclass(frozen=True)
class Budget:
    """Held-out fidelity a plan must keep. None disables a criterion."""

    kl: float | None = 0.01  # mean next-token KL(dense || sparse), nats
    agree: float | None = 0.99  # top-1 agreement with dense
    nll_delta: float | None = 0.01  # relative increase of next-token NLL
    task_delta: float | None = None  # largest drop of the mean task score (dense - sparse), task rows

    def __post_init__(self) -> None:
        for name in ("kl", "agree", "nll_delta", "task_delta"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float)) or math.isnan(v) or v < 0):
                raise BudgetError(f"budget.{name} must be a number >= 0, got {v!r}")
        if self.agree is not None and self.agree > 1:
            raise BudgetError(f"budget.agree must be in [0, 1], got {self.agree}")
        if self.kl is None and self.agree is None and self.nll_delta is None:
            raise BudgetError("a budget needs at least one of kl, agree, nll_delta")

    @classmethod
    def parse(cls, text: str) -> Budget:
        """'kl=0.01,agree=0.99[,nll=0.01][,task=0.03]': criteria not named are off."""
        vals: dict[str, float | None] = {"kl": None, "agree": None, "nll_delta": None, "task_delta": None}
        aliases = {
            "kl": "kl",
            "agree": "agree",
            "agreement": "agree",
            "nll": "nll_delta",
            "nll_delta": "nll_delta",
            "task": "task_delta",
            "task_delta": "task_delta",
        }
        for part in filter(None, (p.strip() for p in text.split(","))):
            if "=" not in part:
                raise BudgetError(f"budget item {part!r} is not name=value (e.g. kl=0.01,agree=0.99)")
            k, v = (x.strip() for x in part.split("=", 1))
            if k not in aliases:
                raise BudgetError(f"unknown budget item {k!r}; known: kl, agree, nll, task")
            try:
                vals[aliases[k]] = float(v)
            except ValueError:
                raise BudgetError(f"budget item {k!r} has a non-numeric value {v!r}") from None
        return cls(**vals)

    @classmethod
    def from_mapping(cls, m: Any) -> Budget:
        """From a dict or an object with kl/agree/nll_delta[/task_delta] attributes (e.g. a spec)."""
        get = m.get if isinstance(m, dict) else lambda k, d=None: getattr(m, k, d)
        return cls(
            kl=get("kl", None),
            agree=get("agree", None),
            nll_delta=get("nll_delta", None),
            task_delta=get("task_delta", None),
        )

    def violations(self, fid: Fidelity) -> list[str]:
        out = []
        if self.kl is not None and not fid.kl <= self.kl:
            out.append(f"kl {fid.kl:.4g} > {self.kl}")
        if self.agree is not None and not fid.agree >= self.agree:
            out.append(f"agree {fid.agree:.4g} < {self.agree}")
        if self.nll_delta is not None and not fid.nll_delta <= self.nll_delta:
            out.append(f"nll_delta {fid.nll_delta:.4g} > {self.nll_delta}")
        return out

    def met_by(self, fid: Fidelity) -> bool:
        return not self.violations(fid)

    def task_violation(self, upper: float | None) -> str | None:
        """The task bound's complaint about the upper confidence bound of the drop, or None."""
        if self.task_delta is None or upper is None:
            return None
        return None if upper < self.task_delta else f"task_delta upper bound {upper:.4g} >= {self.task_delta}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CalibrationLimits:
    """Knobs that trade calibration time against how thorough the search is."""

    max_texts: int = 16  # token windows in total (calibration + held-out)
    max_seq_len: int = 2048
    holdout_fraction: float = 0.25
    taus: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995)
    per_head: bool = True
    max_joint_checks: int = SEARCH_STEPS  # full held-out passes in the eps search
    fidelity_fraction: float = FIDELITY_FRACTION  # score the last half of each held-out window
    max_seconds: float | None = None  # soft cap: stop the search, keep the best plan found so far
    # judge the budget on one-sided bounds at this confidence (agree's lower, kl's and nll_delta's
    # upper; `sparse_core.fidelity_bound`) instead of the held-out point estimates; None (default):
    # the point estimates, as before
    confidence: float | None = None
    # the bound's unit (`sparse_core.prefill_bound`): "block" (256 scored positions; a margin) or
    # "window" (a held-out window; agreement's level held on unseen prompts, needs more windows)
    bound_unit: str = "block"
    # plan geometry
    block_size: int = DEFAULT_BLOCK_SIZE
    sink_blocks: int = 1
    local_blocks: int = 1
    group_heads: bool = True
    # training of the learned estimators (their registry hooks read these)
    gate_steps: int = 300
    gate_lr: float = 3e-3
    gate_max_seconds: float | None = None
    gate_checkpoint_dir: str | None = None
    gate_target: str | None = None  # gate_v2 distillation target: maxpool (default), mass, output
    # what the allocation's eps bounds per head: "mass" (dense attention mass dropped, default) or
    # "output" (relative attention output error; `measure_sensitivities`)
    drop_measure: str = "mass"
    # with a learned estimator among the candidates: the last N calibration windows are kept apart
    # from its training (and early stopping), and every candidate's sensitivities come from them
    # alone; 0: from every calibration window, the learned estimator's training windows included
    sensitivity_windows: int = 0
    # the powers each candidate's estimate is also measured at before selection (`selection.sharpen`);
    # a layer takes the one that keeps the fewest blocks. 1.0 (the estimate as it is) is always among
    # them and comes first; (1.0,), the default, measures nothing more
    sharpen: tuple[float, ...] = (1.0,)
    # "kl": scale each layer's errors by what its error does to the output (next-token KL of the layer
    # sparsified alone at a reference plan, on one sensitivity window; `sparse_core.layer_weights`),
    # so one eps bounds every layer's share of the KL; "none" (default): the same eps in every layer
    layer_weights: str = "none"
    # task bound (budget.task_delta): rows of the calibration split scored per search step, at most (None:
    # every row given; a valid bound needs ~5 / task_delta rows even when none drops, `rows_to_certify`)
    max_task_rows: int | None = None
    max_new_tokens: int = 16
    # sparse decode: a DecodeLimits (or its dict) calibrates the plan's decode section after prefill
    decode: Any = None

    def __post_init__(self) -> None:
        if self.max_texts < 2:
            raise ValueError("calibration needs max_texts >= 2 (one window is held out)")
        if not 0 < self.holdout_fraction < 1:
            raise ValueError("holdout_fraction must be in (0, 1)")
        self.taus = tau_grid(self.taus)
        if self.sensitivity_windows < 0:
            raise ValueError(f"sensitivity_windows must be >= 0, got {self.sensitivity_windows}")
        if self.drop_measure not in DROP_MEASURES:
            raise ValueError(f"drop_measure must be one of {DROP_MEASURES}, got {self.drop_measure!r}")
        if self.confidence is not None and not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1) or None, got {self.confidence}")
        check_unit(self.bound_unit)
        self.sharpen = sharpen_powers(self.sharpen)
        check_layer_weights(self.layer_weights)
        if isinstance(self.decode, dict):
            from sparse_core.decode.calibration import DecodeLimits

            self.decode = DecodeLimits(**self.decode)

    @property
    def heldout_windows(self) -> int:
        """How many of the `max_texts` windows are held out (the rest calibrate), when the texts suffice."""
        return heldout_windows(self.max_texts, self.holdout_fraction)

    @classmethod
    def quick(cls, **kw) -> CalibrationLimits:
        """Cheap settings for the pilot's main job (a few minutes on SmolLM2 on 2 CPU cores)."""
        base = dict(
            max_texts=4,
            max_seq_len=1024,
            taus=(0.8, 0.9, 0.95, 0.98, 0.99, 0.995),
            max_joint_checks=4,
            gate_steps=120,
            max_task_rows=4,
        )
        base.update(kw)
        return cls(**base)


def tau_grid(taus: Sequence[float]) -> tuple[float, ...]:
    """The taus an allocation picks from, ascending and distinct; ValueError unless there is one and
    each is in (0, 1)."""
    if not taus or any(not 0 < t < 1 for t in taus):
        raise ValueError(f"taus must be a non-empty list and every tau must be in (0, 1), got {list(taus)}")
    return tuple(sorted({float(t) for t in taus}))


def sharpen_powers(powers: Sequence[float]) -> tuple[float, ...]:
    """The selection powers to measure: 1.0 first, then the others ascending; a bad one is a
    ValueError (PlanError) naming it."""
    for p in powers:
        check_sharpen("calibration", p)
    return (1.0, *sorted({float(p) for p in powers} - {1.0}))


def variant_key(estimator: str, power: float) -> str:
    """How a candidate measured at a selection power is named: 'gate_v2', or 'gate_v2^1.4'."""
    return estimator if power == 1.0 else f"{estimator}^{power:g}"


def variant_of(key: str) -> tuple[str, float]:
    """`variant_key`'s inverse: 'gate_v2^1.4' -> ('gate_v2', 1.4)."""
    name, _, power = key.partition("^")
    return name, float(power) if power else 1.0


@dataclass
class SearchStep:
    eps: float
    predicted_density: float
    density: float | None
    fidelity: dict
    passed: bool
    seconds: float
    task_delta: float | None = None  # dense - sparse mean task score (measured when fidelity passed)
    task_delta_upper: float | None = None  # its valid one-sided upper bound at 1 - task.step_alpha
    task_failed_rows: int | None = None  # task rows the plan gave no score on (scored as failed answers)
    task_rows_scored: int | None = None  # rows scored before the bound was certified (all when it was not)


@dataclass
class CalibrationReport:
    estimator: str
    budget: dict
    # the prefill part: a sparse (not all-dense) prefill plan met the budget; the decode part's flag is in
    # `decode` (rollout.calibration_outcome: either part met is a sparse plan within the budget)
    met_budget: bool
    fidelity: dict  # held-out fidelity of the returned plan
    density: float  # mean fraction of causal blocks kept over layers (dense layers count 1.0): planned
    predicted_density: float
    layer_density: list[float]
    head_density: list[list[float]]
    dense_layers: list[int]
    eps: float | None
    search: list[SearchStep] = field(default_factory=list)
    gate_training: dict | None = None
    n_calibration_windows: int = 0
    n_heldout_windows: int = 0
    n_sensitivity_windows: int = 0  # of the calibration windows, those the sensitivities came from
    seq_len: int = 0
    data_fingerprint: str = ""
    seconds: dict = field(default_factory=dict)
    plan_hash: str = ""
    layer_estimators: list[str] = field(default_factory=list)  # the estimator each layer uses
    task: dict | None = None  # task bound: rows, dense score, the plan's task_delta
    decode: dict | None = None  # sparse_core.decode.calibration report, when decode was calibrated
    host: dict | None = None  # the thread policy calibration ran under (sparse_core.host)
    # what the plan kept on the held-out windows (its search step's; 1.0 all-dense), beside the planned
    # `density` from the sensitivity windows: new text moves it a few percent, a learned estimator's
    # more when the sensitivities came from its own training windows (docs/calibration.md)
    measured_density: float | None = None
    # layer_weights="kl": each layer's KL alone at the reference plan and the scale on its errors
    layer_weights: dict | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        return d


# ----------------------------------------------------------------------------------------------------


def _fingerprint_of(config: Any) -> dict[str, str]:
    """The weights' fingerprint `load_model` put on the config, as plan metadata (none: a model loaded
    some other way, whose plan is then checked on its geometry only, as before)."""
    fp = getattr(config, "weights_fingerprint", None)
    return {"model_fingerprint": fp} if isinstance(fp, str) and fp else {}


@dataclass
class Sensitivity:
    taus: tuple[float, ...]
    err: torch.Tensor  # [L, T, H] mean error per selection head: mass dropped or relative output error
    density: torch.Tensor  # [L, T, H] fraction of causal blocks kept
    heads: int  # selection heads per layer
    group: int  # query heads per selection head


def measure_sensitivity(
    model, windows: Sequence[Sequence[int]], base: SparsePlan, taus: Sequence[float], progress=None
) -> Sensitivity:
    """`measure_sensitivities` for the plan's own estimator."""
    return measure_sensitivities(model, windows, base, taus, (base.estimator,), progress)[base.estimator]


@torch.no_grad()
def measure_sensitivities(
    model,
    windows: Sequence[Sequence[int]],
    base: SparsePlan,
    taus: Sequence[float],
    estimators: Sequence[str],
    progress=None,
    *,
    measure: str = "mass",
    sharpen: Sequence[float] = (1.0,),
) -> dict[str, Sensitivity]:
    """Per estimator x layer x tau x selection head: the error each tau's selection causes (mean over
    query blocks and the head's query heads) and the density it keeps, from one dense forward per
    window. Every estimator is measured on the same forwards and the same dense map. With `sharpen`
    powers besides 1.0, each estimator's estimate is also measured raised to each of them, under
    `variant_key` names ('gate_v2^1.4'), from the same scores.

    `measure="mass"`: the dense attention mass dropped. It bounds what sparse attention changes (the
    output moves by at most 2m times the largest value norm) and needs one block-mass map per layer.
    `measure="output"`: the attention output's error itself, |o' - o| relative to the head's RMS
    output (`capture.selection_drop`, exact): a block whose values are close to the output costs
    little to drop even when it holds mass. One per-block P.V product per layer more."""
    from sparse_core.capture import block_attention_mass, selection_drop
    from sparse_core.estimators import EstimatorContext, get_estimator
    from sparse_core.selection import group_scores, select_blocks
    from sparse_core.selection import sharpen as sharpen_scores

    if measure not in DROP_MEASURES:
        raise ValueError(f"measure must be one of {DROP_MEASURES}, got {measure!r}")

    cfg = model.config
    n_layers = int(cfg.num_hidden_layers)
    hq = int(cfg.num_attention_heads)
    hkv = int(getattr(cfg, "num_key_value_heads", None) or hq)
    heads = hkv if base.group_heads and hkv != hq else hq
    group = hq // heads
    T = len(taus)
    names = list(dict.fromkeys(estimators))
    powers = sharpen_powers(sharpen)
    keys = [variant_key(e, p) for e in names for p in powers]
    err = {e: torch.zeros(n_layers, T, heads, dtype=torch.float64) for e in keys}
    dens = {e: torch.zeros(n_layers, T, heads, dtype=torch.float64) for e in keys}
    count = torch.zeros(n_layers, dtype=torch.float64)

    def on_layer(call):
        li = call.layer_idx
        q, k = call.query[:1], call.key[:1]
        s = q.shape[2]
        params = base.layer_params(li)
        mass = None if measure == "output" else block_attention_mass(q, k, base.block_size, call.scaling)
        nb = math.ceil(s / base.block_size)
        ctx = EstimatorContext(
            block_size=base.block_size, layer_idx=li, plan=base, scale=call.scaling, module=call.module
        )
        keeps: list[tuple[str, int, torch.Tensor]] = []
        for name, power in ((e, p) for e in names for p in powers):
            if power == powers[0]:
                raw = get_estimator(name)(q, k, ctx)
                if heads != hq:
                    raw = group_scores(raw, heads)
            scores = sharpen_scores(raw, power)
            key = variant_key(name, power)
            for ti, tau in enumerate(taus):
                sel = select_blocks(
                    scores,
                    block_size=base.block_size,
                    seq_len=s,
                    tau=float(tau),
                    sink_blocks=params.sink_blocks,
                    local_blocks=params.local_blocks,
                    top_k=params.top_k,
                    min_density=params.min_density,
                )
                keep = sel.mask().repeat_interleave(group, dim=1)  # [1, Hq, nb, nb]
                if mass is None:
                    keeps.append((key, ti, keep[0]))
                else:
                    dropped = (1.0 - (mass * keep).sum(-1)).clamp_min(0.0)  # [1, Hq, nb]
                    err[key][li, ti] += dropped.view(heads, group * nb).mean(-1).double().cpu()
                dens[key][li, ti] += sel.head_density.double()[:heads]
        if keeps:
            _, out_err = selection_drop(
                q, k, call.value[:1], base.block_size, [m for *_, m in keeps], call.scaling
            )
            for (key, ti, _), e in zip(keeps, out_err, strict=True):
                err[key][li, ti] += e.reshape(heads, group * nb).mean(-1).double().cpu()
        count[li] += 1

    dev = next(model.parameters()).device
    for i, w in enumerate(windows, start=1):
        with capture_attention(model, on_layer):
            model(input_ids=torch.tensor([list(w)], device=dev), logits_to_keep=1)
        if progress:
            progress("sensitivity", i, len(windows))
    c = count.clamp_min(1)[:, None, None]
    return {
        e: Sensitivity(tuple(taus), (err[e] / c).float(), (dens[e] / c).float(), heads, group) for e in keys
    }


def allocate(
    sens: Sensitivity, eps: float, *, per_head: bool
) -> tuple[dict, dict, tuple, float, torch.Tensor]:
    """Taus for one error level: (layer_overrides, head_overrides, dense_layers, predicted density,
    per-layer-head density [L, H])."""
    L, T, H = sens.err.shape
    layer_over: dict[int, dict] = {}
    head_over: dict[int, dict[int, float]] = {}
    dense: list[int] = []
    dmat = torch.ones(L, H)
    for li in range(L):
        if per_head:
            chosen: list[float | None] = []
            for h in range(H):
                ok = [t for t in range(T) if sens.err[li, t, h] <= eps]
                if ok:
                    best = min(ok, key=lambda t: (float(sens.density[li, t, h]), -t))
                    chosen.append(sens.taus[best])
                    dmat[li, h] = sens.density[li, best, h]
                else:
                    chosen.append(None)
            if all(c is None for c in chosen):
                dense.append(li)
                continue
            taus = [1.0 if c is None else c for c in chosen]
            layer_tau = max(taus)
            layer_over[li] = {"tau": layer_tau}
            ho = {}
            for h, t in enumerate(taus):
                if t != layer_tau:
                    for qh in range(h * sens.group, (h + 1) * sens.group):
                        ho[qh] = t
            if ho:
                head_over[li] = ho
        else:
            ok = [t for t in range(T) if float(sens.err[li, t].max()) <= eps]
            if not ok:
                dense.append(li)
                continue
            best = min(ok, key=lambda t: (float(sens.density[li, t].mean()), -t))
            layer_over[li] = {"tau": sens.taus[best]}
            dmat[li] = sens.density[li, best]
    return layer_over, head_over, tuple(dense), float(dmat.mean()), dmat


def allocate_choice(
    sens: dict[str, Sensitivity], eps: float, *, per_head: bool
) -> tuple[dict, dict, tuple, float, torch.Tensor, list[str]]:
    """`allocate` with a per-layer choice among estimators: each layer takes the candidate whose
    allocation keeps the fewest blocks there (a dense layer counts 1.0; ties go to the first
    candidate, the plan's own estimator). Returns allocate's tuple plus the estimator per layer.
    A candidate may be an estimator at a selection power (`variant_key`); a layer that takes one
    carries the power as `sharpen`."""
    names = list(sens)
    per = {e: allocate(sens[e], eps, per_head=per_head) for e in names}
    first = names[0]
    L, H = per[first][4].shape
    layer_over: dict[int, dict] = {}
    head_over: dict[int, dict[int, float]] = {}
    dense: list[int] = []
    dmat = torch.ones(L, H)
    chosen: list[str] = []
    for li in range(L):
        best = min(
            names, key=lambda e: (1.0 if li in per[e][2] else float(per[e][4][li].mean()), names.index(e))
        )
        chosen.append(best)
        lo, ho, dl, _, dm = per[best]
        if li in dl:
            dense.append(li)
            continue
        dmat[li] = dm[li]
        name, power = variant_of(best)
        layer_over[li] = (
            dict(lo[li])
            | ({"estimator": name} if name != variant_of(first)[0] else {})
            | ({"sharpen": power} if power != 1.0 else {})
        )
        if li in ho:
            head_over[li] = dict(ho[li])
    return layer_over, head_over, tuple(dense), float(dmat.mean()), dmat, chosen


def scale_errors(sens: Sensitivity, scales: Sequence[float]) -> Sensitivity:
    """The sensitivity with layer l's errors multiplied by scales[l] (`layer_weights.layer_scales`)."""
    w = torch.tensor(list(scales), dtype=sens.err.dtype)
    if w.numel() != sens.err.shape[0]:
        raise ValueError(f"{w.numel()} layer scales for {sens.err.shape[0]} layers")
    return replace(sens, err=sens.err * w[:, None, None])


@torch.no_grad()
def measure_layer_kl(
    model,
    windows: Sequence[Sequence[int]],
    base: SparsePlan,
    sens: dict[str, Sensitivity],
    lim: CalibrationLimits,
    progress: Progress | None = None,
) -> list[float | None]:
    """Per layer the next-token KL against dense on `windows` with that layer alone sparsified as the
    reference plan has it (`layer_weights.reference_eps`); None for a layer dense there."""
    from sparse_core.retrofit import sparsified

    cands = _eps_candidates(sens, 6)  # 63 levels: enough to land near the reference density
    preds = [allocate_choice(sens, e, per_head=lim.per_head)[3] for e in cands]
    lo, ho, dl, _, _, _ = allocate_choice(sens, reference_eps(cands, preds), per_head=lim.per_head)
    ref_plan = base.with_(layer_overrides=lo, head_overrides=ho, dense_layers=dl)
    n_layers = next(iter(sens.values())).err.shape[0]
    wref = dense_reference(model, windows, fraction=lim.fidelity_fraction)
    out: list[float | None] = []
    for li in range(n_layers):
        if li in dl:
            out.append(None)
        else:
            with sparsified(model, ref_plan.with_(dense_layers=tuple(x for x in range(n_layers) if x != li))):
                out.append(measure_fidelity(model, wref).kl)
        if progress:
            progress("layer weights", li + 1, n_layers)
    return out


def _eps_candidates(sens: Sensitivity | dict[str, Sensitivity], max_checks: int) -> list[float]:
    errs = sens.values() if isinstance(sens, dict) else [sens]
    vals = sorted({float(x) for se in errs for x in se.err.flatten().tolist() if math.isfinite(x)})
    limit = max(1, 2**max_checks - 1)
    if len(vals) > limit:
        vals = (
            [vals[round(i * (len(vals) - 1) / (limit - 1))] for i in range(limit)] if limit > 1 else vals[:1]
        )
    return vals


def calibrate(
    model,
    tokenizer,
    texts: Sequence[str],
    budget: Budget | dict | str,
    *,
    estimator: str = "pooled",
    seed: int = 0,
    limits: CalibrationLimits | None = None,
    progress: Progress | None = None,
    task_rows: Sequence[Any] | None = None,
    task: str | None = None,
) -> tuple[SparsePlan, CalibrationReport]:
    """The sparsest plan (per layer / selection head tau) whose held-out fidelity meets `budget`.

    `estimator`: one name, or candidates joined by "+" for a per-layer choice (first = the plan's).
    `task_rows` / `task`: the rows (`sparse_core.tasks.TaskRow`) and task that `budget.task_delta`
    is measured on -- the calibration split of the use case's dataset; required with a task bound.

    The model is left dense. Layers that cannot meet the budget stay dense; if no sparse plan meets
    it the returned plan is all-dense and `report.met_budget` is False."""
    out = calibrate_many(
        model,
        tokenizer,
        texts,
        budget,
        estimators=(estimator,),
        seed=seed,
        limits=limits,
        progress=progress,
        task_rows=task_rows,
        task=task,
    )
    return out[estimator]


@threads_restored()  # the thread policy below is for this call; the caller's count is restored
def calibrate_many(
    model,
    tokenizer,
    texts: Sequence[str],
    budget: Budget | dict | str,
    *,
    estimators: Sequence[str],
    seed: int = 0,
    limits: CalibrationLimits | None = None,
    progress: Progress | None = None,
    task_rows: Sequence[Any] | None = None,
    task: str | None = None,
) -> dict[str, tuple[SparsePlan, CalibrationReport]]:
    """`calibrate` for several estimator specs on the same split, windows, dense reference, gate
    training and sensitivity forwards (what a fair comparison needs, at a fraction of the cost of
    separate runs): {spec: (plan, report)}."""
    from sparse_core.estimators import available_estimators, get_training_hook, parse_estimator_spec
    from sparse_core.retrofit import is_sparsified, unsparsify

    lim = limits or CalibrationLimits()
    if isinstance(budget, str):
        budget = Budget.parse(budget)
    elif isinstance(budget, dict):
        budget = Budget.from_mapping(budget)
    if not estimators:
        raise BudgetError("calibrate_many needs at least one estimator spec")
    specs = {spec: parse_estimator_spec(spec) for spec in estimators}  # unknown -> PlanError before work
    candidates = list(dict.fromkeys(e for c in specs.values() for e in c))
    task_rows = list(task_rows or [])[: lim.max_task_rows]
    if budget.task_delta is not None and not task_rows:
        raise BudgetError("budget.task_delta needs task rows (the dataset's calibration split) to measure on")
    if lim.decode is not None:
        lim.decode.check_prefill(candidates, lim.block_size)
    if is_sparsified(model):
        unsparsify(model)
    from sparse_core.host import apply_thread_policy

    # threads from the CPUs really free: beside a busy process, torch's default two threads spin on a
    # two-core host (a main-job calibration took 3.3x its idle time that way, the evaluation ~2x)
    host = apply_thread_policy()
    t_start = time.perf_counter()
    secs: dict[str, float] = {}
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    calib_texts, held_texts = split_texts(texts, lim.holdout_fraction, seed)
    n_held = lim.heldout_windows
    n_cal = max(1, lim.max_texts - n_held)
    min_len = 2 * lim.block_size
    cal_w = pack_token_windows(tokenizer, calib_texts, lim.max_seq_len, n_cal, seed=seed, min_length=min_len)
    held_w = pack_token_windows(
        tokenizer, held_texts, lim.max_seq_len, n_held, seed=seed + 1, min_length=min_len
    )
    if not cal_w or not held_w:
        raise ValueError(
            f"texts too short to calibrate on: need at least {min_len} tokens in both the calibration "
            f"and held-out parts (got {len(calib_texts)} / {len(held_texts)} texts)"
        )
    if lim.confidence is not None:  # before any training: even a one-step search needs this many blocks
        check_margin_units([len(w) for w in held_w], lim, steps=1)
    fingerprint = text_fingerprint(texts)

    base = SparsePlan(
        block_size=lim.block_size,
        estimator=candidates[0],
        tau=max(lim.taus),
        sink_blocks=lim.sink_blocks,
        local_blocks=lim.local_blocks,
        group_heads=lim.group_heads,
    )
    learned = [n for n in available_estimators() if n in candidates and get_training_hook(n)]
    fit_w, sens_w = _sensitivity_split(cal_w, lim.sensitivity_windows if learned else 0)
    trained: dict[str, tuple[dict, dict]] = {}  # estimator -> (its plan tensors, report), registry order
    for name in learned:
        train = get_training_hook(name)
        t0 = time.perf_counter()
        # The last window it may read is the estimator's own early-stopping set, so the held-out
        # windows that judge the budget never steer training.
        train_w, stop_w = (fit_w[:-1], fit_w[-1:]) if len(fit_w) > 1 else (fit_w, [])
        trained[name] = train(
            model,
            train_w,
            heldout_windows=stop_w,
            limits=lim,
            seed=seed,
            progress=(lambda ph, d, t, k=name: progress(f"{k} {ph}", d, t)) if progress else None,
        )
        base.tensors.update(trained[name][0])
        secs[name] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ref = dense_reference(
        model,
        held_w,
        fraction=lim.fidelity_fraction,
        progress=counter(progress, "dense reference", len(held_w)),
    )
    secs["dense_reference"] = time.perf_counter() - t0
    dense_task: list[float] = []
    if budget.task_delta is not None:
        t0 = time.perf_counter()
        dense_task, _ = task_scores(
            model,
            tokenizer,
            task_rows,
            task,
            lim,
            dense=True,
            progress=counter(progress, "task rows", len(task_rows)),
        )
        secs["dense_task"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sens_all = measure_sensitivities(
        model, sens_w, base, lim.taus, candidates, progress, measure=lim.drop_measure, sharpen=lim.sharpen
    )
    secs["sensitivity"] = time.perf_counter() - t0
    layer_kl: list[float | None] | None = None
    scales: list[float] | None = None
    if lim.layer_weights == "kl":  # one weighting for every spec, from the first spec's reference plan
        t0 = time.perf_counter()
        first = specs[next(iter(specs))]
        own = {k: v for name in trained if name in first for k, v in trained[name][0].items()}
        layer_kl = measure_layer_kl(
            model,
            sens_w[-1:],
            base.with_(estimator=first[0], tensors=own),
            {k: sens_all[k] for k in (variant_key(e, p) for e in first for p in lim.sharpen)},
            lim,
            progress,
        )
        scales = layer_scales(layer_kl)
        sens_all = {k: scale_errors(v, scales) for k, v in sens_all.items()}
        secs["layer_weights"] = time.perf_counter() - t0
    shared = dict(
        model=model,
        tokenizer=tokenizer,
        budget=budget,
        lim=lim,
        ref=ref,
        dense_task=dense_task,
        task_rows=task_rows,
        task=task,
        seed=seed,
        progress=progress,
        deadline=None if lim.max_seconds is None else t_start + lim.max_seconds,
    )
    results = {}
    for spec, cands_of in specs.items():
        t_spec = time.perf_counter()
        # a plan carries the weights of the learned estimators it names, nothing else
        learned = [k for k in trained if k in cands_of]
        own = {k: v for name in learned for k, v in trained[name][0].items()}
        spec_base = base.with_(estimator=cands_of[0], tensors=own)
        variants = [variant_key(e, p) for e in cands_of for p in lim.sharpen]
        plan, report = _search_plan(spec_base, {k: sens_all[k] for k in variants}, **shared)
        # one learned estimator: its training report as before; several: one report per estimator
        report.gate_training = (
            trained[learned[0]][1] if len(learned) == 1 else ({k: trained[k][1] for k in learned} or None)
        )
        report.estimator, report.host = spec, host
        report.n_calibration_windows, report.n_heldout_windows = len(cal_w), len(held_w)
        report.n_sensitivity_windows = len(sens_w)
        report.seq_len, report.data_fingerprint = lim.max_seq_len, fingerprint
        report.seconds = {**secs, "search": time.perf_counter() - t_spec}
        report.seconds["total"] = time.perf_counter() - t_start
        plan.metadata.update(
            {
                "model_shape": model_shape(model.config),
                "model_type": getattr(model.config, "model_type", None),
                **_fingerprint_of(model.config),
                "budget": budget.to_dict(),
                "estimator": spec,
                "seed": seed,
                "data_fingerprint": fingerprint,
                "n_texts": len(texts),
            }
        )
        plan.metadata["calibration"] = {
            "n_calibration_windows": len(cal_w),
            "n_heldout_windows": len(held_w),
            "n_sensitivity_windows": len(sens_w),
            "seq_len": lim.max_seq_len,
            **plan.metadata["calibration"],
        } | ({"layer_weights": {"layer_kl": layer_kl, "scales": scales}} if scales is not None else {})
        report.layer_weights = plan.metadata["calibration"].get("layer_weights")
        if lim.decode is not None:  # the decode budget, on continuations generated after long prompts
            from sparse_core.decode.calibration import calibrate_decode

            t0 = time.perf_counter()
            plan.decode, rep = calibrate_decode(
                model, tokenizer, texts, budget, base=plan, limits=lim.decode, seed=seed, progress=progress
            )
            report.decode = rep.to_dict()
            plan.metadata["decode_calibration"] = {
                k: report.decode[k]
                for k in (
                    "met_budget",
                    "fidelity",
                    "layer_budgets",
                    "density",
                    "prompt_tokens",
                    "whole_model",
                )
            }
            # the host while the plan's break-evens were timed: the ROI's decode line says when it was busy
            from sparse_core.decode.break_even import break_even_host

            plan.metadata["decode_calibration"]["break_even_host"] = break_even_host(rep.break_even)
            report.seconds["decode"] = time.perf_counter() - t0
            report.seconds["total"] = time.perf_counter() - t_start
        from sparse_core.plan_io import stamp_tensors_digest

        stamp_tensors_digest(plan)
        report.plan_hash = plan.content_hash()
        results[spec] = (plan, report)
    return results


def _sensitivity_split(cal_w: list, apart: int) -> tuple[list, list]:
    """(the windows a learned estimator may train on, the windows the sensitivities come from).

    `apart` > 0: the last `apart` calibration windows are the sensitivities' alone, so the error each
    candidate's tau causes is measured on text no estimator was fitted to (a learned estimator fits
    its own training windows best, and sensitivities read there would flatter it); 0: every window
    serves both. Raises BudgetError (a clear CLI error) when no window would be left to train on."""
    if not apart:
        return cal_w, cal_w
    if len(cal_w) <= apart:
        raise BudgetError(
            f"sensitivity_windows={apart}: the calibration texts fill {len(cal_w)} window(s), and the "
            f"learned estimator needs at least one of its own beyond the {apart} kept apart for the "
            "sensitivities (raise max_texts, give more text, or lower sensitivity_windows)"
        )
    return cal_w[:-apart], cal_w[-apart:]


def _search_plan(
    base: SparsePlan,
    sens_all: dict[str, Sensitivity],
    *,
    model,
    tokenizer,
    budget: Budget,
    lim: CalibrationLimits,
    ref: DenseReference,
    dense_task: list[float],
    task_rows: list,
    task: str | None,
    seed: int,
    progress: Progress | None,
    deadline: float | None,
) -> tuple[SparsePlan, CalibrationReport]:
    """The eps search for one estimator spec (candidates = the keys of `sens_all`, first = base's)."""
    from sparse_core.retrofit import sparse_stats, sparsified

    candidates = list(sens_all)
    sens = sens_all[candidates[0]]

    def plan_for(eps: float | None) -> tuple[SparsePlan, float, torch.Tensor, list[str]]:
        n_layers = sens.err.shape[0]
        if eps is None:
            dense_all = base.with_(dense_layers=tuple(range(n_layers)))
            return dense_all, 1.0, torch.ones(n_layers, sens.heads), [candidates[0]] * n_layers
        lo, ho, dl, pred, dmat, chosen = allocate_choice(sens_all, eps, per_head=lim.per_head)
        if len(dl) == n_layers:
            return base.with_(dense_layers=dl), 1.0, dmat, chosen
        return base.with_(layer_overrides=lo, head_overrides=ho, dense_layers=dl), pred, dmat, chosen

    search: list[SearchStep] = []
    cands = _eps_candidates(sens_all, lim.max_joint_checks)
    # Each step is judged at the level that makes the *returned* plan's bounds hold (eps_search).
    steps = search_steps(len(cands), lim.max_joint_checks)
    step_confidence = None if lim.confidence is None else 1 - step_alpha(1 - lim.confidence, steps)
    task_alpha = step_alpha(TASK_ALPHA, steps)
    if lim.confidence is not None:
        check_margin_units([len(w) for w in ref.windows], lim, steps)
    # the bound's draws: blocks as measured, or each window's blocks summed into one
    per_window = blocks_per_window([len(w) for w in ref.windows], lim.fidelity_fraction)
    unit = lim.bound_unit if lim.confidence is not None else None

    def as_unit(fid: Fidelity) -> Fidelity:
        return by_window(fid, per_window) if unit == "window" else fid

    cache: dict[int, tuple[bool, Fidelity, float | None, float | None]] = {}

    def check(i: int) -> bool:
        if i in cache:
            return cache[i][0]
        t1 = time.perf_counter()
        plan, pred, _, _ = plan_for(cands[i])
        task_drop = task_upper = task_failed = task_scored = None
        with sparsified(model, plan):
            fid = as_unit(measure_fidelity(model, ref))
            dens = sparse_stats(model).density  # the plan just applied (an error here is a bug, not None)
            ok = budget.met_by(judged(fid, step_confidence))
            if ok and budget.task_delta is not None:
                drops, ok, task_upper, task_failed = task_check(
                    model,
                    tokenizer,
                    task_rows,
                    dense_task,
                    task,
                    lim,
                    bound=budget.task_delta,
                    alpha=task_alpha,
                    seed=seed,
                    progress=counter(progress, f"task rows, check {len(search) + 1}", len(task_rows)),
                )
                task_drop, task_scored = sum(drops) / len(drops), len(drops)
        cache[i] = (ok, fid, dens, (task_drop, task_upper, task_scored))
        secs = time.perf_counter() - t1
        step = SearchStep(
            cands[i],
            pred,
            dens,
            judged_dict(fid, lim.confidence, step_confidence, unit),
            ok,
            secs,
            task_drop,
            task_upper,
            task_failed,
            task_scored,
        )
        search.append(step)
        if progress:
            progress("joint check", len(search), min(lim.max_joint_checks, len(cands)))
        return ok

    rows_needed = None if budget.task_delta is None else rows_to_certify(budget.task_delta, alpha=task_alpha)
    certifiable = budget.task_delta is None or (rows_needed is not None and len(task_rows) >= rows_needed)
    lo = -1  # the all-dense plan
    if certifiable:
        lo = largest_passing(
            len(cands),
            check,
            max_checks=lim.max_joint_checks,
            out_of_time=None if deadline is None else lambda: time.perf_counter() > deadline,
        )

    eps = cands[lo] if lo >= 0 else None
    plan, predicted, dmat, chosen = plan_for(eps)
    params = [plan.layer_params(li) for li in range(len(chosen))]
    layer_estimators = ["dense" if p.dense else variant_key(p.estimator, p.sharpen) for p in params]
    if lo >= 0:
        _, fid, measured, (task_drop, task_upper, task_scored) = cache[lo]
    else:
        fid, measured = Fidelity.identical(ref), 1.0
        task_drop = task_upper = 0.0 if dense_task else None
        task_scored = None
    task_info = None
    if budget.task_delta is not None:
        task_info = {
            "task": task,
            "n_rows": len(task_rows),
            # the returned plan's check stopped once its bound was certified (None: the dense plan)
            "rows_scored": task_scored,
            "dense_score": sum(dense_task) / len(dense_task),
            "task_delta": task_drop,
            "task_delta_upper": task_upper,
            "bound": budget.task_delta,
            "alpha": TASK_ALPHA,  # the returned plan's; each search step was judged at step_alpha
            "step_alpha": task_alpha,
            "rows_needed": rows_needed,  # the fewest rows that can certify the bound (all drops 0)
            "certifiable": certifiable,  # False: too few rows, the search was skipped, the plan is dense
        }
    layer_density = [
        1.0 if li in plan.dense_layers else float(dmat[li].mean()) for li in range(dmat.shape[0])
    ]
    head_density = [
        [1.0] * dmat.shape[1] if li in plan.dense_layers else dmat[li].tolist() for li in range(dmat.shape[0])
    ]
    density = sum(layer_density) / len(layer_density)
    plan.metadata.update(
        {
            "calibration": {
                "taus": list(lim.taus),
                "per_head": lim.per_head,
                "drop_measure": lim.drop_measure,
                "eps": eps,
            }
            | ({"sharpen": list(lim.sharpen)} if lim.sharpen != (1.0,) else {}),
            "fidelity": judged_dict(fid, lim.confidence, step_confidence, unit),
            "met_budget": lo >= 0,
            "density": density,
            "measured_density": measured,
            "layer_density": layer_density,
            "head_density": head_density,
            "layer_estimators": layer_estimators,
        }
    )
    if task_info is not None:
        plan.metadata["task"] = task_info
    report = CalibrationReport(
        estimator=base.estimator,
        budget=budget.to_dict(),
        met_budget=lo >= 0,
        fidelity=judged_dict(fid, lim.confidence, step_confidence, unit),
        density=density,
        predicted_density=predicted,
        measured_density=measured,
        layer_density=layer_density,
        head_density=head_density,
        dense_layers=list(plan.dense_layers),
        eps=eps,
        search=search,
        layer_estimators=layer_estimators,
        task=task_info,
    )
    return plan, report


def check_margin_units(window_lens: list[int], lim: CalibrationLimits, steps: int) -> None:
    """A bound too few held-out units (blocks or windows: `lim.bound_unit`) can give is infinite: every
    step would fail and the plan stay dense. Raise BudgetError saying so, with what would do, instead
    of searching."""
    why = heldout_shortfall(lim.confidence, window_lens, lim.fidelity_fraction, lim.bound_unit, steps)
    if why is not None:
        raise BudgetError(why)


def task_check(
    model,
    tokenizer,
    rows: Sequence[Any],
    dense: Sequence[float],
    task: str | None,
    lim: CalibrationLimits,
    *,
    bound: float,
    alpha: float,
    seed: int,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[float], bool, float, int]:
    """Whether the model as it is now (a candidate plan) keeps its mean task-score drop below `bound`:
    (the drops scored, certified, their valid upper bound, rows the plan failed). The rows are scored
    one by one in the test's betting order and the scoring stops once the bound is certified
    (`task_bound.certify_in_order`): the verdict all rows would give, at the cost of the rows it took
    (about `rows_to_certify(bound)` for a plan that loses nothing, every row for one that fails)."""
    failed = 0

    def drop_of(i: int) -> float:
        nonlocal failed
        (q,), f = task_scores(model, tokenizer, [rows[i]], task, lim, dense=False)
        failed += f
        if progress:
            progress(1)
        return dense[i] - q

    drops, certified, upper = certify_in_order(drop_of, len(rows), bound, alpha=alpha, seed=seed)
    return drops, certified, upper, failed


def task_scores(
    model,
    tokenizer,
    rows: Sequence[Any],
    task: str | None,
    lim: CalibrationLimits,
    *,
    dense: bool,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[float], int]:
    """Per-row task quality of the model as it is now (dense, or a candidate plan), in [0, 1], and how
    many rows the candidate failed: a score that is not a number in [0, 1] is the candidate failing that
    row (scored as a failed answer, evidence against it), and from the dense model a ScoreError naming
    the row (`sparse_core.tasks.checked`)."""
    from sparse_core.tasks import score_dataset

    kw = dict(
        task=task or "loglik", max_new_tokens=lim.max_new_tokens, reference_model=dense, progress=progress
    )
    scored = score_dataset(model, tokenizer, rows, **kw).per_row
    return [r.quality for r in scored], sum(r.failed for r in scored)


__all__ = [
    "Budget",
    "BudgetError",
    "CalibrationLimits",
    "CalibrationReport",
    "DenseReference",
    "allocate_choice",
    "calibrate",
    "calibrate_many",
    "check_margin_units",
    "measure_sensitivities",
    "measure_sensitivity",
    "split_texts",
    "task_check",
    "task_scores",
]
