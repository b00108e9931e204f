"""Hand-computed cases for the gate: SRM, interval arithmetic, outcomes, input errors, history."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from rollout.gate import (
    Decision,
    GateHistory,
    GateSettings,
    decide,
    mixture_half_width,
    optimal_mixing_ratio,
    planned_rho,
    planned_sample_size,
    power_analysis,
    projected_sample_size,
    srm_test,
)

SETTINGS = GateSettings(alpha=0.05, margin=0.03, min_samples_per_arm=100, latency_slo_ms=800.0)


def frame(control_q, treatment_q, *, latency=100.0, err_c=None, err_t=None, lat_t=None) -> pd.DataFrame:
    nc, nt = len(control_q), len(treatment_q)
    return pd.DataFrame(
        {
            "request_id": [f"c{i}" for i in range(nc)] + [f"t{i}" for i in range(nt)],
            "arm": ["control"] * nc + ["treatment"] * nt,
            "quality": np.concatenate([control_q, treatment_q]).astype(float),
            "latency_ms": np.concatenate(
                [np.full(nc, latency), np.full(nt, latency) if lat_t is None else lat_t]
            ),
            "error": np.concatenate(
                [
                    np.zeros(nc, bool) if err_c is None else err_c,
                    np.zeros(nt, bool) if err_t is None else err_t,
                ]
            ),
        }
    )


def alternating(n: int, mean: float, spread: float) -> np.ndarray:
    """n values mean +/- spread: mean and variance known exactly by hand."""
    return np.where(np.arange(n) % 2 == 0, mean + spread, mean - spread)


# ---------------------------------------------------------------- SRM


@pytest.mark.parametrize(
    ("n_c", "n_t", "share", "chi2_by_hand"),
    [
        (520, 480, 0.5, 20**2 / 500 + 20**2 / 500),  # 1.6
        (870, 130, 0.1, 30**2 / 900 + 30**2 / 100),  # 10.0
        (865, 135, 0.1, 35**2 / 900 + 35**2 / 100),  # 13.611
        (5550, 4450, 0.5, 2 * 550**2 / 5000),  # 121
    ],
)
def test_srm_matches_hand_computed_chi_square(n_c: int, n_t: int, share: float, chi2_by_hand: float) -> None:
    chi2, p = srm_test(n_c, n_t, share)
    assert chi2 == pytest.approx(chi2_by_hand, rel=1e-12)
    ref = stats.chisquare([n_c, n_t], [(n_c + n_t) * (1 - share), (n_c + n_t) * share])
    assert chi2 == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)


def test_srm_threshold_decides_invalid() -> None:
    rng = np.random.default_rng(0)
    ok = decide(
        frame(rng.uniform(0.7, 0.9, 870), rng.uniform(0.7, 0.9, 130)), SETTINGS, planned_treatment_share=0.1
    )
    assert ok.srm_p_value == pytest.approx(0.001565, abs=1e-6) and ok.outcome != "INVALID"
    bad = decide(
        frame(rng.uniform(0.7, 0.9, 865), rng.uniform(0.7, 0.9, 135)), SETTINGS, planned_treatment_share=0.1
    )
    assert bad.srm_p_value == pytest.approx(0.000225, abs=2e-6)
    assert bad.outcome == "INVALID" and bad.reasons == ("sample-ratio-mismatch",)
    assert "did not split as planned" in bad.explanation


def test_srm_invalid_even_when_quality_looks_great() -> None:
    d = decide(frame(np.full(600, 0.5), np.full(300, 0.9)), SETTINGS, planned_treatment_share=0.5)
    assert d.outcome == "INVALID"


# ---------------------------------------------------------------- interval arithmetic


def test_half_width_hand_case() -> None:
    # I = 1/se^2 = 1e4 = rho: half-width = sqrt(2*rho*log(2/alpha^2))/rho = se*sqrt(2*log(800)).
    assert float(mixture_half_width(0.01, 0.05, 1e4)) == pytest.approx(0.01 * math.sqrt(2 * math.log(800)))
    assert float(mixture_half_width(0.01, 0.05, 1e4)) == pytest.approx(0.0365640, rel=1e-5)
    # Wider at smaller alpha, and a zero standard error gives a point.
    assert mixture_half_width(0.01, 0.01, 1e4) > mixture_half_width(0.01, 0.05, 1e4)
    assert float(mixture_half_width(0.0, 0.05, 1e4)) == 0.0


def test_mixing_ratio_minimises_the_boundary() -> None:
    r = optimal_mixing_ratio(0.05)

    def f(x: float) -> float:
        return (1 + x) * math.log((1 + x) / (x * 0.05**2))

    assert f(r) < f(r * 1.05) and f(r) < f(r / 1.05)


def test_paired_interval_by_hand() -> None:
    settings = GateSettings(alpha=0.05, margin=0.03, min_samples_per_arm=100, planned_samples_per_arm=400)
    n = 400
    d = alternating(n, -0.01, 0.05)  # mean -0.01; sample variance = 0.05^2 * n/(n-1)
    control = np.full(n, 0.8)
    df = pd.DataFrame(
        {
            "request_id": [f"r{i}" for i in range(n)] * 2,
            "arm": ["control"] * n + ["treatment"] * n,
            "quality": np.concatenate([control, control + d]),
            "latency_ms": 50.0,
            "error": False,
        }
    )
    dec = decide(df, settings, mode="paired")
    var = 0.05**2 * n / (n - 1)
    var_used = ((n - 1) * var + 2 * 0.15**2) / (n - 1 + 2)  # 2 pseudo-observations of planned_sd^2
    se = math.sqrt(var_used / n)
    rho = optimal_mixing_ratio(0.05) / (0.15 / math.sqrt(400)) ** 2
    info = 1 / se**2
    hw = math.sqrt((info + rho) * math.log((info + rho) / (rho * 0.05**2))) / info
    assert dec.quality.rho == pytest.approx(rho)
    assert dec.quality.estimate == pytest.approx(-0.01)
    assert dec.quality.std_error == pytest.approx(se)
    assert dec.interval == pytest.approx((-0.01 - hw, -0.01 + hw))
    assert dec.n_pairs == n and dec.outcome == "GO"


def test_split_interval_by_hand() -> None:
    settings = GateSettings(alpha=0.1, margin=0.05, min_samples_per_arm=50, planned_samples_per_arm=200)
    c, t = alternating(200, 0.8, 0.1), alternating(100, 0.78, 0.2)
    dec = decide(frame(c, t), settings, planned_treatment_share=1 / 3)

    def shrunk(var: float, n: int) -> float:
        return ((n - 1) * var + 2 * 0.15**2) / (n + 1)

    se = math.sqrt(shrunk(0.01 * 200 / 199, 200) / 200 + shrunk(0.04 * 100 / 99, 100) / 100)
    planned_se = 0.15 * math.sqrt(1 / 200 + 1 / 400)  # smaller arm (1/3 share) gets the planned 200
    rho = optimal_mixing_ratio(0.1) / planned_se**2
    info = 1 / se**2
    hw = math.sqrt((info + rho) * math.log((info + rho) / (rho * 0.1**2))) / info
    assert dec.quality.estimate == pytest.approx(-0.02)
    assert dec.interval == pytest.approx((-0.02 - hw, -0.02 + hw))


# ---------------------------------------------------------------- outcomes


def test_go_when_clearly_non_inferior() -> None:
    d = decide(
        frame(alternating(800, 0.8, 0.1), alternating(800, 0.8, 0.1)), SETTINGS, planned_treatment_share=0.5
    )
    assert d.outcome == "GO" and d.quality.interval_low > -SETTINGS.margin
    assert "Decision: GO" in d.explanation and "no worse than the allowed margin" in d.explanation


def test_futility_is_no_go() -> None:
    d = decide(
        frame(alternating(800, 0.8, 0.1), alternating(800, 0.7, 0.1)), SETTINGS, planned_treatment_share=0.5
    )
    assert d.outcome == "NO-GO" and d.reasons == ("futility",)
    assert d.quality.interval_high < -SETTINGS.margin


def test_inconclusive_extends_before_and_is_no_go_at_maximum() -> None:
    df = frame(alternating(150, 0.8, 0.15), alternating(150, 0.785, 0.15))
    before = decide(df, SETTINGS, planned_treatment_share=0.5, elapsed_days=3)
    assert before.outcome == "EXTEND" and before.quality.verdict == "inconclusive"
    at_days = decide(df, SETTINGS, planned_treatment_share=0.5, elapsed_days=SETTINGS.max_duration_days)
    at_looks = decide(df, SETTINGS, planned_treatment_share=0.5, now_look=SETTINGS.max_looks)
    for d in (at_days, at_looks):
        assert d.outcome == "NO-GO" and d.reasons == ("max-duration-inconclusive",) and d.at_maximum
        assert "never ships" in d.explanation


def test_max_duration_without_minimum_sample_is_no_go_never_go() -> None:
    df = frame(np.full(20, 0.8), np.full(20, 0.95))
    assert decide(df, SETTINGS, planned_treatment_share=0.5).outcome == "EXTEND"
    d = decide(df, SETTINGS, planned_treatment_share=0.5, elapsed_days=30)
    assert d.outcome == "NO-GO" and d.reasons == ("max-duration-before-min-sample",)


def test_conclusive_at_maximum_still_go() -> None:
    df = frame(alternating(800, 0.8, 0.1), alternating(800, 0.8, 0.1))
    assert decide(df, SETTINGS, planned_treatment_share=0.5, elapsed_days=99).outcome == "GO"


def test_step_minimum_sample_overrides_settings() -> None:
    df = frame(alternating(800, 0.8, 0.1), alternating(800, 0.8, 0.1))
    d = decide(df, SETTINGS, planned_treatment_share=0.5, min_samples_per_arm=1000)
    assert d.outcome == "EXTEND" and d.reasons == ("min-sample",) and d.min_samples_per_arm == 1000


def test_failed_data_check_is_invalid() -> None:
    df = frame(alternating(800, 0.8, 0.1), alternating(800, 0.8, 0.1))
    d = decide(
        df,
        SETTINGS,
        planned_treatment_share=0.5,
        data_check_passed=False,
        data_check_failures=["row 17: latency_ms must be > 0"],
    )
    assert d.outcome == "INVALID" and d.reasons == ("data-check-failed",)
    assert d.data_check_failures == ("row 17: latency_ms must be > 0",)
    assert "row 17" in d.explanation
    assert not d.quality.counts_toward_interval and d.quality.verdict == "not-evaluated"


@pytest.mark.parametrize(
    ("limits", "kwargs", "guardrail"),
    [
        # 5% errors > 2% ceiling (excess over control allowed up to 10 pp here)
        ({"max_error_rate_increase": 0.1}, {"err_t": np.arange(800) % 20 == 0}, "treatment_error_rate"),
        # 1% vs 2.5%: under the 3% ceiling but 1.5 pp above control (> 1 pp)
        (
            {"max_error_rate": 0.03},
            {"err_c": np.arange(800) % 100 == 0, "err_t": np.arange(800) % 40 == 0},
            "error_rate_increase",
        ),
        # 10% of requests at 900 ms: p95 = 900 > 800 ms SLO
        ({}, {"lat_t": np.where(np.arange(800) % 10 == 0, 900.0, 300.0)}, "treatment_p95_latency_ms"),
    ],
)
def test_guardrail_breach_is_no_go(limits, kwargs, guardrail: str) -> None:
    settings = GateSettings(latency_slo_ms=800, **limits)
    df = frame(alternating(800, 0.8, 0.1), alternating(800, 0.8, 0.1), **kwargs)
    d = decide(df, settings, planned_treatment_share=0.5)
    assert d.outcome == "NO-GO" and d.reasons == (f"guardrail:{guardrail}",)
    assert [g.name for g in d.guardrails if g.breached] == [guardrail]
    assert "Safety limit broken" in d.explanation


def test_guardrail_waits_for_enough_treatment_rows() -> None:
    df = frame(alternating(40, 0.8, 0.1), alternating(10, 0.8, 0.1), err_t=np.array([True] + [False] * 9))
    d = decide(df, SETTINGS, planned_treatment_share=0.2)
    assert d.outcome == "EXTEND" and not d.guardrails[0].evaluated


# ---------------------------------------------------------------- paired mode


def test_paired_mode_uses_per_request_differences() -> None:
    rng = np.random.default_rng(1)
    n = 200
    control = rng.uniform(0.2, 1.0, n)  # large between-request spread...
    treatment = control - 0.005 + rng.normal(0, 0.01, n)  # ...but tiny per-request differences
    df = pd.DataFrame(
        {
            "request_id": [f"r{i}" for i in range(n)] * 2,
            "arm": ["control"] * n + ["treatment"] * n,
            "quality": np.concatenate([control, treatment]),
            "latency_ms": 10.0,
            "error": False,
        }
    )
    paired = decide(df, SETTINGS, mode="paired")
    assert paired.outcome == "GO" and paired.n_pairs == n and paired.unpaired_rows == 0
    df_split = df.assign(request_id=[f"c{i}" for i in range(n)] + [f"t{i}" for i in range(n)])
    split = decide(df_split, SETTINGS, planned_treatment_share=0.5)
    assert split.outcome == "EXTEND"  # same numbers as independent arms: far too noisy
    assert paired.quality.std_error < split.quality.std_error / 5
    with pytest.raises(ValueError, match="both arms"):
        decide(df, SETTINGS, planned_treatment_share=0.5)


def test_paired_missing_treatment_answers_trip_srm() -> None:
    n = 1000
    df = pd.DataFrame(
        {
            "request_id": [f"r{i}" for i in range(n)] + [f"r{i}" for i in range(800)],
            "arm": ["control"] * n + ["treatment"] * 800,
            "quality": 0.8,
            "latency_ms": 10.0,
            "error": False,
        }
    )
    d = decide(df, SETTINGS, mode="paired")
    assert d.outcome == "INVALID" and d.unpaired_rows == 200 and d.n_pairs == 800


# ---------------------------------------------------------------- input errors


@pytest.mark.parametrize("column", ["quality", "latency_ms", "error", "request_id", "arm"])
def test_nan_names_the_column(column: str) -> None:
    df = frame(alternating(10, 0.8, 0.1), alternating(10, 0.8, 0.1)).astype({column: object})
    df.loc[3, column] = np.nan
    with pytest.raises(ValueError, match=rf"column '{column}'.*NaN"):
        decide(df, SETTINGS, planned_treatment_share=0.5)


def test_other_bad_input() -> None:
    df = frame(alternating(10, 0.8, 0.1), alternating(10, 0.8, 0.1))
    with pytest.raises(ValueError, match="column 'quality'.*non-finite"):
        decide(df.assign(quality=np.r_[np.inf, df.quality[1:]]), SETTINGS, planned_treatment_share=0.5)
    with pytest.raises(ValueError, match="missing column.*latency_ms"):
        decide(df.drop(columns="latency_ms"), SETTINGS, planned_treatment_share=0.5)
    with pytest.raises(ValueError, match="column 'arm'"):
        decide(df.assign(arm="sparse"), SETTINGS, planned_treatment_share=0.5)
    with pytest.raises(ValueError, match="column 'request_id' repeats"):
        decide(pd.concat([df, df.iloc[:1]]), SETTINGS, planned_treatment_share=0.5)
    with pytest.raises(ValueError, match="planned_treatment_share"):
        decide(df, SETTINGS)
    with pytest.raises(ValueError, match="margin"):
        GateSettings(margin=-0.1)
    with pytest.raises(ValueError, match="unknown gate setting.*alhpa"):
        GateSettings.from_mapping({"alhpa": 0.05})


def test_from_mapping_flattens_guardrails_and_aliases() -> None:
    s = GateSettings.from_mapping(
        {
            "alpha": 0.1,
            "non_inferiority_margin": 0.04,
            "max_duration_days": 7,
            "guardrails": {"max_error_rate": 0.05, "p95_latency_slo_ms": 1200},
        }
    )
    assert (s.alpha, s.margin, s.max_duration_days, s.max_error_rate, s.latency_slo_ms) == (
        0.1,
        0.04,
        7,
        0.05,
        1200,
    )


# ---------------------------------------------------------------- history, fingerprint, evidence


def test_running_interval_never_widens_and_round_trips_through_evidence() -> None:
    rng = np.random.default_rng(2)
    qc, qt = rng.beta(4.9, 1.2, 1500), rng.beta(4.9, 1.2, 1500)
    history, stored, prev = GateHistory(), [], (-math.inf, math.inf)
    for k, n in enumerate((200, 250, 900, 1500), start=1):  # the 250-row look is barely more data
        d = decide(frame(qc[:n], qt[:n]), SETTINGS, history, planned_treatment_share=0.5)
        assert d.look_index == k
        assert d.quality.interval_low >= prev[0] and d.quality.interval_high <= prev[1]
        prev = d.interval
        stored.append(json.loads(json.dumps(d.to_dict())))
        history = d.next_history(history)
        assert GateHistory.from_evidence(stored) == history
    assert history.looks == 4 and len(history.fingerprints) == 4


def test_invalid_look_counts_as_a_look_but_not_toward_the_interval() -> None:
    df = frame(alternating(300, 0.8, 0.1), alternating(300, 0.8, 0.1))
    d = decide(df, SETTINGS, planned_treatment_share=0.5, data_check_passed=False)
    h = d.next_history()
    assert h.looks == 1 and h.interval_low == -math.inf


def test_fingerprint_ignores_row_order_and_sees_any_change() -> None:
    df = frame(alternating(200, 0.8, 0.1), alternating(200, 0.8, 0.1))
    a = decide(df, SETTINGS, planned_treatment_share=0.5).data_fingerprint
    b = decide(df.sample(frac=1.0, random_state=1), SETTINGS, planned_treatment_share=0.5).data_fingerprint
    changed = df.copy()
    changed.loc[5, "quality"] += 1e-9
    c = decide(changed, SETTINGS, planned_treatment_share=0.5).data_fingerprint
    assert a == b and a != c and len(a) == 64


def test_decision_evidence_is_complete_and_json_safe() -> None:
    d = decide(
        frame(alternating(800, 0.8, 0.1), alternating(800, 0.8, 0.1)), SETTINGS, planned_treatment_share=0.5
    )
    ev = json.loads(json.dumps(d.to_dict(), allow_nan=False))
    for key in (
        "outcome",
        "explanation",
        "n_control",
        "n_treatment",
        "srm_chi2",
        "srm_p_value",
        "guardrails",
        "data_fingerprint",
        "look_index",
        "settings",
        "quality",
    ):
        assert key in ev
    assert ev["quality"]["interval_low"] == pytest.approx(d.quality.interval_low)
    assert ev["settings"]["margin"] == 0.03
    assert isinstance(d, Decision)
    with pytest.raises(AttributeError):
        d.outcome = "GO"  # type: ignore[misc]  # frozen


# ---------------------------------------------------------------- planning


def test_planned_sample_size_reaches_power_and_one_less_does_not() -> None:
    plan = planned_sample_size(SETTINGS)
    assert plan.power >= 0.8
    assert power_analysis(SETTINGS, plan.n_control - 1, plan.n_treatment - 1) < 0.8
    # Documented defaults (docs/gate.md): sd 0.15, margin 0.03, alpha 0.05 -> about 750 per arm.
    assert 700 <= plan.n_treatment <= 800
    paired = planned_sample_size(SETTINGS, paired=True)
    assert paired.n_total < plan.n_total
    # A smaller treatment share needs more traffic in total.
    assert planned_sample_size(SETTINGS, treatment_share=0.1).n_total > plan.n_total
    assert planned_rho(SETTINGS, treatment_share=0.5, paired=False) > 0


def test_worked_example_in_docs() -> None:
    """docs/gate.md's worked example, from summary statistics through the same functions decide uses."""
    from rollout.gate import classify_interval, difference_cs, running_intersection

    rho = planned_rho(GateSettings(), treatment_share=0.5, paired=False)
    assert rho == pytest.approx(2034, abs=1)
    low, high = -math.inf, math.inf
    expected = [
        ((-0.0596, 0.0196), "inconclusive"),
        ((-0.0395, 0.0175), "inconclusive"),
        ((-0.0275, 0.0175), "non-inferior"),
    ]
    for (n, mc, mt), (interval, verdict) in zip(
        ((300, 0.810, 0.790), (550, 0.806, 0.795), (800, 0.805, 0.801)), expected, strict=True
    ):
        _, se, lo, hi = difference_cs(n, mc, 0.15**2, n, mt, 0.16**2, alpha=0.05, rho=rho, prior_sd=0.15)
        low, high = running_intersection(lo, hi, low, high)
        assert (float(low), float(high)) == pytest.approx(interval, abs=5e-5)
        assert classify_interval(low, high, 0.03) == verdict
    assert float(se) == pytest.approx(0.007753, abs=1e-6)


