"""Hand-computed and behavioural cases for the gate: the betting capital, the bounds, outcomes, guardrails,
bad input (INVALID, never an exception), history, evidence, planning and projection."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from scipy import stats

from rollout.gate import (
    Decision,
    GateHistory,
    GateSettings,
    check_observations,
    data_fingerprint,
    decide,
    guardrail_checks,
    judge,
    planned_sample_size,
    projected_sample_size,
    srm_test,
)
from rollout.gate.quality import paired_arms, prior
from rollout.gate.sequences import (
    TRUNCATION,
    bets,
    confidence_bound,
    ipw_stream,
    log_capital,
    paired_stream,
    rate_stream,
    rejects,
)

SETTINGS = GateSettings(  # a 2% error-rate ceiling, as the cases below say
    alpha=0.05,
    margin=0.03,
    min_samples_per_arm=20,
    max_error_rate=0.02,
    guardrail_min_samples=20,
    latency_slo_ms=800.0,
)


def split_frame(q: np.ndarray, treated: np.ndarray, *, latency=None, error=None) -> pd.DataFrame:
    """Requests in arrival order, each in one arm."""
    n = len(q)
    return pd.DataFrame(
        {
            "request_id": [f"r{i}" for i in range(n)],
            "arm": np.where(treated, "treatment", "control"),
            "quality": np.asarray(q, float),
            "latency_ms": np.full(n, 100.0) if latency is None else latency,
            "error": np.zeros(n, bool) if error is None else error,
        }
    )


def paired_frame(qc, qt, *, err_t=None, lat_t=None) -> pd.DataFrame:
    """Shadow rows in arrival order: control then treatment for each request."""
    n = len(qc)
    rows = {
        "request_id": np.repeat([f"r{i}" for i in range(n)], 2),
        "arm": np.tile(["control", "treatment"], n),
        "quality": np.column_stack([qc, qt]).ravel().astype(float),
        "latency_ms": np.column_stack(
            [np.full(n, 100.0), np.full(n, 100.0) if lat_t is None else lat_t]
        ).ravel(),
        "error": np.column_stack([np.zeros(n, bool), np.zeros(n, bool) if err_t is None else err_t]).ravel(),
    }
    return pd.DataFrame(rows)


def alternate(n: int) -> np.ndarray:
    return np.arange(n) % 2 == 1


# ---------------------------------------------------------------- the capital, by hand


def test_capital_of_three_identical_pairs_by_hand() -> None:
    """Z = 0, 0, 0 against m0 = -0.03 with prior mean 0 and var 0.0225: aGRAPA wants
    0.03 / (var + 0.03^2), far above the cap 0.9 / (m0 - (-1)) = 0.9 / 0.97, so every bet is the cap and
    each factor is 1 + 0.927835 * 0.03."""
    stream = paired_stream(np.zeros((1, 3)))
    lam = bets(stream, -0.03, "lower", prior_mean=0.0, prior_var=0.0225)
    cap = TRUNCATION["paired"] / 0.97
    assert lam[0, 0] == pytest.approx(0.03 / (0.0225 + 0.0009))
    logk = log_capital(stream, lam, -0.03, "lower")
    assert logk[0] == pytest.approx(np.log1p(cap * 0.03) * np.arange(1, 4))


def test_a_loss_shrinks_the_next_bet_and_costs_capital() -> None:
    z = np.array([0.0, 0.0, -1.0, 0.0])
    stream = paired_stream(z)
    lam = bets(stream, -0.03, "lower", prior_mean=0.0, prior_var=0.0225)
    cap = TRUNCATION["paired"] / 0.97
    # after the loss: running mean (0 + 0 + 0 - 1) / 4 = -0.25 < m0: no bet on "mean > -0.03"
    assert lam[3] == 0.0
    logk = log_capital(stream, lam, -0.03, "lower")
    assert logk[2] == pytest.approx(2 * np.log1p(cap * 0.03) + np.log1p(min(lam[2], cap) * (-1 + 0.03)))


def test_ipw_stream_by_hand() -> None:
    """Centres: 0.5 (prior), then running means; Z = (q - c) / p for treatment, -(q - c) / (1 - p) else."""
    q = np.array([1.0, 0.0, 0.5])
    t = np.array([True, False, True])
    s = ipw_stream(q, t, 0.25)
    centre = np.array([0.5, 0.75, 0.5])
    assert s.z == pytest.approx([(1 - 0.5) / 0.25, -(0 - 0.75) / 0.75, (0.5 - 0.5) / 0.25])
    assert s.lo == pytest.approx(np.minimum(-centre / 0.25, -(1 - centre) / 0.75))
    assert s.hi == pytest.approx(np.maximum((1 - centre) / 0.25, centre / 0.75))


def test_ipw_stream_is_unbiased_for_the_difference() -> None:
    rng = np.random.default_rng(3)
    n, share = 400_000, 0.1
    t = rng.random(n) < share
    q = np.where(t, rng.beta(6, 2, n), rng.beta(8, 2, n))  # means 0.75 and 0.8
    z = ipw_stream(q, t, share).z
    assert z.mean() == pytest.approx(0.75 - 0.8, abs=4 * z.std() / math.sqrt(n))


def test_capital_falls_as_m_rises_so_the_bound_is_the_edge_of_the_rejected_set() -> None:
    rng = np.random.default_rng(5)
    stream = paired_stream(np.clip(rng.normal(0.01, 0.05, 300), -1, 1))
    kw = {"prior_mean": 0.0, "prior_var": 0.0225}
    lam = bets(stream, -0.03, "lower", **kw)
    ms = np.linspace(-0.2, 0.1, 61)
    peak = [log_capital(stream, lam, m, "lower").max() for m in ms]
    assert all(np.diff(peak) <= 1e-12)
    low = confidence_bound(stream, -0.03, "lower", 0.05, **kw)
    assert log_capital(stream, lam, low - 1e-3, "lower").max() >= math.log(20)
    assert log_capital(stream, lam, low + 1e-3, "lower").max() < math.log(20)


def test_bounds_cover_the_truth_at_every_look_in_most_runs() -> None:
    """Time-uniform coverage of the lower bound of a skewed bounded mean (5% misses allowed)."""
    rng = np.random.default_rng(11)
    reps, n = 2000, 300
    z = np.where(rng.random((reps, n)) < 0.05, -1.0, 0.0)  # mean -0.05
    crossed, _ = rejects(paired_stream(z), -0.05, "lower", 0.05, prior_mean=0.0, prior_var=0.0225)
    miss = crossed.mean()
    assert stats.binomtest(int(crossed.sum()), reps, 0.05, alternative="greater").pvalue > 0.001, miss


# ---------------------------------------------------------------- outcomes


@pytest.mark.parametrize("block", [1, 7, 4096])
def test_the_peak_by_blocks_is_the_peak_of_the_whole_path(block: int, monkeypatch) -> None:
    """`peak_log_capital` (what the bounds' root-finder evaluates) is max(log_capital) to the last bit."""
    from sparse_core import betting

    monkeypatch.setattr(betting, "PEAK_BLOCK", block)
    rng = np.random.default_rng(7)
    t = rng.random(5000) < 0.3
    split = ipw_stream(rng.random(5000), t, 0.3)
    paired = paired_stream(rng.random(5000) - rng.random(5000))
    for stream in (split, paired):
        for side in ("lower", "upper"):
            lam = bets(stream, -0.03, side, prior_mean=0.0, prior_var=0.05)
            for m in (-0.2, -0.03, 0.0, 0.1):
                whole = log_capital(stream, lam, m, side).max()
                assert betting.peak_log_capital(stream, lam, m, side) == whole


def test_all_identical_pairs_need_about_a_hundred_to_prove_a_small_margin() -> None:
    """The issue's case: 24 shadow pairs all scoring 1.0 used to give GO at margin 0.03. Nothing bounds a
    loss that has not happened yet, so that is EXTEND; about 109 identical pairs are needed
    (0.9 x log(20) / log(1 + 0.9 x 0.03 / 0.97))."""
    s = GateSettings(margin=0.03, min_samples_per_arm=12, guardrail_min_samples=12)
    need = math.ceil(math.log(20) / math.log1p(TRUNCATION["paired"] / 0.97 * 0.03))
    early = decide(paired_frame(np.ones(24), np.ones(24)), s, mode="paired")
    assert early.outcome == "EXTEND" and early.reasons == ("inconclusive",)
    assert early.projected_requests == need
    assert decide(paired_frame(np.ones(need - 1), np.ones(need - 1)), s, mode="paired").outcome == "EXTEND"
    go = decide(paired_frame(np.ones(need), np.ones(need)), s, mode="paired")
    assert go.outcome == "GO" and go.quality.interval_low > -0.03
    assert "at least -0.0" in go.explanation and "no worse than the allowed margin" in go.explanation


def test_clearly_worse_is_futile_and_clearly_fine_split_is_go() -> None:
    t = alternate(2000)
    bad = decide(split_frame(np.where(t, 0.5, 0.9), t), SETTINGS, planned_treatment_share=0.5)
    assert bad.outcome == "NO-GO" and bad.reasons == ("futility",)
    assert bad.quality.interval_high < -0.03
    rng = np.random.default_rng(1)
    good = decide(
        split_frame(rng.beta(80, 20, 3000), rng.random(3000) < 0.5), SETTINGS, planned_treatment_share=0.5
    )
    assert good.outcome == "GO" and good.quality.interval_low > -0.03


def test_inconclusive_extends_then_is_no_go_at_maximum_never_go() -> None:
    t = alternate(60)
    df = split_frame(np.where(t, 0.8, 0.8), t)
    assert decide(df, SETTINGS, planned_treatment_share=0.5).outcome == "EXTEND"
    last = decide(df, SETTINGS, planned_treatment_share=0.5, now_look=SETTINGS.max_looks)
    assert last.outcome == "NO-GO" and last.reasons == ("max-duration-inconclusive",)
    late = decide(df, SETTINGS, planned_treatment_share=0.5, elapsed_days=SETTINGS.max_duration_days)
    assert late.outcome == "NO-GO"


def test_minimum_sample_comes_first() -> None:
    df = paired_frame(np.ones(200), np.ones(200))
    assert decide(df, SETTINGS, mode="paired", min_samples_per_arm=300).reasons == ("min-sample",)
    at_max = decide(df, SETTINGS, mode="paired", min_samples_per_arm=300, now_look=SETTINGS.max_looks)
    assert at_max.outcome == "NO-GO" and at_max.reasons == ("max-duration-before-min-sample",)


def test_failed_data_check_and_srm_are_invalid() -> None:
    df = paired_frame(np.ones(200), np.ones(200))
    d = decide(
        df, SETTINGS, mode="paired", data_check_passed=False, data_check_failures=["quality out of range"]
    )
    assert d.outcome == "INVALID" and d.reasons == ("data-check-failed",)
    assert "quality out of range" in d.explanation
    t = np.arange(1000) % 10 == 0  # 10% treatment against a planned 50%
    srm = decide(split_frame(np.ones(1000), t), SETTINGS, planned_treatment_share=0.5)
    assert srm.outcome == "INVALID" and "sample-ratio-mismatch" in srm.reasons


def test_invalid_at_the_maximum_is_no_go_never_go() -> None:
    """Review G2: a step's stored rows are kept and no command reruns it, so an INVALID resting on them (a
    sample-ratio mismatch of externally assigned rows, a bad row) stayed INVALID past the maximum, the
    pilot running for good. At the limit it ends NO-GO with a reason of its own; before it, INVALID."""
    t = np.arange(1000) % 10 == 0  # 10% treatment against a planned 50%: identical scores, GO-worthy
    frame = split_frame(np.ones(1000), t)
    for at in ({"now_look": SETTINGS.max_looks}, {"elapsed_days": SETTINGS.max_duration_days}):
        d = decide(frame, SETTINGS, planned_treatment_share=0.5, **at)
        assert d.outcome == "NO-GO" and d.reasons == ("max-duration-invalid", "sample-ratio-mismatch")
        assert "while its data could not be trusted" in d.explanation and "rerun" not in d.explanation
    bad = _base().drop(columns=["latency_ms"])
    d = decide(bad, SETTINGS, mode="paired", now_look=SETTINGS.max_looks)
    assert d.outcome == "NO-GO" and d.reasons == ("max-duration-invalid", "invalid-input")
    before = decide(frame, SETTINGS, planned_treatment_share=0.5, now_look=SETTINGS.max_looks - 1)
    assert before.outcome == "INVALID" and "rerun" not in before.explanation
    assert "abort the pilot" in before.explanation and "ends NO-GO" in before.explanation


@pytest.mark.parametrize(
    ("n_c", "n_t", "share", "chi2_by_hand"),
    [(520, 480, 0.5, 1.6), (870, 130, 0.1, 10.0), (865, 135, 0.1, 35**2 / 900 + 35**2 / 100)],
)
def test_srm_matches_hand_computed_chi_square(n_c: int, n_t: int, share: float, chi2_by_hand: float) -> None:
    """The statistic is Pearson's (for information); the p-value the exact binomial test's (review S4)."""
    chi2, p = srm_test(n_c, n_t, share)
    assert chi2 == pytest.approx(chi2_by_hand)
    assert p == pytest.approx(stats.binomtest(n_t, n_c + n_t, share).pvalue)


def _treated(n_t: int, n: int = 1000) -> np.ndarray:
    """n_t of n requests in the treatment arm, at random positions."""
    t = np.zeros(n, bool)
    t[np.random.default_rng(0).permutation(n)[:n_t]] = True
    return t


def test_srm_is_flagged_at_the_settings_threshold() -> None:
    """A sample-ratio mismatch is flagged where its p-value falls below settings.srm_p_threshold (0.001),
    near the boundary and not only for a gross split: 556/1000 treated against a planned half (exact
    binomial p 0.0004) is INVALID; 550/1000 (p 0.0022) is not, unless the threshold is raised past it."""
    assert SETTINGS.srm_p_threshold == 0.001
    flagged = decide(split_frame(np.ones(1000), _treated(556)), SETTINGS, planned_treatment_share=0.5)
    assert flagged.srm_p_value == pytest.approx(stats.binomtest(556, 1000, 0.5).pvalue)  # 0.0004
    assert flagged.outcome == "INVALID" and "sample-ratio-mismatch" in flagged.reasons
    fine = decide(split_frame(np.ones(1000), _treated(550)), SETTINGS, planned_treatment_share=0.5)
    assert fine.srm_p_value == pytest.approx(stats.binomtest(550, 1000, 0.5).pvalue)  # 0.0022
    assert "sample-ratio-mismatch" not in fine.reasons and fine.outcome != "INVALID"
    strict = dataclasses.replace(SETTINGS, srm_p_threshold=0.01)
    raised = decide(split_frame(np.ones(1000), _treated(550)), strict, planned_treatment_share=0.5)
    assert "sample-ratio-mismatch" in raised.reasons


# ---------------------------------------------------------------- guardrails


def test_guardrails_are_one_list_of_named_checks() -> None:
    names = [c.name for c in guardrail_checks(SETTINGS)]
    assert names == ["treatment_error_rate", "error_rate_increase", "treatment_latency_over_slo"]
    assert [c.name for c in guardrail_checks(SETTINGS, with_control=False)] == [
        "treatment_error_rate",
        "treatment_latency_over_slo",
    ]
    no_slo = GateSettings(latency_slo_ms=None)
    assert "treatment_latency_over_slo" not in [c.name for c in guardrail_checks(no_slo)]


def test_error_breach_is_no_go_only_on_evidence() -> None:
    n = 400
    few = np.zeros(n, bool)
    few[[50, 300]] = True  # 2 errors in 400 against a 2% ceiling: fine
    ok = decide(paired_frame(np.ones(n), np.ones(n), err_t=few), SETTINGS, mode="paired")
    assert ok.outcome == "GO"
    many = np.arange(n) % 8 == 0  # 12.5% against a 2% ceiling
    d = decide(paired_frame(np.ones(n), np.ones(n), err_t=many), SETTINGS, mode="paired")
    assert d.outcome == "NO-GO" and "guardrail:treatment_error_rate" in d.reasons
    g = next(g for g in d.guardrails if g.name == "treatment_error_rate")
    assert g.breached and g.lower_bound > 0.02 and "at least" in d.explanation


def test_a_breached_guardrail_ends_the_step_before_its_minimum_sample() -> None:
    """A breach needs no minimum sample: its evidence is already enough, so a step whose sparse arm errs
    on 12.5% of 400 requests (ceiling 2%) is NO-GO at once, not EXTEND towards a 1,000-request minimum."""
    many = np.arange(400) % 8 == 0
    frame = paired_frame(np.ones(400), np.ones(400), err_t=many)
    d = decide(frame, SETTINGS, mode="paired", min_samples_per_arm=1000)
    assert d.outcome == "NO-GO" and "guardrail:treatment_error_rate" in d.reasons
    assert "min-sample" not in d.reasons and all(r.startswith("guardrail:") for r in d.reasons)


def test_latency_guardrail_judges_the_share_over_the_slo() -> None:
    n = 400
    slow = np.where(np.arange(n) % 4 == 0, 2000.0, 100.0)  # 25% over an 800 ms SLO
    d = decide(paired_frame(np.ones(n), np.ones(n), lat_t=slow), SETTINGS, mode="paired")
    assert d.outcome == "NO-GO" and d.reasons == ("guardrail:treatment_latency_over_slo",)
    p95_at_slo = np.where(np.arange(n) % 50 == 0, 2000.0, 100.0)  # 2% over: within 5%
    assert (
        decide(paired_frame(np.ones(n), np.ones(n), lat_t=p95_at_slo), SETTINGS, mode="paired").outcome
        == "GO"
    )


def test_a_latency_exactly_at_the_slo_is_within_it() -> None:
    """The latency guardrail counts requests over the SLO: every sparse-arm request taking exactly the
    SLO's 800 ms meets it, so the step is not stopped for latency."""
    n = 400
    at_slo = np.full(n, SETTINGS.latency_slo_ms)
    d = decide(paired_frame(np.ones(n), np.ones(n), lat_t=at_slo), SETTINGS, mode="paired")
    g = next(g for g in d.guardrails if g.name == "treatment_latency_over_slo")
    assert g.evaluated and not g.breached and g.value == 0.0
    assert d.outcome == "GO"


def test_a_guardrail_is_judged_once_its_minimum_sample_is_reached_exactly() -> None:
    """guardrail_min_samples is a minimum (n >= it): with exactly 200 pairs for a 200-row minimum every
    guardrail is judged and identical arms GO; one pair fewer waits for the guardrails."""
    s = GateSettings(margin=0.03, min_samples_per_arm=20, guardrail_min_samples=200)
    d = decide(paired_frame(np.ones(200), np.ones(200)), s, mode="paired")
    assert all(g.evaluated for g in d.guardrails) and d.outcome == "GO"
    short = decide(paired_frame(np.ones(199), np.ones(199)), s, mode="paired")
    assert short.outcome == "EXTEND" and any(r.startswith("guardrail-not-judged:") for r in short.reasons)


def test_a_guardrail_that_cannot_be_judged_keeps_the_step_at_extend() -> None:
    strict = GateSettings(margin=0.03, min_samples_per_arm=20, guardrail_min_samples=500)
    d = decide(paired_frame(np.ones(200), np.ones(200)), strict, mode="paired")
    assert d.quality.verdict == "non-inferior"
    assert d.outcome == "EXTEND" and "guardrail-not-judged:treatment_error_rate" in d.reasons
    assert "Not yet judged" in d.explanation
    at_max = decide(
        paired_frame(np.ones(200), np.ones(200)), strict, mode="paired", now_look=strict.max_looks
    )
    assert at_max.outcome == "NO-GO"


def test_the_paired_excess_check_counts_pairs_toward_its_minimum() -> None:
    """In a shadow step the excess over control compares per request: a sparse-arm row whose dense
    answer is missing is no evidence, so 34 sparse-arm rows with 26 pairs among them are 26, short of
    a minimum of 30 (the rate check, on the sparse arm alone, has its 34)."""
    s = GateSettings(margin=0.03, min_samples_per_arm=2, guardrail_min_samples=30)
    frame = paired_frame(np.ones(34), np.ones(34))
    frame = frame[(frame["arm"] == "treatment") | (frame.index < 52)]  # dense answers for r0..r25 only
    d = decide(frame, s, mode="paired")
    by_name = {g.name: g for g in d.guardrails}
    excess, rate = by_name["error_rate_increase"], by_name["treatment_error_rate"]
    assert (excess.evaluated, excess.n, excess.note) == (False, 26, "needs 30 pairs to be judged (26 so far)")
    assert (rate.evaluated, rate.n) == (True, 34) and d.outcome == "EXTEND"


def test_excess_error_over_control_in_a_split_step() -> None:
    rng = np.random.default_rng(4)
    n = 4000
    t = rng.random(n) < 0.5
    err = np.where(t, rng.random(n) < 0.12, rng.random(n) < 0.01)
    s = GateSettings(margin=0.03, min_samples_per_arm=20, max_error_rate=0.5, max_error_rate_increase=0.05)
    d = decide(split_frame(np.ones(n), t, error=err), s, planned_treatment_share=0.5)
    assert d.reasons == ("guardrail:error_rate_increase",)


def test_monitor_uses_the_same_checks() -> None:
    from rollout.pilots import monitor_guardrails
    from rollout.spec import parse_spec

    from .usecase_helpers import example_spec

    spec = parse_spec(example_spec("docs-qa"))
    rows = [
        {"request_id": f"m{i}", "arm": "treatment", "quality": 1.0, "latency_ms": 100.0, "error": i % 3 == 0}
        for i in range(90)
    ]
    out = monitor_guardrails(rows, spec)
    names = [c["name"] for c in out["checks"]]
    assert names[0] == "treatment_error_rate" and out["breached"] == ["treatment_error_rate"]
    settings = GateSettings(max_error_rate=spec.gate.guardrails.max_error_rate, guardrail_min_samples=1)
    frame = check_observations(pd.DataFrame(rows), mode="split").frame
    # rows without a look are one look, whose candidate carries weight 1/2 in the monitor's change
    # detector: the step's own rate test at alpha / 2, bound for bound
    same = judge(guardrail_checks(settings)[0], frame, alpha=spec.gate.alpha / 2, mode="split")
    assert same.breached and out["checks"][0]["lower_bound"] == pytest.approx(same.lower_bound, abs=1e-3)
    assert out["looks"] == 1 and out["checks"][0]["value"] == pytest.approx(1 / 3)


def test_the_monitor_compares_the_arms_where_dense_answered_too() -> None:
    """The monitor's sampled requests are answered by both arms: the quality loss beyond the margin and
    the excess error over dense are judged on those pairs, look by look; imported production rows of
    the champion alone leave both not judged (and say so) while the rate checks still run."""
    from rollout.decisions import _monitor_verdict
    from rollout.pilots import monitor_guardrails
    from rollout.spec import parse_spec

    from .usecase_helpers import example_spec

    spec = parse_spec(example_spec("docs-qa"))  # margin 0.03
    rng = np.random.default_rng(8)
    rows = []
    for i in range(600):  # 50 looks of 12; from look 21 the champion misses 20% of what dense gets right
        lost = i >= 240 and rng.random() < 0.2
        look = f"m-{i // 12}"
        rows.append(
            {
                "request_id": f"r{i}",
                "arm": "control",
                "quality": 1.0,
                "latency_ms": 90.0,
                "error": False,
                "look": look,
            }
        )
        rows.append(
            {
                "request_id": f"r{i}",
                "arm": "treatment",
                "quality": 0.0 if lost else 1.0,
                "latency_ms": 80.0,
                "error": False,
                "look": look,
            }
        )
    out = monitor_guardrails(rows, spec)
    # the table the monitor reads from the state DB (`pilots.monitor_observations`), shuffled index and all,
    # is judged as the same rows one dict each
    assert monitor_guardrails(pd.DataFrame(rows, index=np.arange(len(rows))[::-1]), spec) == out
    checks = {c["name"]: c for c in out["checks"]}
    assert out["looks"] == 50 and out["pairs"] == 600
    assert out["breached"] == ["quality_loss"], out
    loss = checks["quality_loss"]
    assert loss["threshold"] == 0.03 and loss["lower_bound"] > 0.03 and loss["value"] > 0.1
    begins = int(re.search(r"the evidence begins with look (\d+) of 50", loss["note"]).group(1))
    assert 18 <= begins <= 24, loss["note"]  # the loss began with look 21
    assert checks["error_rate_increase"]["evaluated"] and not checks["error_rate_increase"]["breached"]

    healthy = [r if r["arm"] == "control" else {**r, "quality": 1.0} for r in rows]
    assert monitor_guardrails(healthy, spec)["breached"] == []

    alone = monitor_guardrails([r for r in rows if r["arm"] == "treatment"], spec)
    by_name = {c["name"]: c for c in alone["checks"]}
    for paired_check in ("quality_loss", "error_rate_increase"):
        assert not by_name[paired_check]["evaluated"] and "both arms" in by_name[paired_check]["note"]
    assert by_name["treatment_error_rate"]["evaluated"] and alone["breached"] == []
    outcome, why = _monitor_verdict({"passed": True}, alone, 0.05)
    assert outcome == "GO" and "quality_loss not judged" in why

    broken = [dict(r) for r in healthy]
    broken[0]["quality"] = float("nan")  # a dense answer's score: the pairs cannot be judged
    out = monitor_guardrails(broken, spec)
    assert out["problems"] and {c["name"]: c["evaluated"] for c in out["checks"]}["treatment_error_rate"]
    assert _monitor_verdict({"passed": True}, out, 0.05)[0] == "INVALID"
    assert monitor_guardrails(pd.DataFrame(broken), spec) == out
    nothing = monitor_guardrails(pd.DataFrame(columns=[*rows[0]]), spec)
    assert nothing == monitor_guardrails([], spec) and nothing["n_treatment"] == 0 and not nothing["checks"]


# ---------------------------------------------------------------- bad input: INVALID naming the column


def _base() -> pd.DataFrame:
    return paired_frame(np.full(30, 0.9), np.full(30, 0.9))


@pytest.mark.parametrize(
    ("mutate", "column", "mode"),
    [
        (lambda df: df.assign(quality=df["quality"].where(df.index != 3, np.nan)), "quality", "paired"),
        (lambda df: df.assign(quality=df["quality"].where(df.index != 3, np.inf)), "quality", "paired"),
        (lambda df: df.assign(quality=df["quality"].where(df.index != 4, 1.5)), "quality", "paired"),
        (lambda df: df.assign(quality=df["quality"].where(df.index != 4, -1.0)), "quality", "paired"),
        (
            lambda df: df.assign(latency_ms=df["latency_ms"].where(df.index != 5, -3.0)),
            "latency_ms",
            "paired",
        ),
        (lambda df: df.assign(latency_ms=df["latency_ms"].where(df.index != 5, 0.0)), "latency_ms", "paired"),
        (
            lambda df: df.assign(latency_ms=df["latency_ms"].where(df.index != 5, np.nan)),
            "latency_ms",
            "paired",
        ),
        (lambda df: df.assign(arm=df["arm"].where(df.index != 6, "treatmnt")), "arm", "paired"),
        (lambda df: pd.concat([df, df.iloc[[7]]], ignore_index=True), "request_id", "paired"),
        (
            lambda df: df.assign(error=df["error"].astype(object).where(df.index != 2, "maybe")),
            "error",
            "paired",
        ),
        (lambda df: df, "request_id", "split"),  # shadow rows (both arms per request) judged as a split step
        (lambda df: df.drop(columns=["latency_ms"]), "latency_ms", "paired"),
        (lambda df: df.iloc[0:0], "empty", "paired"),
        (lambda df: pd.concat([df, df[["quality"]]], axis=1), "quality", "paired"),  # a column named twice
    ],
)
def test_bad_input_is_invalid_naming_the_column(mutate, column: str, mode: str) -> None:
    df = mutate(_base())
    d = decide(df, SETTINGS, mode=mode, planned_treatment_share=0.5 if mode == "split" else None)
    assert d.outcome == "INVALID" and d.reasons == ("invalid-input",)
    assert any(column in p for p in d.input_problems), d.input_problems
    assert column in d.explanation or column == "empty"
    json.dumps(d.to_dict(), allow_nan=False)  # still storable evidence


def test_a_missing_request_id_in_a_split_step_is_invalid_not_a_crash() -> None:
    df = split_frame(np.ones(40), alternate(40))
    df["request_id"] = df["request_id"].where(df.index != 3)
    d = decide(df, SETTINGS, planned_treatment_share=0.5)
    assert d.outcome == "INVALID"
    assert d.input_problems == ("column 'request_id': missing/NaN value in 1 row(s), e.g. at rows [3]",)


def test_a_quality_of_minus_one_cannot_turn_no_go_into_go() -> None:
    """The issue's case: control scores of -1 used to make a clear NO-GO look like GO."""
    t = alternate(400)
    q = np.where(t, 0.5, -1.0)
    assert decide(split_frame(q, t), SETTINGS, planned_treatment_share=0.5).outcome == "INVALID"


def test_not_a_frame_is_invalid() -> None:
    assert decide([{"request_id": "a"}], SETTINGS, mode="paired").outcome == "INVALID"  # type: ignore[arg-type]


# ---------------------------------------------------------------- history, fingerprint, evidence


def test_history_round_trips_and_the_interval_never_widens() -> None:
    rng = np.random.default_rng(2)
    qc = rng.beta(8, 2, 600)
    qt = np.clip(qc + rng.normal(0, 0.05, 600), 0, 1)
    history, evidence, lows = GateHistory(), [], []
    for k in (100, 200, 400, 600):
        d = decide(paired_frame(qc[:k], qt[:k]), SETTINGS, history, mode="paired")
        evidence.append(json.loads(json.dumps(d.to_dict())))
        history = d.next_history(history)
        lows.append(d.quality.interval_low)
    assert lows == sorted(lows)
    rebuilt = GateHistory.from_evidence(evidence)
    assert rebuilt.looks == 4 and rebuilt.interval_low == pytest.approx(history.interval_low)


def test_fingerprint_sees_order_and_any_change() -> None:
    df = _base()
    fp = data_fingerprint(df)
    assert fp == data_fingerprint(df.copy())
    assert fp != data_fingerprint(df.iloc[::-1].reset_index(drop=True))  # the order is evidence
    changed = df.copy()
    changed.loc[0, "quality"] = np.nextafter(0.9, 1.0)
    assert fp != data_fingerprint(changed)
    # the same text in any storage pandas may pick (pandas 2's object columns, pandas 3's Arrow `str`,
    # Python-backed strings) gives the same fingerprint; a changed or moved character does not
    ids = df["request_id"].astype(str).tolist()
    for storage in (object, "string[python]", "string[pyarrow]", pd.ArrowDtype(pa.large_string())):
        assert data_fingerprint(df.assign(request_id=pd.Series(ids, dtype=storage))) == fp, storage
    assert fp != data_fingerprint(df.assign(request_id=[ids[0] + ids[1], "", *ids[2:]]))
    assert fp != data_fingerprint(df.assign(request_id=[ids[0] + "\u00e9", *ids[1:]]))


def test_the_fingerprint_algorithm_is_pinned_on_exact_data() -> None:
    """A stored decision's idempotency key is its step and this fingerprint: were the algorithm to change,
    a re-run on unchanged data would record a second decision. Pinned on values every machine holds
    exactly (the gate references pin it too but their inputs come through log1p and power, whose last bit
    may differ between machines: tests/rollout/test_gate_reference.py)."""
    from rollout.gate.inputs import check_observations

    df = pd.DataFrame(
        {
            "request_id": ["r0", "r0", "r1", "r1", "r\u00e92", "r\u00e92"],
            "arm": ["control", "treatment"] * 3,
            "quality": [1.0, 0.75, 0.5, 0.5, 0.0, 0.25],
            "latency_ms": [120.0, 96.5, 200.0, 150.25, 80.0, 64.0],
            "error": [False, False, False, True, False, False],
        }
    )
    assert data_fingerprint(df) == "038e25866eba44a3a28c1c04508765742d77b970a2f0e867c8d5a1222abe58dd"
    checked = check_observations(df, mode="paired").frame  # what decide() hashes: the arm as codes
    assert data_fingerprint(checked) == "f30ce9656132cf4db41bc07e9fd0c32358192e2e512be4f0fab70c394bfcce57"
    assert decide(df, SETTINGS, mode="paired").data_fingerprint == data_fingerprint(checked)


def test_evidence_is_complete_and_json_safe() -> None:
    d = decide(paired_frame(np.ones(50), np.ones(50)), SETTINGS, mode="paired")
    ev = json.loads(json.dumps(d.to_dict(), allow_nan=False))
    for key in ("outcome", "reasons", "explanation", "n_pairs", "guardrails", "data_fingerprint", "quality"):
        assert key in ev
    for key in ("estimate", "interval_low", "interval_high", "log_capital_go", "threshold", "method"):
        assert key in ev["quality"]
    assert ev["quality"]["threshold"] == pytest.approx(math.log(20))
    assert isinstance(d, Decision)
    with pytest.raises(AttributeError):
        d.outcome = "GO"  # type: ignore[misc]


# ---------------------------------------------------------------- planning and projection


def test_projection_of_identical_pairs_by_hand() -> None:
    """With every difference 0 the best constant bet is the cap, growth log(1 + cap x margin) per pair."""
    arms = paired_arms(check_observations(paired_frame(np.ones(40), np.ones(40)), mode="paired").frame)
    s = GateSettings(margin=0.03)
    _, logk = rejects(arms.stream, -0.03, "lower", 0.05, **prior(s, "paired", 0.5))
    g = math.log1p(TRUNCATION["paired"] / 0.97 * 0.03)
    n = projected_sample_size(arms.stream, m0=-0.03, log_capital_now=float(logk[-1]), alpha=0.05)
    assert n == 40 + math.ceil((math.log(20) - logk[-1]) / g)


def test_no_projection_when_the_estimate_is_below_the_margin() -> None:
    arms = paired_arms(check_observations(paired_frame(np.ones(40), np.full(40, 0.9)), mode="paired").frame)
    assert projected_sample_size(arms.stream, m0=-0.03, log_capital_now=0.0, alpha=0.05) is None


def test_quality_shown_but_the_minimum_not_reached_projects_the_minimum_and_says_so() -> None:
    """Identical pairs at margin 0.05 prove non-inferiority after ~65-76 pairs, before a step minimum of
    100: the projection is what the step needs (the minimum), not the pairs in hand, so the main job asks
    for them at once instead of creeping up 10% a look; the text says quality is already shown."""
    s = GateSettings(margin=0.05, guardrail_min_samples=30)
    d = decide(paired_frame(np.ones(80), np.ones(80)), s, mode="paired", min_samples_per_arm=100)
    assert (d.outcome, d.reasons, d.quality.verdict) == ("EXTEND", ("min-sample",), "non-inferior")
    assert d.projected_requests == 100
    assert "Quality is already shown within the allowed margin; the step waits for its minimum sample " in (
        d.explanation
    )
    assert "(100 pairs)" in d.explanation and "either way" not in d.explanation
    # a split step's minimum is per arm: at a 10% share, 100 sparse-arm rows take 1,000 requests
    t = np.arange(400) % 10 == 0
    d = decide(split_frame(np.ones(400), t), s, planned_treatment_share=0.1, min_samples_per_arm=100)
    assert d.outcome == "EXTEND" and "min-sample" in d.reasons
    assert d.projected_requests is not None and d.projected_requests >= 1000
    assert "(at least 100 per arm)" in d.explanation or "(100 per arm)" in d.explanation


def test_a_late_ramp_step_projects_requests_for_its_small_control_arm() -> None:
    """The per-arm minimum is met by the smaller arm, whichever it is: at a 90% ramp step the control arm
    gets 10% of the requests, so 100 control rows take 1,000 requests (not 100 / 0.9 = 112)."""
    s = GateSettings(margin=0.05, guardrail_min_samples=30)
    t = np.arange(400) % 10 != 0  # 90% treatment as planned: 40 control rows
    d = decide(split_frame(np.ones(400), t), s, planned_treatment_share=0.9, min_samples_per_arm=100)
    assert d.outcome == "EXTEND" and "min-sample" in d.reasons
    assert d.projected_requests is not None and d.projected_requests >= 1000, d.projected_requests


def test_a_breach_diluted_by_later_rows_says_where_its_bound_applies() -> None:
    """Four errors in the first 40 of 3,000 shadow requests breach a 1% ceiling (the evidence showed it
    then), though the rate over all rows is 0.13%: the text must not call 0.13% "above the limit"."""
    err = np.zeros(3000, bool)
    err[:4] = True
    s = GateSettings(margin=0.03, min_samples_per_arm=100, guardrail_min_samples=30, max_error_rate=0.01)
    d = decide(paired_frame(np.full(3000, 0.8), np.full(3000, 0.8), err_t=err), s, mode="paired")
    g = next(g for g in d.guardrails if g.name == "treatment_error_rate")
    assert d.outcome == "NO-GO" and g.breached and g.value < g.threshold < g.lower_bound
    assert "was above the limit 0.01 over a stretch of this step's rows" in d.explanation
    assert "though over all of them it is 0.001333" in d.explanation


def test_the_texts_name_the_limit_reached_and_each_bound_its_own_level() -> None:
    s = GateSettings(margin=0.03, min_samples_per_arm=10, max_looks=3, max_duration_days=14.0)
    rng = np.random.default_rng(3)
    qc = (rng.random(60) < 0.8).astype(float)
    d = decide(paired_frame(qc, qc), s, mode="paired", history=GateHistory(looks=2))
    assert d.outcome == "NO-GO" and "max-duration-inconclusive" in d.reasons
    assert "reached its maximum number of looks (3 of 3)" in d.explanation
    d = decide(paired_frame(qc, qc), s, mode="paired", elapsed_days=15.0)
    assert "reached its maximum duration (15.0 of 14 days)" in d.explanation
    # both bounds: each at its level, and the pair only at 1 - both alphas
    rng = np.random.default_rng(3)
    qc = rng.beta(8, 2, 400)
    d = decide(paired_frame(qc, np.clip(qc + rng.normal(0, 0.1, 400), 0, 1)), s, mode="paired")
    assert (
        "95% confident it is at most" in d.explanation and "(90% confident of both at once)" in d.explanation
    )


def test_the_monitor_with_no_row_of_the_champion_cannot_judge() -> None:
    from rollout.pilots import monitor_guardrails

    rows = [dict(request_id=f"r{i}", arm="control", quality=0.8, latency_ms=10.0, error=0) for i in range(12)]
    g = monitor_guardrails(rows, {"gate": {}})
    assert g["problems"] == [
        "no row of the champion (arm 'treatment'): the monitor judges the champion's own answers"
    ]


def test_planned_sample_size_is_a_simulated_power_quantile() -> None:
    s = GateSettings(margin=0.05, score_type="binary", planned_sd=0.2)
    plan = planned_sample_size(s, paired=True)
    assert plan.n_treatment is not None and plan.paired and plan.expected_requests <= plan.horizon
    looser = planned_sample_size(GateSettings(margin=0.1, score_type="binary", planned_sd=0.2), paired=True)
    assert looser.n_treatment < plan.n_treatment
    split = planned_sample_size(GateSettings(margin=0.05), treatment_share=0.1)
    assert split.n_control > split.n_treatment and not split.paired
    assert planned_sample_size(s, paired=True) is plan  # cached per settings


def test_settings_reject_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValueError, match="alhpa"):
        GateSettings.from_mapping({"alhpa": 0.05})
    with pytest.raises(ValueError, match="max_error_rate"):
        GateSettings(max_error_rate=0.0)
    s = GateSettings.from_mapping(
        {
            "alpha": 0.1,
            "non_inferiority_margin": 0.04,
            "guardrails": {"max_error_rate": 0.05, "p95_latency_ms": 900},
        }
    )
    assert (s.alpha, s.margin, s.max_error_rate, s.latency_slo_ms) == (0.1, 0.04, 0.05, 900)
    assert GateSettings(score_type="binary").sd == pytest.approx(0.4)


