"""ROI against numbers worked out by hand (docs/roi.md walks through the first one)."""

from __future__ import annotations

import math

import pytest

from rollout.roi import (
    DAYS_PER_MONTH,
    RoiInputs,
    compute_roi,
    decode_outcome,
    payback_days,
    roi_for_spec,
    speedup_interval,
    usd,
)
from rollout.spec import load_spec

from .usecase_helpers import EXAMPLES


def _inputs(**kw) -> RoiInputs:  # noqa: ANN003
    base = dict(
        dense_tps=3100.0,
        speedup=2.0,
        speedup_low=1.5,
        speedup_high=2.5,
        requests_per_day=10_000,
        prompt_tokens=3000,
        output_tokens=100,
        gpu_usd_per_hour=2.0,
        utilisation=0.5,
        pilot_one_off_usd=1000.0,
    )
    base.update(kw)
    return RoiInputs(**base)


def test_worked_example() -> None:
    r = compute_roi(_inputs())
    # 3100 tokens per request at 3100 tokens/s = 1 s; 10,000 s/day = 2.777.. busy hours; at 50%
    # utilisation 5.555.. paid GPU-hours/day; x $2 x 30.4375 days = $338.19/month dense.
    assert DAYS_PER_MONTH == 30.4375
    assert r.dense_seconds_per_request == pytest.approx(1.0)
    assert r.dense_gpu_hours_day == pytest.approx(50 / 9)
    assert r.dense_usd_month == pytest.approx(338.194444, abs=1e-5)
    # 2x on the prompt, not on the output (no decode throughput measured: output tokens at T_d in both
    # arms): 3000/6200 + 100/3100 = 0.516 s, 2.867 hours, $174.55 -> saves $163.64
    assert r.sparse_seconds_per_request == pytest.approx(3000 / 6200 + 100 / 3100)
    assert r.sparse_gpu_hours_day == pytest.approx(2.867384, abs=1e-6)
    assert r.sparse_usd_month == pytest.approx(174.551971, abs=1e-5)
    assert r.saved_usd_month == pytest.approx(163.642473, abs=1e-5)
    # 1.5x: 3000/4650 + 100/3100 = 0.677 s -> $229.10 -> saves 109.09; 2.5x: 0.419 s -> saves 196.37
    assert r.saved_usd_month_low == pytest.approx(109.094982, abs=1e-5)
    assert r.saved_usd_month_high == pytest.approx(196.370968, abs=1e-5)
    # $1000 / ($163.64 / 30.4375 = $5.376 a day) = 186 days; 155 and 279 days at the ends
    assert r.payback_days == pytest.approx(186.0)
    assert r.payback_days_low == pytest.approx(155.0)
    assert r.payback_days_high == pytest.approx(279.0)
    assert r.pays_off and r.certain
    assert r.verdict == "saves $164/month ($109-$196); pays back the $1,000 pilot in 186 days"


def test_worked_example_with_sparse_decode() -> None:
    # docs/roi.md, "Sparse decode": 1,000 prompt tokens at 1,000 tok/s = 1 s, 100 output tokens at
    # 50 tok/s dense = 2 s -> 3 s dense. Prefill not sped up (S = 1), sparse decode at 100 tok/s [75, 125]:
    # 1 + 1 = 2 s -> effective speed-up 1.5, a third of the cost saved.
    r = compute_roi(
        _inputs(
            dense_tps=1000.0,
            speedup=1.0,
            speedup_low=1.0,
            speedup_high=1.0,
            prompt_tokens=1000,
            output_tokens=100,
            decode_tps=50.0,
            sparse_decode_tps=100.0,
            sparse_decode_tps_low=75.0,
            sparse_decode_tps_high=125.0,
        )
    )
    assert r.dense_seconds_per_request == pytest.approx(3.0)
    assert r.sparse_seconds_per_request == pytest.approx(2.0)
    assert r.effective_speedup == pytest.approx(1.5)
    # dense: 30,000 s/day / 3600 / 0.5 = 16.67 h/day x $2 x 30.4375 = $1,014.58/month; sparse $676.39
    assert r.dense_usd_month == pytest.approx(1014.583333, abs=1e-5)
    assert r.sparse_usd_month == pytest.approx(676.388889, abs=1e-5)
    assert r.saved_usd_month == pytest.approx(338.194444, abs=1e-5)
    # 75 tok/s: 1 + 1.333 s -> $789.12 -> saves $225.46; 125 tok/s: 1 + 0.8 s -> $608.75 -> saves $405.83
    assert r.saved_usd_month_low == pytest.approx(225.462963, abs=1e-5)
    assert r.saved_usd_month_high == pytest.approx(405.833333, abs=1e-5)
    assert r.effective_speedup_low == pytest.approx(3 / (1 + 100 / 75))
    assert r.effective_speedup_high == pytest.approx(3 / 1.8)
    # $1,000 / ($338.19 / 30.4375 = $11.11 a day) = 90 days; 75 and 135 days at the ends
    assert r.payback_days == pytest.approx(90.0)
    assert r.payback_days_low == pytest.approx(75.0)
    assert r.payback_days_high == pytest.approx(135.0)
    assert r.pays_off and r.certain
    # without sparse decode the same use case saves nothing: output tokens cost the same in both arms
    flat = compute_roi(
        _inputs(
            dense_tps=1000.0,
            speedup=1.0,
            speedup_low=1.0,
            speedup_high=1.0,
            prompt_tokens=1000,
            decode_tps=50.0,
        )
    )
    assert flat.saved_usd_month == pytest.approx(0.0) and not flat.pays_off


