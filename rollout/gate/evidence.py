"""What a decision carries: the history of earlier looks, the quality evidence and the `Decision` itself,
stored verbatim (`Decision.to_dict()`) as the decision's evidence."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from rollout.gate.guardrails import Guardrail
from rollout.gate.settings import GateSettings

Outcome = Literal["GO", "EXTEND", "NO-GO", "INVALID"]
Mode = Literal["split", "paired"]


@dataclass(frozen=True)
class GateHistory:
    """Earlier looks at the same pilot step: how many, and the running interval of the valid ones."""

    looks: int = 0
    interval_low: float = -math.inf
    interval_high: float = math.inf
    fingerprints: tuple[str, ...] = ()

    @classmethod
    def from_evidence(cls, evidence: Iterable[Mapping[str, Any]]) -> GateHistory:
        """Rebuild from stored Decision.to_dict() payloads (e.g. GateDecision.evidence rows of the step)."""
        hist = cls()
        for ev in sorted(evidence, key=lambda e: e["look_index"]):
            q = ev.get("quality") or {}
            hist = hist.after(
                look_low=q.get("look_low"),
                look_high=q.get("look_high"),
                # a look decided before the betting sequences (no `method`) counts as a look, but its
                # asymptotic interval is not folded into this one's
                counts=bool(q.get("counts_toward_interval")) and bool(q.get("method")),
                fingerprint=ev.get("data_fingerprint") or "",
            )
        return hist

    def after(
        self, *, look_low: float | None, look_high: float | None, counts: bool, fingerprint: str
    ) -> GateHistory:
        low, high = self.interval_low, self.interval_high
        if counts and look_low is not None and look_high is not None:
            low, high = running_intersection(look_low, look_high, low, high)
        return GateHistory(self.looks + 1, low, high, (*self.fingerprints, fingerprint))


def running_intersection(low: float, high: float, prev_low: float, prev_high: float) -> tuple[float, float]:
    """Every look's bounds hold at once, so their intersection does too and the reported interval never
    widens. An empty intersection (probability <= 2 alpha) restarts from this look."""
    run_low, run_high = max(float(low), float(prev_low)), min(float(high), float(prev_high))
    return (float(low), float(high)) if run_low > run_high else (run_low, run_high)


@dataclass(frozen=True)
class QualityEvidence:
    control_mean: float | None
    treatment_mean: float | None
    estimate: float | None  # mean difference treatment - control (paired: of the per-request differences)
    std_error: float | None  # plain standard error of the estimate (information only; not used to decide)
    look_low: float | None  # this look's anytime-valid bounds (one-sided, 1 - alpha each)
    look_high: float | None
    interval_low: float | None  # running intersection with earlier looks (what is reported)
    interval_high: float | None
    verdict: str  # non-inferior / futile / inconclusive / not-evaluated
    counts_toward_interval: bool
    log_capital_go: float | None = None  # max log-capital of the test of H0: difference <= -margin
    log_capital_futility: float | None = None  # ... of H0: difference >= -margin
    threshold: float | None = None  # log(1/alpha): a test rejects when its capital reaches it
    interval_reset: bool = False  # the running intersection became empty; this look's interval was used
    method: str = "betting confidence sequence (Waudby-Smith & Ramdas 2023)"


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    reasons: tuple[str, ...]
    explanation: str
    mode: Mode
    look_index: int
    at_maximum: bool
    elapsed_days: float
    n_control: int
    n_treatment: int
    n_pairs: int | None
    unpaired_rows: int
    planned_treatment_share: float
    observed_treatment_share: float | None
    srm_chi2: float | None
    srm_p_value: float | None
    data_check_passed: bool
    data_check_failures: tuple[str, ...]
    guardrails: tuple[Guardrail, ...]
    quality: QualityEvidence
    error_rate_control: float | None
    error_rate_treatment: float | None
    # over the rows collected while the host was not overloaded (None: no such row)
    p95_latency_control_ms: float | None
    p95_latency_treatment_ms: float | None
    min_samples_per_arm: int
    settings: GateSettings
    data_fingerprint: str
    previous_looks: int = 0
    # EXTEND only: requests in all (pairs when paired) at which the test would settle if the observations
    # to come looked like those so far (rollout.gate.planning.projected_sample_size); None = not projected
    projected_requests: int | None = None
    input_problems: tuple[str, ...] = ()  # INVALID input: what is wrong, naming the column
    # rows collected while the host's CPU was overloaded (`overloaded`): counted for quality and errors,
    # left out of the p95s and of the latency guardrail
    overloaded_control_rows: int = 0
    overloaded_treatment_rows: int = 0

    @property
    def interval(self) -> tuple[float | None, float | None]:
        return self.quality.interval_low, self.quality.interval_high

    def next_history(self, history: GateHistory | None = None) -> GateHistory:
        """History to pass to the next look at the same step (this look folded in)."""
        return (history or GateHistory()).after(
            look_low=self.quality.look_low,
            look_high=self.quality.look_high,
            counts=self.quality.counts_toward_interval,
            fingerprint=self.data_fingerprint,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe (non-finite floats become None) evidence, stored verbatim with the decision."""
        return _json_safe(asdict(self))


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj
