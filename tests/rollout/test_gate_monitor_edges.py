"""The monitor's checks pinned at their edges (`rollout.gate.detection`, `guardrails.judge_monitor`): each
test fails if a constant, a bet or a bound of the change detector changes (the cases a hand mutation pass
of rollout/gate/detection.py, sequences.py and the monitor's paths found unguarded). Pure and fast."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from rollout.gate import GuardrailCheck, check_observations, detection, judge
from rollout.gate.guardrails import breach_peak, judge_monitor, judge_monitor_quality, paired_excess_stream
from rollout.gate.quality import paired_arms
from rollout.gate.sequences import EXCESS_MIXTURE, RATE_MIXTURE, excess_log_capital, rate_factors

from .test_gate import paired_frame

ALPHA = 0.05


def _shadow(err_t: np.ndarray, q_t: np.ndarray | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Checked shadow rows (control then treatment per request, dense never failing, scoring 1) and
    their pairs, every pair one look."""
    n = err_t.size
    frame = paired_frame(np.ones(n), np.ones(n) if q_t is None else q_t, err_t=err_t)
    checked = check_observations(frame, mode="paired").frame
    return checked, paired_arms(checked).pairs.assign(look="one")


@pytest.mark.parametrize("comparison", ["rate", "excess"])
def test_one_look_of_the_monitor_is_the_steps_check_at_half_alpha_even_for_a_gross_breach(comparison) -> None:
    """docs/gate.md "The monitor": the detector runs the step's own components (the rate test's
    likelihood-ratio mixture, the excess check's constant bets `EXCESS_MIXTURE`), a champion bad from its
    first look paying log 2 more than the step's test: on one look it is the step's check at alpha / 2,
    bound for bound, also where the bound is so high that the bets' truncation decides it (90% errors in
    the sparse arm against a 5% ceiling, none in dense)."""
    rng = np.random.default_rng(11)
    err_t = rng.random(60) < 0.9
    frame, pairs = _shadow(err_t)
    check = GuardrailCheck("c", "error", comparison, 0.05, 10)
    trt = frame[frame["treated"]]
    looks = np.full(len(trt), "one", dtype=object)
    monitor = judge_monitor(check, trt.reset_index(drop=True), looks, alpha=ALPHA, pairs=pairs)
    step = judge(check, frame, alpha=ALPHA / 2, mode="paired", pairs=pairs)
    assert monitor.breached and step.breached
    assert step.lower_bound > 0.6  # where the truncation binds: trunc / m < each bet at m = c
    assert monitor.lower_bound == pytest.approx(step.lower_bound, abs=5e-4)


def test_a_quality_loss_alarm_reports_the_edge_of_what_the_detector_rejects() -> None:
    """The bound behind an alarm is the largest m the detector rejects ("the anytime-valid lower bound
    (the edge of the rejected m, as for the step's test)"): the loss since the evidence began lies above
    it, and the capital reaches 1/alpha just below it and not just above."""
    rng = np.random.default_rng(2)
    q_t = np.where(rng.random(240) < 0.3, 0.0, 1.0)  # the champion misses 30% of what dense gets right
    _, pairs = _shadow(np.zeros(240, bool), q_t=q_t)
    pairs = pairs.assign(look=np.repeat(np.arange(20), 12).astype(str))
    g = judge_monitor_quality(pairs, 0.03, alpha=ALPHA, min_samples=10)
    assert g.breached and 0.03 < g.lower_bound < g.value
    z = 1.0 - q_t
    factors, starts = detection.mean_factors_of(z, 0.03), np.arange(0, 240, 12)
    target = math.log(1 / ALPHA)
    assert detection.peak(factors, starts, g.lower_bound - 1e-3) >= target
    assert detection.peak(factors, starts, g.lower_bound + 1e-3) < target


def test_the_loss_mixture_weights_sum_to_one() -> None:
    """Fixed weights summing to 1 keep the mixture a supermartingale from 1 (docs/gate.md: the quality
    check's bets g 0.1 / 0.2 / 0.4 / 0.8 at equal weights); weights summing to more would multiply the
    false alarm."""
    weights = [w for _, w in detection.LOSS_MIXTURE]
    assert sum(weights) == pytest.approx(1.0) and len(set(weights)) == 1
    assert [g for g, _ in detection.LOSS_MIXTURE] == [0.1, 0.2, 0.4, 0.8]


