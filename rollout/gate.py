"""The pilot gate: pure statistics, no I/O.

`decide` looks at every observation of one pilot step collected so far and says GO, EXTEND, NO-GO or
INVALID, with all the evidence. Method (docs/gate.md has the derivation and a worked example):

* Sample-ratio mismatch: Pearson chi-square of the arm counts against the planned split; p < 0.001
  means the assignment is broken and nothing else can be trusted -> INVALID. A failed data check -> INVALID.
* Guardrails (treatment error rate, its excess over control, p95 latency vs the SLO) -> NO-GO on breach.
* Quality non-inferiority (treatment - control >= -margin) with an anytime-valid confidence sequence:
  the two-sided normal-mixture (mSPRT) boundary of Robbins / Howard et al. (2021) applied to the
  difference of means with a plug-in variance (the asymptotic CS of Waudby-Smith et al., 2021). It holds
  at every look simultaneously, so the running intersection over looks stays valid and daily looks do not
  inflate false GO. Lower bound > -margin -> GO; upper bound < -margin -> NO-GO (futility); otherwise
  EXTEND, or NO-GO once the maximum duration / number of looks is reached: inconclusive never ships.
* Split steps compare two independent arms; shadow steps have both answers for every request and use
  the per-request difference ("paired" mode), which is usually far more precise.

The simulation tests call `mixture_half_width` / `difference_cs` / `paired_cs` directly, the same code
`decide` uses.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import optimize, stats

Outcome = Literal["GO", "EXTEND", "NO-GO", "INVALID"]
Mode = Literal["split", "paired"]
REQUIRED_COLUMNS = ("request_id", "arm", "quality", "latency_ms", "error")
ARMS = ("control", "treatment")
# Pseudo-observations of the planned variance mixed into the plug-in variance: keeps a degenerate sample
# (every score identical) from claiming a zero-width interval; negligible at real sample sizes.
_PRIOR_PSEUDO_N = 2.0


@dataclass(frozen=True)
class GateSettings:
    """Thresholds of the gate, normally from the use-case spec's `gate` section."""

    alpha: float = 0.05  # error level of the confidence sequence (false GO <= alpha, at any look)
    margin: float = 0.03  # non-inferiority margin on mean quality (quality is in [0, 1])
    min_samples_per_arm: int = 100
    max_error_rate: float = 0.02  # treatment error rate ceiling
    max_error_rate_increase: float = 0.01  # treatment minus control error rate ceiling
    latency_slo_ms: float | None = None  # p95 treatment latency ceiling; None = no latency guardrail
    guardrail_min_samples: int = 30  # treatment rows needed before a guardrail can fire
    max_duration_days: float = 14.0
    max_looks: int = 10
    srm_p_threshold: float = 0.001
    planned_sd: float = 0.15  # assumed sd of quality (split) or of the per-request difference (paired)
    planned_effect: float = 0.0  # true difference the pilot is powered for (0 = "as good as dense")
    power: float = 0.8
    planned_samples_per_arm: int | None = None  # tunes the CS; None = planned_sample_size()

    def __post_init__(self) -> None:
        checks = {
            "alpha": 0 < self.alpha < 0.5,
            "margin": self.margin > 0,
            "min_samples_per_arm": self.min_samples_per_arm >= 2,
            "max_error_rate": 0 <= self.max_error_rate <= 1,
            "max_error_rate_increase": 0 <= self.max_error_rate_increase <= 1,
            "latency_slo_ms": self.latency_slo_ms is None or self.latency_slo_ms > 0,
            "guardrail_min_samples": self.guardrail_min_samples >= 1,
            "max_duration_days": self.max_duration_days > 0,
            "max_looks": self.max_looks >= 1,
            "srm_p_threshold": 0 < self.srm_p_threshold < 1,
            "planned_sd": self.planned_sd > 0,
            "planned_effect": self.planned_effect > -self.margin,
            "power": 0 < self.power < 1,
            "planned_samples_per_arm": self.planned_samples_per_arm is None
            or self.planned_samples_per_arm >= 2,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{n}={getattr(self, n)!r}" for n in bad)
            raise ValueError(f"invalid gate settings: {values}")

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
                    flat[cls._ALIASES.get(gk, gk)] = gv
            else:
                flat[cls._ALIASES.get(key, key)] = value
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(flat) - known)
        if unknown:
            raise ValueError(
                f"unknown gate setting(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**{k: v for k, v in flat.items() if v is not None or k == "latency_slo_ms"})

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | Any, **overrides: Any) -> GateSettings:
        """From a use-case spec (rollout.spec.UseCaseSpec or its dict): its `gate` section, with the
        spec's p95 latency SLO as the latency guardrail when the gate does not set its own."""
        data = spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)
        gate = dict(data.get("gate") or {})
        guard = dict(gate.get("guardrails") or {})
        if guard.get("p95_latency_ms") is None:
            slo = data.get("latency_slo_ms")
            guard["p95_latency_ms"] = slo.get("p95") if isinstance(slo, Mapping) else slo
        gate["guardrails"] = guard
        return replace(cls.from_mapping(gate), **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# The confidence sequence (vectorised; the simulation tests call exactly these)


@lru_cache(maxsize=64)
def optimal_mixing_ratio(alpha: float) -> float:
    """r* = rho / I* minimising the boundary at the planned information I*; depends only on alpha."""

    def width(log_r: float) -> float:
        r = math.exp(log_r)
        return (1 + r) * math.log((1 + r) / (r * alpha**2))

    res = optimize.minimize_scalar(width, bounds=(-12.0, 5.0), method="bounded")
    return float(math.exp(res.x))


def mixing_rho(planned_se: float, alpha: float) -> float:
    """Mixing precision rho tuned so the boundary is tightest when the standard error reaches planned_se."""
    return optimal_mixing_ratio(alpha) / planned_se**2


def mixture_half_width(se: np.ndarray | float, alpha: float, rho: float) -> np.ndarray:
    """Half-width of the two-sided normal-mixture confidence sequence for an estimate with standard error
    `se`. With information I = 1/se^2 and S = I*(estimate - truth) ~ Brownian motion in I, Ville's
    inequality on the N(0, 1/rho) mixture martingale gives, simultaneously for every look,
    |S| <= sqrt((I + rho) * log((I + rho) / (rho * alpha^2))) with probability >= 1 - alpha."""
    se = np.asarray(se, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        info = 1.0 / se**2
        hw = np.sqrt((info + rho) * np.log((info + rho) / (rho * alpha**2))) / info
    return np.where(np.isfinite(se) & (se > 0), hw, np.where(se == 0, 0.0, np.inf))


def _shrunk_var(var: np.ndarray, n: np.ndarray, prior_sd: float) -> np.ndarray:
    return ((n - 1) * var + _PRIOR_PSEUDO_N * prior_sd**2) / (n - 1 + _PRIOR_PSEUDO_N)


def difference_cs(
    n_c: np.ndarray | float,
    mean_c: np.ndarray | float,
    var_c: np.ndarray | float,
    n_t: np.ndarray | float,
    mean_t: np.ndarray | float,
    var_t: np.ndarray | float,
    *,
    alpha: float,
    rho: float,
    prior_sd: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Two independent arms: (estimate, se, low, high) for mean_t - mean_c. Variances are sample
    variances (ddof=1)."""
    n_c, n_t = np.asarray(n_c, float), np.asarray(n_t, float)
    est = np.asarray(mean_t, float) - np.asarray(mean_c, float)
    se = np.sqrt(
        _shrunk_var(np.asarray(var_c, float), n_c, prior_sd) / n_c
        + _shrunk_var(np.asarray(var_t, float), n_t, prior_sd) / n_t
    )
    hw = mixture_half_width(se, alpha, rho)
    return est, se, est - hw, est + hw


def paired_cs(
    n: np.ndarray | float,
    mean_d: np.ndarray | float,
    var_d: np.ndarray | float,
    *,
    alpha: float,
    rho: float,
    prior_sd: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Paired requests: (estimate, se, low, high) for the mean per-request difference treatment - control."""
    n = np.asarray(n, float)
    est = np.asarray(mean_d, float)
    se = np.sqrt(_shrunk_var(np.asarray(var_d, float), n, prior_sd) / n)
    hw = mixture_half_width(se, alpha, rho)
    return est, se, est - hw, est + hw


def running_intersection(
    low: np.ndarray | float,
    high: np.ndarray | float,
    prev_low: np.ndarray | float,
    prev_high: np.ndarray | float,
) -> tuple[np.ndarray, np.ndarray]:
    """Intersect with earlier looks' interval: every look's interval holds at once, so the intersection
    does too, and the reported interval never widens."""
    return np.maximum(low, prev_low), np.minimum(high, prev_high)


def classify_interval(low: np.ndarray | float, high: np.ndarray | float, margin: float) -> np.ndarray:
    """'non-inferior' when the whole interval is above -margin, 'futile' when it is below, else
    'inconclusive'."""
    low, high = np.asarray(low, float), np.asarray(high, float)
    return np.where(low > -margin, "non-inferior", np.where(high < -margin, "futile", "inconclusive"))


def projected_sample_size(
    estimate: float,
    var_c: float,
    var_t: float,
    *,
    mode: Mode,
    treatment_share: float,
    margin: float,
    alpha: float,
    rho: float,
    prior_sd: float,
    at_least: int,
    max_total: int = 1_000_000,
) -> int | None:
    """Requests in all (pairs in paired mode) at which this look's interval would clear -margin if
    the observed difference and spread held; None when the estimate itself is at or below -margin
    (more data would not help). What an EXTEND "waits for", and what the main job sizes its batches
    by. A projection, not a promise: the next look's estimate moves."""
    if not math.isfinite(estimate) or estimate <= -margin:
        return None

    def clears(total: int) -> bool:
        if mode == "paired":
            se = math.sqrt(float(_shrunk_var(np.asarray(var_t), np.asarray(float(total)), prior_sd)) / total)
        else:
            n_t = max(2.0, total * treatment_share)
            n_c = max(2.0, total - n_t)
            se = math.sqrt(
                float(_shrunk_var(np.asarray(var_c), np.asarray(n_c), prior_sd)) / n_c
                + float(_shrunk_var(np.asarray(var_t), np.asarray(n_t), prior_sd)) / n_t
            )
        return estimate - float(mixture_half_width(se, alpha, rho)) > -margin

    lo = hi = max(4, int(at_least))
    while not clears(hi):
        lo, hi = hi, hi * 2
        if hi > max_total:
            return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if clears(mid) else (mid, hi)
    return hi


# --------------------------------------------------------------------------------------------------
# Planning


def _planned_se(sd: float, n_control: float, n_treatment: float, paired: bool) -> float:
    if paired:
        return sd / math.sqrt(n_treatment)
    return sd * math.sqrt(1 / n_control + 1 / n_treatment)


@dataclass(frozen=True)
class SamplePlan:
    n_control: int
    n_treatment: int
    paired: bool
    treatment_share: float
    planned_se: float
    half_width: float
    power: float

    @property
    def n_total(self) -> int:
        return self.n_treatment if self.paired else self.n_control + self.n_treatment

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "n_total": self.n_total}


def power_analysis(
    settings: GateSettings,
    n_control: int,
    n_treatment: int,
    *,
    paired: bool = False,
    effect: float | None = None,
    rho: float | None = None,
) -> float:
    """Probability that the look at these sample sizes says non-inferior when the true difference is
    `effect` (default: settings.planned_effect), assuming sd = settings.planned_sd. Conservative for a
    pilot with earlier looks (each earlier look is an extra chance to pass)."""
    delta = settings.planned_effect if effect is None else effect
    se = _planned_se(settings.planned_sd, n_control, n_treatment, paired)
    rho = mixing_rho(se, settings.alpha) if rho is None else rho
    hw = float(mixture_half_width(se, settings.alpha, rho))
    return float(stats.norm.cdf((delta + settings.margin - hw) / se))


def planned_sample_size(
    settings: GateSettings, *, treatment_share: float = 0.5, paired: bool = False, max_total: int = 10_000_000
) -> SamplePlan:
    """Smallest sample reaching settings.power at settings.planned_effect (the CS tuned for that size).
    Split: total N with treatment_share of it on the treatment arm; paired: N requests with both arms."""
    if not 0 < treatment_share < 1:
        raise ValueError(f"treatment_share must be in (0, 1), got {treatment_share!r}")

    def sizes(total: int) -> tuple[int, int]:
        if paired:
            return total, total
        n_t = max(2, round(total * treatment_share))
        return max(2, total - n_t), n_t

    def ok(total: int) -> bool:
        return power_analysis(settings, *sizes(total), paired=paired) >= settings.power

    lo, hi = 4, 8
    while not ok(hi):
        lo, hi = hi, hi * 2
        if hi > max_total:
            raise ValueError(
                f"no sample size up to {max_total} reaches power {settings.power} "
                f"with margin {settings.margin}"
            )
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    n_c, n_t = sizes(hi)
    se = _planned_se(settings.planned_sd, n_c, n_t, paired)
    hw = float(mixture_half_width(se, settings.alpha, mixing_rho(se, settings.alpha)))
    return SamplePlan(
        n_control=n_c,
        n_treatment=n_t,
        paired=paired,
        treatment_share=0.5 if paired else treatment_share,
        planned_se=se,
        half_width=hw,
        power=power_analysis(settings, n_c, n_t, paired=paired),
    )


def planned_rho(settings: GateSettings, *, treatment_share: float, paired: bool) -> float:
    """The mixing precision `decide` uses: fixed in advance from the settings, never from the data."""
    if settings.planned_samples_per_arm is not None:
        n = settings.planned_samples_per_arm
        if paired:
            se = _planned_se(settings.planned_sd, n, n, True)
        else:  # the smaller arm gets the planned size
            share = min(treatment_share, 1 - treatment_share)
            n_small, n_large = n, n * (1 - share) / share
            se = settings.planned_sd * math.sqrt(1 / n_small + 1 / n_large)
    else:
        se = planned_sample_size(settings, treatment_share=treatment_share, paired=paired).planned_se
    return mixing_rho(se, settings.alpha)


# --------------------------------------------------------------------------------------------------
# History and the decision


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
            hist = hist.after(
                look_low=ev["quality"]["look_low"],
                look_high=ev["quality"]["look_high"],
                counts=bool(ev["quality"]["counts_toward_interval"]),
                fingerprint=ev["data_fingerprint"],
            )
        return hist

    def after(
        self, *, look_low: float | None, look_high: float | None, counts: bool, fingerprint: str
    ) -> GateHistory:
        low, high = self.interval_low, self.interval_high
        if counts and look_low is not None and look_high is not None:
            low, high = (float(x) for x in running_intersection(look_low, look_high, low, high))
            if low > high:  # same rule as decide(): an empty intersection restarts from this look
                low, high = float(look_low), float(look_high)
        return GateHistory(self.looks + 1, low, high, (*self.fingerprints, fingerprint))


@dataclass(frozen=True)
class Guardrail:
    name: str
    value: float | None
    threshold: float | None
    breached: bool
    evaluated: bool
    note: str = ""


@dataclass(frozen=True)
class QualityEvidence:
    control_mean: float | None
    treatment_mean: float | None
    estimate: float | None
    std_error: float | None
    look_low: float | None  # this look's interval
    look_high: float | None
    interval_low: float | None  # running intersection with earlier looks (what the decision uses)
    interval_high: float | None
    verdict: str  # non-inferior / futile / inconclusive / not-evaluated
    counts_toward_interval: bool
    rho: float
    interval_reset: bool = False  # the running intersection became empty; this look's interval was used


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
    p95_latency_control_ms: float | None
    p95_latency_treatment_ms: float | None
    min_samples_per_arm: int
    settings: GateSettings
    data_fingerprint: str
    previous_looks: int = 0
    # EXTEND only: requests in all (pairs when paired) at which the interval would clear -margin if the
    # observed difference and spread held (rollout.gate.projected_sample_size); None = not projected
    projected_requests: int | None = None

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


# --------------------------------------------------------------------------------------------------
# Input checks and fingerprint


def _validate(observations: pd.DataFrame) -> pd.DataFrame:
    if not isinstance(observations, pd.DataFrame):
        raise TypeError(f"observations must be a pandas DataFrame, got {type(observations).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in observations.columns]
    if missing:
        raise ValueError(f"observations are missing column(s): {', '.join(missing)}")
    df = observations.loc[:, list(REQUIRED_COLUMNS)].copy()
    for col in REQUIRED_COLUMNS:
        nulls = df[col].isna()
        if nulls.any():
            rows = df.index[nulls][:5].tolist()
            raise ValueError(
                f"column {col!r} has {int(nulls.sum())} missing/NaN value(s), e.g. at rows {rows}"
            )
    for col in ("quality", "latency_ms"):
        try:
            values = pd.to_numeric(df[col], errors="raise").astype(float)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"column {col!r} must be numeric: {exc}") from exc
        bad = ~np.isfinite(values.to_numpy())
        if bad.any():
            rows = df.index[bad][:5].tolist()
            raise ValueError(f"column {col!r} has {int(bad.sum())} non-finite value(s), e.g. at rows {rows}")
        df[col] = values
    if (df["latency_ms"] < 0).any():
        rows = df.index[df["latency_ms"] < 0][:5].tolist()
        raise ValueError(f"column 'latency_ms' has negative values, e.g. at rows {rows}")
    err = df["error"]
    if err.dtype != bool:
        ok = err.isin([0, 1, True, False])
        if not ok.all():
            raise ValueError(
                f"column 'error' must be boolean (or 0/1); bad values e.g. {err[~ok].head(3).tolist()}"
            )
    df["error"] = err.astype(bool)
    df["arm"] = df["arm"].astype(str)
    bad_arm = ~df["arm"].isin(ARMS)
    if bad_arm.any():
        raise ValueError(
            f"column 'arm' must be 'control' or 'treatment'; got {sorted(set(df['arm'][bad_arm]))[:5]}"
        )
    df["request_id"] = df["request_id"].astype(str)
    dup = df.duplicated(["request_id", "arm"], keep=False)
    if dup.any():
        raise ValueError(
            f"column 'request_id' repeats within an arm ({int(dup.sum())} rows), e.g. "
            f"{df.loc[dup, 'request_id'].head(3).tolist()}"
        )
    return df


def data_fingerprint(df: pd.DataFrame) -> str:
    """sha256 of the rows sorted by (request_id, arm), floats written exactly (repr)."""
    h = hashlib.sha256()
    ordered = df.sort_values(["request_id", "arm"], kind="mergesort")
    for rid, arm, q, lat, err in ordered.loc[:, list(REQUIRED_COLUMNS)].itertuples(index=False, name=None):
        h.update(f"{rid}\t{arm}\t{float(q)!r}\t{float(lat)!r}\t{int(bool(err))}\n".encode())
    return h.hexdigest()


def srm_test(n_control: int, n_treatment: int, planned_treatment_share: float) -> tuple[float, float]:
    """Pearson chi-square (1 df) of the arm counts against the planned split: (statistic, p-value)."""
    total = n_control + n_treatment
    if total == 0:
        return 0.0, 1.0
    exp_t = total * planned_treatment_share
    exp_c = total - exp_t
    chi2 = (n_control - exp_c) ** 2 / exp_c + (n_treatment - exp_t) ** 2 / exp_t
    return float(chi2), float(stats.chi2.sf(chi2, df=1))


# --------------------------------------------------------------------------------------------------
# decide


def decide(
    observations: pd.DataFrame,
    settings: GateSettings,
    history: GateHistory | None = None,
    *,
    mode: Mode = "split",
    planned_treatment_share: float | None = None,
    data_check_passed: bool = True,
    data_check_failures: Sequence[str] = (),
    elapsed_days: float = 0.0,
    now_look: int | None = None,
    min_samples_per_arm: int | None = None,
) -> Decision:
    """Decide one look at one pilot step.

    observations: ALL rows of the step so far (cumulative, not just the new batch); columns request_id,
        arm ('control'/'treatment'), quality (finite, higher is better), latency_ms, error (bool). Rows
        are never dropped: score a failed answer as the scorer scores an empty answer.
    mode: 'split' (independent arms, planned_treatment_share required) or 'paired' (shadow step: both
        arms answer each request; the planned split is 50/50 rows and quality uses per-request differences).
    history: earlier looks at this step (GateHistory.from_evidence or Decision.next_history).
    elapsed_days / now_look: how long the step has run and which look this is (default history.looks+1);
        reaching settings.max_duration_days or settings.max_looks turns an inconclusive result into NO-GO.
    min_samples_per_arm: the step's own minimum (default settings.min_samples_per_arm).
    Raises ValueError naming the column for NaN/inf, missing columns, unknown arms or duplicates.
    """
    history = history or GateHistory()
    if mode not in ("split", "paired"):
        raise ValueError(f"mode must be 'split' or 'paired', got {mode!r}")
    if mode == "paired":
        share = 0.5 if planned_treatment_share is None else planned_treatment_share
        if share != 0.5:
            raise ValueError(
                "paired mode has both arms for every request: planned_treatment_share must be 0.5"
            )
    else:
        if planned_treatment_share is None:
            raise ValueError("split mode needs planned_treatment_share (the step's treatment traffic share)")
        share = float(planned_treatment_share)
        if not 0 < share < 1:
            raise ValueError(f"planned_treatment_share must be in (0, 1), got {share!r}")
    min_n = settings.min_samples_per_arm if min_samples_per_arm is None else int(min_samples_per_arm)
    df = _validate(observations)
    fingerprint = data_fingerprint(df)
    look = history.looks + 1 if now_look is None else int(now_look)
    at_max = look >= settings.max_looks or elapsed_days >= settings.max_duration_days

    ctrl = df[df["arm"] == "control"]
    trt = df[df["arm"] == "treatment"]
    n_c, n_t = len(ctrl), len(trt)
    if mode == "split":
        both = set(ctrl["request_id"]) & set(trt["request_id"])
        if both:
            raise ValueError(
                f"column 'request_id': {len(both)} request(s) appear in both arms (e.g. {sorted(both)[:3]}); "
                "a split step assigns each request to one arm — use mode='paired' for shadow data"
            )
    srm_chi2, srm_p = srm_test(n_c, n_t, share)
    observed_share = n_t / (n_c + n_t) if n_c + n_t else None

    # Guardrails
    er_c = float(ctrl["error"].mean()) if n_c else None
    er_t = float(trt["error"].mean()) if n_t else None
    p95_c = float(np.percentile(ctrl["latency_ms"], 95)) if n_c else None
    p95_t = float(np.percentile(trt["latency_ms"], 95)) if n_t else None
    can_guard = n_t >= settings.guardrail_min_samples
    guard_note = "" if can_guard else f"needs {settings.guardrail_min_samples} treatment rows"
    guardrails = [
        Guardrail(
            "treatment_error_rate",
            er_t,
            settings.max_error_rate,
            bool(can_guard and er_t is not None and er_t > settings.max_error_rate),
            can_guard,
            guard_note,
        )
    ]
    can_excess = can_guard and n_c >= settings.guardrail_min_samples
    excess = None if er_t is None or er_c is None else er_t - er_c
    guardrails.append(
        Guardrail(
            "error_rate_increase",
            excess,
            settings.max_error_rate_increase,
            bool(can_excess and excess is not None and excess > settings.max_error_rate_increase),
            can_excess,
            "" if can_excess else f"needs {settings.guardrail_min_samples} rows per arm",
        )
    )
    if settings.latency_slo_ms is not None:
        guardrails.append(
            Guardrail(
                "treatment_p95_latency_ms",
                p95_t,
                settings.latency_slo_ms,
                bool(can_guard and p95_t is not None and p95_t > settings.latency_slo_ms),
                can_guard,
                guard_note,
            )
        )

    # Quality
    rho = planned_rho(settings, treatment_share=share, paired=mode == "paired")
    n_pairs: int | None = None
    unpaired = 0
    est = se = look_low = look_high = None
    var_c = var_t = math.nan  # sample variances behind the interval (paired: of the differences)
    if mode == "paired":
        wide = df.pivot(index="request_id", columns="arm", values="quality")
        for arm in ARMS:
            if arm not in wide.columns:
                wide[arm] = np.nan
        complete = wide.dropna()
        n_pairs = len(complete)
        unpaired = int(len(df) - 2 * n_pairs)
        enough = n_pairs >= min_n
        if n_pairs >= 2:
            d = (complete["treatment"] - complete["control"]).to_numpy()
            var_c = var_t = float(d.var(ddof=1))
            e, s, lo, hi = paired_cs(
                n_pairs, d.mean(), d.var(ddof=1), alpha=settings.alpha, rho=rho, prior_sd=settings.planned_sd
            )
            est, se, look_low, look_high = float(e), float(s), float(lo), float(hi)
        c_mean = float(complete["control"].mean()) if n_pairs else None
        t_mean = float(complete["treatment"].mean()) if n_pairs else None
    else:
        enough = n_c >= min_n and n_t >= min_n
        if n_c >= 2 and n_t >= 2:
            qc, qt = ctrl["quality"].to_numpy(), trt["quality"].to_numpy()
            var_c, var_t = float(qc.var(ddof=1)), float(qt.var(ddof=1))
            e, s, lo, hi = difference_cs(
                n_c,
                qc.mean(),
                qc.var(ddof=1),
                n_t,
                qt.mean(),
                qt.var(ddof=1),
                alpha=settings.alpha,
                rho=rho,
                prior_sd=settings.planned_sd,
            )
            est, se, look_low, look_high = float(e), float(s), float(lo), float(hi)
        c_mean = float(ctrl["quality"].mean()) if n_c else None
        t_mean = float(trt["quality"].mean()) if n_t else None

    invalid_reasons: list[str] = []
    if not data_check_passed:
        invalid_reasons.append("data-check-failed")
    if srm_p < settings.srm_p_threshold:
        invalid_reasons.append("sample-ratio-mismatch")
    counts = enough and not invalid_reasons and look_low is not None
    reset = False
    if counts:
        run_low, run_high = (
            float(x)
            for x in running_intersection(look_low, look_high, history.interval_low, history.interval_high)
        )
        if run_low > run_high:  # contradicts an earlier look (probability <= alpha): trust this look only
            run_low, run_high, reset = look_low, look_high, True
    elif look_low is not None:
        run_low, run_high = history.interval_low, history.interval_high
        if not math.isfinite(run_low) and not math.isfinite(run_high):
            run_low, run_high = look_low, look_high
    else:
        run_low, run_high = history.interval_low, history.interval_high
    verdict = str(classify_interval(run_low, run_high, settings.margin)) if counts else "not-evaluated"
    quality = QualityEvidence(
        control_mean=c_mean,
        treatment_mean=t_mean,
        estimate=est,
        std_error=se,
        look_low=look_low,
        look_high=look_high,
        interval_low=run_low,
        interval_high=run_high,
        verdict=verdict,
        counts_toward_interval=counts,
        rho=rho,
        interval_reset=reset,
    )

    # Outcome, in order of precedence
    breached = [g.name for g in guardrails if g.breached]
    if invalid_reasons:
        outcome: Outcome = "INVALID"
        reasons = tuple(invalid_reasons)
    elif breached:
        outcome, reasons = "NO-GO", tuple(f"guardrail:{name}" for name in breached)
    elif not enough:
        outcome, reasons = (
            ("NO-GO", ("max-duration-before-min-sample",)) if at_max else ("EXTEND", ("min-sample",))
        )
    elif verdict == "non-inferior":
        outcome, reasons = "GO", ("non-inferior",)
    elif verdict == "futile":
        outcome, reasons = "NO-GO", ("futility",)
    elif at_max:
        outcome, reasons = "NO-GO", ("max-duration-inconclusive",)
    else:
        outcome, reasons = "EXTEND", ("inconclusive",)

    projected = None
    if outcome == "EXTEND" and est is not None:
        current = (n_pairs or 0) if mode == "paired" else n_c + n_t
        projected = projected_sample_size(
            est,
            var_c,
            var_t,
            mode=mode,
            treatment_share=share,
            margin=settings.margin,
            alpha=settings.alpha,
            rho=rho,
            prior_sd=settings.planned_sd,
            at_least=max(current, 2 * min_n if mode == "split" else min_n),
        )
    decision = Decision(
        outcome=outcome,
        reasons=reasons,
        explanation="",
        mode=mode,
        look_index=look,
        at_maximum=at_max,
        elapsed_days=float(elapsed_days),
        n_control=n_c,
        n_treatment=n_t,
        n_pairs=n_pairs,
        unpaired_rows=unpaired,
        planned_treatment_share=share,
        observed_treatment_share=observed_share,
        srm_chi2=srm_chi2,
        srm_p_value=srm_p,
        data_check_passed=bool(data_check_passed),
        data_check_failures=tuple(str(f) for f in data_check_failures),
        guardrails=tuple(guardrails),
        quality=quality,
        error_rate_control=er_c,
        error_rate_treatment=er_t,
        p95_latency_control_ms=p95_c,
        p95_latency_treatment_ms=p95_t,
        min_samples_per_arm=min_n,
        settings=settings,
        data_fingerprint=fingerprint,
        previous_looks=history.looks,
        projected_requests=projected,
    )
    return replace(decision, explanation=explain(decision))


# --------------------------------------------------------------------------------------------------
# Plain language


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def explain(d: Decision) -> str:
    """One paragraph a business owner can read: what was decided, why, and how sure we are."""
    s = d.settings
    conf = f"{100 * (1 - s.alpha):.0f}%"
    arms = (
        f"{d.n_pairs} requests answered by both the sparse and the dense model"
        if d.mode == "paired"
        else f"{d.n_treatment} requests on the sparse model and {d.n_control} on the dense model"
    )
    parts = [f"Decision: {d.outcome} (look {d.look_index}, {d.elapsed_days:.1f} days in)."]
    if "data-check-failed" in d.reasons:
        fails = "; ".join(d.data_check_failures[:3]) or "see the data-check report"
        parts.append(
            f"The pilot data failed its quality checks ({fails}), so no conclusion can be drawn from it."
        )
    if "sample-ratio-mismatch" in d.reasons:
        parts.append(
            f"Traffic did not split as planned: {_pct(d.observed_treatment_share)} of requests went to the "
            f"sparse model instead of {_pct(d.planned_treatment_share)} (chance of this by luck "
            f"p={d.srm_p_value:.2g}), which usually means a routing or logging bug; "
            "the results are not trustworthy."
        )
    parts.append(f"We looked at {arms}.")
    q = d.quality
    if q.estimate is not None and q.interval_low is not None and math.isfinite(q.interval_low):
        parts.append(
            f"Average quality was {q.treatment_mean:.3f} for sparse vs {q.control_mean:.3f} for dense "
            f"(difference {q.estimate:+.3f}); allowing for chance, and for having checked "
            f"{d.look_index} time(s), "
            f"we are {conf} confident the true difference lies between {q.interval_low:+.3f} and "
            f"{q.interval_high:+.3f}, against an allowed loss of {s.margin:.3f}."
        )
    breached = [g for g in d.guardrails if g.breached]
    for g in breached:
        parts.append(
            f"Safety limit broken: {g.name.replace('_', ' ')} is {g.value:.4g}, "
            f"above the limit {g.threshold:.4g}."
        )
    if not breached and any(g.evaluated for g in d.guardrails):
        lat = (
            f", p95 latency {d.p95_latency_treatment_ms:.0f} ms"
            if d.p95_latency_treatment_ms is not None
            else ""
        )
        parts.append(f"Safety limits held (sparse error rate {_pct(d.error_rate_treatment)}{lat}).")
    why = {
        "GO": "The sparse model is shown to be no worse than the allowed margin, so it may advance "
        "(a person still approves any promotion).",
        "EXTEND": "There is not enough evidence yet either way; the pilot should keep collecting data"
        + (f" (at least {d.min_samples_per_arm} per arm)" if "min-sample" in d.reasons else "")
        + (
            f"; if quality and its spread stay as they are, about {d.projected_requests} "
            f"{'requests answered by both models' if d.mode == 'paired' else 'requests in all'} "
            "would settle it."
            if d.projected_requests is not None
            else "."
        ),
        "INVALID": "Fix the data problem and rerun this step; "
        "this look must not be used to promote or reject.",
    }
    if d.outcome == "NO-GO":
        if any(r.startswith("guardrail") for r in d.reasons):
            tail = "The sparse model must not advance while it breaks a safety limit."
        elif "futility" in d.reasons:
            tail = "The sparse model is confidently worse than the allowed margin, so the pilot stops."
        else:
            tail = (
                "The pilot reached its maximum duration without proving the sparse model is good enough; "
                "an unproven model never ships."
            )
    else:
        tail = why[d.outcome]
    parts.append(tail)
    return " ".join(parts)
