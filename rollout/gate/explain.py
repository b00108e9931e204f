"""One paragraph a business owner can read: what was decided, why, and how sure we are."""

from __future__ import annotations

import math

from rollout.gate.evidence import Decision


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _times(n: int) -> str:
    return "once" if n == 1 else f"{n} times"


def _confidence(alpha: float) -> str:
    return f"{100 * (1 - alpha):.1f}".rstrip("0").rstrip(".") + "%"


def _bounds(d: Decision) -> str:
    """The quality bounds in words; a bound at the edge of the scale (-1 / +1) says nothing: left out. The
    lower bound is at the GO test's level, the upper at futility's (they differ when alpha is spent across
    the use case's pilots)."""
    q, s = d.quality, d.settings
    low = q.interval_low if q.interval_low is not None and q.interval_low > -1 + 1e-9 else None
    high = q.interval_high if q.interval_high is not None and q.interval_high < 1 - 1e-9 else None
    if low is None and high is None:
        return "the evidence does not yet bound the true difference in either direction"
    low_conf, high_conf = _confidence(s.alpha_go), _confidence(s.alpha)
    low_said = None if low is None else f"at least {low:+.3f}" + (" (no loss)" if low >= 0 else "")
    high_said = None if high is None else f"at most {high:+.3f}"
    if low_said and high_said:  # each bound holds at its own level; both at once only at 1 - both alphas
        return (
            f"we are {low_conf} confident the true difference is {low_said}, "
            f"and {high_conf} confident it is {high_said} ({_confidence(s.alpha_go + s.alpha)} confident "
            "of both at once)"
        )
    conf = low_conf if low_said else high_conf
    return f"we are {conf} confident the true difference is {low_said or high_said}"


def _spending(s) -> str | None:
    if s.alpha_go >= s.alpha:
        return None
    return (
        f"This use case shares its {s.alpha:g} risk of a false GO across all its pilots, so this pilot's GO "
        f"is held to {s.alpha_go:.3g}."
    )


def explain(d: Decision) -> str:
    s = d.settings
    parts = [f"Decision: {d.outcome} (look {d.look_index}, {d.elapsed_days:.1f} days in)."]
    if d.input_problems:
        parts.append("The pilot data cannot be judged: " + "; ".join(d.input_problems[:4]) + ".")
        parts.append(_why(d))
        return " ".join(parts)
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
    if "crossed-bounds" in d.reasons and d.quality.look_low is not None:
        parts.append(_contradicts(d))
    arms = (
        f"{d.n_pairs} requests answered by both the sparse and the dense model"
        if d.mode == "paired"
        else f"{d.n_treatment} requests on the sparse model and {d.n_control} on the dense model"
    )
    parts.append(f"We looked at {arms}.")
    q = d.quality
    if q.estimate is not None and q.verdict != "not-evaluated":
        parts.append(
            f"Average quality was {q.treatment_mean:.3f} for sparse vs {q.control_mean:.3f} for dense "
            f"(difference {q.estimate:+.3f}); allowing for chance, for the small sample and for having "
            f"checked {_times(d.look_index)}, {_bounds(d)}, against an allowed loss of {s.margin:.3f}."
        )
        spent = _spending(s)
        if spent:
            parts.append(spent)
    breached = [g for g in d.guardrails if g.breached]
    for g in breached:
        parts.append(_breach(g, _confidence(s.alpha)))
    unjudged = [g for g in d.guardrails if not g.evaluated]
    if not breached and unjudged:
        parts.append(
            "Not yet judged: " + "; ".join(f"{g.name.replace('_', ' ')} ({g.note})" for g in unjudged) + "."
        )
    if "latency-unmeasurable-on-this-host" in d.reasons:
        parts.append(_unmeasurable(d))
    if not breached and any(g.evaluated for g in d.guardrails):
        parts.append(
            f"No safety limit is shown to be broken (sparse error rate {_pct(d.error_rate_treatment)}"
            f"{_p95(d)})."
        )
    parts.append(_why(d))
    return " ".join(parts)


