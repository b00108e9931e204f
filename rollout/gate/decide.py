"""`decide`: one look at one pilot step -> GO, EXTEND, NO-GO or INVALID, with all the evidence. Pure."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pandas as pd

from rollout.gate.evidence import Decision, GateHistory, Mode, Outcome, QualityEvidence, running_intersection
from rollout.gate.explain import explain
from rollout.gate.guardrails import guardrail_checks, judge_all, latency_unmeasurable
from rollout.gate.inputs import check_observations, data_fingerprint, srm_test
from rollout.gate.planning import projected_sample_size
from rollout.gate.quality import judge_quality, paired_arms, split_arms
from rollout.gate.settings import GateSettings


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
    """Decide one look at one pilot step; never raises on bad data (INVALID names the column).

    observations: ALL rows of the step so far, in arrival order (the order the flows stored them);
        columns request_id, arm ('control'/'treatment'), quality in [0, 1], latency_ms > 0, error (0/1).
    mode: 'split' (each request in one arm, `planned_treatment_share` its known probability) or
        'paired' (shadow step: both arms answer each request; quality uses per-request differences).
    history: earlier looks at this step; elapsed_days / now_look: reaching max_duration_days or max_looks
        turns an inconclusive result into NO-GO. min_samples_per_arm: the step's own minimum.
    """
    history = history or GateHistory()
    share = _share(mode, planned_treatment_share)
    min_n = settings.min_samples_per_arm if min_samples_per_arm is None else int(min_samples_per_arm)
    look = history.looks + 1 if now_look is None else int(now_look)
    at_max = look >= settings.max_looks or elapsed_days >= settings.max_duration_days
    checked = check_observations(observations, mode=mode)
    frame = checked.frame
    base = dict(
        mode=mode,
        look_index=look,
        at_maximum=at_max,
        elapsed_days=float(elapsed_days),
        planned_treatment_share=share,
        data_check_passed=bool(data_check_passed),
        data_check_failures=tuple(str(f) for f in data_check_failures),
        min_samples_per_arm=min_n,
        settings=settings,
        previous_looks=history.looks,
    )
    if frame is None:
        return _invalid_input(observations, checked.problems, history, base)

    treated = frame["treated"].to_numpy()
    n_c, n_t = int((~treated).sum()), int(treated.sum())
    srm_chi2, srm_p = srm_test(n_c, n_t, share)
    arms = paired_arms(frame) if mode == "paired" else split_arms(frame, share)
    guards = judge_all(
        guardrail_checks(settings), frame, alpha=settings.alpha, mode=mode, share=share, pairs=arms.pairs
    )
    invalid = [
        r
        for r, bad in (
            ("data-check-failed", not data_check_passed),
            ("sample-ratio-mismatch", srm_p < settings.srm_p_threshold),
        )
        if bad
    ]
    enough = (arms.n_pairs or 0) >= min_n if mode == "paired" else min(n_c, n_t) >= min_n
    quality, tests = _quality(arms, settings, history, mode, share, counts=not invalid)
    if tests is not None and _crossed(tests):
        invalid.append("crossed-bounds")
        quality, tests = _quality(arms, settings, history, mode, share, counts=False)
    # the futility test's own verdict: `quality.verdict` of a crossed look is "not-evaluated"
    futile = tests is not None and tests.futile
    outcome, reasons = _outcome(invalid, guards, enough, quality.verdict, at_max, futile=futile)
    # said early; it decides nothing. Not on INVALID, whose reasons say why the data is not trusted (the
    # portfolio's "Waits for" lists them so): the host's load is no such reason, and the step is over anyway
    if outcome != "INVALID" and latency_unmeasurable(guards, settings.guardrail_min_samples) is not None:
        reasons += ("latency-unmeasurable-on-this-host",)
    projected = None
    if outcome == "EXTEND" and tests is not None:
        projected = projected_sample_size(
            arms.stream,
            m0=-settings.margin,
            log_capital_now=tests.log_capital_go_now,
            alpha=settings.alpha_go,
        )
        if projected is not None:  # a GO also needs the step's minimum and every guardrail judged
            unjudged = any(not g.evaluated for g in guards)
            projected = max(projected, _requests_for_minimums(mode, share, min_n, settings, unjudged))
    lat, err = frame["latency_ms"].to_numpy(), frame["error"].to_numpy()
    # latencies measured while the host was overloaded are the host's: the p95s leave them out, as the
    # latency guardrail does (guardrails._judged_rows), and say how many
    quiet = ~frame["overloaded"].to_numpy()
    decision = Decision(
        outcome=outcome,
        reasons=reasons,
        explanation="",
        n_control=n_c,
        n_treatment=n_t,
        n_pairs=arms.n_pairs,
        unpaired_rows=arms.unpaired_rows,
        observed_treatment_share=n_t / (n_c + n_t),
        srm_chi2=srm_chi2,
        srm_p_value=srm_p,
        guardrails=guards,
        quality=quality,
        error_rate_control=float(err[~treated].mean()) if n_c else None,
        error_rate_treatment=float(err[treated].mean()) if n_t else None,
        p95_latency_control_ms=_p95(lat[~treated & quiet]),
        p95_latency_treatment_ms=_p95(lat[treated & quiet]),
        overloaded_control_rows=int((~treated & ~quiet).sum()),
        overloaded_treatment_rows=int((treated & ~quiet).sum()),
        data_fingerprint=data_fingerprint(frame),
        projected_requests=projected,
        **base,
    )
    return replace(decision, explanation=explain(decision))


def _p95(latencies: np.ndarray) -> float | None:
    return float(np.percentile(latencies, 95)) if len(latencies) else None


def _crossed(tests) -> bool:
    """This look's own bounds contradict each other: the lower above the upper, or both tests rejecting
    (GO's "no worse than the margin" and futility's "worse than it" at once). With the rows in an order
    that carries no information, that happens with probability at most alpha_go + alpha in any state of
    the world; far more often it means the order carries some (rows brought arm by arm, or sorted by
    outcome), and then neither test's verdict holds: INVALID, never GO; NO-GO where futility rejects
    (`_outcome`)."""
    return bool(tests.go and tests.futile) or tests.low > tests.high


def _requests_for_minimums(mode: str, share: float, min_n: int, settings, unjudged: bool) -> int:
    """Requests in all (pairs when paired) by which a step holds its minimum per arm and, where a guardrail
    is not judged yet, the guardrails' minimum of sparse-arm rows: in a split step each arm gets its share
    of the requests."""
    guard = settings.guardrail_min_samples if unjudged else 0
    if mode == "paired":
        return max(min_n, guard)
    return math.ceil(max(min_n / min(share, 1 - share), guard / share) - 1e-9)


def _share(mode: str, planned: float | None) -> float:
    if mode == "paired":
        if planned not in (None, 0.5):
            raise ValueError(
                "paired mode has both arms for every request: planned_treatment_share must be 0.5"
            )
        return 0.5
    if mode != "split":
        raise ValueError(f"mode must be 'split' or 'paired', got {mode!r}")
    if planned is None or not 0 < float(planned) < 1:
        raise ValueError(f"split mode needs planned_treatment_share in (0, 1), got {planned!r}")
    return float(planned)


def _quality(arms, settings, history, mode, share, *, counts):
    """(QualityEvidence, QualityTests or None). Bounds are valid at any sample size, so every look with
    usable data counts toward the running interval; the minimum sample is a rule of `_outcome`."""
    t = judge_quality(arms, settings, mode=mode, share=share) if arms.stream.n >= 2 else None
    if t is None:  # nothing to test yet: the running interval stands
        verdict, reset = "not-evaluated", False
        run_low, run_high = history.interval_low, history.interval_high
    elif counts:
        run_low, run_high = running_intersection(t.low, t.high, history.interval_low, history.interval_high)
        reset = max(t.low, history.interval_low) > min(t.high, history.interval_high)
        # The verdict is the exact tests' (the running maximum of the capital already covers every earlier
        # look of the same rows); the reported bounds are root-finder estimates, kept on the verdict's side.
        m = -settings.margin
        verdict = "non-inferior" if t.go else ("futile" if t.futile else "inconclusive")
        run_low = max(run_low, m) if t.go else min(run_low, m)
        run_high = min(run_high, m) if t.futile else max(run_high, m)
    else:
        verdict, run_low, run_high, reset = "not-evaluated", t.low, t.high, False
    evidence = QualityEvidence(
        control_mean=arms.control_mean,
        treatment_mean=arms.treatment_mean,
        estimate=arms.estimate,
        std_error=arms.std_error,
        look_low=None if t is None else t.low,
        look_high=None if t is None else t.high,
        interval_low=run_low,
        interval_high=run_high,
        verdict=verdict,
        counts_toward_interval=counts and t is not None,
        log_capital_go=None if t is None else t.log_capital_go,
        log_capital_futility=None if t is None else t.log_capital_futility,
        threshold=None if t is None else math.log(1 / settings.alpha_go),
        interval_reset=bool(reset and counts),
    )
    return evidence, t


def _outcome(invalid, guards, enough, verdict, at_max, *, futile=False) -> tuple[Outcome, tuple[str, ...]]:
    """In order of precedence: bad data, a breached guardrail, too few samples, a guardrail that cannot be
    judged yet, then the quality verdict. Inconclusive at the maximum is NO-GO: it never ships; so is
    INVALID at the maximum (`_invalid_at_max`).

    A look whose own bounds cross (`crossed-bounds`, its only reason to distrust the data) while the
    futility test rejects (`futile`) is judged as a futile look, the crossing named after its reasons: NO-GO
    from the step's minimum sample on, as futility itself. That test's false NO-GO is at most alpha on its
    own, whatever the GO test said; where the rows' order carries information neither test holds, and
    stopping is the safe side (a NO-GO never promotes), where an INVALID kept the step exposing users to the
    sparse arm until its maximum. A crossing without a futility rejection stays INVALID. Never GO."""
    breached = [g.name for g in guards if g.breached]
    unjudged = [g.name for g in guards if not g.evaluated]
    if list(invalid) == ["crossed-bounds"] and futile and enough:
        outcome, reasons = _outcome((), guards, enough, "futile", at_max)
        return outcome, (*reasons, "crossed-bounds")
    if invalid:
        return _invalid_at_max(tuple(invalid), at_max)
    if breached:
        return "NO-GO", tuple(f"guardrail:{n}" for n in breached)
    if not enough:
        return ("NO-GO", ("max-duration-before-min-sample",)) if at_max else ("EXTEND", ("min-sample",))
    if verdict == "futile":
        return "NO-GO", ("futility",)
    if verdict == "non-inferior" and not unjudged:
        return "GO", ("non-inferior",)
    waiting = tuple(f"guardrail-not-judged:{n}" for n in unjudged) if verdict == "non-inferior" else ()
    if at_max:
        return "NO-GO", ("max-duration-inconclusive", *waiting)
    return "EXTEND", waiting or ("inconclusive",)


def _invalid_at_max(reasons: tuple[str, ...], at_max: bool) -> tuple[Outcome, tuple[str, ...]]:
    """INVALID, or at the maximum NO-GO (`max-duration-invalid`, the INVALID's reasons after it). A step's
    stored rows are kept (append-only) and no command reruns a step, so an INVALID that rests on them (a
    sample-ratio mismatch of externally assigned rows, a bad row) may never clear: it must end at the limit
    like an inconclusive step, never with a GO."""
    return ("NO-GO", ("max-duration-invalid", *reasons)) if at_max else ("INVALID", reasons)


def _invalid_input(observations, problems, history, base) -> Decision:
    """INVALID for a table that cannot be judged: the reasons name the columns; nothing else is computed."""
    frame = observations if isinstance(observations, pd.DataFrame) else pd.DataFrame()
    frame = frame.loc[:, ~frame.columns.duplicated()]  # a column named twice: its first, for the counts
    n = len(frame)
    arm = frame["arm"].astype(str) if "arm" in frame.columns else pd.Series([], dtype=str)
    quality = QualityEvidence(
        None,
        None,
        None,
        None,
        None,
        None,
        history.interval_low,
        history.interval_high,
        "not-evaluated",
        False,
    )
    outcome, reasons = _invalid_at_max(("invalid-input",), base["at_maximum"])
    decision = Decision(
        outcome=outcome,
        reasons=reasons,
        explanation="",
        n_control=int((arm == "control").sum()),
        n_treatment=int((arm == "treatment").sum()),
        n_pairs=None,
        unpaired_rows=0,
        observed_treatment_share=None,
        srm_chi2=None,
        srm_p_value=None,
        guardrails=(),
        quality=quality,
        error_rate_control=None,
        error_rate_treatment=None,
        p95_latency_control_ms=None,
        p95_latency_treatment_ms=None,
        data_fingerprint=data_fingerprint(frame) if n else "empty",
        input_problems=tuple(problems),
        **base,
    )
    return replace(decision, explanation=explain(decision))