def test_sparse_decode_inputs_are_checked() -> None:
    with pytest.raises(ValueError, match="sparse_decode_tps needs decode_tps"):
        compute_roi(_inputs(sparse_decode_tps=100.0))
    with pytest.raises(ValueError, match="sparse decode interval must contain the estimate"):
        compute_roi(_inputs(decode_tps=50.0, sparse_decode_tps=100.0, sparse_decode_tps_low=120.0))
    with pytest.raises(ValueError, match="sparse_decode_tps must be a finite number > 0"):
        compute_roi(_inputs(decode_tps=50.0, sparse_decode_tps=0.0))
    slower = compute_roi(
        _inputs(speedup=1.0, speedup_low=1.0, speedup_high=1.0, decode_tps=50.0, sparse_decode_tps=40.0)
    )
    assert not slower.pays_off
    assert slower.verdict.startswith(
        "no savings: the per-request speed-up (prefill and decode together) is 0."
    )


def test_a_verdict_never_credits_sparse_decode_where_decode_stays_dense() -> None:
    """Review U7: below decode's break-even the sparse arm decodes on the dense path (its line says
    1.00x), so the sub-1 per-request figure is prefill's diluted by dense decode, not "with sparse
    decode" as the verdict said."""
    below = compute_roi(
        _inputs(speedup=0.9, speedup_low=0.8, speedup_high=0.95, decode_tps=50.0, sparse_decode_tps=50.0)
    )
    assert not below.pays_off
    assert "sparse decode" not in below.verdict
    assert "per-request speed-up (prefill and decode together)" in below.verdict


def test_output_tokens_at_dense_decode_speed_dilute_the_speed_up() -> None:
    # prompt 3000 tokens at 3000 tok/s = 1 s; 100 output tokens at 100 tok/s = 1 s -> 2 s dense.
    # Sparse prefill at 2x: 0.5 + 1 = 1.5 s -> effective speed-up 4/3, a quarter of the cost saved.
    r = compute_roi(_inputs(dense_tps=3000.0, decode_tps=100.0))
    assert r.dense_seconds_per_request == pytest.approx(2.0)
    assert r.sparse_seconds_per_request == pytest.approx(1.5)
    assert r.effective_speedup == pytest.approx(4 / 3)
    assert r.saved_usd_month == pytest.approx(r.dense_usd_month / 4)
    # dense: 20,000 s/day / 3600 / 0.5 = 11.11 h/day x 2 x 30.4375 = $676.39/month
    assert r.dense_usd_month == pytest.approx(676.388889, abs=1e-5)


def test_speed_up_at_or_below_one_reports_the_loss_and_flags_it() -> None:
    r = compute_roi(_inputs(speedup=0.8, speedup_low=0.7, speedup_high=0.9))
    # the prompt at 0.8x, the output at T_d: 3000/2480 + 100/3100 = 1.2419 s -> $420.02 -> -81.82 a month,
    # never pays back
    assert r.saved_usd_month == pytest.approx(338.194444 * (1 - (3000 / 2480 + 100 / 3100)), abs=1e-5)
    assert r.saved_usd_month == pytest.approx(-81.821237, abs=1e-5)
    assert r.saved_usd_month < 0 and not r.pays_off and not r.certain
    assert r.payback_days is None and r.payback_days_low is None and r.payback_days_high is None
    assert r.verdict.startswith("no savings: the speed-up is 0.80x (<= 1)")
    even = compute_roi(_inputs(speedup=1.0, speedup_low=1.0, speedup_high=1.0))
    assert even.saved_usd_month == 0 and not even.pays_off and even.payback_days is None


def test_a_loss_at_the_estimate_whose_interval_reaches_a_saving_is_not_called_a_loss() -> None:
    r = compute_roi(_inputs(speedup=0.98, speedup_low=0.7, speedup_high=1.6))
    assert r.saved_usd_month < 0 < r.saved_usd_month_high and not r.pays_off
    assert r.verdict.startswith("not shown to save: the speed-up is 0.98x (<= 1); at the estimate")
    assert f"the interval reaches {usd(r.saved_usd_month_high)}/month saved" in r.verdict
    even = compute_roi(_inputs(speedup=1.0, speedup_low=1.0, speedup_high=1.0))
    assert "would cost $0/month more" in even.verdict  # never "$-0"


def test_one_timing_pair_establishes_nothing() -> None:
    """Without an interval (one pair) the ends are the estimate: a zero-width "interval" used to make
    the saving certain, counted as established in the portfolio and piloted by the main job."""
    spec = load_spec(EXAMPLES / "docs-qa.yaml")
    r = roi_for_spec(spec, dense_tps=1000.0, sparse_tps=1500.0)
    assert r.pays_off and not r.certain and r.saved_usd_month_low == r.saved_usd_month
    assert "no interval was measured (one timing pair): savings are not established" in r.verdict
    assert roi_for_spec(spec, dense_tps=1000.0, sparse_tps=1500.0, speedup_interval=(1.4, 1.6)).certain