def test_the_guardrails_defaults_are_the_specs() -> None:
    """One default per ceiling: settings made in code judge as a spec that leaves the guardrails out."""
    from rollout.spec import Guardrails

    spec, made = Guardrails(), GateSettings()
    assert made.max_error_rate == spec.max_error_rate == 0.01
    assert (made.max_error_rate_increase, made.max_latency_exceedance, made.guardrail_min_samples) == (
        spec.max_error_rate_increase,
        spec.max_latency_exceedance,
        spec.min_samples,
    )
    from_spec = GateSettings.from_mapping({"guardrails": spec.model_dump()})
    assert from_spec.max_error_rate == made.max_error_rate


def test_the_looks_default_is_the_specs() -> None:
    """Settings made in code allow as many looks per step as a spec that leaves gate.max_looks out (it
    was 10 in code and 20 in the spec)."""
    from rollout.spec import GateSpec

    assert GateSettings().max_looks == GateSpec(non_inferiority_margin=0.05).max_looks == 20


def test_rate_stream_breach_needs_evidence() -> None:
    """3 errors in 30 rows against a 2% ceiling is not yet proof; 8 in 30 is."""
    check = guardrail_checks(GateSettings(max_error_rate=0.02, guardrail_min_samples=1))[0]

    def frame_with(errors: int) -> pd.DataFrame:
        e = np.zeros(30, bool)
        e[np.linspace(0, 29, errors).astype(int)] = True
        return check_observations(split_frame(np.ones(30), np.ones(30, bool), error=e), mode="split").frame

    assert not judge(check, frame_with(3), alpha=0.05, mode="monitor").breached
    assert judge(check, frame_with(8), alpha=0.05, mode="monitor").breached
    assert rate_stream(np.zeros(3)).truncation == TRUNCATION["rate"]