def _contradicts(d: Decision) -> str:
    """A look whose own bounds cross: what they say, why that happens, and what was made of it: no
    conclusion (INVALID, final for the step), or a NO-GO that rests on the futility test alone (on the
    breached guardrails, where its reasons name them, the futility test rejecting too)."""
    q, s = d.quality, d.settings
    go = q.log_capital_go is not None and q.threshold is not None and q.log_capital_go >= q.threshold
    futile = q.log_capital_futility is not None and q.log_capital_futility >= math.log(1 / s.alpha)
    both = go and futile
    said = (
        "The evidence contradicts itself: this look's bounds say the true difference is at least "
        f"{q.look_low:+.3f} and at most {q.look_high:+.3f}"
        + (
            " (both tests rejected: the GO test's 'no worse than the allowed margin' and the futility "
            "test's 'worse than it')"
            if both
            else ""
        )
        + ". Rows in an order that carries no information give that by chance with probability at most "
        f"{s.alpha_go + s.alpha:.3g}; far more often the order of the rows carries some (imports that "
        "brought one arm after the other, or rows sorted by their outcome)"
    )
    if d.outcome == "NO-GO" and "max-duration-invalid" not in d.reasons:
        # its reasons name its ground: the breached guardrails where there are any (`decide._outcome`'s
        # precedence), else futility
        guarded = any(r.startswith("guardrail:") for r in d.reasons)
        ground = (
            "The NO-GO rests on the breached safety limits named below, and the futility test rejects too"
            if guarded
            else "The NO-GO rests on the futility test alone"
        )
        return (
            f"{said}. {ground}: on rows whose order carries no information its false NO-GO is at most "
            f"{s.alpha:.3g} whatever the GO test said, and where the order does carry some, stopping is the "
            "safe side: a NO-GO never promotes."
        )
    said += ", and then neither bound holds, so no conclusion is drawn."
    if d.outcome == "INVALID":  # at the maximum the NO-GO itself says the step ended
        said += (
            " This is final for this step: both tests keep the strongest evidence they have seen, so every "
            "later look of the step is INVALID again until one with the step's minimum sample whose futility "
            f"test rejects, or {_limits(d)}, ends it NO-GO."
        )
    return said


def _p95(d: Decision) -> str:
    """The p95 clause: over the sparse-arm rows measured on a host not overloaded, naming those left out
    (the latency guardrail judged the same rows)."""
    left_out = d.overloaded_treatment_rows
    p95 = d.p95_latency_treatment_ms
    if p95 is None or not math.isfinite(p95):
        return (
            f"; every sparse-arm latency was measured under CPU overload ({_rows(left_out)})"
            if left_out
            else ""
        )
    if not left_out:
        return f", p95 latency {p95:.0f} ms"
    judged = d.n_treatment - left_out
    return (
        f", p95 latency {p95:.0f} ms over the {_rows(judged)} measured on a host not overloaded; "
        f"{left_out} collected under CPU overload {'is' if left_out == 1 else 'are'} left out"
    )


def _rows(n: int) -> str:
    return f"{n} sparse-arm row" + ("" if n == 1 else "s")


def _unmeasurable(d: Decision) -> str:
    """The host's load, not the pilot's length, keeps the latency limit from being judged."""
    left_out = d.overloaded_treatment_rows
    return (
        f"Latency unmeasurable on this host so far: {left_out} of {d.n_treatment} sparse-arm rows were "
        "collected under CPU overload and left out, leaving too few to judge the latency limit; while the "
        "host stays this busy no look can judge it: move the pilot (or its arms) to a quieter host, or "
        "free this one."
    )


