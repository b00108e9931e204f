"""Block-importance estimators: pure functions from (q, k) to per-block attention-mass estimates, and
the one registry of their names.

Contract of an estimator ``fn(q, k, ctx) -> Tensor``:
- q ``[B, Hq, S, D]`` and k ``[B, Hkv, S, D]`` are the post-RoPE queries/keys of one layer
  (Hq a multiple of Hkv);
- returns float32 ``[B, Hq, nb, nb]`` with ``nb = ceil(S / ctx.block_size)``: for each query head and
  query block, an estimate of the share of attention mass on each key block. Entries above the
  diagonal (non-causal) must be 0 and each row should sum to ~1 over the causal key blocks.

The registry is the single source of estimator names: the spec validator, the CLI options, the
benchmark's defaults and the tests' parametrisation all ask `available_estimators()`. An entry carries
its kind (`KINDS`) and, for a learned estimator, a training hook that calibration calls
(`get_training_hook`) and a check that the plan's weights fit the model, which loading a plan calls
(`get_weights_check`), so nothing outside the estimator's own module names it. The built-ins are the
`_BUILTINS` table: their functions are referenced as ``"module:attr"`` and imported on first use, so
listing names (a spec check, ``--help``) needs no torch. Any other code adds one with
`register_estimator(name, fn, kind=..., train=...)`.

Training-free: ``pooled``, ``antidiagonal``, ``quest``, ``sampled``; learned: ``gate``, ``gate_v2``
(weights in the plan's tensors; modules `learned_gate` and `learned_gate_v2`, so the scorer is never
taken for rollout's statistical gate); exact ceiling: ``oracle`` (exact block mass, as costly as dense
attention), what the benchmark compares against. The block helpers the estimators share are in
`sparse_core.estimators.blocks`."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from sparse_core.plan import PlanError

if TYPE_CHECKING:
    import torch

KINDS = ("training-free", "learned", "exact-ceiling")
# what a use case may deploy: an exact-ceiling estimator costs as much as dense attention
DEPLOYABLE_KINDS = ("training-free", "learned")


@dataclass(frozen=True)
class EstimatorContext:
    block_size: int
    layer_idx: int | None = None
    plan: Any = None  # the SparsePlan (carries plan.tensors, e.g. learned gate weights)
    key_valid: torch.Tensor | None = None  # [B, S] bool, False = padding; None = all valid
    scale: float | None = None  # softmax scale of the attention (default 1/sqrt(D))
    module: Any = None  # the attention module when called from a model (None in the functional API)
    positions: torch.Tensor | None = None  # [B, S] token positions (None: 0..S-1, or derived from padding)


Estimator = Callable[["torch.Tensor", "torch.Tensor", EstimatorContext], "torch.Tensor"]
# train(model, windows, *, heldout_windows, limits, seed, progress) -> (plan tensors, report dict):
# `windows` are token-id lists, `heldout_windows` the early-stopping set, `limits` the
# sparse_core.calibration.CalibrationLimits, `progress(phase, done, total)` or None.
TrainHook = Callable[..., tuple[dict[str, Any], dict[str, Any]]]
# check(plan, model_config) -> None, PlanError when the plan's weights for the estimator do not fit
WeightsCheck = Callable[[Any, Any], None]


@dataclass(frozen=True)
class EstimatorEntry:
    name: str
    kind: str
    fn: Estimator | str  # a built-in's "module:attr", resolved on first use
    train: TrainHook | str | None = None  # None: nothing to train
    check: WeightsCheck | str | None = None  # None: no weights to check


_BUILTINS = (
    EstimatorEntry("pooled", "training-free", "sparse_core.estimators.pooled:pooled_scores"),
    EstimatorEntry(
        "antidiagonal", "training-free", "sparse_core.estimators.antidiagonal:antidiagonal_scores"
    ),
    EstimatorEntry("quest", "training-free", "sparse_core.estimators.quest:quest_scores"),
    EstimatorEntry("sampled", "training-free", "sparse_core.estimators.sampled:sampled_scores"),
    EstimatorEntry(
        "gate",
        "learned",
        "sparse_core.estimators.learned_gate:gate_scores",
        train="sparse_core.scorer_training:train_gate_v1_hook",
        check="sparse_core.estimators.learned_gate:check_weights_fit",
    ),
    EstimatorEntry(
        "gate_v2",
        "learned",
        "sparse_core.estimators.learned_gate_v2:gate_v2_scores",
        train="sparse_core.scorer_training:train_gate_v2_hook",
        check="sparse_core.estimators.learned_gate_v2:check_weights_fit",
    ),
    EstimatorEntry("oracle", "exact-ceiling", "sparse_core.estimators.oracle:oracle_scores"),
)
_REGISTRY: dict[str, EstimatorEntry] = {e.name: e for e in _BUILTINS}


def register_estimator(
    name: str,
    fn: Estimator,
    *,
    kind: str = "training-free",
    train: TrainHook | None = None,
    check: WeightsCheck | None = None,
    overwrite: bool = False,
) -> Estimator:
    """Add an estimator under `name`; `train`, when given, is called by calibration before the search
    and returns the plan tensors the estimator reads (see `TrainHook`); `check`, when given, is called
    when a plan that names the estimator is loaded for a model (see `WeightsCheck`)."""
    if not name or not isinstance(name, str) or "+" in name or "," in name:
        raise ValueError(f"estimator name must be a non-empty string without '+' or ',', got {name!r}")
    if kind not in KINDS:
        raise ValueError(f"estimator {name!r}: kind must be one of {KINDS}, got {kind!r}")
    if not all(callable(f) for f in (fn, train, check) if f is not None):
        raise ValueError(f"estimator {name!r}: the function and the hooks must be callables")
    old = _REGISTRY.get(name)
    if old is not None and old.fn is not fn and not overwrite:
        raise ValueError(f"estimator {name!r} is already registered")
    _REGISTRY[name] = EstimatorEntry(name, kind, fn, train, check)
    return fn


def unregister_estimator(name: str) -> None:
    """Remove an estimator (e.g. one a test registered)."""
    _entry(name)
    del _REGISTRY[name]


def _resolve(ref: Any) -> Any:
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def _entry(name: str) -> EstimatorEntry:
    entry = _REGISTRY.get(name)
    if entry is None:
        raise PlanError(f"unknown estimator {name!r}; available: {available_estimators()}")
    return entry


def _resolved(name: str, attr: str) -> Any:
    """The entry's `attr` (fn, train or check), imported on first use when it is a "module:attr"."""
    entry = _entry(name)
    value = getattr(entry, attr)
    if isinstance(value, str):
        value = _resolve(value)
        _REGISTRY[name] = replace(entry, **{attr: value})
    return value


