"""rollout.pilot_plan: what a pilot takes before its approval, per step, from the gate's own planner —
and the warnings a team gets before the first request when its rollout cannot reach a decision."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from rollout.dataset_split import kept_apart_of
from rollout.gate import GateSettings, planned_sample_size
from rollout.pilot_plan import (
    PilotPlan,
    StepNeed,
    describe_to_approval,
    per_day,
    plan_pilot,
    plan_summary,
    plan_warnings,
    traffic_time,
)
from rollout.spec import TrafficSourceSpec, load_spec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "usecases"


@pytest.fixture(scope="module")
def longdoc():
    return load_spec(EXAMPLES / "longdoc-summaries.yaml")


def test_each_step_needs_what_the_gates_planner_says(longdoc) -> None:
    plan = plan_pilot(longdoc)
    settings = GateSettings.from_spec(longdoc, pilot_number=1)  # a plan is for the use case's first pilot
    assert plan.pilot_number == 1 and plan.go_alpha == settings.alpha_go == pytest.approx(
        0.05 * 6 / math.pi**2
    )
    assert [s.where for s in plan.steps] == ["rollout.shadow", "rollout.steps[0]", "rollout.steps[1]"]
    assert [s.label for s in plan.steps] == ["shadow", "split 10%", "split 50%"]
    expected = [
        planned_sample_size(settings, paired=True),
        planned_sample_size(settings, treatment_share=0.10),
        planned_sample_size(settings, treatment_share=0.50),
    ]
    for s, p in zip(plan.steps, expected, strict=True):
        assert s.requests == p.n_total and s.requests is not None
        assert s.expected == p.expected_requests <= s.requests  # the mean stop comes before the 80% one
        assert s.looks == math.ceil(s.requests / longdoc.rollout.batch_size)
        assert s.days == pytest.approx(s.requests / longdoc.traffic.requests_per_day)
    # a split step at 10% needs many more rows than one at 50% (a tenth of them are sparse)
    assert plan.steps[1].requests > 2 * plan.steps[2].requests
    assert plan.approval_after == 3 and plan.requests == sum(s.requests for s in plan.steps)
    short = plan_pilot(longdoc, approval_after=2)  # the main job asks after the first split step
    assert short.requests == plan.steps[0].requests + plan.steps[1].requests
    assert short.days == pytest.approx(short.requests / longdoc.traffic.requests_per_day)


def test_a_later_pilot_of_the_use_case_needs_more_requests(longdoc) -> None:
    """alpha is spent across the use case's pilots: pilot 2's GO runs at a quarter of pilot 1's level, so
    it needs more requests; a pilot started before spending (None) runs at the spec's alpha and needs
    fewer; a spec that keeps alpha per pilot plans every pilot alike."""
    first, second, legacy = (plan_pilot(longdoc, pilot_number=n) for n in (1, 2, None))
    assert second.go_alpha == pytest.approx(first.go_alpha / 4) and legacy.go_alpha == longdoc.gate.alpha
    for a, b, c in zip(legacy.steps, first.steps, second.steps, strict=True):
        assert a.requests < b.requests < c.requests
    per_pilot = longdoc.model_copy(
        update={"gate": longdoc.gate.model_copy(update={"alpha_spending": "pilot"})}
    )
    assert [s.requests for s in plan_pilot(per_pilot, pilot_number=2).steps] == [
        s.requests for s in legacy.steps
    ]
    summary = plan_summary(longdoc, pilot_number=2)
    assert (summary["pilot_number"], summary["go_alpha"]) == (2, second.go_alpha)


@pytest.mark.parametrize(
    ("sample", "step", "pinned"),
    [
        # (requests (pairs), mean requests to GO, horizon), from the planner before it tested the simulated
        # pilots a few at a time (main 74d5858): the same draws and the same test give the same numbers
        ("longdoc-summaries", None, (118, 90.655, 512)),
        ("longdoc-summaries", 10, (1399, 996.1425, 2048)),
        ("longdoc-summaries", 50, (451, 276.585, 512)),
        ("support-chat", None, (1123, 709.86, 2048)),
        ("support-chat", 50, (3998, 2662.2575, 8192)),
    ],
)
def test_the_planned_sizes_are_the_pinned_ones(sample: str, step: int | None, pinned) -> None:
    settings = GateSettings.from_spec(load_spec(EXAMPLES / f"{sample}.yaml"))
    kw = {"paired": True} if step is None else {"treatment_share": step / 100}
    plan = planned_sample_size(settings, **kw)
    assert (plan.n_total, plan.expected_requests, plan.horizon) == pinned


def test_a_sample_too_small_for_its_pilot_is_told_so(longdoc) -> None:
    plan = plan_pilot(longdoc)
    warned = dict(plan_warnings(plan, distinct_requests=16))
    # 10 looks x one batch of 8 reach 80 requests; every step needs more
    looks = warned["gate.max_looks"]
    assert "reach 80 requests" in looks and f"split 10% ~{plan.steps[1].requests:,}" in looks
    assert f">= {math.ceil(plan.steps[1].requests / 10):,} requests" in looks
    data = warned["dataset.path"]
    assert (
        data.startswith("16 distinct requests kept apart from calibration") and f"~{plan.requests:,}" in data
    )
    assert "traffic exhausted" in data
    # a request log's size is not known in advance: no dataset warning without a count
    assert "dataset.path" not in dict(plan_warnings(plan))
    # enough distinct requests and looks: nothing to warn about
    roomy = replace(plan, max_looks=1000)
    assert plan_warnings(roomy, distinct_requests=10**6) == []


def test_duration_and_unreachable_steps_are_warned() -> None:
    fast = StepNeed("rollout.shadow", None, 200, 150.0, 512, 20, 2.0, "m")
    never = StepNeed("rollout.steps[0]", 5.0, None, 8192.0, 8192, None, None, "m")
    plan = PilotPlan((fast,), 1, 0.8, 0.0, 0.03, 10, 20, 1.0, 100.0)
    warned = dict(plan_warnings(plan))
    assert warned == {"gate.max_duration_days": warned["gate.max_duration_days"]}
    assert "2.0 days of traffic at 100 requests/day" in warned["gate.max_duration_days"]
    stuck = PilotPlan((fast, never), 2, 0.8, 0.0, 0.03, 10, 20, 30.0, 100.0)
    warned = dict(plan_warnings(stuck))
    assert "no pilot of up to 8,192 requests reaches GO" in warned["rollout.steps[0]"]
    assert stuck.requests is None and stuck.days is None
    assert describe_to_approval(plan_summary_of(stuck)).startswith("no simulated pilot size reaches GO")


def plan_summary_of(plan: PilotPlan) -> dict:
    return {**plan.to_dict(), "distinct_requests": None, "warnings": [m for _, m in plan_warnings(plan)]}


def test_the_summary_line_and_the_request_log_source(longdoc) -> None:
    summary = plan_summary(longdoc, dataset_rows=65, approval_after=2)
    line = describe_to_approval(summary)
    total = summary["requests_to_approval"]
    assert line.startswith(f"the approval (after shadow + split 10%) needs ~{total:,} distinct requests")
    assert "split 10% 1,564; pilot 1's GO held to alpha 0.0304): 1.0 h of its" in line
    # the pilot draws only the 16 of the 65 rows that calibration never reads (rollout.dataset_split)
    assert summary["distinct_requests"] == 16 and summary["dataset_rows"] == 65
    assert (
        "its dataset keeps 16 of its 65 rows apart from calibration" in line and "40,000 requests/day" in line
    )
    source = TrafficSourceSpec(kind="request-log", path="captured.jsonl")
    logged = longdoc.model_copy(
        update={"rollout": longdoc.rollout.model_copy(update={"traffic_source": source})}
    )
    # from a request log the count of distinct requests is not known in advance
    assert plan_summary(logged, dataset_rows=65)["distinct_requests"] is None
    # the validator's count, each prompt once, where the dataset repeats prompts
    assert plan_summary(longdoc, dataset_rows=65, kept_apart=11)["distinct_requests"] == 11
    assert kept_apart_of({"stats": {"rows": 65, "kept_apart": 11}}) == 11
    assert kept_apart_of({"stats": {"rows": 65}}) is None and kept_apart_of(None) is None


def test_traffic_time_reads_as_people_say_it() -> None:
    assert [traffic_time(d) for d in (None, 0.0005, 0.04, 0.5, 3.25)] == [
        "-",
        "1 min",
        "58 min",
        "12.0 h",
        "3.2 days",
    ]
    # a step that huge traffic fills in seconds needs some traffic still: never "0 min"
    assert traffic_time(72 / 1e12) == traffic_time(72 / 250_000) == "< 1 min"


def test_a_tiny_traffic_rate_keeps_its_digits() -> None:
    fast = StepNeed("rollout.shadow", None, 200, 150.0, 512, 20, 2.0, "m")
    plan = PilotPlan((fast,), 1, 0.8, 0.0, 0.03, 10, 20, 1.0, 0.001)
    warned = dict(plan_warnings(plan))["gate.max_duration_days"]
    assert "2.0 days of traffic at 0.001 requests/day" in warned
    assert [per_day(x) for x in (0.001, 2.5, 99.5, 250_000, 1e12)] == [
        "0.001",
        "2.5",
        "99.5",
        "250,000",
        "1,000,000,000,000",
    ]


def test_the_plan_says_how_fast_the_monitor_reacts(longdoc) -> None:
    """After promotion: per monitor check, the looks by which simulated monitors of a champion that
    breaches from its first look raise an alarm (the monitor's own change detector), one batch per look;
    a bigger batch reacts in fewer looks, and the plan's summary carries it."""
    from rollout.pilot_plan import describe_monitor, plan_monitor

    reach = plan_monitor(longdoc)  # batch 8, error ceiling 0.02, a latency SLO, margin 0.05, bounded scores
    assert [(r.check, r.threshold, r.breach) for r in reach] == [
        ("treatment_error_rate", 0.02, 0.05),
        ("treatment_latency_over_slo", 0.05, 0.125),
        ("quality_loss", 0.05, 0.1),
    ]
    assert all(r.batch == 8 and 0 < r.looks_half <= r.looks_most < r.horizon for r in reach)
    # seeded and cached: the same numbers on every run
    assert [(r.looks_half, r.looks_most) for r in reach] == [(23, 56), (9, 19), (18, 26)]
    bigger = plan_monitor(
        longdoc.model_copy(update={"rollout": longdoc.rollout.model_copy(update={"batch_size": 200})})
    )
    assert all(b.looks_most < r.looks_most for b, r in zip(bigger, reach, strict=True))
    assert plan_summary(longdoc, with_monitor=True)["monitor"] == [r.to_dict() for r in reach]
    # the sample's schedule is daily ("0 2 * * *"), one look a tick: the looks are also days
    assert describe_monitor(reach[0].to_dict()) == (
        "treatment_error_rate: a rate of 0.05 (limit 0.02) raises an alarm in half the simulated monitors "
        "by look 23 (184 rows; ~23.0 days at its schedule), 90% by 56 (448 rows; ~56.0 days)"
    )
    slow = {**reach[0].to_dict(), "looks_half": None, "looks_most": None}
    assert "is not caught within 300 looks of 8" in describe_monitor(slow)


def test_the_monitor_plan_gives_its_reaction_in_days_at_the_specs_schedule(longdoc) -> None:
    """One monitor look a tick of the spec's cron (the scheduled cycle): a weekdays-only schedule reacts
    in 7/5 the days of a daily one; without a schedule only looks are given, and the heading says why."""
    from rollout.pilot_plan import (
        describe_monitor,
        describe_monitor_cadence,
        looks_per_day,
        monitor_days,
        plan_monitor,
    )
    from rollout.spec import ScheduleSpec

    assert [looks_per_day(c) for c in ("0 2 * * *", "0 * * * *", "*/15 * * * *")] == [1.0, 24.0, 96.0]
    assert looks_per_day("30 3 * * 1-5") == pytest.approx(5 / 7)
    assert looks_per_day("0 0 1 * *") == pytest.approx(12 / 364)  # monthly: averaged over a year
    weekdays = plan_monitor(longdoc.model_copy(update={"schedule": ScheduleSpec(cron="30 3 * * 1-5")}))
    daily = plan_monitor(longdoc)
    for w, d in zip(weekdays, daily, strict=True):
        assert (w.looks_half, w.looks_most) == (d.looks_half, d.looks_most)
        assert monitor_days(w.looks_half, w.to_dict()) == pytest.approx(d.looks_half * 7 / 5)
    assert "~32.2 days at its schedule" in describe_monitor(weekdays[0].to_dict())  # 23 looks, weekdays
    assert describe_monitor_cadence(daily[0].to_dict()).startswith(
        "one batch of 8 per look (at the schedule '0 2 * * *', ~1 looks a day); a breach that begins after "
        "a long healthy history takes longer"
    )
    unscheduled = plan_monitor(longdoc.model_copy(update={"schedule": None}))
    assert all(
        r.looks_per_day is None and monitor_days(r.looks_half, r.to_dict()) is None for r in unscheduled
    )
    assert "days" not in describe_monitor(unscheduled[0].to_dict())
    assert "no schedule: a look is each `sparsepilot monitor` run" in describe_monitor_cadence(
        unscheduled[0].to_dict()
    )


def test_the_monitor_plan_simulates_any_loss_a_score_can_express(longdoc) -> None:
    """A wide margin's doubled loss gets a noisier model that can lose it; one no score averaging 0.8 can
    lose (a margin of 0.4 or more) is not planned rather than simulated wrongly."""
    import numpy as np

    from rollout.gate.simulation import monitor_score_model
    from rollout.pilot_plan import plan_monitor

    for score_type in ("binary", "bounded"):
        for loss in (0.06, 0.4, 0.7):
            model = monitor_score_model(score_type, loss)
            rng = np.random.default_rng(1)
            q = model.control(rng, (200_000,))
            assert (q - model.degrade(rng, q, -loss)).mean() == pytest.approx(loss, abs=0.01)
        with pytest.raises(ValueError, match="beyond what scores averaging 0.8 can lose"):
            monitor_score_model(score_type, 0.8)
    wide = longdoc.model_copy(
        update={"gate": longdoc.gate.model_copy(update={"non_inferiority_margin": 0.2})}
    )
    assert [(r.check, r.breach) for r in plan_monitor(wide)][-1] == ("quality_loss", 0.4)
    too_wide = longdoc.model_copy(
        update={"gate": longdoc.gate.model_copy(update={"non_inferiority_margin": 0.45})}
    )
    assert "quality_loss" not in [r.check for r in plan_monitor(too_wide)]