def test_uncertain_when_the_interval_reaches_no_savings() -> None:
    r = compute_roi(_inputs(speedup=1.25, speedup_low=0.9, speedup_high=1.6))
    assert r.pays_off and not r.certain
    assert r.saved_usd_month_low < 0 < r.saved_usd_month
    assert r.payback_days_high is None and r.payback_days_low is not None
    assert "savings are not established" in r.verdict


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("dense_tps", 0.0),
        ("utilisation", 1.2),
        ("utilisation", 0.0),
        ("requests_per_day", -1.0),
        ("speedup", math.nan),
    ],
)
def test_bad_inputs_raise(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        compute_roi(_inputs(**{field: value}))
    with pytest.raises(ValueError, match="interval must contain"):
        compute_roi(_inputs(speedup_low=2.1))


def test_dollars_that_overflow_are_refused_naming_the_inputs() -> None:
    """Inputs inside their ranges can overflow the paid hours (inf - inf: NaN dollars, a NaN payback and a
    verdict of "$0/month more"): refused, naming what overflowed and the fields to check."""
    with pytest.raises(ValueError, match=r"dense_usd_month is inf: .*utilisation 1e-310.*cost\.utilisation"):
        compute_roi(_inputs(utilisation=1e-310))
    with pytest.raises(ValueError, match="traffic.requests_per_day"):
        compute_roi(_inputs(requests_per_day=1e300, gpu_usd_per_hour=1e300))


def test_payback_days() -> None:
    assert payback_days(1000, 304.375) == pytest.approx(100.0)
    assert payback_days(0, 10) == 0
    assert payback_days(1000, 0) is None


def test_roi_for_spec_uses_the_traffic_mix() -> None:
    spec = load_spec(EXAMPLES / "docs-qa.yaml")
    # prompt mean 2048*.3 + 3072*.45 + 4096*.25 = 614.4 + 1382.4 + 1024 = 3020.8;
    # output {p50: 24, p99: 64}: masses .745/.255 -> 17.88 + 16.32 = 34.2
    r = roi_for_spec(spec, dense_tps=1000.0, sparse_tps=1500.0, speedup_interval=(1.2, 1.8))
    assert r.inputs.prompt_tokens == pytest.approx(3020.8)
    assert r.inputs.output_tokens == pytest.approx(24 * 0.745 + 64 * 0.255)
    t = (3020.8 + 34.2) / 1000.0
    hours = 120_000 * t / 3600 / 0.55
    assert r.dense_gpu_hours_day == pytest.approx(hours)
    assert r.dense_usd_month == pytest.approx(hours * 2.5 * DAYS_PER_MONTH)
    # 1.5x on the prompt, the output at the dense rate: t_sparse = 3020.8 / 1500 + 34.2 / 1000
    sparse_t = 3020.8 / 1500.0 + 34.2 / 1000.0
    assert r.saved_usd_month == pytest.approx(r.dense_usd_month * (1 - sparse_t / t))
    assert (r.inputs.speedup_low, r.inputs.speedup_high) == (1.2, 1.8)


def test_speedup_interval_from_timings() -> None:
    # the host slowed both arms of the second pair alike and sped up the third: pairs cancel it exactly
    assert speedup_interval([1.0, 1.1, 0.9], [0.5, 0.55, 0.45]) == pytest.approx((2.0, 2.0, 2.0))
    # the pairs' ratios 2.0, 2.2, 1.8: t over their logs, 2 dof, t(0.975, 2) = 4.302653
    est, lo, hi = speedup_interval([2.0, 2.2, 1.8], [1.0, 1.0, 1.0])
    r = [math.log(2.0), math.log(2.2), math.log(1.8)]
    mean = sum(r) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in r) / 2)
    assert est == pytest.approx(math.exp(mean))
    assert lo == pytest.approx(math.exp(mean - 4.302653 * sd / math.sqrt(3)), rel=1e-6)
    assert hi == pytest.approx(math.exp(mean + 4.302653 * sd / math.sqrt(3)), rel=1e-6)
    assert lo < est < hi
    with pytest.raises(ValueError):
        speedup_interval([1.0], [0.5, 0.6])
    with pytest.raises(ValueError, match="as many dense as sparse"):
        speedup_interval([1.0, 1.1, 1.2], [0.5, 0.6])