@pytest.mark.parametrize("check", ["rate", "excess", "quality_loss"])
def test_a_monitor_check_alarms_when_its_detector_reaches_one_over_alpha(check: str) -> None:
    """Ville's inequality bounds P(ever M_t >= 1/alpha) by alpha, so that is the alarm (>=, as the step's
    tests): at the alpha whose log(1/alpha) is the detector's peak to the last bit the check is breached,
    just above it not. Four looks of 12 pairs; the champion fails or loses on a sixth of them."""
    bad = np.arange(48) % 6 == 0
    frame, pairs = _shadow(
        bad if check != "quality_loss" else np.zeros(48, bool), q_t=np.where(bad, 0.0, 1.0)
    )
    looks = np.repeat(["a", "b", "c", "d"], 12).astype(object)
    pairs = pairs.assign(look=looks)
    trt = frame[frame["treated"]].reset_index(drop=True)
    if check == "quality_loss":
        factors = detection.mean_factors_of(bad.astype(float), 0.03)

        def judged(alpha: float):
            return judge_monitor_quality(pairs, 0.03, alpha=alpha, min_samples=10)
    else:
        guard = GuardrailCheck("c", "error", check, 0.02, 10)
        factors = (
            detection.rate_factors_of(bad.astype(float), 0.02)
            if check == "rate"
            else detection.mean_factors_of(bad.astype(float), 0.02, mixture=EXCESS_MIXTURE)
        )

        def judged(alpha: float):
            return judge_monitor(guard, trt, looks, alpha=alpha, pairs=pairs)

    peak = detection.peak(factors, detection.look_starts(looks))
    alpha = math.exp(-peak)
    assert 0.001 < alpha < 0.5 and math.log(1 / alpha) == peak  # a plausible level; the tie is exact
    assert judged(alpha).breached
    assert not judged(alpha * 0.999).breached


def _evidence_start_by_hand(parts: list[tuple[float, np.ndarray]], starts: np.ndarray) -> int:
    """The evidence's first look as docs/gate.md defines it, by loops: the detector's peak row (the
    capital summed over looks and components term by term), then the candidate start from which one
    component's capital grew most up to that row."""
    capital = [
        sum(
            math.exp(log_v + steps[s : t + 1].sum()) / (k * (k + 1))
            for k, s in enumerate(starts[starts <= t], start=1)
            for log_v, steps in parts
        )
        for t in range(parts[0][1].size)
    ]
    peak_row = int(np.argmax(capital))
    growth = {
        (k, j): steps[s : peak_row + 1].sum()
        for k, s in enumerate(starts[starts <= peak_row])
        for j, (_, steps) in enumerate(parts)
    }
    return max(growth, key=growth.get)[0]


@pytest.mark.parametrize(("check", "seed"), [("rate", 27), ("rate", 44), ("quality_loss", 1033)])
def test_the_evidence_begins_where_a_components_capital_grew_most_by_the_peak(check: str, seed: int) -> None:
    """The look an alarm quotes ("the evidence begins with look k") is the CUSUM estimate: among the
    looks begun by the detector's peak, the one from which a component's capital grew most to it (not
    the latest row's, not the smallest component's). Ten looks of 8 rows whose error rate (loss) changes
    from look to look, bursts and healthy stretches, each raising an alarm, checked against the
    definition by loops."""
    rng = np.random.default_rng(seed)
    starts = np.arange(0, 80, 8)
    if check == "rate":
        rate = np.repeat(rng.choice([0.0, 0.02, 0.3, 0.6], size=10), 8)
        x = (rng.random(80) < rate).astype(float)
        factors = detection.rate_factors_of(x, 0.05)
    else:
        loss = np.repeat(rng.choice([0.0, 0.1, 0.3, 0.6], size=10), 8)
        z = np.where(rng.random(80) < loss, 1.0, 0.0) - np.where(rng.random(80) < 0.1, 1.0, 0.0)
        factors = detection.mean_factors_of(z, 0.03)
    assert detection.detected(factors, starts, ALPHA)
    assert detection.evidence_start(factors, starts) == _evidence_start_by_hand(factors(None), starts)