def _breach(g, confidence: str) -> str:
    """A breached check in words. The test rejects "at or below the limit on every row" as soon as the
    evidence shows it, so the rows that showed it may be a stretch (an outage) that later rows dilute: then
    the rate over all rows is below the bound, and the sentence says where the bound applies."""
    name, bound = g.name.replace("_", " "), g.lower_bound
    if g.value is None or bound is None or g.value >= bound:
        at_least = "" if bound is None else f" (at least {bound:.4g} with {confidence} confidence)"
        value = "" if g.value is None else f" is {g.value:.4g}{at_least},"
        return f"Safety limit broken: {name}{value} above the limit {g.threshold:.4g}."
    return (
        f"Safety limit broken: {name} was above the limit {g.threshold:.4g} over a stretch of this step's "
        f"rows (at least {bound:.4g} there, with {confidence} confidence), though over all of them it is "
        f"{g.value:.4g}."
    )


def _limit_reached(d: Decision) -> str:
    s = d.settings
    if d.elapsed_days >= s.max_duration_days:
        return f"its maximum duration ({d.elapsed_days:.1f} of {s.max_duration_days:g} days)"
    return f"its maximum number of looks ({d.look_index} of {s.max_looks})"


def _limits(d: Decision) -> str:
    s = d.settings
    return f"its maximum duration ({s.max_duration_days:g} days) or number of looks ({s.max_looks})"


def _why(d: Decision) -> str:
    if d.outcome == "GO":
        return (
            "The sparse model is shown to be no worse than the allowed margin, so it may advance "
            "(a person still approves any promotion)."
        )
    if d.outcome == "INVALID":
        clears = "will not" if "crossed-bounds" in d.reasons else "may not"
        return (
            "This look must not be used to promote or reject. The step's stored rows are kept and no step "
            f"is run again, so more rows {clears} clear this: at {_limits(d)} an INVALID step ends NO-GO. "
            "To start over sooner, abort the pilot and pilot again once the cause is fixed."
        )
    if d.outcome == "NO-GO":
        if "max-duration-invalid" in d.reasons:
            return (
                f"The pilot reached {_limit_reached(d)} while its data could not be trusted, so the step "
                "ends: an unproven model never ships. Fix the cause before the use case is piloted again."
            )
        if any(r.startswith("guardrail:") for r in d.reasons):
            return "The sparse model must not advance while it breaks a safety limit."
        if "futility" in d.reasons and "crossed-bounds" in d.reasons:
            return (
                "The futility test shows the sparse model worse than the allowed margin, so the pilot stops "
                "now rather than keep sending users to it; the contradicting evidence promotes nothing."
            )
        if "futility" in d.reasons:
            return "The sparse model is confidently worse than the allowed margin, so the pilot stops."
        if d.quality.verdict == "non-inferior":
            return (
                f"The pilot reached {_limit_reached(d)}: quality was shown within the allowed margin, but "
                "not every safety limit could be judged in time; an unproven model never ships."
            )
        return (
            f"The pilot reached {_limit_reached(d)} without proving the sparse model is good enough; "
            "an unproven model never ships."
        )
    per = "pairs" if d.mode == "paired" else "per arm"
    minimum = "min-sample" in d.reasons
    unjudged = any(r.startswith("guardrail-not-judged") for r in d.reasons)
    if d.quality.verdict == "non-inferior":  # EXTEND only for the minimum sample or a guardrail's rows
        waits = [f"its minimum sample ({d.min_samples_per_arm} {per})"] if minimum else []
        waits += ["enough rows to judge every safety limit"] if unjudged else []
        tail = "Quality is already shown within the allowed margin; the step waits for " + " and ".join(waits)
    else:
        tail = "There is not enough evidence yet either way; the pilot should keep collecting data"
        if minimum:
            tail += f" (at least {d.min_samples_per_arm} {per})"
        if unjudged:
            tail += " until every safety limit can be judged"
    if d.projected_requests is not None:
        unit = "requests answered by both models" if d.mode == "paired" else "requests in all"
        tail += (
            f"; if the requests to come look like those so far, about {d.projected_requests} {unit} "
            "would settle it"
        )
    return tail + "."