def test_pilot_skip_reason_says_why_a_pilot_would_be_wasted() -> None:
    from rollout.roi import pilot_skip_reason as skip

    def pilot_skip_reason(**kw) -> str | None:
        found = skip(**kw)
        return None if found is None else str(found)

    ok = dict(met_budget=True, density=0.6, saved_usd_month=1200.0)
    assert pilot_skip_reason(**ok, saved_usd_month_low=800.0, saved_usd_month_high=1600.0) is None
    # no interval (one timing pair) establishes nothing; said in every surface's words (roi.NO_INTERVAL,
    # where it said "no interval measured")
    assert "saving not established ($1,200/month, no interval: one timing pair)" in pilot_skip_reason(**ok)
    assert "met the quality budget" in pilot_skip_reason(met_budget=False, density=0.5, saved_usd_month=900.0)
    assert "keeps 99.95% of blocks" in pilot_skip_reason(
        met_budget=True, density=0.9995, saved_usd_month=50.0
    )
    no_saving = pilot_skip_reason(
        met_budget=True, density=0.95, saved_usd_month=-23.0, saved_usd_month_high=187.0
    )
    assert "no saving expected (-$23/month, at best $187)" in no_saving
    # judged as priced (review V finding 2): every prefill block kept but a measured sparse decode that
    # establishes a saving is a plan to pilot; with decode dense too it is the dense model
    decode_saves = dict(met_budget=True, density=1.0, saved_usd_month=1606.0, saved_usd_month_low=409.0)
    assert pilot_skip_reason(**decode_saves, saved_usd_month_high=2660.0, decode_status="measured") is None
    for dense_decode in (None, "dense", "below_break_even", "dense_layers"):
        assert "keeps 100.00% of blocks (as dense): nothing to pilot" in pilot_skip_reason(
            **decode_saves, decode_status=dense_decode
        )
    # --pilot-all waives the dense-plan and no-saving reasons, never the missed budget.
    assert pilot_skip_reason(met_budget=True, density=0.95, saved_usd_month=-23.0, pilot_anyway=True) is None
    assert pilot_skip_reason(met_budget=True, density=1.0, saved_usd_month=5.0, pilot_anyway=True) is None
    assert "budget" in pilot_skip_reason(
        met_budget=False, density=0.5, saved_usd_month=900.0, pilot_anyway=True
    )
    # A saving whose interval reaches zero (timings from a busy host: 1.94x [0.05, 14.42]) is not
    # established: no pilot on it, unless --pilot-all.
    wide = dict(met_budget=True, density=0.6, saved_usd_month=10_762.0, saved_usd_month_high=25_520.0)
    assert "saving not established ($10,762/month, interval -$289,022, $25,520)" in pilot_skip_reason(
        **wide, saved_usd_month_low=-289_022.0
    )
    assert pilot_skip_reason(**wide, saved_usd_month_low=-289_022.0, pilot_anyway=True) is None
    assert pilot_skip_reason(**wide, saved_usd_month_low=1_078.0) is None
    # Unknown numbers are not a reason to skip.
    assert pilot_skip_reason(met_budget=None, density=None, saved_usd_month=None) is None
    # the finding apart from what follows from it (the portfolio's "no pilot: ..." says the finding)
    found = skip(met_budget=True, density=0.95, saved_usd_month=-23.0, saved_usd_month_high=187.0)
    assert found.why == "no saving expected (-$23/month, at best $187)"
    assert str(found) == f"{found.why}: sparse attention does not pay off here, stays dense, not piloted"


def test_evaluation_roi_prices_output_tokens_at_the_measured_sparse_decode() -> None:
    from flows.evaluate import roi_from_report

    spec = load_spec(EXAMPLES / "support-chat.yaml")
    speed = [{"weight": 1.0, "dense_seconds": [1.0, 1.1], "sparse_seconds": [1.0, 1.1]}]
    report = {
        "speed": speed,
        "speed_summary": {"weighted_dense_tokens_per_s": 500.0, "weighted_sparse_tokens_per_s": 500.0},
    }
    flat = roi_from_report(spec, report, decode_tps=20.0)
    assert flat["decode_from"] == "dense decode in both arms" and flat["saved_usd_month"] == pytest.approx(
        0.0
    )
    report["decode"] = {
        "rows": [],
        "summary": {
            "weighted_dense_tokens_per_s": 20.0,
            "weighted_sparse_tokens_per_s": 26.0,
            "weighted_sparse_tokens_per_s_low": 24.0,
            "weighted_sparse_tokens_per_s_high": 28.0,
        },
    }
    report["speed_summary"]["host"] = {"threads": 1, "pairs_retimed_for_overload": 2}
    report["decode"]["summary"]["host"] = {"threads": 1, "pairs_retimed_for_overload": 0, "cache": "paged"}
    report["decode"]["summary"]["break_even_host"] = {"lengths_timed": 7, "lengths_kept_under_overload": 0}
    report["decode"]["summary"]["context_tokens"] = [2048, 3040]
    r = roi_from_report(spec, report, decode_tps=99.0)  # the side-by-side dense decode figure wins
    # the host's record of the timings behind the dollars: the prefill pairs', the decode runs', and the
    # calibration's break-even timings behind the decode line, with the contexts it is judged at
    assert r["timing_host"] == {
        "prefill": report["speed_summary"]["host"],
        "decode": report["decode"]["summary"]["host"],
        "break_even": report["decode"]["summary"]["break_even_host"],
        "decode_context": [2048, 3040],
    }
    assert r["inputs"]["decode_tps"] == 20.0 and r["inputs"]["sparse_decode_tps"] == 26.0
    p, o = spec.traffic.prompt_tokens.mean(), spec.traffic.output_tokens.mean()
    assert r["effective_speedup"] == pytest.approx((p / 500 + o / 20) / (p / 500 + o / 26))
    assert 0 < r["saved_usd_month_low"] < r["saved_usd_month"] < r["saved_usd_month_high"]
    assert r["decode_from"] == "sparse decode measured side by side"
    assert r["decode"]["status"] == "measured" and r["decode"]["speedup"] == pytest.approx(1.3)
    assert flat["decode"]["status"] == "dense"
    # with the runs' timings, the ROI's sparse decode figure and interval come from them, paired: here
    # the host slowed both runs of a repeat alike and every run pair says 1.25x
    report["decode"]["rows"] = [
        {
            "weight": 1.0,
            "dense_seconds_per_token": [0.050, 0.060, 0.050, 0.045],
            "sparse_seconds_per_token": [0.040, 0.048, 0.040, 0.036],
        }
    ]
    runs = roi_from_report(spec, report, decode_tps=99.0)
    assert runs["inputs"]["sparse_decode_tps"] == pytest.approx(25.0)
    assert runs["inputs"]["sparse_decode_tps_low"] == pytest.approx(25.0)
    assert runs["inputs"]["sparse_decode_tps_high"] == pytest.approx(25.0)
    # a plan without a decode section: the evaluation's dense decode timing prices both arms' output
    report["decode"] = {
        "rows": [],
        "summary": {
            "sparse_decode": False,
            "weighted_dense_tokens_per_s": 20.0,
            "weighted_sparse_tokens_per_s": 20.0,
            "weighted_sparse_tokens_per_s_low": 20.0,
            "weighted_sparse_tokens_per_s_high": 20.0,
        },
    }
    dense = roi_from_report(spec, report, decode_tps=99.0)
    assert dense["inputs"]["decode_tps"] == 20.0 and dense["inputs"]["sparse_decode_tps"] is None
    assert dense["decode_from"] == "dense decode in both arms" and dense["decode"]["status"] == "dense"
    assert dense["saved_usd_month"] == pytest.approx(0.0)