def test_overloaded_rows_count_for_quality_but_not_for_the_latency_guardrail() -> None:
    n = 400
    slow = np.where(np.arange(n) % 4 == 0, 2000.0, 100.0)  # 25% over the 800 ms SLO...
    df = paired_frame(np.ones(n), np.ones(n), lat_t=slow)
    overloaded = np.zeros(2 * n, bool)
    overloaded[1::2] = slow > 800  # ...all of them measured while the host was oversubscribed
    d = decide(df.assign(overloaded=overloaded), SETTINGS, mode="paired")
    assert d.outcome == "GO" and d.n_pairs == n
    g = next(g for g in d.guardrails if g.name == "treatment_latency_over_slo")
    assert g.excluded == 100 and g.n == 300 and "under CPU overload left out" in g.note
    assert decide(df, SETTINGS, mode="paired").outcome == "NO-GO"  # the same rows, not flagged
    bad = decide(df.assign(overloaded="yes"), SETTINGS, mode="paired")
    assert bad.outcome == "INVALID" and "column 'overloaded'" in bad.input_problems[0]


def test_a_go_shows_the_p95_latency_of_the_rows_its_guardrail_judged_and_names_those_left_out() -> None:
    """Review s48 L3: a GO read "No safety limit is shown to be broken (... p95 latency 2000 ms)" against an
    800 ms SLO: the p95 took in the rows measured under CPU overload that the latency guardrail left out.
    The p95s are now over the rows measured on a host not overloaded, and the text counts those left out."""
    n = 400
    slow = np.where(np.arange(n) % 4 == 0, 2000.0, 100.0)
    overloaded = np.zeros(2 * n, bool)
    overloaded[1::2] = slow > 800
    overloaded[0:40:2] = True  # 20 control rows too
    d = decide(
        paired_frame(np.ones(n), np.ones(n), lat_t=slow).assign(overloaded=overloaded),
        SETTINGS,
        mode="paired",
    )
    assert d.outcome == "GO" and d.p95_latency_treatment_ms == 100.0 and d.p95_latency_control_ms == 100.0
    assert (d.overloaded_treatment_rows, d.overloaded_control_rows) == (100, 20)
    assert (
        "No safety limit is shown to be broken (sparse error rate 0.0%, p95 latency 100 ms over the 300 "
        "sparse-arm rows measured on a host not overloaded; 100 collected under CPU overload are left out)"
    ) in d.explanation
    assert "latency-unmeasurable-on-this-host" not in d.reasons
    quiet = decide(paired_frame(np.ones(n), np.ones(n)), SETTINGS, mode="paired")
    assert "(sparse error rate 0.0%, p95 latency 100 ms)." in quiet.explanation


