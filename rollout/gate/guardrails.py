"""Guardrails as data: one list of named checks, judged by sequential tests with the gate's guarantee.

A check says which 0/1 metric of a request it watches (an error, a latency over the SLO), how it is
compared (`rate`: the treatment arm's rate against a ceiling; `excess`: treatment minus control), the
threshold and the minimum number of treatment rows before it can be judged. `decide` (pilot steps) runs
them through `judge`; the monitor (the champion's sampled traffic, which the dense model also answers)
runs them through `judge_monitor`, a change detector over all its looks (`rollout.gate.detection`), so
that its false alarm, too, is bounded however many looks it takes, and adds the quality loss beyond the
margin (`judge_monitor_quality`).

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
    EXCESS_MIXTURE,
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
    """The checks the settings ask for; `with_control=False`: the rate checks only (no control arm)."""
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
        n_t = stream.n  # the requests both arms answered: a sparse-arm row without its pair is no evidence
    else:
        stream, span = split_excess_stream(x, treated, share), (-1.0, 1.0)
        n_c = len(x) - n_t
        value = float(x[treated].mean() - x[~treated].mean()) if n_t and n_c else None
    evaluated = n_t >= check.min_samples and stream.n > 0
    left_out = f"{excluded} sparse-arm rows collected under CPU overload left out" if excluded else ""
    unit = "pairs" if check.comparison == "excess" and mode == "paired" else "treatment rows"
    if stream.n == 0:
        note = "; ".join(filter(None, [_note(check, n_t, unit), left_out]))
        return Guardrail(check.name, None, check.threshold, False, False, note, n=n_t, excluded=excluded)
    breached, low = _breach(stream, check, alpha, span)
    return Guardrail(
        check.name,
        value,
        check.threshold,
        breached,
        evaluated or breached,  # evidence of a breach counts whatever the sample size
        "; ".join(filter(None, ["" if evaluated or breached else _note(check, n_t, unit), left_out])),
        low,
        n_t,
        excluded,
    )


def judge_monitor(
    check: GuardrailCheck,
    frame: pd.DataFrame,
    looks: Sequence[object],
    *,
    alpha: float,
    pairs: pd.DataFrame | None = None,
) -> Guardrail:
    """Judge one check on the champion's traffic over the monitor's looks by the change detector
    (`rollout.gate.detection`): breached when some stretch since a look began shows it above the
    threshold, with false alarm <= alpha over every look the monitor will ever take. A rate check judges
    the sparse arm's rows of `frame` (`looks`: each row's look, e.g. its batch id, in arrival order); an
    excess check the requests both arms answered (`pairs`, `quality.paired_arms`, with a `look` column),
    not judged without them. A breach's value is the rate (excess) since the look where its evidence
    begins (the note says which); otherwise over all the rows judged."""
    if check.comparison == "rate":
        looks = np.asarray(looks, dtype=object)
        if looks.shape != (len(frame),):
            raise ValueError(f"{check.name}: {looks.size} look labels for {len(frame)} rows")
        keep, excluded = _judged_rows(check, frame)
        x = check.indicator(frame)[keep]
        return _detect(
            check.name,
            check.threshold,
            check.min_samples,
            rate_stream(x),
            looks[keep],
            detection.rate_factors_of(x, check.threshold),
            alpha,
            (0.0, 1.0),
            excluded,
        )
    if pairs is None or pairs.empty:
        note = "not judged: no request has both arms' answers to compare"
        return Guardrail(check.name, None, check.threshold, False, False, note)
    z = check.indicator(pairs.rename(columns=_suffix("treatment"))) - check.indicator(
        pairs.rename(columns=_suffix("control"))
    )
    factors = detection.mean_factors_of(z, check.threshold, mixture=EXCESS_MIXTURE)
    stream = paired_stream(z)
    return _detect(
        check.name, check.threshold, check.min_samples, stream, pairs["look"].to_numpy(), factors, alpha
    )


def judge_monitor_quality(pairs: pd.DataFrame, margin: float, *, alpha: float, min_samples: int) -> Guardrail:
    """`quality_loss`: does the champion now lose more than the margin to dense on the requests both
    answered (`pairs` as for `judge_monitor`)? The change detector on the paired loss q_dense - q_sparse
    in [-1, 1] (`detection.LOSS_MIXTURE`): the step's futility question, asked after promotion."""
    name = "quality_loss"
    if pairs is None or pairs.empty:
        return Guardrail(name, None, margin, False, False, "not judged: no request has both arms' answers")
    z = pairs["quality_control"].to_numpy(dtype=float) - pairs["quality_treatment"].to_numpy(dtype=float)
    return _detect(
        name,
        margin,
        min_samples,
        paired_stream(z),
        pairs["look"].to_numpy(),
        detection.mean_factors_of(z, margin),
        alpha,
    )


def _detect(
    name: str,
    threshold: float,
    min_samples: int,
    stream: Stream,
    labels: np.ndarray,
    factors: detection.Factors,
    alpha: float,
    span: tuple[float, float] = (-1.0, 1.0),
    excluded: int = 0,
) -> Guardrail:
    n = stream.n
    left_out = f"{excluded} sparse-arm rows collected under CPU overload left out" if excluded else ""
    short = f"needs {min_samples} rows to be judged ({n} so far)" if n < min_samples else ""
    if n == 0:
        note = "; ".join(filter(None, [short, left_out]))
        return Guardrail(name, None, threshold, False, False, note, n=0, excluded=excluded)
    starts = detection.look_starts(labels)
    if not detection.detected(factors, starts, alpha):
        note = "; ".join(filter(None, [short, left_out]))
        return Guardrail(
            name, float(stream.z.mean()), threshold, False, not short, note, n=n, excluded=excluded
        )
    k = detection.evidence_start(factors, starts)
    since = Stream(stream.z[starts[k] :], stream.lo, stream.hi, stream.truncation)
    note = f"the evidence begins with look {k + 1} of {starts.size} ({since.n} rows since)"
    return Guardrail(
        name,
        float(since.z.mean()),
        threshold,
        True,
        True,  # evidence of a breach counts whatever the sample size
        "; ".join(filter(None, [note, left_out])),
        detection.lower_bound(factors, starts, alpha, since, span),
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


def latency_unmeasurable(guards: Sequence[Guardrail], min_samples: int) -> Guardrail | None:
    """The latency guardrail, where it is not judged only because the host's overload left rows out: the
    step holds enough sparse-arm rows to judge it, too few of them measured on a host not overloaded. Said
    early (decision reason `latency-unmeasurable-on-this-host`): more looks on the same host do not help."""
    for g in guards:
        if g.name == "treatment_latency_over_slo" and not g.evaluated and g.excluded:
            return g if g.n + g.excluded >= min_samples else None
    return None


def _suffix(arm: str) -> dict[str, str]:
    return {f"error_{arm}": "error", f"latency_ms_{arm}": "latency_ms"}


def _note(check: GuardrailCheck, n: int, unit: str = "treatment rows") -> str:
    return f"needs {check.min_samples} {unit} to be judged ({n} so far)"