def _decode_section(
    rows_below: list[bool], speedup: tuple, density: float, break_even: int, context: list
) -> dict:
    rows = [{"seq_len": 512, "extra": {"below_break_even": b}} for b in rows_below]
    names = ("weighted_speedup", "weighted_speedup_low", "weighted_speedup_high")
    summary = dict(zip(names, speedup, strict=True))
    summary.update(density=density, break_even_tokens=break_even, context_tokens=context)
    return {"rows": rows, "summary": summary}


def test_decode_line_for_the_roi_reader() -> None:
    # the worked example with sparse decode: prefill not sped up, so the whole saving is decode's
    kw = dict(dense_tps=1000.0, speedup=1.0, speedup_low=1.0, speedup_high=1.0, prompt_tokens=1000)
    fast = compute_roi(
        _inputs(
            **kw,
            decode_tps=50.0,
            sparse_decode_tps=100.0,
            sparse_decode_tps_low=75.0,
            sparse_decode_tps_high=125.0,
        )
    )
    assert fast.decode_saved_usd_month == pytest.approx(338.194444, abs=1e-5) == fast.saved_usd_month
    both = compute_roi(_inputs(decode_tps=50.0, sparse_decode_tps=100.0))  # prefill 2x as well
    prefill_only = compute_roi(_inputs(decode_tps=50.0))
    assert prefill_only.decode_saved_usd_month == 0.0
    assert both.decode_saved_usd_month == pytest.approx(prefill_only.sparse_usd_month - both.sparse_usd_month)
    assert 0 < both.decode_saved_usd_month < both.saved_usd_month

    measured = decode_outcome(_decode_section([False, False], (2.0, 1.5, 2.5), 0.25, 768, [1000, 1100]), fast)
    assert measured["status"] == "measured" and measured["speedup"] == 2.0
    assert measured["line"] == (
        "decode: 2.00x [1.50, 2.50] at 1,000-1,100 tokens of context (25% of the cache read): "
        "saves $338/month"
    )
    assert measured["short"] == "2.00x [1.50, 2.50]"
    mixed = decode_outcome(_decode_section([True, False], (1.2, 1.1, 1.3), 0.6, 3072, [2048, 4160]), fast)
    assert mixed["line"].endswith("; 1 of 2 lengths are below the break-even (3,072 tokens): dense there")

    # a short-context use case: every measured context below the break-even -> 1.00x, no money either way
    flat = compute_roi(_inputs(**kw, decode_tps=50.0, sparse_decode_tps=50.0))
    short = decode_outcome(_decode_section([True, True], (1.0, 1.0, 1.0), 1.0, 3072, [96, 544]), flat)
    assert short["status"] == "below_break_even" and short["speedup"] == 1.0
    assert short["saved_usd_month"] == pytest.approx(0.0)
    assert short["line"] == (
        "decode: no decode saving at this context length: 544 tokens < break-even 3,072 tokens, "
        "so decode stays dense (1.00x) and output tokens cost the same"
    )
    assert short["short"] == "1.00x (544 < break-even 3,072 tokens)"
    # a decode section that keeps every layer dense (calibration skipped the search), measured at
    # contexts past its break-even: identical arms, 1.00x, and the line says why
    rows = [{"extra": {"identical": True, "below_break_even": False}}]
    all_dense = decode_outcome(
        {"rows": rows, "summary": {"break_even_tokens": 4096, "context_tokens": [4200, 4232]}}, flat
    )
    assert all_dense["status"] == "dense_layers" and all_dense["speedup"] == 1.0
    assert all_dense["line"] == (
        "decode: no decode saving: every layer decodes densely (break-even 4,096 tokens), "
        "so decode runs at 1.00x and output tokens cost the same"
    )
    dense = decode_outcome(None, flat)
    assert dense["status"] == "dense" and dense["short"] == "dense" and dense["saved_usd_month"] == 0.0


