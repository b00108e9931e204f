"""`sparsepilot bench dashboard`: seed a realistic portfolio into a scratch state DB and time every
page as Streamlit renders it (AppTest runs the real script, queries included).

The seeded rows are synthetic but shaped like the flows' output: per use case a spec, a model version,
two evaluations, a pilot with a shadow and a split step, per-request observations, gate decisions with
evidence, alias moves and audit entries. Nothing is written outside the scratch home. `write_use_case` is
also the dashboard tests' seeder (tests/fixtures/dashboard.py), with known numbers."""

from __future__ import annotations

import datetime as dt
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import insert

from rollout import audit
from rollout.bench_verdict import metered, within_target
from rollout.db.models import (
    AliasMove,
    EvaluationRun,
    GateDecision,
    ModelVersion,
    Observation,
    Pilot,
    PilotStep,
    SpecVersion,
    UseCase,
)
from rollout.db.session import session_scope
from rollout.gate.spending import pilot_alpha
from rollout.redact import mask_db_url

PAGES = ("portfolio", "use_case", "approvals", "audit")
PAGE_FILES = {p: f"views/{p}.py" for p in PAGES}
TARGETS_S = {"portfolio": 2.0}
BENCH_PHASES = ("registered", "evaluated", "piloting", "piloting", "awaiting_approval", "promoted", "stopped")
PILOT_STATUS = {"awaiting_approval": "awaiting_approval", "promoted": "promoted", "stopped": "stopped"}


@dataclass
class SeedUseCase:
    """One use case as the flows leave it in the state DB, written by `write_use_case` for the page
    benchmark and the dashboard's tests. The row dicts hold the ORM models' fields; a step, observation or
    look names its step by `step` (the index in `steps`)."""

    name: str
    owner: str
    criticality: str
    phase: str
    actor: str  # who added it (audit)
    spec: dict[str, Any]
    spec_hash: str
    created_at: dt.datetime | None = None
    version: dict[str, Any] | None = None  # ModelVersion
    evaluations: list[dict[str, Any]] = field(default_factory=list)  # EvaluationRun
    pilot: dict[str, Any] | None = None  # Pilot
    steps: list[dict[str, Any]] = field(default_factory=list)  # PilotStep
    observations: list[dict[str, Any]] = field(default_factory=list)  # Observation
    looks: list[dict[str, Any]] = field(default_factory=list)  # GateDecision
    look_audit: tuple[str, str] = ("gate-flow", "decision.gate")  # (actor, action) of each look
    alias_moves: list[dict[str, Any]] = field(default_factory=list)  # AliasMove


def write_use_case(s: Any, u: SeedUseCase) -> dict[str, Any]:
    """Write one seeded use case in the caller's transaction (audit rows through rollout.audit, so the
    hash chain holds); returns its ids: use_case, pilot, decisions."""
    uc = UseCase(name=u.name, owner=u.owner, criticality=u.criticality, phase=u.phase)
    if u.created_at is not None:
        uc.created_at = u.created_at
    s.add(uc)
    s.flush()
    s.add(SpecVersion(use_case_id=uc.id, version=1, spec=u.spec, spec_hash=u.spec_hash, created_by=u.actor))
    audit.record(s, u.actor, "usecase.add", use_case_id=uc.id, entity="use_case", entity_id=uc.id)
    ids: dict[str, Any] = {"use_case": uc.id, "pilot": None, "decisions": []}
    if u.version is None:
        return ids
    mv = ModelVersion(use_case_id=uc.id, **u.version)
    s.add(mv)
    s.flush()
    s.add_all(EvaluationRun(use_case_id=uc.id, model_version_id=mv.id, **e) for e in u.evaluations)
    if u.pilot is None:
        return ids
    pilot = Pilot(use_case_id=uc.id, model_version_id=mv.id, **u.pilot)
    s.add(pilot)
    s.flush()
    steps = [PilotStep(pilot_id=pilot.id, **st) for st in u.steps]
    s.add_all(steps)
    s.flush()
    if u.observations:
        rows = [{**o, "pilot_step_id": steps[o["step"]].id, "use_case_id": uc.id} for o in u.observations]
        s.execute(insert(Observation), [{k: v for k, v in r.items() if k != "step"} for r in rows])
    for look in u.looks:
        fields = {k: v for k, v in look.items() if k != "step"}
        d = GateDecision(use_case_id=uc.id, pilot_id=pilot.id, pilot_step_id=steps[look["step"]].id, **fields)
        s.add(d)
        s.flush()
        actor, action = u.look_audit
        audit.record(
            s, actor, action, on=d,
            details={"outcome": d.outcome},
        )  # fmt: skip
        ids["decisions"].append(d.id)
    s.add_all(AliasMove(use_case_id=uc.id, **m) for m in u.alias_moves)
    ids["pilot"] = pilot.id
    return ids