def test_an_excess_check_is_breached_by_its_mixture_not_by_its_boldest_bet_alone() -> None:
    """The excess check's capital is the fixed-weight average of its constant bets (`EXCESS_MIXTURE`,
    docs/gate.md "The excess over control"): the step is breached when that average reaches 1/alpha, and
    not when only its boldest bet's capital has (a level between the two: no breach; the average's peak to
    the last bit: breach, though healthy pairs since have lowered it: the test takes the running maximum).
    The shortcut that settles most crossings without the average must agree."""
    err_t = np.r_[np.arange(120) % 7 == 0, np.zeros(60, bool)]  # 15% sparse-arm failures, then none
    frame, pairs = _shadow(err_t)
    check = GuardrailCheck("error_rate_increase", "error", "excess", 0.02, 10)
    stream = paired_excess_stream(err_t.astype(float), np.zeros(err_t.size))
    mixed = breach_peak(stream, check)
    boldest = max(
        float(excess_log_capital(stream, 0.02, mixture=((gain, 1.0),)).max()) for gain, _ in EXCESS_MIXTURE
    )
    assert mixed + 0.2 < boldest and float(excess_log_capital(stream, 0.02)[-1]) < mixed - 0.5
    assert not judge(check, frame, alpha=math.exp(-(mixed + 0.1)), mode="paired", pairs=pairs).breached
    alpha = math.exp(-mixed)
    assert (
        math.log(1 / alpha) == mixed and judge(check, frame, alpha=alpha, mode="paired", pairs=pairs).breached
    )


def test_the_monitors_latency_check_leaves_out_rows_collected_under_overload() -> None:
    """A latency measured while the host was oversubscribed is the host's, not the champion's
    (docs/flows.md: left out of the latency guardrail, whose evidence says how many): the monitor's
    latency check judges the other rows with their own looks. A first look collected under overload, all
    over the SLO, is no evidence; a later look all over it is, and the alarm names it among the looks
    judged."""
    latency = np.r_[np.full(6, 500.0), np.full(12, 100.0), np.full(12, 500.0)]
    rows = pd.DataFrame(
        {
            "request_id": [f"m{i}" for i in range(30)],
            "arm": "treatment",
            "quality": 1.0,
            "latency_ms": latency,
            "error": False,
            "overloaded": np.arange(30) < 6,
        }
    )
    frame = check_observations(rows, mode="split").frame
    looks = np.repeat(["a", "b", "c"], [6, 12, 12]).astype(object)
    check = GuardrailCheck("treatment_latency_over_slo", "latency_over_slo", "rate", 0.05, 10, slo_ms=200.0)
    g = judge_monitor(check, frame, looks, alpha=ALPHA)
    assert g.breached and g.excluded == 6 and g.n == 24 and g.value == 1.0
    assert g.note == (
        "the evidence begins with look 2 of 2 (12 rows since); "
        "6 sparse-arm rows collected under CPU overload left out"
    )


@pytest.mark.parametrize("pairs_seen", [9, 10])
def test_a_monitor_check_is_judged_once_it_has_exactly_its_minimum(pairs_seen: int) -> None:
    """A check with fewer rows than its minimum is not judged (docs/gate.md); at the minimum it is: 10
    identical pairs of a 10-pair minimum hold, 9 say how many they wait for."""
    _, pairs = _shadow(np.zeros(pairs_seen, bool))
    g = judge_monitor_quality(pairs, 0.03, alpha=ALPHA, min_samples=10)
    assert not g.breached and g.n == pairs_seen
    assert (g.evaluated, g.note) == (
        (True, "") if pairs_seen == 10 else (False, "needs 10 rows to be judged (9 so far)")
    )


def test_a_monitor_breach_shown_below_the_checks_minimum_counts_as_judged() -> None:
    """Evidence of a breach counts whatever the sample size (docs/gate.md): 9 pairs the champion loses
    wholly, against a 10-pair minimum, are a judged breach of the quality check, not a check waiting."""
    _, pairs = _shadow(np.zeros(9, bool), q_t=np.zeros(9))
    g = judge_monitor_quality(pairs, 0.03, alpha=ALPHA, min_samples=10)
    assert g.breached and g.evaluated and g.n == 9


@pytest.mark.parametrize(("per_arm", "guardrails"), [(200, 40), (40, 200)])
def test_the_monitors_quality_check_is_judged_from_the_guardrails_minimum(
    per_arm: int, guardrails: int
) -> None:
    """Mutation P02: `quality_loss` took its minimum from `guardrail_min_samples`, and the pilot step's
    `min_samples_per_arm` in its place went unnoticed. The monitor has no step quality test: its quality
    check is one of its checks on live traffic, judged (`evaluated`, the note) from the spec's
    `gate.guardrails.min_samples`, as the rate and excess checks beside it (docs/gate.md "The monitor")."""
    from rollout.pilots import monitor_guardrails

    rows = [
        {"request_id": f"r{i}", "arm": arm, "quality": 1.0, "latency_ms": 10.0, "error": 0}
        for i in range(60)
        for arm in ("control", "treatment")
    ]
    spec = {"gate": {"min_samples_per_arm": per_arm, "guardrails": {"min_samples": guardrails}}}
    checks = {c["name"]: c for c in monitor_guardrails(rows, spec)["checks"]}
    loss = checks["quality_loss"]
    assert loss["evaluated"] is (60 >= guardrails) is checks["error_rate_increase"]["evaluated"]
    assert loss["note"] == ("" if 60 >= guardrails else f"needs {guardrails} rows to be judged (60 so far)")