def test_the_decode_line_shows_the_interval_its_dollars_are_priced_at() -> None:
    """The evaluation summary's own decode figures (90%, each row's interval ends combined) differ from
    the ROI's (the paired runs at 95%): the line beside the dollars shows the ROI's, as docs/roi.md says."""
    kw = dict(dense_tps=1000.0, speedup=1.0, speedup_low=1.0, speedup_high=1.0, prompt_tokens=1000)
    roi = compute_roi(
        _inputs(
            **kw,
            decode_tps=50.0,
            sparse_decode_tps=38.75,
            sparse_decode_tps_low=33.7,
            sparse_decode_tps_high=44.6,
        )
    )
    summary_90 = _decode_section([False, False], (0.7645, 0.6795, 0.8601), 0.11, 768, [768, 1544])
    out = decode_outcome(summary_90, roi)
    assert (out["speedup"], out["speedup_low"], out["speedup_high"]) == pytest.approx((0.775, 0.674, 0.892))
    assert out["line"].startswith("decode: 0.78x [0.67, 0.89] at 768-1,544 tokens of context")
    assert out["short"] == "0.78x [0.67, 0.89]"


def test_timings_kept_under_overload_are_named_beside_the_figures() -> None:
    """Review P finding 1: an evaluation whose pairs were kept under overload (every retime spent) says so
    in one line, with how many of how many pairs and which block; a clean run, or no record, says nothing."""
    from rollout.roi import timing_overload

    clean = {"pairs_timed": 3, "pairs_retimed_for_overload": 2, "pairs_kept_under_overload": 0}
    busy = {"pairs_timed": 4, "pairs_retimed_for_overload": 4, "pairs_kept_under_overload": 4}
    assert timing_overload(None) is None and timing_overload({"prefill": None, "decode": None}) is None
    assert timing_overload({"prefill": clean, "decode": {**clean, "pairs_timed": 4}}) is None
    assert timing_overload(
        {"prefill": {**busy, "pairs_kept_under_overload": 3, "pairs_timed": 3}, "decode": busy}
    ) == (
        "measured under overload: 7 of 7 timed pairs (prefill 3 of 3, decode 4 of 4) were timed while other "
        "processes left too little CPU; rerun on a quieter host"
    )
    assert timing_overload({"prefill": clean, "decode": busy}).startswith(
        "measured under overload: 4 of 7 timed pairs (decode 4 of 4)"
    )


@pytest.mark.parametrize(
    ("figures", "said"),
    [
        ({"savings_month_usd": -41.0, "savings_month_high": 70.0}, "-$41/month, at best $70"),
        ({"savings_month_usd": 900.0, "savings_month_low": -120.0, "savings_month_high": 1500.0}, "interval"),
        ({"savings_month_usd": 900.0}, "$900/month, timed under overload"),
    ],
)
def test_a_saving_timed_under_overload_is_not_established_never_found_not_to_pay(figures, said) -> None:
    """Review L4: an evaluation timed 7 of 7 pairs under overload concluded "sparse attention does not pay
    off here, stays dense", the words of a quiet host. Timings under overload are off in either
    direction: the saving they do not establish is "not established", to be re-evaluated on a quieter
    host (still no pilot; --pilot-all waives it); an established one is piloted as before."""
    from rollout.roi import evaluation_pilot_skip

    warn = "measured under overload: 7 of 7 timed pairs (prefill 3 of 3, decode 4 of 4) were timed ..."
    ev = {"density": 0.6, "measured_under_overload": warn, **figures}
    skip = evaluation_pilot_skip(ev, met_budget=True)
    assert skip is not None and skip.why.startswith("saving not established (") and said in skip.why, skip
    assert "timed under overload" in skip.why and "does not pay off" not in str(skip)
    assert skip.then.endswith("re-evaluate on a quieter host") and "--pilot" not in str(skip)
    assert skip.said("--pilot-all").endswith(
        "re-evaluate on a quieter host (or pilot anyway with --pilot-all)"
    )
    assert evaluation_pilot_skip(ev, met_budget=True, pilot_anyway=True) is None
    established = {**ev, "savings_month_usd": 900.0, "savings_month_low": 300.0, "savings_month_high": 1500.0}
    assert evaluation_pilot_skip(established, met_budget=True) is None


