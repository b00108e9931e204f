"""What a pilot of a use case takes before a person is asked to approve it, known before it starts.

Per step of the spec's rollout (the shadow step, then each ramp step): the requests (pairs in the shadow
step) by which the GO test says GO in `gate.power` of pilots whose true difference is the planned effect
(`rollout.gate.planning.planned_sample_size`, simulated with the functions `decide` runs), how many looks
that takes at one batch (`rollout.batch_size`) per look — the scheduled cycle collects one batch and looks
once — and how many days of the spec's traffic it is. Then the problems a team should know before the
first request: a step that cannot reach its GO within `gate.max_looks` looks ends NO-GO at its last look
(inconclusive never ships), and a dataset source, where each request is used once per pilot, that has
fewer distinct requests than the pilot needs ends in "traffic exhausted".

After the approval, the monitor (`plan_monitor`): per check it runs on the champion's traffic, the looks
by which half and 90% of simulated monitors raise an alarm when the champion breaches it from its first
look (a rate at 2.5x its ceiling, a quality loss of twice the margin), judged by the monitor's own
change detector (`rollout.gate.detection`) at one batch per look: how fast the fail-safe reacts.

Pure: spec in, plan out (the simulations are seeded and cached per gate settings)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from typing import Any

from rollout.dataset_split import held_apart_count
from rollout.gate.planning import planned_sample_size
from rollout.gate.power import DETECT_FACTOR
from rollout.gate.settings import GateSettings

MONITOR_LOOKS = 300  # looks simulated per monitor check
MONITOR_REPLICATIONS = 400
MONITOR_LOSS_FACTOR = 2.0  # the quality loss the plan shows the monitor catching: twice the margin


@dataclass(frozen=True)
class StepNeed:
    where: str  # the spec field of the step: "rollout.shadow" or "rollout.steps[i]"
    traffic_pct: float | None  # None: the shadow step (every request to both arms)
    requests: int | None  # requests (pairs) by which `power` of pilots say GO; None: beyond `horizon`
    expected: float  # mean requests (pairs) to a GO, capped at `horizon`
    horizon: int  # requests (pairs) simulated
    looks: int | None  # looks that takes at one batch per look
    days: float | None  # days of the spec's traffic (shadow: with every request mirrored)
    model: str  # the score model the simulation drew from

    @property
    def label(self) -> str:
        return "shadow" if self.traffic_pct is None else f"split {self.traffic_pct:g}%"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "label": self.label}


@dataclass(frozen=True)
class PilotPlan:
    steps: tuple[StepNeed, ...]
    approval_after: int  # steps run before the approval (the shadow step counts as one)
    power: float
    planned_effect: float
    margin: float
    batch_size: int
    max_looks: int
    max_duration_days: float
    requests_per_day: float
    pilot_number: int | None = 1  # the use case's pilot planned (None: one started before alpha spending)
    go_alpha: float = 0.05  # the GO level of that pilot

    @property
    def to_approval(self) -> tuple[StepNeed, ...]:
        return self.steps[: self.approval_after]

    @property
    def requests(self) -> int | None:
        """Distinct requests until the approval is asked (each request is evidence once per pilot)."""
        needs = [s.requests for s in self.to_approval]
        return None if None in needs else sum(needs)  # type: ignore[arg-type]

    @property
    def days(self) -> float | None:
        days = [s.days for s in self.to_approval]
        return None if None in days else sum(days)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": [s.to_dict() for s in self.steps],
            "approval_after": self.approval_after,
            "requests_to_approval": self.requests,
            "days_to_approval": self.days,
            "power": self.power,
            "planned_effect": self.planned_effect,
            "margin": self.margin,
            "batch_size": self.batch_size,
            "max_looks": self.max_looks,
            "max_duration_days": self.max_duration_days,
            "requests_per_day": self.requests_per_day,
            "pilot_number": self.pilot_number,
            "go_alpha": self.go_alpha,
        }


def plan_pilot(
    spec: Any,
    *,
    approval_after: int | None = None,
    pilot_number: int | None = 1,
    go_alpha: float | None = None,
) -> PilotPlan:
    """The plan of `spec` (a UseCaseSpec). `approval_after`: how many steps run before the approval is
    asked (default: all of them, the shadow step included); the main job asks after the first split step
    (2). `pilot_number`: which of the use case's pilots it plans (1 = its first), whose GO level the
    spec's alpha spending sets (rollout.gate.spending); None = a pilot whose GO runs at the spec's alpha.
    `go_alpha`: that pilot's level where the use case's earlier pilots fix it (rollout.pilots.
    planned_pilot: the level an active pilot started at, or the series' term capped by what is left);
    0 plans nothing (no step can reach GO, `plan_warnings` says why)."""
    settings = GateSettings.from_spec(spec, pilot_number=pilot_number)
    none_left = go_alpha is not None and go_alpha <= 0
    if go_alpha is not None and not none_left:
        settings = replace(settings, go_alpha=go_alpha)
    rollout = spec.rollout
    batch = rollout.batch_size
    per_day = spec.traffic.requests_per_day
    steps = [("rollout.shadow", None)] + [
        (f"rollout.steps[{i}]", s.traffic_pct) for i, s in enumerate(rollout.steps)
    ]
    needs = []
    for where, pct in steps:
        if none_left:  # nothing is left of the use case's alpha: no pilot starts (pilots.start_pilot)
            needs.append(StepNeed(where, pct, None, 0.0, 0, None, None, "none"))
            continue
        p = planned_sample_size(
            settings, paired=pct is None, treatment_share=0.5 if pct is None else pct / 100
        )
        n = p.n_total
        needs.append(
            StepNeed(
                where=where,
                traffic_pct=pct,
                requests=n,
                expected=p.expected_requests,
                horizon=p.horizon,
                looks=None if n is None else math.ceil(n / batch),
                days=None if n is None else n / per_day,
                model=p.model,
            )
        )
    after = len(needs) if approval_after is None else max(1, min(approval_after, len(needs)))
    return PilotPlan(
        steps=tuple(needs),
        approval_after=after,
        power=settings.power,
        planned_effect=settings.planned_effect,
        margin=settings.margin,
        batch_size=batch,
        max_looks=spec.gate.max_looks,
        max_duration_days=spec.gate.max_duration_days,
        requests_per_day=per_day,
        pilot_number=pilot_number,
        go_alpha=0.0 if none_left else settings.alpha_go,
    )


@dataclass(frozen=True)
class MonitorReach:
    """How fast the monitor raises an alarm on a champion that breaches one check from its first look."""

    check: str
    threshold: float
    breach: float  # the true rate (or mean quality loss) simulated
    looks_half: int | None  # looks by which half of the simulated monitors had raised an alarm
    looks_most: int | None  # ... 90% of them; None: not within `horizon` looks
    horizon: int
    batch: int  # rows (pairs for quality_loss) per look
    # the spec's schedule (one monitor look a tick, flows/cycle.py) and its mean ticks a day; None: no
    # schedule, a look is each `sparsepilot monitor` run
    schedule: str | None = None
    looks_per_day: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_monitor(spec: Any) -> tuple[MonitorReach, ...]:
    """Per monitor check of `spec`: the error rate and, with a latency SLO, the share over it, at 2.5x their
    ceilings (`gate.power.DETECT_FACTOR`), and the quality loss at twice the margin, simulated with the
    spec's score type (`simulation.monitor_score_model`; a margin of 0.4 or more, whose double no score
    model can lose, is not planned). (The excess error over dense depends on the dense model's own rate:
    not planned.)"""
    settings = GateSettings.from_spec(spec)
    batch, alpha = spec.rollout.batch_size, settings.alpha
    out = [_rate_reach("treatment_error_rate", settings.max_error_rate, batch, alpha)]
    if settings.latency_slo_ms is not None:
        out.append(_rate_reach("treatment_latency_over_slo", settings.max_latency_exceedance, batch, alpha))
    if MONITOR_LOSS_FACTOR * settings.margin < 0.8:  # beyond that no score model can lose it: not planned
        out.append(_loss_reach(settings.margin, settings.score_type, batch, alpha))
    schedule = getattr(spec, "schedule", None)
    if schedule is None:
        return tuple(out)
    per_day = looks_per_day(schedule.cron)
    return tuple(replace(r, schedule=schedule.cron, looks_per_day=per_day) for r in out)


@lru_cache(maxsize=64)
def looks_per_day(cron: str) -> float:
    """The mean ticks a day of a five-field cron (the scheduled cycle's monitor looks once a tick), over
    four whole weeks (weekday crons average right), or a year for a rarer one."""
    import datetime as dt

    from cronsim import CronSim

    start = dt.datetime(2026, 1, 5)  # a Monday

    def ticks(days: int) -> int:
        end, n = start + dt.timedelta(days=days), 0
        for t in CronSim(cron, start - dt.timedelta(seconds=1)):  # a tick at `start` counts
            if t >= end:
                return n
            n += 1
        return n

    n = ticks(28)
    return n / 28 if n >= 28 else ticks(364) / 364  # less than daily: a year, so monthly ones average right


def monitor_days(looks: int | None, reach: dict[str, Any]) -> float | None:
    """`looks` of a monitor check (`MonitorReach.to_dict()`) in days at its spec's schedule; None without
    a schedule (or looks)."""
    per_day = reach.get("looks_per_day")
    return None if looks is None or not per_day else looks / per_day


@lru_cache(maxsize=64)
def _rate_reach(check: str, ceiling: float, batch: int, alpha: float) -> MonitorReach:
    from rollout.gate.simulation import simulate_monitor

    breach = min(DETECT_FACTOR * ceiling, 1.0)
    r = simulate_monitor(
        ceiling,
        batch=batch,
        looks=MONITOR_LOOKS,
        before=breach,
        after=breach,
        replications=MONITOR_REPLICATIONS,
        alpha=alpha,
        methods=("detector",),
    )
    return MonitorReach(
        check,
        ceiling,
        breach,
        r.looks_to_detect("detector"),
        r.looks_to_detect("detector", 0.9),
        MONITOR_LOOKS,
        batch,
    )


@lru_cache(maxsize=64)
def _loss_reach(margin: float, score_type: str, batch: int, alpha: float) -> MonitorReach:
    from rollout.gate.simulation import monitor_score_model, simulate_monitor_quality

    loss = MONITOR_LOSS_FACTOR * margin
    r = simulate_monitor_quality(
        monitor_score_model(score_type, loss),
        margin=margin,
        batch=batch,
        looks=MONITOR_LOOKS,
        before=loss,
        after=loss,
        replications=MONITOR_REPLICATIONS,
        alpha=alpha,
    )
    return MonitorReach(
        "quality_loss",
        margin,
        loss,
        r.looks_to_detect("loss"),
        r.looks_to_detect("loss", 0.9),
        MONITOR_LOOKS,
        batch,
    )


def describe_monitor(reach: dict[str, Any]) -> str:
    """One check of `plan_monitor` (as a dict) for people."""
    what = "a quality loss of" if reach["check"] == "quality_loss" else "a rate of"
    if reach["looks_half"] is None:
        return (
            f"{reach['check']}: {what} {reach['breach']:.3g} (limit {reach['threshold']:g}) is not caught "
            f"within {reach['horizon']} looks of {reach['batch']} in half the simulated monitors"
        )

    def days(looks: int, said: str = "") -> str:
        d = monitor_days(looks, reach)
        return "" if d is None else f"; ~{traffic_time(d)}{said}"

    most = (
        f"90% by {reach['looks_most']} ({reach['looks_most'] * reach['batch']:,} rows"
        f"{days(reach['looks_most'])})"
        if reach["looks_most"] is not None
        else f"90% not within {reach['horizon']}"
    )
    return (
        f"{reach['check']}: {what} {reach['breach']:.3g} (limit {reach['threshold']:g}) raises an alarm "
        f"in half the simulated monitors by look {reach['looks_half']} "
        f"({reach['looks_half'] * reach['batch']:,} rows{days(reach['looks_half'], ' at its schedule')}), "
        f"{most}"
    )


def describe_monitor_cadence(reach: dict[str, Any]) -> str:
    """How often the monitor looks, for people (the heading of `describe_monitor`'s lines), and that a
    breach after a long healthy history takes longer than the simulated one from the first look."""
    when = (
        f"at the schedule {reach['schedule']!r}, ~{reach['looks_per_day']:.3g} looks a day"
        if reach.get("looks_per_day")
        else "no schedule: a look is each `sparsepilot monitor` run"
    )
    return (
        f"one batch of {reach['batch']} per look ({when}); a breach that begins after a long healthy "
        'history takes longer to show (docs/gate.md, "The monitor")'
    )


def plan_warnings(plan: PilotPlan, *, distinct_requests: int | None = None) -> list[tuple[str, str]]:
    """(field, message) for what will stop this pilot short of a decision: a step whose GO needs more
    looks than gate.max_looks allows at one batch per look, a step no simulated size reaches, a pilot
    longer than gate.max_duration_days at the spec's traffic, and (`distinct_requests`: the rows the
    dataset source can hand out, those kept apart from calibration) fewer than the approval needs."""
    if plan.go_alpha <= 0:
        return [
            (
                "gate.alpha_spending",
                f"pilot {plan.pilot_number}: the use case's earlier pilots spent its whole alpha for a "
                'false GO, so no pilot can start (docs/gate.md, "Across a use case\'s pilots"); a new '
                "spec version with gate.alpha_spending: pilot holds each pilot to alpha on its own",
            )
        ]
    out = []
    power = f"{plan.power:.0%} power at a true difference of {plan.planned_effect:+g}"
    for s in plan.steps:
        if s.requests is None:
            out.append(
                (
                    s.where,
                    f"{s.label}: no pilot of up to {s.horizon:,} requests reaches GO with {power} (margin "
                    f"{plan.margin:g}): this step would end NO-GO at its last look",
                )
            )
    short = [s for s in plan.steps if s.looks is not None and s.looks > plan.max_looks]
    if short:
        needs = ", ".join(f"{s.label} ~{s.requests:,}" for s in short)
        look = max(math.ceil(s.requests / plan.max_looks) for s in short)  # type: ignore[operator]
        out.append(
            (
                "gate.max_looks",
                f"{plan.max_looks} looks per step at one batch of {plan.batch_size} per look reach "
                f"{plan.max_looks * plan.batch_size:,} requests, but GO with {power} needs {needs}: those "
                f"steps would end NO-GO at their last look. Looks of >= {look:,} requests reach them "
                "(rollout.batch_size and the steps' min_samples, or imported production observations)",
            )
        )
    if plan.days is not None and plan.days > plan.max_duration_days:
        out.append(
            (
                "gate.max_duration_days",
                f"{plan.max_duration_days:g} days, but the approval needs ~{plan.requests:,} requests, "
                f"{plan.days:,.1f} days of traffic at {per_day(plan.requests_per_day)} requests/day",
            )
        )
    if distinct_requests is not None and plan.requests is not None and plan.requests > distinct_requests:
        parts = ", ".join(f"{s.label} {s.requests:,}" for s in plan.to_approval)
        out.append(
            (
                "dataset.path",
                f"{distinct_requests:,} distinct requests kept apart from calibration, but the pilot needs "
                f"~{plan.requests:,} before the approval ({parts}); each request is evidence once, so it "
                "would stop at 'traffic exhausted'. Pilot it on a request log (rollout.traffic_source; "
                "imported observations may carry only the requests of the pilot's traffic source)",
            )
        )
    return out


def plan_summary(
    spec: Any,
    *,
    dataset_rows: int | None = None,
    kept_apart: int | None = None,
    approval_after: int | None = None,
    pilot_number: int | None = 1,
    go_alpha: float | None = None,
    with_monitor: bool = False,
) -> dict[str, Any]:
    """JSON-ready: the plan, the distinct requests the pilot can draw on (where the dataset is the traffic
    source, its rows kept apart from calibration, rollout.dataset_split; None for a request log, whose
    size is not known in advance), the dataset's rows, and the plan's warnings as "field: message".
    `kept_apart` is that count as the dataset validator found it (each prompt once); without it (a spec
    version stored before the validator counted it) it is the share of `dataset_rows` kept apart.
    `with_monitor`: also `monitor`, how fast the monitor reacts (`plan_monitor`, simulated: ~0.4-0.8 s
    per new setting, so only where it is shown); else None."""
    plan = plan_pilot(spec, approval_after=approval_after, pilot_number=pilot_number, go_alpha=go_alpha)
    on_dataset = spec.rollout.traffic_source.kind == "dataset" and dataset_rows is not None
    distinct = None
    if on_dataset:
        distinct = kept_apart if kept_apart is not None else held_apart_count(dataset_rows)
    problems = plan_warnings(plan, distinct_requests=distinct)
    return {
        **plan.to_dict(),
        "distinct_requests": distinct,
        "dataset_rows": dataset_rows,
        "warnings": [f"{field}: {message}" for field, message in problems],
        # how fast the monitor reacts: simulated, so only where it is shown (usecase show, the dashboard)
        "monitor": [m.to_dict() for m in plan_monitor(spec)] if with_monitor else None,
    }


def per_day(requests_per_day: float) -> str:
    """A traffic rate for people: whole requests from 100 a day, else three significant digits (a spec
    may ask for 0.001 requests/day, which whole numbers would show as 0)."""
    if requests_per_day >= 100:
        return f"{requests_per_day:,.0f}"
    return f"{requests_per_day:.3g}"


def traffic_time(days: float | None) -> str:
    """A span of traffic for people: minutes, hours or days."""
    if days is None:
        return "-"
    if days * 1440 < 0.5:  # never "0 min": the step still needs some traffic
        return "< 1 min"
    if days * 24 < 1:
        return f"{days * 1440:.0f} min"
    return f"{days * 24:.1f} h" if days < 1 else f"{days:,.1f} days"


def describe_to_approval(summary: dict[str, Any]) -> str:
    """One line from `plan_summary`: what reaching the approval takes, against what the source holds."""
    steps = summary["steps"][: summary["approval_after"]]
    total = summary["requests_to_approval"]
    if summary["go_alpha"] <= 0:
        return "; ".join(summary["warnings"])
    if total is None:
        return "no simulated pilot size reaches GO at the planned effect: " + "; ".join(summary["warnings"])
    parts = ", ".join(
        f"{s['label']} {s['requests']:,}{' pairs' if s['traffic_pct'] is None else ''}" for s in steps
    )
    which = "" if summary["pilot_number"] is None else f"pilot {summary['pilot_number']}'s "
    text = (
        f"the approval (after {' + '.join(s['label'] for s in steps)}) needs ~{total:,} distinct requests "
        f"for {summary['power']:.0%} power ({parts}; {which}GO held to alpha {summary['go_alpha']:.3g}): "
        f"{traffic_time(summary['days_to_approval'])} of its "
        f"{per_day(summary['requests_per_day'])} requests/day"
    )
    if summary["distinct_requests"] is not None and summary["distinct_requests"] < total:
        text += (
            f"; its dataset keeps {summary['distinct_requests']:,} of its {summary['dataset_rows']:,} rows "
            "apart from calibration for the pilot, so a pilot on it ends at 'traffic exhausted': a team "
            "pilots it on production traffic (a request-log source, answered by the pilot or imported)"
        )
    return text