def test_contradicting_history_resets_to_this_look() -> None:
    """An empty intersection (probability <= alpha) is flagged and this look's interval is used."""
    history = GateHistory(looks=2, interval_low=0.20, interval_high=0.30)
    d = decide(
        frame(alternating(800, 0.8, 0.1), alternating(800, 0.8, 0.1)),
        SETTINGS,
        history,
        planned_treatment_share=0.5,
    )
    assert d.quality.interval_reset and d.interval == (d.quality.look_low, d.quality.look_high)
    assert d.look_index == 3 and d.previous_looks == 2
    assert (d.next_history(history).interval_low, d.next_history(history).interval_high) == d.interval


# ---------------------------------------------------------------- what an EXTEND waits for


def test_projection_is_the_first_size_whose_interval_clears_the_margin() -> None:
    """At the projected size the same estimate and spread clear -margin; one request fewer does not."""
    from rollout.gate import difference_cs, paired_cs

    kw = dict(margin=0.03, alpha=0.05, rho=40.0, prior_sd=0.15)
    n = projected_sample_size(0.0, 0.02, 0.02, mode="paired", treatment_share=0.5, at_least=10, **kw)
    assert n is not None and n > 10
    for size, clears in ((n, True), (n - 1, False)):
        _, _, low, _ = paired_cs(size, 0.0, 0.02, alpha=0.05, rho=40.0, prior_sd=0.15)
        assert (float(low) > -0.03) is clears
    m = projected_sample_size(-0.01, 0.04, 0.05, mode="split", treatment_share=0.2, at_least=10, **kw)
    assert m is not None
    for size, clears in ((m, True), (m - 1, False)):
        n_t = max(2.0, size * 0.2)
        _, _, low, _ = difference_cs(
            size - n_t, 0.5, 0.04, n_t, 0.49, 0.05, alpha=0.05, rho=40.0, prior_sd=0.15
        )
        assert (float(low) > -0.03) is clears
    # A worse estimate needs more; at or below -margin no amount of data makes it GO.
    worse = projected_sample_size(-0.02, 0.02, 0.02, mode="paired", treatment_share=0.5, at_least=10, **kw)
    assert worse is not None and worse > n
    assert (
        projected_sample_size(-0.03, 0.02, 0.02, mode="paired", treatment_share=0.5, at_least=10, **kw)
        is None
    )
    assert (
        projected_sample_size(math.nan, 0.02, 0.02, mode="paired", treatment_share=0.5, at_least=10, **kw)
        is None
    )


def test_extend_says_how_much_more_data_would_settle_it() -> None:
    settings = GateSettings(alpha=0.05, margin=0.03, min_samples_per_arm=20)
    df = frame(alternating(60, 0.8, 0.15), alternating(60, 0.8, 0.15))
    d = decide(df, settings, planned_treatment_share=0.5)
    assert d.outcome == "EXTEND" and d.projected_requests is not None and d.projected_requests > 120
    assert f"about {d.projected_requests} requests in all" in d.explanation
    ev = json.loads(json.dumps(d.to_dict(), allow_nan=False))
    assert ev["projected_requests"] == d.projected_requests
    # Collecting that many with the same mean and spread does give GO.
    half = d.projected_requests // 2 + 1
    more = decide(
        frame(alternating(half, 0.8, 0.15), alternating(half, 0.8, 0.15)),
        settings,
        planned_treatment_share=0.5,
    )
    assert more.outcome == "GO" and more.projected_requests is None
    # GO, NO-GO and a quality already past the margin carry no projection.
    futile = decide(
        frame(alternating(60, 0.8, 0.15), alternating(60, 0.7, 0.15)), settings, planned_treatment_share=0.5
    )
    assert futile.projected_requests is None
