"""The gate's rules pinned at their edges: each test fails if a comparison, a constant or a branch of a rule
changes (the cases a hand mutation pass of rollout/gate found unguarded). Pure, small and fast."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest

from rollout.gate import GateHistory, GateSettings, check_observations, decide, guardrail_checks, judge
from rollout.gate.guardrails import breach_peak
from rollout.gate.planning import (
    PLANNING_REPLICATIONS,
    PLANNING_SEED,
    PlanningDraws,
    first_go,
    planned_sample_size,
    planning_draws,
    projected_sample_size,
)
from rollout.gate.quality import paired_arms, prior
from rollout.gate.sequences import rate_stream, rejects
from rollout.gate.spending import account, pilot_alpha

from .test_gate import paired_frame, split_frame

EDGE = GateSettings(margin=0.05, min_samples_per_arm=20, guardrail_min_samples=20)


@pytest.mark.parametrize("pairs", [99, 100])
def test_a_shadow_steps_minimum_is_reached_at_exactly_its_pairs(pairs: int) -> None:
    """min_samples_per_arm is a minimum (n >= it): identical pairs at margin 0.05 show non-inferiority
    after ~65-76 pairs, so 100 pairs of a 100-pair minimum GO and 99 wait for the minimum."""
    d = decide(paired_frame(np.ones(pairs), np.ones(pairs)), EDGE, mode="paired", min_samples_per_arm=100)
    assert d.quality.verdict == "non-inferior"
    assert (d.outcome, d.reasons) == (
        ("GO", ("non-inferior",)) if pairs == 100 else ("EXTEND", ("min-sample",))
    )


@pytest.mark.parametrize(("n_control", "expected"), [(99, "EXTEND"), (100, "GO")])
def test_a_split_steps_minimum_is_per_arm_reached_at_exactly_its_rows(n_control: int, expected: str) -> None:
    """A split step's minimum holds when its smaller arm has min_samples_per_arm rows: 100 control rows
    (and more sparse-arm ones) of a 100-row minimum can GO; 99 wait, however many the other arm has."""
    n_t = 400
    treated = np.r_[np.ones(n_t, bool), np.zeros(n_control, bool)]
    treated = treated[np.random.default_rng(5).permutation(treated.size)]
    d = decide(
        split_frame(np.ones(treated.size), treated),
        EDGE,
        planned_treatment_share=n_t / treated.size,
        min_samples_per_arm=100,
    )
    assert (d.n_control, d.n_treatment) == (n_control, n_t)
    assert d.outcome == expected and ("min-sample" in d.reasons) == (expected == "EXTEND")


def test_a_guardrail_not_judged_projects_the_requests_its_minimum_takes() -> None:
    """While a guardrail waits for its minimum of sparse-arm rows, the projection asks for them: in a
    shadow step the guardrails' minimum in pairs, in a split step that minimum over the treatment share
    (docs/gate.md "Planning": min / share)."""
    s = GateSettings(margin=0.05, min_samples_per_arm=20, guardrail_min_samples=150)
    d = decide(paired_frame(np.ones(80), np.ones(80)), s, mode="paired")
    assert (d.outcome, d.quality.verdict) == ("EXTEND", "non-inferior")
    assert d.reasons[0].startswith("guardrail-not-judged:") and d.projected_requests == 150
    treated = np.arange(600) % 5 == 0  # 120 sparse-arm rows of the 150 at a 20% share
    d = decide(split_frame(np.ones(600), treated), s, planned_treatment_share=0.2)
    assert d.outcome == "EXTEND" and d.projected_requests is not None and d.projected_requests >= 750


@pytest.mark.parametrize(("pairs", "tested"), [(1, False), (2, True)])
def test_two_observations_are_tested_and_count_toward_the_interval(pairs: int, tested: bool) -> None:
    """The bounds are valid at any sample size: a look with two observations is tested and counts toward
    the running interval; one observation is not tested (its interval is the history's)."""
    d = decide(paired_frame(np.ones(pairs), np.ones(pairs)), EDGE, mode="paired")
    assert d.quality.counts_toward_interval is tested and (d.quality.look_low is not None) is tested
    assert d.quality.verdict == ("inconclusive" if tested else "not-evaluated")


def test_an_interval_that_shrinks_to_a_point_is_no_reset() -> None:
    """The running interval restarts only when it would be empty: a look whose lower bound is exactly the
    history's upper end leaves the single point, no reset."""
    frame = paired_frame(np.ones(40), np.ones(40))
    low = decide(frame, EDGE, mode="paired").quality.look_low
    d = decide(frame, EDGE, GateHistory(looks=1, interval_low=-1.0, interval_high=low), mode="paired")
    assert d.quality.look_low == low and not d.quality.interval_reset and d.quality.interval_low == low


@pytest.mark.parametrize(("low", "high"), [(-0.01, 1.0), (-1.0, -0.06)])
def test_an_inconclusive_looks_interval_keeps_minus_the_margin_inside(low: float, high: float) -> None:
    """The bounds shown are kept on the verdict's side of -margin (docs/gate.md): however the earlier
    looks' interval lies, an inconclusive look reports an interval holding -margin, never one that reads
    as shown non-inferior (low above it) or shown futile (high below it)."""
    frame = paired_frame(np.ones(40), np.ones(40))
    d = decide(frame, EDGE, GateHistory(looks=1, interval_low=low, interval_high=high), mode="paired")
    assert d.quality.verdict == "inconclusive" and d.outcome == "EXTEND"
    assert d.quality.interval_low <= -EDGE.margin <= d.quality.interval_high


def test_an_inconclusive_step_waits_on_its_quality_not_on_an_unjudged_guardrail() -> None:
    """`guardrail-not-judged:NAME` is the reason only where quality is already shown non-inferior; an
    inconclusive step with a guardrail short of its minimum says inconclusive (docs/gate.md's table)."""
    s = GateSettings(margin=0.05, min_samples_per_arm=20, guardrail_min_samples=100)
    d = decide(paired_frame(np.ones(40), np.ones(40)), s, mode="paired")
    assert not any(g.evaluated for g in d.guardrails) and d.quality.verdict == "inconclusive"
    assert (d.outcome, d.reasons) == ("EXTEND", ("inconclusive",))


def test_a_sample_ratio_p_value_at_the_threshold_is_no_mismatch() -> None:
    """The mismatch is p < srm_p_threshold (docs/gate.md): a split whose p-value is the threshold itself
    is not INVALID."""
    treated = np.arange(1000) < 550  # 550 of 1000 sparse-arm rows against a planned half
    frame = split_frame(np.ones(1000), treated[np.random.default_rng(6).permutation(1000)])
    p = decide(frame, EDGE, planned_treatment_share=0.5).srm_p_value
    at = decide(frame, dataclasses.replace(EDGE, srm_p_threshold=p), planned_treatment_share=0.5)
    assert at.srm_p_value == p and "sample-ratio-mismatch" not in at.reasons
    above = decide(
        frame, dataclasses.replace(EDGE, srm_p_threshold=p * 1.000001), planned_treatment_share=0.5
    )
    assert above.outcome == "INVALID" and "sample-ratio-mismatch" in above.reasons


@pytest.mark.parametrize(("n", "sparse"), [(12, 4), (12, 3), (8, 3), (240, 25)])
def test_the_sample_ratio_check_is_the_exact_binomial_test(n: int, sparse: int) -> None:
    """Review S4: Pearson's chi-square at an early look of a small share (12 requests at 5%: 0.6 sparse
    rows expected) called 4 sparse rows a mismatch (p 7e-6) where the exact probability of 4 or more is
    0.002, and its false INVALID per look was up to 13x the level. The p-value is the exact test's, whose
    false rate is at most the level at every look size."""
    from scipy.stats import binom, binomtest

    from rollout.gate.inputs import srm_test

    share = 0.05
    assert srm_test(n - sparse, sparse, share)[1] == pytest.approx(binomtest(sparse, n, share).pvalue)
    k = np.arange(n + 1)
    refused = np.array([srm_test(n - i, i, share)[1] < 0.001 for i in k])
    assert binom.pmf(k[refused], n, share).sum() <= 0.001  # its size, exactly: at most the level


def _one_arm_after_the_other(seed: int, share: float, shift: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A split step's rows with every dense row first (one log imported after the other), the sparse arm's
    Beta(8, 2) scores moved by `shift`: (quality, treated) in that order."""
    rng = np.random.default_rng(seed)
    treated = rng.random(n) < share
    q = np.where(treated, np.clip(rng.beta(8, 2, n) + shift, 0.0, 1.0), rng.beta(8, 2, n))
    order = np.argsort(treated, kind="stable")
    return q[order], treated[order]


CROSSED = GateSettings(margin=0.03, go_alpha=0.0304)


def test_a_crossed_look_whose_futility_test_rejects_is_no_go_at_once() -> None:
    """Review S3: the sparse arm 0.10 worse, its rows after the dense arm's: the GO capital grew on the dense
    rows alone and the look said GO, its bounds "at least -0.010 ... at most -0.762". Both tests reject:
    the evidence contradicts itself, and that look was INVALID, final for the step but NO-GO only at its
    maximum, so a step whose own futility test had rejected kept sending users to the sparse arm for up to
    max_looks more looks. The futility test's level holds on its own: NO-GO now, the crossing named beside
    futility, the interval not carried. Never GO. Below the step's minimum sample futility decides nothing,
    so the crossing stays INVALID there."""
    q, treated = _one_arm_after_the_other(8, 0.1, -0.10, 4000)
    d = decide(split_frame(q, treated), CROSSED, planned_treatment_share=0.1)
    assert d.quality.look_low > d.quality.look_high
    assert (d.outcome, d.reasons) == ("NO-GO", ("futility", "crossed-bounds"))
    assert not d.quality.counts_toward_interval
    assert "both tests rejected" in d.explanation and "The evidence contradicts itself" in d.explanation
    assert "The NO-GO rests on the futility test alone" in d.explanation
    assert "This is final" not in d.explanation
    short = decide(
        split_frame(q, treated), CROSSED, planned_treatment_share=0.1, min_samples_per_arm=d.n_treatment + 1
    )
    assert (short.outcome, short.reasons) == ("INVALID", ("crossed-bounds",))
    shuffled = decide(split_frame(*_shuffled(q, treated)), CROSSED, planned_treatment_share=0.1)
    assert shuffled.outcome == "NO-GO" and shuffled.reasons == ("futility",)


def test_a_crossed_look_that_breaches_a_guardrail_names_the_breach_as_its_ground() -> None:
    """Review Q4: a crossed look whose sparse arm also erred 20% was NO-GO for the breached guardrails
    (its reasons, what the portfolio shows), while its explanation said it rested on the futility test
    alone. The explanation now names the ground its reasons give."""
    q, treated = _one_arm_after_the_other(8, 0.1, -0.10, 4000)
    error = treated & (np.arange(len(q)) % 5 == 0)
    d = decide(split_frame(q, treated, error=error), CROSSED, planned_treatment_share=0.1)
    assert d.outcome == "NO-GO" and d.reasons[-1] == "crossed-bounds", d.reasons
    assert d.reasons[0].startswith("guardrail:"), d.reasons
    assert "futility test alone" not in d.explanation, d.explanation
    assert "The NO-GO rests on the breached safety limits named below, and the futility test rejects" in (
        d.explanation
    )
    assert "Safety limit broken" in d.explanation


def _shuffled(q: np.ndarray, treated: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(0).permutation(len(q))
    return q[order], treated[order]


def test_a_crossed_look_without_a_futility_rejection_is_invalid_never_go() -> None:
    """The sparse arm 0.20 better, its rows after the dense arm's: the lower bound above the upper with only
    the GO test rejecting. Neither bound holds: INVALID, never GO, and the explanation says it is final for
    the step and names the way out (review W2: it said nothing, and the step repeated INVALID look after
    look up to its maximum)."""
    q, treated = _one_arm_after_the_other(0, 0.5, 0.20, 2000)
    d = decide(split_frame(q, treated), CROSSED, planned_treatment_share=0.5)
    assert d.quality.look_low > d.quality.look_high > -CROSSED.margin  # futility does not reject
    assert (d.outcome, d.reasons) == ("INVALID", ("crossed-bounds",))
    assert not d.quality.counts_toward_interval and "The evidence contradicts itself" in d.explanation
    assert "both tests rejected" not in d.explanation
    # review W2: both tests keep their running maximum, so later looks repeat it until the step's NO-GO
    assert "This is final for this step" in d.explanation and "more rows will not clear this" in d.explanation
    assert "abort the pilot and pilot again" in d.explanation


def test_a_crossing_is_ended_by_an_abort_and_a_pilot_again_in_every_text() -> None:
    """The rows' order crosses the bounds, not the challenger: the remedy said "calibrate a new challenger
    (`sparsepilot calibrate NAME`) and pilot it" where the gate's explanation said "abort the pilot and pilot
    again" and the portfolio "start over with a new challenger". Now all three say abort and pilot again,
    the remedy with the order that carries no information (each export whole, or in time slices) and what
    the command that pilots the aborted pilot's challenger again (`pilot NAME --again`); at the maximum
    (a NO-GO), the way to another plan."""
    from rollout.decisions import invalid_remedy
    from rollout.pilots import pilot_again
    from rollout.queries import waits_for

    q, treated = _one_arm_after_the_other(0, 0.5, 0.20, 2000)
    d = decide(split_frame(q, treated), CROSSED, planned_treatment_share=0.5)
    assert d.reasons == ("crossed-bounds",) and "abort the pilot and pilot again" in d.explanation
    remedy = invalid_remedy("docs-qa", d.outcome, d.reasons, 50.0)
    assert remedy.startswith(
        'To start over: `sparsepilot pilot docs-qa --abort --reason "..."`, then `sparsepilot pilot docs-qa '
        '--again --reason "..."` pilots its challenger again'
    )
    assert "not on the challenger" in remedy and "each export whole" in remedy and "time slices" in remedy
    assert "`sparsepilot calibrate" not in remedy
    row = {"pilot_status": "running", "decision": d.outcome, "decision_kind": "gate", "awaiting": "none",
           "decision_reasons": list(d.reasons), "step_kind": "split"}  # fmt: skip
    assert waits_for(row | {"name": "docs-qa"}).startswith(
        "an operator: abort the pilot (`sparsepilot pilot docs-qa --abort --reason TEXT`) and pilot its "
        "challenger again (`sparsepilot pilot docs-qa --again --reason TEXT`)"
    )
    assert waits_for(row).endswith("(data not trusted: crossed bounds)")
    last = decide(split_frame(q, treated), CROSSED, planned_treatment_share=0.5, now_look=CROSSED.max_looks)
    assert (last.outcome, last.reasons) == ("NO-GO", ("max-duration-invalid", "crossed-bounds"))
    at_max = invalid_remedy("docs-qa", last.outcome, last.reasons, 50.0)
    assert (
        at_max.startswith("To pilot again:") and "--abort" not in at_max and "not on the challenger" in at_max
    )
    assert pilot_again("docs-qa") in at_max and "--again" not in at_max  # a NO-GO judged the plan


def test_one_guardrail_short_of_its_minimum_is_enough_to_project_it() -> None:
    """The projection waits for every guardrail: with the error-rate check judged on 200 sparse-arm rows
    but the excess over dense short of its 190 pairs (170 requests have both answers), a shadow step whose
    quality is shown is projected at the 190 pairs, not at the 170 in hand."""
    s = GateSettings(margin=0.05, min_samples_per_arm=20, guardrail_min_samples=190)
    frame = paired_frame(np.ones(200), np.ones(200))
    frame = frame[(frame["arm"] == "treatment") | (frame.index < 340)]  # dense answers for r0..r169 only
    d = decide(frame, s, mode="paired")
    judged = {g.name: g.evaluated for g in d.guardrails}
    assert judged["treatment_error_rate"] and not judged["error_rate_increase"]
    assert (d.outcome, d.reasons) == ("EXTEND", ("guardrail-not-judged:error_rate_increase",))
    assert d.projected_requests == 190


def test_bad_data_comes_before_a_breached_guardrail() -> None:
    """Bad data never decides (docs/gate.md, order of precedence): a step whose data check failed is
    INVALID even where its rows show a guardrail breached."""
    many = np.arange(400) % 8 == 0  # 12.5% sparse-arm errors against a 2% ceiling
    frame = paired_frame(np.ones(400), np.ones(400), err_t=many)
    assert decide(frame, EDGE, mode="paired").outcome == "NO-GO"
    d = decide(frame, EDGE, mode="paired", data_check_passed=False, data_check_failures=["quality: not null"])
    assert (d.outcome, d.reasons) == ("INVALID", ("data-check-failed",))


def test_a_breach_shown_below_the_checks_minimum_counts_as_judged() -> None:
    """Evidence of a breach counts whatever the sample size: 12.5% sparse-arm errors in 400 rows, against a
    2% ceiling whose check asks for 1,000 rows, is a judged breach in the evidence (status breached,
    evaluated), while the checks without evidence stay not judged."""
    s = GateSettings(
        margin=0.05,
        min_samples_per_arm=20,
        guardrail_min_samples=1000,
        max_error_rate=0.02,
        max_error_rate_increase=0.5,
    )
    many = np.arange(400) % 8 == 0
    d = decide(paired_frame(np.ones(400), np.ones(400), err_t=many), s, mode="paired")
    g = {g.name: g for g in d.guardrails}
    assert d.reasons == ("guardrail:treatment_error_rate",)
    assert g["treatment_error_rate"].evaluated and g["treatment_error_rate"].status == "breached"
    assert not g["error_rate_increase"].evaluated and g["error_rate_increase"].status == "not-judged"


def test_a_rate_check_is_breached_when_its_capital_reaches_one_over_alpha() -> None:
    """Ville's test rejects when the capital reaches 1/alpha (>=, as the quality tests): at the alpha whose
    log(1/alpha) is the capital's peak to the last bit, the check is breached; just above it, not."""
    check = guardrail_checks(GateSettings(max_error_rate=0.02, guardrail_min_samples=1))[0]
    errors = np.arange(200) % 10 == 0
    frame = check_observations(
        split_frame(np.ones(200), np.ones(200, bool), error=errors), mode="split"
    ).frame
    peak = breach_peak(rate_stream(errors.astype(float)), check)
    alpha = math.exp(-peak)
    assert math.log(1 / alpha) == peak  # the tie is exact
    assert judge(check, frame, alpha=alpha, mode="split").breached
    assert not judge(check, frame, alpha=alpha * 0.999, mode="split").breached


def test_futility_stops_at_the_specs_alpha_not_at_the_pilots_go_level() -> None:
    """Only GO spends (docs/gate.md "Across a use case's pilots"): a later pilot whose GO is held to 0.001
    still stops a sparse arm that loses a quarter of the requests at alpha 0.05, once the futility
    capital reaches log 20, well before log 1000."""
    s = GateSettings(margin=0.05, min_samples_per_arm=2, guardrail_min_samples=2, go_alpha=0.001)
    lost = (np.arange(29) % 4 != 0).astype(float)
    d = decide(paired_frame(np.ones(29), lost), s, mode="paired")
    assert (d.outcome, d.reasons) == ("NO-GO", ("futility",))
    assert math.log(1 / s.alpha) <= d.quality.log_capital_futility < math.log(1 / s.go_alpha)


def test_pairs_enter_the_stream_in_the_order_they_became_complete() -> None:
    """A shadow step's stream takes each pair at its later row, so an earlier look's pairs are always a
    prefix of a later look's: r0's dense answer first, then r1 in full, then r0's sparse answer gives
    r1's pair before r0's, as the look after row 2 already had it."""
    rows = pd.DataFrame(
        {
            "request_id": ["r0", "r1", "r1", "r0"],
            "arm": ["control", "control", "treatment", "treatment"],
            "quality": [1.0, 0.5, 0.5, 0.0],  # r0 loses 1, r1 nothing
            "latency_ms": 100.0,
            "error": False,
        }
    )
    arms = paired_arms(check_observations(rows, mode="paired").frame)
    earlier = paired_arms(check_observations(rows.iloc[:3], mode="paired").frame)
    assert arms.pairs["row"].tolist() == [2, 3] and arms.stream.z.tolist()[:1] == earlier.stream.z.tolist()
    assert arms.stream.z.tolist() == [0.0, -1.0]


def test_only_the_lower_bound_is_held_to_the_pilots_go_level() -> None:
    """The reported interval has its lower end at the GO level and its upper end at alpha (docs/gate.md):
    a later pilot's smaller GO level lowers the lower bound and leaves the upper one as it is."""
    rng = np.random.default_rng(7)
    qc = rng.beta(8, 2, 300)
    frame = paired_frame(qc, np.clip(qc + rng.normal(-0.02, 0.1, 300), 0, 1))
    first = decide(frame, EDGE, mode="paired").quality
    later = decide(frame, dataclasses.replace(EDGE, go_alpha=0.001), mode="paired").quality
    assert later.look_high == first.look_high < 1 and later.look_low < first.look_low


@pytest.mark.parametrize("flag", [2, -1, 0.5])
def test_an_error_flag_that_is_a_number_other_than_0_or_1_is_invalid(flag: float) -> None:
    """The error column is 0/1 (or true/false): another number is not read as an error but named."""
    frame = paired_frame(np.ones(30), np.ones(30))
    frame["error"] = frame["error"].astype(float).where(frame.index != 3, flag)
    d = decide(frame, EDGE, mode="paired")
    assert (d.outcome, d.reasons) == ("INVALID", ("invalid-input",))
    assert d.input_problems == ("column 'error': not 0/1 or true/false in 1 row(s), e.g. at rows [3]",)


def test_a_use_case_spent_past_alpha_leaves_a_level_of_zero_never_below() -> None:
    """Two pilots that ran at alpha itself (before spending) spent 2 alpha: a next pilot's level is 0.0
    (nothing is left), never a negative alpha; and alpha itself must be below 1."""
    assert pilot_alpha(0.05, 3, spent_before=0.1) == 0.0
    assert account({"alpha": 0.05}, [None, None])["next_go_alpha"] == 0.0
    with pytest.raises(ValueError, match="alpha must be in"):
        pilot_alpha(1.0, 1)


def test_the_planned_size_is_the_smallest_with_the_asked_power() -> None:
    """planned_sample_size is the smallest number of pairs by which `power` of the simulated pilots have
    said GO: at it they have (80%), one pair fewer they have not."""
    s = GateSettings(margin=0.1, score_type="binary", planned_sd=0.3)
    plan = planned_sample_size(s, paired=True)
    rng = np.random.default_rng(PLANNING_SEED)
    draws, _ = planning_draws(s, rng, paired=True, share=0.5, reps=PLANNING_REPLICATIONS, n=plan.horizon)
    first = first_go(draws, s, kind="paired")
    assert np.mean(first <= plan.n_total) >= s.power > np.mean(first <= plan.n_total - 1)


def test_a_simulated_pilots_first_go_is_the_pair_at_which_its_capital_reaches_one_over_alpha() -> None:
    """first_go counts pairs from 1, as decide does: identical pairs GO at the 65th at margin 0.05
    (decide says GO there and EXTEND one pair before), and at a GO level whose log(1/alpha) is the
    capital after pair 40 to the last bit, at the 40th (reaching is enough)."""
    s = GateSettings(margin=0.05, min_samples_per_arm=2, guardrail_min_samples=2)
    draws = PlanningDraws(np.zeros((1, 120)), None, 0.5)
    need = int(first_go(draws, s, kind="paired")[0])
    assert need == 65
    assert decide(paired_frame(np.ones(need), np.ones(need)), s, mode="paired").outcome == "GO"
    assert decide(paired_frame(np.ones(need - 1), np.ones(need - 1)), s, mode="paired").outcome == "EXTEND"
    _, logk = rejects(draws.stream(slice(None)), -0.05, "lower", 0.05, **prior(s, "paired", 0.5))
    tie = dataclasses.replace(s, alpha=0.2, go_alpha=math.exp(-logk[0, 39]))
    assert math.log(1 / tie.alpha_go) == logk[0, 39]  # the tie is exact
    assert first_go(draws, tie, kind="paired")[0] == 40


def test_a_projection_is_never_fewer_than_the_requests_in_hand() -> None:
    """Where the GO test's capital is already past log(1/alpha) (quality shown, the step waiting for
    something else) the projection is the observations in hand, not fewer."""
    arms = paired_arms(check_observations(paired_frame(np.ones(80), np.ones(80)), mode="paired").frame)
    assert projected_sample_size(arms.stream, m0=-0.05, log_capital_now=10.0, alpha=0.05) == 80
