"""Guardrails as data: one list of named checks, judged by sequential tests with the gate's guarantee.

A check says which 0/1 metric of a request it watches (an error, a latency over the SLO), how it is
compared (`rate`: the treatment arm's rate against a ceiling; `excess`: treatment minus control), the
threshold and the minimum number of treatment rows before it can be judged. `decide` (pilot steps) runs
them through `judge`; the monitor (the champion's production traffic, no control arm) runs the rate checks
through `judge_monitor`, a change detector over all its looks (`rollout.gate.detection`), so that its false
alarm, too, is bounded however many looks it takes.

A check is **breached** only when the evidence says so: its lower confidence bound, anytime-valid by
betting (`rollout.gate.sequences`), is above the threshold. A check whose rate is truly at or below the
threshold is breached with probability at most alpha, however often it is looked at. A check with fewer
rows than its minimum is **not judged**, which keeps a step at EXTEND (never GO). Otherwise it **holds**.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from rollout.gate import detection
from rollout.gate.sequences import (
    Stream,
    bound_where,
    excess_crosses,
    excess_log_capital,
    ipw_stream,
    paired_stream,
    rate_log_capital,
    rate_peak_log_capital,
    rate_stream,
)
from rollout.gate.settings import GateSettings

Metric = Literal["error", "latency_over_slo"]
Comparison = Literal["rate", "excess"]
Status = Literal["breached", "holds", "not-judged"]


@dataclass(frozen=True)
class GuardrailCheck:
    name: str
    metric: Metric
    comparison: Comparison
    threshold: float
    min_samples: int
    slo_ms: float | None = None  # latency_over_slo only

    def indicator(self, frame: pd.DataFrame) -> np.ndarray:
        if self.metric == "error":
            return frame["error"].to_numpy(dtype=float)
        return (frame["latency_ms"].to_numpy(dtype=float) > float(self.slo_ms)).astype(float)


@dataclass(frozen=True)
class Guardrail:
    """The judgement of one check (stored in the decision's evidence)."""

    name: str
    value: float | None  # observed rate (or excess)
    threshold: float
    breached: bool
    evaluated: bool  # False = fewer rows than the check's minimum: cannot be judged yet
    note: str = ""
    lower_bound: float | None = None  # breached only: anytime-valid (1 - alpha) lower bound of the rate
    n: int = 0
    excluded: int = 0  # sparse-arm rows left out (latency: collected while the host was overloaded)

    @property
    def status(self) -> Status:
        return "breached" if self.breached else ("holds" if self.evaluated else "not-judged")


def guardrail_checks(settings: GateSettings, *, with_control: bool = True) -> tuple[GuardrailCheck, ...]:
    """The checks the settings ask for. Without a control arm (the monitor) only the rate checks."""
    n = settings.guardrail_min_samples
    checks = [GuardrailCheck("treatment_error_rate", "error", "rate", settings.max_error_rate, n)]
    if with_control:
        checks.append(
            GuardrailCheck("error_rate_increase", "error", "excess", settings.max_error_rate_increase, n)
        )
    if settings.latency_slo_ms is not None:
        checks.append(
            GuardrailCheck(
                "treatment_latency_over_slo",
                "latency_over_slo",
                "rate",
                settings.max_latency_exceedance,
                n,
                slo_ms=float(settings.latency_slo_ms),
            )
        )
    return tuple(checks)


def judge(
    check: GuardrailCheck,
    frame: pd.DataFrame,
    *,
    alpha: float,
    mode: Literal["split", "paired"],
    share: float = 0.5,
    pairs: pd.DataFrame | None = None,
) -> Guardrail:
    """Judge one check on validated rows in arrival order. Paired mode compares per request (`pairs`: one
    row per complete request, columns `<metric>_control` / `<metric>_treatment` are built here)."""
    treated, excluded = _judged_rows(check, frame)
    x = check.indicator(frame)
    n_t = int(treated.sum())
    if check.comparison == "rate":
        stream, span, value = rate_stream(x[treated]), (0.0, 1.0), (float(x[treated].mean()) if n_t else None)
    elif mode == "paired":
        assert pairs is not None
        stream = paired_excess_stream(
            check.indicator(pairs.rename(columns=_suffix("treatment"))),
            check.indicator(pairs.rename(columns=_suffix("control"))),
        )
        span, value = (-1.0, 1.0), (float(stream.z.mean()) if stream.n else None)
    else:
        stream, span = split_excess_stream(x, treated, share), (-1.0, 1.0)
        n_c = len(x) - n_t
        value = float(x[treated].mean() - x[~treated].mean()) if n_t and n_c else None
    evaluated = n_t >= check.min_samples and stream.n > 0
    left_out = f"{excluded} sparse-arm rows collected under CPU overload left out" if excluded else ""
    if stream.n == 0:
        note = "; ".join(filter(None, [_note(check, n_t), left_out]))
        return Guardrail(check.name, None, check.threshold, False, False, note, n=n_t, excluded=excluded)
    breached, low = _breach(stream, check, alpha, span)
    return Guardrail(
        check.name,
        value,
        check.threshold,
        breached,
        evaluated or breached,  # evidence of a breach counts whatever the sample size
        "; ".join(filter(None, ["" if evaluated or breached else _note(check, n_t), left_out])),
        low,
        n_t,
        excluded,
    )


def judge_monitor(
    check: GuardrailCheck, frame: pd.DataFrame, looks: Sequence[object], *, alpha: float
) -> Guardrail:
    """Judge one rate check on the champion's traffic over the monitor's looks (`looks`: the look, e.g.
    the batch id, of each row of `frame`, in arrival order) by the change detector
    (`rollout.gate.detection`): breached when some stretch since a look began shows the rate above the
    threshold, with false alarm <= alpha over every look the monitor will ever take. A breach's value is
    the rate since the look where its evidence begins (the note says which); otherwise the rate overall."""
    if check.comparison != "rate":
        raise ValueError(f"{check.name}: the monitor judges rate checks only (no control arm)")
    looks = np.asarray(looks, dtype=object)
    if looks.shape != (len(frame),):
        raise ValueError(f"{check.name}: {looks.size} look labels for {len(frame)} rows")
    keep, excluded = _judged_rows(check, frame)
    x, labels = check.indicator(frame)[keep], looks[keep]
    n = int(x.size)
    left_out = f"{excluded} sparse-arm rows collected under CPU overload left out" if excluded else ""
    if n == 0:
        note = "; ".join(filter(None, [_note(check, 0), left_out]))
        return Guardrail(check.name, None, check.threshold, False, False, note, n=0, excluded=excluded)
    starts = detection.look_starts(labels)
    evaluated = n >= check.min_samples
    if not detection.detected(x, starts, check.threshold, alpha):
        note = "; ".join(filter(None, ["" if evaluated else _note(check, n), left_out]))
        return Guardrail(
            check.name, float(x.mean()), check.threshold, False, evaluated, note, n=n, excluded=excluded
        )
    k = detection.evidence_start(x, starts, check.threshold)
    since = x[starts[k] :]
    note = f"the evidence begins with look {k + 1} of {starts.size} ({since.size} rows since)"
    return Guardrail(
        check.name,
        float(since.mean()),
        check.threshold,
        True,
        True,  # evidence of a breach counts whatever the sample size
        "; ".join(filter(None, [note, left_out])),
        detection.lower_bound(x, starts, check.threshold, alpha),
        n,
        excluded,
    )


def paired_excess_stream(treatment: np.ndarray, control: np.ndarray) -> Stream:
    """The excess check's stream in a shadow step: per request, the sparse arm's 0/1 metric minus the
    dense arm's (in [-1, 1]; its mean is the excess). Vectorised over leading axes."""
    return paired_stream(np.asarray(treatment, dtype=float) - np.asarray(control, dtype=float))


def split_excess_stream(indicator: np.ndarray, treated: np.ndarray, share: float) -> Stream:
    """The excess check's stream in a split step: every request's 0/1 metric, inverse-propensity weighted
    by its known assignment probability, centred on the running rate (starting at 0: errors are rare)."""
    return ipw_stream(indicator, treated, share, prior_centre=0.0)


def breach_log_capital(stream: Stream, check: GuardrailCheck, m: float | None = None) -> np.ndarray:
    """log-capital over time of the test of H0: at or below m (default: the threshold), vectorised over
    leading axes: rate checks by the likelihood-ratio mixture, excess checks by the mixture of constant
    bets (`sequences.excess_log_capital`)."""
    if check.comparison == "rate":
        return rate_log_capital(stream, check.threshold, m)
    return excess_log_capital(stream, check.threshold, m)


def breach_peak(stream: Stream, check: GuardrailCheck, m: float | None = None) -> float:
    """max over time of `breach_log_capital` for one (1-D) stream; a rate check's from the rows where its
    capital can peak only (`sequences.rate_peak_log_capital`)."""
    if check.comparison == "rate":
        return rate_peak_log_capital(stream, check.threshold, m)
    return float(excess_log_capital(stream, check.threshold, m).max())


def _breach(stream: Stream, check: GuardrailCheck, alpha: float, span) -> tuple[bool, float | None]:
    """(breached, the lower bound behind a breach: how bad at least, which the explanation quotes)."""
    target = math.log(1 / alpha)
    if check.comparison == "rate":
        crossed = breach_peak(stream, check) >= target
    else:
        crossed = excess_crosses(stream, check.threshold, target)
    if not crossed:
        return False, None
    return True, bound_where(lambda m: breach_peak(stream, check, m), stream, "lower", alpha, span)


def judge_all(
    checks: Sequence[GuardrailCheck],
    frame: pd.DataFrame,
    *,
    alpha: float,
    mode,
    share: float = 0.5,
    pairs=None,
) -> tuple[Guardrail, ...]:
    return tuple(judge(c, frame, alpha=alpha, mode=mode, share=share, pairs=pairs) for c in checks)


def _judged_rows(check: GuardrailCheck, frame: pd.DataFrame) -> tuple[np.ndarray, int]:
    """The sparse-arm rows a check judges, and how many it leaves out: a latency measured while the host
    was oversubscribed is the host's, not the model's."""
    treated = frame["treated"].to_numpy()
    if check.metric != "latency_over_slo" or "overloaded" not in frame.columns:
        return treated, 0
    overloaded = frame["overloaded"].to_numpy()
    return treated & ~overloaded, int((treated & overloaded).sum())


def _suffix(arm: str) -> dict[str, str]:
    return {f"error_{arm}": "error", f"latency_ms_{arm}": "latency_ms"}


def _note(check: GuardrailCheck, n: int) -> str:
    return f"needs {check.min_samples} treatment rows to be judged ({n} so far)"