@pytest.mark.parametrize("ceiling", [0.02, 0.25, 0.3, 0.4, 0.5, 0.7, 0.9])
def test_each_rate_component_is_a_likelihood_ratio_at_most_halfway_to_one(ceiling: float) -> None:
    """Mutation S14: `rate_factors` holds each alternative p_j = multiple x c to (1 + c) / 2, and losing
    that went unnoticed (it binds only above c = 2/7). At m = c every component's factors are the likelihood
    ratio of Bernoulli(p_j) to Bernoulli(c) (a martingale at c), p_j = multiple x c below the clip and
    (1 + c) / 2 above it, so p_j < 1 and a zero costs a component at most half its capital; without the
    clip 2.25 x 0.3 bets a zero down to 0.46, and from c = 0.375 on the truncation takes over the bet."""
    for (multiple, weight), (log_w, on_one, on_zero) in zip(RATE_MIXTURE, rate_factors(ceiling), strict=True):
        p = ceiling * math.exp(on_one)  # the alternative whose likelihood ratio the component is
        assert log_w == pytest.approx(math.log(weight))
        assert p + (1 - ceiling) * math.exp(on_zero) == pytest.approx(1.0, abs=1e-12)  # E[factor] = 1 at c
        assert p == pytest.approx(min(multiple * ceiling, (1 + ceiling) / 2), abs=1e-12) and p < 1
        assert math.exp(on_zero) >= 0.5 - 1e-12


def test_a_file_is_refused_as_sorted_only_on_the_exact_probability_of_its_order() -> None:
    """`outcome_sorted`: rows monotone in latency (or quality) in the file's order, with P(a random order is
    that monotone) = 2 prod(g_i!) / n! below 1e-6. Ten distinct latencies ascending: 2/10! = 5.5e-7,
    refused; nine: 5.5e-6, taken; ties counted (twenty rows in ten tied pairs: 2 * 2^10 / 20! ~ 8.4e-16);
    one value throughout, or one row out of order, is never a sorted file. The error flag (a bool, read as
    0/1; review V2): k errors first among n rows, 2 / C(n, k): 10 of 40 refused, 8 of 20 (1.6e-5) taken."""
    from rollout.outcome_sorted import SORTED_LEVEL, log_p_monotone, sorted_column

    def rows(lat: list[float], q: float | list[float] = 0.9, errors: int = 0) -> list[dict]:
        qs = q if isinstance(q, list) else [q] * len(lat)
        return [
            {"latency_ms": x, "quality": y, "error": i < errors}
            for i, (x, y) in enumerate(zip(lat, qs, strict=True))
        ]

    assert math.exp(log_p_monotone(list(range(10)))) == pytest.approx(2 / math.factorial(10))
    assert sorted_column(rows(list(range(10)))) == ("latency_ms", pytest.approx(2 / math.factorial(10)))
    assert 2 / math.factorial(9) > SORTED_LEVEL and sorted_column(rows(list(range(9)))) is None
    tied = [float(i // 2) for i in range(20)]
    assert math.exp(log_p_monotone(tied)) == pytest.approx(2 * 2**10 / math.factorial(20))
    assert sorted_column(rows(tied[::-1]))[0] == "latency_ms"  # descending too
    assert sorted_column(rows([5.0] * 30)) is None
    assert sorted_column(rows([1.0, 3.0, 2.0, *range(4, 40)])) is None
    assert sorted_column(rows([7.0, 1.0] * 10, q=[i / 20 for i in range(20)]))[0] == "quality"
    unsorted = [7.0, 1.0, 4.0, 9.0]  # neither latency nor quality in order
    assert sorted_column(rows(unsorted * 10, errors=10)) == ("error", pytest.approx(2 / math.comb(40, 10)))
    assert sorted_column(rows(unsorted[::-1] * 10, errors=40)) is None  # every row an error: no order
    assert 2 / math.comb(20, 8) > SORTED_LEVEL and sorted_column(rows(unsorted * 5, errors=8)) is None
