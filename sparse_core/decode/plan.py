"""`DecodePlan`: the `decode` section of a `SparsePlan` -- how cached decode steps read the KV cache.

Per decode step and KV head (its query heads share one choice), the pages of the cache are scored by
an estimator (`quest`: per-page channel-wise min/max key bound, training-free; `gate` / `gate_v2`:
the plan's learned gate on the same page features its prefill scoring uses; `page_gate`: gate_v2's
geometry with weights decode calibration trains on single decode queries at the page size) and only
the kept pages are read:
always the first `sink_pages` and the last `local_pages` (the newest page, partial or not, counts as
one), plus the best-scored pages up to the budget. The budget is a token count (`budget_tokens`) or a
share of the pages (`density`); `tau` instead keeps the fewest pages whose estimated mass reaches tau,
capped by the budget when one is set. `layer_overrides` carry the per-layer budgets calibration
finds; `dense_layers` read the whole cache. `break_even_tokens`: below this cache length every decode
step reads the whole cache through the dense path (no page summaries, no scoring): the per-step cost
of scoring, selection and the gather is fixed, so at short caches sparse decode is slower than dense;
calibration measures where it stops being so (sparse_core.decode.break_even), per budget: a layer
with a smaller budget breaks even sooner (its own value in `layer_overrides`). 0: sparse at any length."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from sparse_core.plan import PlanError, check_layers_exist, merged_overrides

# decode page scorers -> the prefill estimator whose trained weights the scorer reads (None: none;
# quest is training-free, page_gate is trained by decode calibration itself: sparse_core.decode.page_gate)
DECODE_ESTIMATORS: dict[str, str | None] = {
    "quest": None,
    "gate": "gate",
    "gate_v2": "gate_v2",
    "page_gate": None,
}
TRAINED_BY_DECODE_CALIBRATION = ("page_gate",)
DECODE_OVERRIDE_KEYS = ("budget_tokens", "density", "tau", "estimator", "break_even_tokens")


@dataclass(frozen=True)
class DecodeLayerParams:
    layer_idx: int
    dense: bool
    estimator: str
    page_size: int
    budget_tokens: int | None
    density: float | None
    tau: float | None
    sink_pages: int
    local_pages: int
    break_even_tokens: int = 0

    def keep_pages(self, n_pages: int) -> int | None:
        """Pages the budget allows out of `n_pages` (sink and local included); None: no budget."""
        caps = []
        if self.budget_tokens is not None:
            caps.append(math.ceil(self.budget_tokens / self.page_size))
        if self.density is not None:
            caps.append(math.ceil(self.density * n_pages - 1e-9))
        return min(caps) if caps else None


@dataclass
class DecodePlan:
    estimator: str = "quest"
    page_size: int | None = None  # None: the plan's block_size
    budget_tokens: int | None = 1024
    density: float | None = None
    tau: float | None = None
    sink_pages: int = 1
    local_pages: int = 2
    layer_overrides: dict[int, dict[str, Any]] = field(default_factory=dict)
    dense_layers: tuple[int, ...] = ()
    break_even_tokens: int = 0  # cache length below which decode stays dense (0: never)

    def __post_init__(self) -> None:
        self.layer_overrides = {int(k): dict(v) for k, v in (self.layer_overrides or {}).items()}
        self.dense_layers = tuple(sorted({int(x) for x in (self.dense_layers or ())}))
        _check("plan.decode", self.estimator, self.budget_tokens, self.density, self.tau)
        ps = self.page_size
        if ps is not None and (not isinstance(ps, int) or isinstance(ps, bool) or ps < 1):
            raise PlanError(f"plan.decode.page_size must be None or an integer >= 1, got {ps!r}")
        for name in ("sink_pages", "local_pages", "break_even_tokens"):
            v = getattr(self, name)
            low = 1 if name == "local_pages" else 0
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise PlanError(f"plan.decode.{name} must be an integer >= {low}, got {v!r}")
        for layer, m in merged_overrides("plan.decode", self.layer_overrides, DECODE_OVERRIDE_KEYS, self):
            be = m["break_even_tokens"]
            if not isinstance(be, int) or isinstance(be, bool) or be < 0:
                raise PlanError(
                    f"plan.decode.layer_overrides[{layer}].break_even_tokens must be an integer >= 0, "
                    f"got {be!r}"
                )
            _check(
                f"plan.decode.layer_overrides[{layer}]",
                m["estimator"],
                m["budget_tokens"],
                m["density"],
                m["tau"],
            )
        if any(x < 0 for x in self.dense_layers):
            raise PlanError(
                f"plan.decode.dense_layers: layer indices must be >= 0, got {list(self.dense_layers)}"
            )

    def layer_params(self, layer_idx: int, block_size: int) -> DecodeLayerParams:
        ov = self.layer_overrides.get(layer_idx, {})
        return DecodeLayerParams(
            layer_idx=layer_idx,
            dense=layer_idx in self.dense_layers,
            estimator=ov.get("estimator", self.estimator),
            page_size=self.page_size or block_size,
            budget_tokens=ov.get("budget_tokens", self.budget_tokens),
            density=ov.get("density", self.density),
            tau=ov.get("tau", self.tau),
            sink_pages=self.sink_pages,
            local_pages=self.local_pages,
            break_even_tokens=ov.get("break_even_tokens", self.break_even_tokens),
        )

    def sparse_at(self, n_layers: int, cache_tokens: int) -> bool:
        """Whether any of `n_layers` layers may decode sparsely with a cache of `cache_tokens`."""
        return any(
            i not in self.dense_layers and cache_tokens >= self.layer_params(i, 1).break_even_tokens
            for i in range(n_layers)
        )

    def first_break_even(self) -> int:
        """The shortest cache at which any layer may decode sparsely (below it every layer is dense)."""
        own = [ov["break_even_tokens"] for ov in self.layer_overrides.values() if "break_even_tokens" in ov]
        return min([self.break_even_tokens, *own])

    def estimators(self) -> set[str]:
        return {self.estimator} | {
            ov["estimator"] for ov in self.layer_overrides.values() if "estimator" in ov
        }

    def validate_for(self, n_layers: int, name: str) -> None:
        check_layers_exist(
            "plan.decode",
            {"layer_overrides": self.layer_overrides.keys(), "dense_layers": self.dense_layers},
            n_layers,
            name,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layer_overrides"] = {str(k): dict(v) for k, v in sorted(self.layer_overrides.items())}
        d["dense_layers"] = list(self.dense_layers)
        if not self.break_even_tokens:  # absent when 0: plans written before it keep their hash
            del d["break_even_tokens"]
        return d

    @classmethod
    def from_value(cls, value: Any) -> DecodePlan | None:
        """None, a DecodePlan, or its dict form (unknown keys are an error naming them)."""
        if value is None or isinstance(value, DecodePlan):
            return value
        if not isinstance(value, dict):
            raise PlanError(f"plan.decode must be an object or null, got {type(value).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(value) - known)
        if unknown:
            raise PlanError(f"plan.decode: unknown field(s) {unknown}; allowed: {sorted(known)}")
        try:
            return cls(**value)
        except TypeError as exc:
            raise PlanError(f"plan.decode: malformed ({exc})") from None


def _check(where: str, estimator: Any, budget: Any, density: Any, tau: Any) -> None:
    if estimator not in DECODE_ESTIMATORS:
        raise PlanError(f"{where}.estimator must be one of {list(DECODE_ESTIMATORS)}, got {estimator!r}")
    if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 1):
        raise PlanError(f"{where}.budget_tokens must be None or an integer >= 1, got {budget!r}")
    for name, v in (("density", density), ("tau", tau)):
        if v is not None and (
            isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or not 0.0 < v <= 1.0
        ):
            raise PlanError(f"{where}.{name} must be None or in (0, 1], got {v!r}")
    if budget is None and density is None and tau is None:
        raise PlanError(f"{where}: set at least one of budget_tokens, density, tau")