def test_a_break_even_overload_is_named_only_where_it_could_change_the_decode_line() -> None:
    """Review T3, T4: a break-even is moved only by overloaded lengths at or above the longest length
    that was not faster (`overload_spans`: where it could lie on a quiet host), and that matters only
    where a context of the use case lies in that span. The review's calibration had 3 of 36 lengths
    overloaded, all far below each break-even: neither the decode line nor the evaluation's figures are
    "measured under overload"."""
    from rollout.roi import break_even_overload, timing_overload

    base = {"budgets": 3, "lengths_timed": 36, "lengths_kept_under_overload": 3, "overloaded": True}
    review = {**base, "overload_spans": {}}  # 512-1,536 overloaded, break-evens 3,072 / 3,584 / 6,144
    clean = {"pairs_timed": 3, "pairs_kept_under_overload": 0}
    host = {"prefill": clean, "decode": clean, "break_even": review, "decode_context": [2048, 3040]}
    assert timing_overload(host) is None
    assert break_even_overload(review, [2048, 3040]) is None and break_even_overload(review) is None
    # the last slow length (2,560) overloaded: on a quiet host the break-even could be as low as 2,560
    low = {
        **base,
        "overload_spans": {"512": {"break_even": 3072, "low": 2560, "high": 3072, "lengths": [2560]}},
    }
    caveat = (
        "the decode break-even was timed at calibration while the host was overloaded at 1 of 36 cache "
        "lengths that decide it (2,560 tokens): on a quiet host it could lie anywhere from 2,560 to 3,072 "
        "tokens; recalibrate on a quieter host"
    )
    assert break_even_overload(low, [2048, 3040]) == caveat  # "no decode saving" at 3,040 may be wrong
    assert break_even_overload(low, [1024, 2400]) is None  # below any break-even it could have been
    assert break_even_overload(low, [3072, 4000]) is None  # sparse either way: its speed-up is measured
    assert break_even_overload(low) == caveat  # contexts not recorded: every span counts
    assert timing_overload(host | {"break_even": low}) == f"measured under overload: {caveat}"
    # a faster length overloaded: the break-even could be higher, so contexts just above it may be dense
    high = {
        **base,
        "overload_spans": {"512": {"break_even": 3072, "low": 3072, "high": 4096, "lengths": [3072]}},
    }
    assert break_even_overload(high, [3100, 3500]) is not None
    assert break_even_overload(high, [2048, 3040]) is None and break_even_overload(high, [4096, 5000]) is None
    # the decode line carries it only where it matters
    kw = dict(dense_tps=1000.0, speedup=1.0, speedup_low=1.0, speedup_high=1.0, prompt_tokens=1000)
    flat = compute_roi(_inputs(**kw, decode_tps=50.0, sparse_decode_tps=50.0))
    section = _decode_section([True, True], (1.0, 1.0, 1.0), 1.0, 3072, [2048, 3040])
    section["summary"]["break_even_host"] = review
    out = decode_outcome(section, flat)
    assert out["break_even_overloaded"] is False and "overloaded" not in out["line"]
    section["summary"]["break_even_host"] = low
    out = decode_outcome(section, flat)
    assert out["break_even_overloaded"] is True
    assert f"< break-even 3,072 tokens ({caveat}), so decode stays dense" in out["line"]


def test_a_break_even_timed_on_a_busy_host_is_named_beside_the_decode_line() -> None:
    """Review M, M1: the break-even behind "no decode saving ... 1.00x" is a calibration timing; when the
    host was overloaded while it was timed, the decode line and the overload warning say so."""
    from rollout.roi import break_even_overload, timing_overload

    # a record from before `overload_spans`: which lengths were overloaded is unknown, the caveat stands
    busy = {"budgets": 1, "lengths_timed": 7, "lengths_kept_under_overload": 2, "overloaded": True}
    quiet = {**busy, "lengths_kept_under_overload": 0, "overloaded": False}
    old = {**quiet, "overloaded": None}  # calibrated before the meter: unknown, nothing to say
    caveat = (
        "the decode break-even was timed at calibration while the host was overloaded (2 of 7 cache "
        "lengths); recalibrate on a quieter host"
    )
    assert break_even_overload(busy) == caveat
    assert break_even_overload(quiet) is None and break_even_overload(old) is None
    assert break_even_overload(None) is None
    clean = {"pairs_timed": 3, "pairs_kept_under_overload": 0}
    assert timing_overload({"prefill": clean, "decode": clean, "break_even": quiet}) is None
    assert timing_overload({"prefill": clean, "decode": clean, "break_even": busy}) == (
        f"measured under overload: {caveat}"
    )
    pairs = {"pairs_timed": 4, "pairs_kept_under_overload": 1}
    assert timing_overload({"prefill": clean, "decode": pairs, "break_even": busy}).endswith(
        f"rerun on a quieter host; and {caveat}"
    )

    kw = dict(dense_tps=1000.0, speedup=1.0, speedup_low=1.0, speedup_high=1.0, prompt_tokens=1000)
    flat = compute_roi(_inputs(**kw, decode_tps=50.0, sparse_decode_tps=50.0))
    section = _decode_section([True, True], (1.0, 1.0, 1.0), 1.0, 3584, [2048, 3040])
    section["summary"]["break_even_host"] = busy
    short = decode_outcome(section, flat)
    assert short["status"] == "below_break_even" and short["break_even_overloaded"] is True
    assert short["line"] == (
        "decode: no decode saving at this context length: 3,040 tokens < break-even 3,584 tokens "
        f"({caveat}), so decode stays dense (1.00x) and output tokens cost the same"
    )
    section["summary"]["break_even_host"] = quiet
    assert "overloaded" not in decode_outcome(section, flat)["line"]
    assert decode_outcome(section, flat)["break_even_overloaded"] is False