@pytest.mark.parametrize(
    ("overloaded_rows", "said"),
    [(100, True), (85, True), (10, False)],  # 100 rows, min 20: 0 or 15 judged: said; 90: judged
)
def test_a_host_too_busy_to_measure_latency_is_said_at_the_first_look_and_decides_nothing(
    overloaded_rows: int, said: bool
) -> None:
    """Review s48 L6: on a host that stays busy every sparse-arm latency is left out; the pilot ran all its
    looks to a NO-GO without a word that the host, not the evidence, was the obstacle. From the first look
    where the rows would have judged the latency limit but too few were measured on a quiet host, the
    decision says so (reason `latency-unmeasurable-on-this-host`); the outcome stays the gate's."""
    n = 100
    overloaded = np.zeros(2 * n, bool)
    overloaded[1 : 2 * overloaded_rows : 2] = True
    df = paired_frame(np.ones(n), np.ones(n)).assign(overloaded=overloaded)
    d = decide(df, SETTINGS, mode="paired")
    assert ("latency-unmeasurable-on-this-host" in d.reasons) is said
    assert d.outcome == "EXTEND"
    text = (
        f"Latency unmeasurable on this host so far: {overloaded_rows} of {n} sparse-arm rows were collected"
    )
    assert (text in d.explanation) is said
    last = decide(df, SETTINGS, mode="paired", now_look=SETTINGS.max_looks)
    assert last.outcome == "NO-GO"  # as it was: inconclusive at the maximum never ships


def test_an_invalid_look_on_a_busy_host_lists_only_why_its_data_is_not_trusted() -> None:
    """Review V, V2: a sample-ratio mismatch on a host busy the whole look listed the host's load beside
    it, and the portfolio said "data not trusted: sample ratio mismatch, latency unmeasurable on this
    host". An INVALID's reasons are why its data is not trusted; the load is none of them."""
    from rollout.queries import waits_for

    n = 600
    treated = np.random.default_rng(3).random(n) < 0.5  # split 50/50 by the serving system ...
    df = split_frame(np.ones(n), treated).assign(overloaded=True)  # ... on a host busy every answer
    d = decide(df, SETTINGS, mode="split", planned_treatment_share=0.10)  # ... while the step's share is 10%
    assert d.outcome == "INVALID" and d.reasons == ("sample-ratio-mismatch",)
    row = {"pilot_status": "running", "decision": d.outcome, "decision_kind": "gate", "awaiting": "none",
           "decision_reasons": list(d.reasons), "step_kind": "split"}  # fmt: skip
    assert waits_for(row).endswith("(data not trusted: sample ratio mismatch)")


def test_a_look_from_the_old_asymptotic_gate_counts_as_a_look_but_not_in_the_interval() -> None:
    old = {
        "look_index": 1,
        "data_fingerprint": "x",
        "quality": {"look_low": -0.029, "look_high": 0.029, "counts_toward_interval": True},  # no method
    }
    hist = GateHistory.from_evidence([old])
    assert hist.looks == 1 and hist.interval_low == -math.inf and hist.interval_high == math.inf


def test_bench_gate_prints_a_table_and_writes_json(tmp_path) -> None:
    from typer.testing import CliRunner

    from sparsepilot.cli import app

    out = tmp_path / "gate.json"
    res = CliRunner().invoke(
        app, ["bench", "gate", "--rows", "400,2000", "--repeats", "1", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert "decide() time" in res.output
    rows = json.loads(out.read_text())["decide"]["rows"]
    assert [(r["mode"], r["rows"]) for r in rows] == [
        ("split", 400),
        ("split", 2000),
        ("paired", 400),
        ("paired", 2000),
    ]
    assert all(r["best_s"] > 0 and r["outcome"] in ("GO", "EXTEND", "NO-GO") for r in rows)
    load = json.loads(out.read_text())["decide"]["environment"]["host_load"]  # the others during the timing
    assert load["threads"] == 1 and load["seconds"] > 0 and isinstance(load["overloaded"], bool)
    assert "guardrail rate checks, exact" in res.output
    guard = {(r["check"], r["ceiling"]): r for r in json.loads(out.read_text())["guardrails"]}
    assert guard[("latency over SLO (p95)", 0.05)]["power_2.5x"] >= 0.95
    assert guard[("error rate", 0.01)]["rows_for_95"] > guard[("error rate", 0.01)]["fewest_rows_any_test"]
    bad = CliRunner().invoke(app, ["bench", "gate", "--rows", "ten"])
    assert bad.exit_code == 2 and "--rows" in bad.output