def get_estimator(name: str) -> Estimator:
    return _resolved(name, "fn")


def get_training_hook(name: str) -> TrainHook | None:
    """The estimator's training hook, or None when it needs no training."""
    return _resolved(name, "train")


def get_weights_check(name: str) -> WeightsCheck | None:
    """The estimator's check of a plan's weights against a model, or None when it reads none."""
    return _resolved(name, "check")


def estimator_kind(name: str) -> str:
    return _entry(name).kind


def available_estimators(kinds: str | Sequence[str] = KINDS) -> list[str]:
    """Registered names of the given kind(s), built-ins first, then in registration order."""
    wanted = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    return [name for name, e in _REGISTRY.items() if e.kind in wanted]


def parse_estimator_spec(spec: str, kinds: str | Sequence[str] = KINDS) -> tuple[str, ...]:
    """'a' or 'a+b' (a per-layer choice between candidates, the first the plan's own) -> the names,
    each registered with one of `kinds`; PlanError names the bad part and the choices."""
    parts = tuple(p.strip() for p in str(spec).split("+"))
    choices = available_estimators(kinds)
    if not all(parts):
        raise PlanError(f"estimator spec {spec!r} has an empty part; choose from {choices} (a+b mixes)")
    for p in parts:
        if p not in choices:
            what = (
                f"{p!r} ({_REGISTRY[p].kind}) is not allowed"
                if p in _REGISTRY
                else f"unknown estimator {p!r}"
            )
            where = f" in {spec!r}" if len(parts) > 1 else ""
            raise PlanError(f"{what}{where}; choose from {choices} (a+b mixes)")
    return tuple(dict.fromkeys(parts))


__all__ = [
    "DEPLOYABLE_KINDS",
    "KINDS",
    "Estimator",
    "EstimatorContext",
    "EstimatorEntry",
    "TrainHook",
    "WeightsCheck",
    "available_estimators",
    "estimator_kind",
    "get_estimator",
    "get_training_hook",
    "get_weights_check",
    "parse_estimator_spec",
    "register_estimator",
    "unregister_estimator",
]