def test_money_under_a_dollar_keeps_its_sign_and_cents() -> None:
    """Review s46 D11: whole dollars made "-$0/month" of a 40-cent loss, and "the interval reaches $0/month
    saved" of a 30-cent one."""
    assert usd(-0.4) == "-$0.40" and usd(0.3) == "$0.30"
    assert usd(0) == usd(-0.0) == usd(-0.001) == "$0"  # nothing to sign
    assert usd(-466.2) == "-$466" and usd(1234.4) == "$1,234"


def test_sparse_gpu_hours_range_is_low_at_the_best_speedup() -> None:
    """The sparse GPU-hours a day run from the best speed-up (fewest hours) to the worst, worked by hand:
    10,000 requests x (3000/(3100 x s) + 100/3100) s / 3600 / 0.5 utilisation."""
    r = compute_roi(_inputs())

    def hours(s: float) -> float:
        return 10_000 * (3000 / (3100 * s) + 100 / 3100) / 3600 / 0.5

    assert r.sparse_gpu_hours_day == pytest.approx(hours(2.0))
    assert r.sparse_gpu_hours_day_low == pytest.approx(hours(2.5))  # 2.33
    assert r.sparse_gpu_hours_day_high == pytest.approx(hours(1.5))  # 3.76


def test_a_slower_sparse_decode_is_called_a_cost_not_a_saving() -> None:
    """A sparse decode slower than dense (0.5x) costs money: the decode line says what it costs, never
    that it saves the absolute amount."""
    prefill_even = dict(dense_tps=1000.0, speedup=1.0, speedup_low=1.0, speedup_high=1.0, decode_tps=100.0)
    decode_slow = dict(sparse_decode_tps=50.0, sparse_decode_tps_low=40.0, sparse_decode_tps_high=60.0)
    slow = compute_roi(_inputs(**prefill_even, **decode_slow))
    assert slow.decode_saved_usd_month < 0
    line = decode_outcome(_decode_section([False], (0.5, 0.4, 0.6), 0.3, 512, [1000, 1000]), slow)["line"]
    assert f"costs ${-slow.decode_saved_usd_month:,.0f}/month more" in line and "saves" not in line


def test_roi_for_spec_widens_an_interval_that_misses_the_estimate() -> None:
    """A measured interval that does not contain the point estimate (1.5x from the throughputs, an
    interval of [1.6, 1.8] from the paired timings) is widened to reach it, so the ends bracket it."""
    spec = load_spec(EXAMPLES / "docs-qa.yaml")
    r = roi_for_spec(spec, dense_tps=1000.0, sparse_tps=1500.0, speedup_interval=(1.6, 1.8))
    assert (r.inputs.speedup_low, r.inputs.speedup, r.inputs.speedup_high) == pytest.approx((1.5, 1.5, 1.8))
    high = roi_for_spec(spec, dense_tps=1000.0, sparse_tps=1500.0, speedup_interval=(1.2, 1.4))
    assert (high.inputs.speedup_low, high.inputs.speedup_high) == pytest.approx((1.2, 1.5))
    assert r.saved_usd_month_low <= r.saved_usd_month <= r.saved_usd_month_high


def test_an_interval_whose_best_end_saves_exactly_nothing_is_no_saving() -> None:
    """At a loss whose interval reaches exactly $0 (best speed-up 1.00x), the verdict says no savings:
    "the interval reaches $0/month saved" would hold out a saving that is not there."""
    r = compute_roi(_inputs(speedup=0.8, speedup_low=0.7, speedup_high=1.0))
    assert r.saved_usd_month_high == 0
    assert r.verdict.startswith("no savings:") and "reaches" not in r.verdict


def test_pilot_skip_at_the_exact_boundaries() -> None:
    """The pilot rules at their edges: a plan keeping exactly 99.9% of blocks is dense; an estimate of
    exactly $0/month is no saving; an interval whose low end is exactly $0 establishes none."""
    from rollout.roi import DENSE_PLAN_DENSITY, pilot_skip_reason

    saves = dict(met_budget=True, saved_usd_month=100.0, saved_usd_month_low=50.0, saved_usd_month_high=150.0)
    assert pilot_skip_reason(**saves, density=0.5) is None
    dense = pilot_skip_reason(**saves, density=DENSE_PLAN_DENSITY)
    assert dense is not None and "as dense" in dense.why
    zero = pilot_skip_reason(
        met_budget=True,
        density=0.5,
        saved_usd_month=0.0,
        saved_usd_month_low=-10.0,
        saved_usd_month_high=10.0,
    )
    assert zero is not None and zero.why.startswith("no saving expected")
    low_zero = pilot_skip_reason(
        met_budget=True,
        density=0.5,
        saved_usd_month=100.0,
        saved_usd_month_low=0.0,
        saved_usd_month_high=200.0,
    )
    assert low_zero is not None and low_zero.why.startswith("saving not established")
