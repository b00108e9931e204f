"""The gate's thresholds (`GateSettings`), normally built from a use-case spec's `gate` section."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

from rollout.gate.spending import DEFAULT_SPENDING, pilot_alpha
from rollout.spec import GateSpec, Guardrails

# The guardrails' defaults are the use-case spec's (`gate.guardrails`), from which every pilot's settings are
# built: one source, so settings made in code judge against the same ceilings as a spec that omits them.
_SPEC_GUARDRAILS = Guardrails()
_SPEC_MAX_LOOKS: int = GateSpec.model_fields["max_looks"].default

ScoreType = Literal["bounded", "binary"]
# Planned spread of the score when the spec does not give one: a 0/1 score at 80% correct, or a bounded score
# with sd 0.15 (the per-request difference in a shadow step uses the same number).
DEFAULT_PLANNED_SD = {"binary": math.sqrt(0.8 * 0.2), "bounded": 0.15}


@dataclass(frozen=True)
class GateSettings:
    """Thresholds of the gate. Quality scores are in [0, 1] (higher is better)."""

    alpha: float = 0.05  # false GO <= alpha at any number of looks; each guardrail's false stop <= alpha
    # The GO level of this pilot when the use case spends alpha across its pilots (rollout.gate.spending):
    # the GO test and the interval's lower end use it; futility and the guardrails keep alpha. None = alpha.
    go_alpha: float | None = None
    margin: float = 0.03  # non-inferiority margin on mean quality
    min_samples_per_arm: int = 100  # per arm (pairs in a shadow step) before quality may decide
    max_error_rate: float = _SPEC_GUARDRAILS.max_error_rate  # treatment error-rate ceiling (0.01)
    # ceiling on treatment minus control error rate (0.01)
    max_error_rate_increase: float = _SPEC_GUARDRAILS.max_error_rate_increase
    latency_slo_ms: float | None = None  # None = no latency guardrail
    # share of treatment requests slower than the SLO (p95 -> 0.05)
    max_latency_exceedance: float = _SPEC_GUARDRAILS.max_latency_exceedance
    guardrail_min_samples: int = _SPEC_GUARDRAILS.min_samples  # treatment rows before a guardrail is judged
    max_duration_days: float = 14.0
    max_looks: int = _SPEC_MAX_LOOKS  # per pilot step (20)
    srm_p_threshold: float = 0.001
    score_type: ScoreType = "bounded"  # planning only: 0/1 scores or scores anywhere in [0, 1]
    planned_sd: float | None = None  # planning only; None = DEFAULT_PLANNED_SD[score_type]
    planned_effect: float = 0.0  # true difference the pilot is planned for (0 = "as good as dense")
    power: float = 0.8

    def __post_init__(self) -> None:
        checks = {
            "alpha": 0 < self.alpha < 0.5,
            "go_alpha": self.go_alpha is None or 0 < self.go_alpha <= self.alpha,
            "margin": 0 < self.margin < 1,
            "min_samples_per_arm": self.min_samples_per_arm >= 2,
            "max_error_rate": 0 < self.max_error_rate < 1,
            "max_error_rate_increase": 0 < self.max_error_rate_increase < 1,
            "latency_slo_ms": self.latency_slo_ms is None or self.latency_slo_ms > 0,
            "max_latency_exceedance": 0 < self.max_latency_exceedance < 1,
            "guardrail_min_samples": self.guardrail_min_samples >= 1,
            "max_duration_days": self.max_duration_days > 0,
            "max_looks": self.max_looks >= 1,
            "srm_p_threshold": 0 < self.srm_p_threshold < 1,
            "score_type": self.score_type in DEFAULT_PLANNED_SD,
            "planned_sd": self.planned_sd is None or 0 < self.planned_sd <= 1,
            "planned_effect": -self.margin < self.planned_effect < 1,
            "power": 0 < self.power < 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{n}={getattr(self, n)!r}" for n in bad)
            raise ValueError(f"invalid gate settings: {values}")

    @property
    def alpha_go(self) -> float:
        """The level of the GO test (false GO <= it at any number of looks)."""
        return self.alpha if self.go_alpha is None else self.go_alpha

    @property
    def sd(self) -> float:
        """The planned sd (of quality in a split step, of the per-request difference in a shadow step)."""
        return DEFAULT_PLANNED_SD[self.score_type] if self.planned_sd is None else self.planned_sd

    # Names other parts of the project may use for the same thing.
    _ALIASES = {
        "non_inferiority_margin": "margin",
        "min_samples": "min_samples_per_arm",
        "p95_latency_slo_ms": "latency_slo_ms",
        "latency_slo_p95_ms": "latency_slo_ms",
        "p95_latency_ms": "latency_slo_ms",
        "max_days": "max_duration_days",
        "srm_alpha": "srm_p_threshold",
    }

    # The spec's `gate.guardrails` names, where they differ from the settings' (`min_samples` there is the
    # guardrails' own minimum, not the quality test's).
    _GUARDRAIL_ALIASES = {"p95_latency_ms": "latency_slo_ms", "min_samples": "guardrail_min_samples"}

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | Any) -> GateSettings:
        """Build from a dict (or pydantic model); a nested `guardrails` mapping is flattened. Unknown
        keys are an error naming them, so a typo in a spec cannot silently loosen the gate."""
        if hasattr(data, "model_dump"):
            data = data.model_dump()
        flat: dict[str, Any] = {}
        for key, value in dict(data).items():
            if key == "guardrails" and isinstance(value, Mapping):
                for gk, gv in value.items():
                    flat[cls._GUARDRAIL_ALIASES.get(gk, gk)] = gv
            else:
                flat[cls._ALIASES.get(key, key)] = value
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(flat) - known)
        if unknown:
            raise ValueError(
                f"unknown gate setting(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        keep_none = {"latency_slo_ms", "planned_sd", "go_alpha"}
        return cls(**{k: v for k, v in flat.items() if v is not None or k in keep_none})

    @classmethod
    def from_spec(
        cls, spec: Mapping[str, Any] | Any, *, pilot_number: int | None = None, **overrides: Any
    ) -> GateSettings:
        """From a use-case spec (rollout.spec.UseCaseSpec or its dict): its `gate` section, with the
        spec's p95 latency SLO as the latency guardrail when the gate does not set its own.
        `pilot_number` (1 = the use case's first pilot): the GO level that pilot spends under the spec's
        `gate.alpha_spending` (rollout.gate.spending); None leaves the GO test at alpha."""
        data = spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)
        gate = dict(data.get("gate") or {})
        spending = gate.pop("alpha_spending", DEFAULT_SPENDING)
        guard = dict(gate.get("guardrails") or {})
        if guard.get("p95_latency_ms") is None:
            slo = data.get("latency_slo_ms")
            guard["p95_latency_ms"] = slo.get("p95") if isinstance(slo, Mapping) else slo
        gate["guardrails"] = guard
        settings = cls.from_mapping(gate)
        if pilot_number is not None:
            settings = replace(settings, go_alpha=pilot_alpha(settings.alpha, pilot_number, spending))
        return replace(settings, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