def evaluation(
    key: str,
    mlflow_run_id: str,
    *,
    density: float,
    quality_delta: float,
    speedup: tuple[float, float, float],
    savings: tuple[float, float, float],
    payback_days: float | None,
    **more: Any,
) -> dict[str, Any]:
    """A succeeded EvaluationRun's fields: speed-up and $/month saved each as (value, low, high)."""
    return dict(
        idempotency_key=key,
        status="succeeded",
        device="cpu",
        mlflow_run_id=mlflow_run_id,
        density=density,
        quality_delta=quality_delta,
        speedup=speedup[0],
        speedup_low=speedup[1],
        speedup_high=speedup[2],
        savings_month_usd=savings[0],
        savings_month_low=savings[1],
        savings_month_high=savings[2],
        payback_days=payback_days,
        **more,
    )


def _evidence(rng: random.Random, outcome: str, n: int) -> dict[str, Any]:
    est = rng.gauss(-0.004, 0.006)
    half = 0.004 + 0.3 / max(n, 1) ** 0.5 * 0.1
    return {
        "outcome": outcome,
        "mode": "split",
        "n_control": n,
        "n_treatment": n,
        "srm_p_value": rng.uniform(0.01, 1.0),
        "quality": {"estimate": est, "interval_low": est - half, "interval_high": est + half},
        "p95_latency_treatment_ms": rng.uniform(200, 900),
        "settings": {"margin": 0.02, "alpha": 0.05},
    }


def random_use_case(i: int, rng: random.Random, n_observations: int, now: dt.datetime) -> SeedUseCase:
    """The benchmark's use case number i: its phase by i, its numbers drawn from rng."""
    name = f"usecase-{i:03d}"
    phase = BENCH_PHASES[i % len(BENCH_PHASES)]
    u = SeedUseCase(
        name=name,
        owner=f"team-{i % 17}",
        criticality=("low", "medium", "high")[i % 3],
        phase=phase,
        actor="bench",
        spec={"name": name},
        spec_hash=name,
        created_at=now - dt.timedelta(days=30),
    )
    if phase == "registered":
        return u
    density = rng.uniform(0.15, 0.9)
    u.version = dict(
        base_model_ref="smollm2-135m",
        plan={"density": density},
        plan_hash=f"p{i}",
        mlflow_model_name=name,
        mlflow_version="1",
        density=density,
    )
    sp = max(0.8, 1 / density * rng.uniform(0.4, 0.7))
    eff = 1 + (sp - 1) * rng.uniform(0.5, 0.8)  # per request: decode saves less than prefill
    saving = (sp - 1) * rng.uniform(200, 2000)
    spread = abs(saving) * 0.2 + 20  # an interval around the saving, low below high at any sign
    u.evaluations = [
        evaluation(
            f"e{i}-{k}",
            f"{i:016x}{k:016x}",
            density=d,
            quality_delta=-0.01 * (1 - d),
            speedup=(sp, sp * 0.9, sp * 1.1),
            savings=(saving, saving - spread, saving + spread),
            payback_days=(3000 / saving * 30) if saving > 0 else None,
            roi={  # the per-request speed-up the dollars rest on, as rollout.roi records it
                "inputs": {"gpu_usd_per_hour": 2.5, "requests_per_day": 10000},
                "effective_speedup": eff,
                "effective_speedup_low": eff * 0.95,
                "effective_speedup_high": eff * 1.05,
            },
        )
        for k, d in enumerate((min(1.0, density + 0.25), density))
    ]
    if phase == "evaluated":
        return u
    # the pilot as its last look left it (rollout.decisions.act_on, the promotion): a GO at the final step
    # waits for approval, an approved one is promoted, a NO-GO stopped it; it ran on, seeded "running",
    # under a promoted use case ("next gate look")
    status = PILOT_STATUS.get(phase, "running")
    ended = None if status in ("running", "awaiting_approval") else now - dt.timedelta(days=1)
    u.pilot = dict(
        salt=name,
        current_step_index=1,
        pilot_number=1,
        go_alpha=pilot_alpha(0.05, 1),
        status=status,
        ended_at=ended,
    )
    u.steps = [
        dict(index=0, kind="shadow", traffic_pct=0.0, min_samples=100, status="passed"),
        dict(index=1, kind="split", traffic_pct=10.0, min_samples=400),
    ]
    for j in range(n_observations):
        arm = "control" if j % 2 == 0 else "treatment"
        u.observations.append(
            {
                "step": 0 if j < n_observations // 3 else 1,
                "batch_id": f"b{j // 100}",
                "request_id": f"r{j // 2}",
                "arm": arm,
                "quality": min(1.0, max(0.0, rng.gauss(0.8, 0.1))),
                "latency_ms": rng.lognormvariate(6.0 if arm == "control" else 5.6, 0.3),
                "tokens": 200,
                "error": rng.random() < 0.002,
                "source": "simulated",
            }
        )
    for look, outcome in enumerate(["EXTEND", "GO"] if phase != "stopped" else ["EXTEND", "NO-GO"]):
        u.looks.append(
            dict(
                step=1,
                idempotency_key=f"g{i}-{look}",
                look_index=look,
                outcome=outcome,
                awaiting="approval" if (phase == "awaiting_approval" and outcome == "GO") else "none",
                resolution="approved" if phase == "promoted" and outcome == "GO" else None,
                evidence=_evidence(rng, outcome, n_observations // 3),
                explanation=f"{name}: look {look} says {outcome}.",
                data_fingerprint=f"{i:064d}",
                created_at=now - dt.timedelta(days=2 - look),
            )
        )
    if phase == "promoted":
        u.alias_moves.append(
            dict(
                idempotency_key=f"a{i}",
                alias="champion",
                from_version=None,
                to_version="1",
                actor="alice",
                reason="approved",
                status="committed",
            )  # fmt: skip
        )
    return u


def seed_portfolio(
    n_use_cases: int = 200,
    n_observations: int = 200_000,
    *,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """Write the portfolio through the ORM models, one transaction per use case."""
    rng = random.Random(seed)
    now = dt.datetime.now(dt.UTC)
    counts = {"use_cases": 0, "observations": 0, "decisions": 0, "pending": 0, "audit": 0}
    piloted = [
        i
        for i in range(n_use_cases)
        if BENCH_PHASES[i % len(BENCH_PHASES)] not in ("registered", "evaluated")
    ]
    # every observation lands in a use case that has a pilot; the remainder goes to the first ones
    share = dict.fromkeys(piloted, n_observations // max(len(piloted), 1))
    for i in piloted[: n_observations - sum(share.values())]:
        share[i] += 1
    for i in range(n_use_cases):
        u = random_use_case(i, rng, share.get(i, 0), now)
        with session_scope() as s:
            write_use_case(s, u)
        counts["use_cases"] += 1
        counts["observations"] += len(u.observations)
        counts["decisions"] += len(u.looks)
        counts["pending"] += sum(look["awaiting"] != "none" for look in u.looks)
        counts["audit"] += 1 + len(u.looks)
        if progress:
            progress(1)
    return counts


def time_pages(
    *, repeats: int = 3, use_case: str = "usecase-004", say: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
    """Render each page `repeats` times after one cold run; report cold and median warm seconds, with the
    host's load while that page rendered (`rollout.bench_verdict.metered`: a page rendered under overload
    over its target is `within_target` None, unknown). `say(line)`: a progress line before each page and
    with its times after it."""
    say = say or (lambda _line: None)
    import logging

    from streamlit.testing.v1 import AppTest

    logging.getLogger("streamlit").setLevel(logging.ERROR)
    app = Path(__file__).resolve().parent / "app.py"
    # A served dashboard imports its libraries once per process, not per page view: render the
    # (query-free) sign-in page first so "cold" below is a page's first render in a new session.
    t0 = time.perf_counter()
    import altair  # noqa: F401 - the pages' heavy imports, once per process
    import pandas  # noqa: F401

    say("rendering the sign-in page once (the process's imports)")
    AppTest.from_file(str(app), default_timeout=120).switch_page("views/login.py").run()
    results: list[dict[str, Any]] = [
        {"page": "(process warm-up: imports)", "cold_s": round(time.perf_counter() - t0, 3)}
    ]
    say(f"process warm-up (imports): {results[0]['cold_s']} s")
    for page in PAGES:
        say(f"rendering {page}: 1 cold and {repeats} warm")
        at = AppTest.from_file(str(app), default_timeout=120)
        at.query_params["name"] = use_case
        times = []
        with metered() as host:  # this page's own: a busy spell during another page is not its load
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                at.switch_page(PAGE_FILES[page]).run()
                times.append(time.perf_counter() - t0)
                if at.exception:
                    raise RuntimeError(f"page {page} raised: {at.exception[0].value}")
        warm = statistics.median(times[1:]) if repeats else times[0]
        target = TARGETS_S.get(page)
        within = "" if target is None else f" (target {target} s)"
        busy = "; host overloaded" if host["overloaded"] else ""
        say(f"{page}: cold {times[0]:.3f} s, warm median {warm:.3f} s{within}{busy}")
        results.append(
            {
                "page": page,
                "cold_s": round(times[0], 3),
                "warm_median_s": round(warm, 3),
                "target_s": target,
                "within_target": within_target(max(times[0], warm), target, host["overloaded"]),
                **host,
            }
        )
    return results


def time_portfolio_sql(repeats: int = 3) -> float:
    """Median seconds of the portfolio page's two SQL aggregates alone (no rendering)."""
    from rollout import queries

    times = []
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        with session_scope() as s:
            queries.portfolio(s)
            queries.portfolio_totals(s)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_bench(
    home: Path,
    *,
    use_cases: int,
    observations: int,
    repeats: int,
    progress: Callable[[int], None] | None,
    database_url: str | None = None,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Seed into `database_url` (an EMPTY database; default: SQLite in the scratch home) and time.
    `progress(n)`: n more use cases seeded; `say(line)`: each step's progress line."""
    from sqlalchemy import inspect

    from rollout.db import migrate
    from rollout.db.session import get_engine
    from rollout.settings import configure_environment, get_settings

    os.environ["SPARSEPILOT_HOME"] = str(home)
    if database_url:
        os.environ["SPARSEPILOT_DATABASE_URL"] = database_url
        if inspect(get_engine(database_url)).get_table_names():
            raise ValueError(f"{database_url}: the benchmark needs an empty database (it has tables)")
    else:
        os.environ.pop("SPARSEPILOT_DATABASE_URL", None)
    say = say or (lambda _line: None)
    settings = configure_environment(get_settings())
    where = mask_db_url(settings.database_url)  # the JSON and the log travel as evidence: no password
    say(f"migrating the scratch state DB {where}")
    migrate.upgrade(settings.database_url)
    say(f"seeding {use_cases} use cases, {observations:,} observations")
    t0 = time.perf_counter()
    counts = seed_portfolio(use_cases, observations, progress=progress)
    seed_s = time.perf_counter() - t0
    say(f"seeded {counts['use_cases']} use cases, {counts['observations']:,} observations in {seed_s:.2f} s")
    if not settings.is_sqlite:  # what autovacuum would do soon after a bulk load
        from sqlalchemy import text

        say("ANALYZE")
        with get_engine(settings.database_url).connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE"))
    pages = time_pages(repeats=repeats, say=say)
    portfolio_sql_s = time_portfolio_sql(repeats)
    say(f"portfolio SQL alone: {portfolio_sql_s:.4f} s")
    return {
        "database": where,
        "seeded": counts,
        "seed_s": round(seed_s, 2),
        "portfolio_sql_s": round(portfolio_sql_s, 4),
        "pages": pages,
        "measured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
