"""The main job behind `make run` / `sparsepilot run`: on embedded defaults, add the sample use cases if
missing, then for each: validate -> calibrate -> evaluate -> pilot (shadow to its minimum sample, then
the first split step, small batches) -> gate, and print a summary table.

The main job runs a *short pilot*: shadow + the first split step, with promotion asked for after that
step (`promote_after_step=1`); a GO there is recorded as waiting for approval and the job moves on — it
never blocks on a person. With `--serve` the job keeps a paused approval flow run per waiting decision
(flows.approval) for as long as the dashboard is served, so an approval in the dashboard resumes it; on
exit those runs are released and `sparsepilot approve` starts (and resumes) a fresh one.

The loaded model is cached across use cases (flows.common.get_model); calibration and evaluation use
their quick settings; pilot batches come from each spec (`rollout.batch_size`)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from rollout import audit, lifecycle, pilot_batches, queries, roi
from rollout.usecases import added_by_people, phase_of, pilot_plan_of, run_started
from rollout.words import counted

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples" / "usecases"
STAGES = (
    "validate+calibrate",
    "evaluate",
    "pilot shadow",
    "gate shadow",
    "pilot split",
    "gate split",
    "done",
)


@dataclass
class MainJobSettings:
    use_cases: list[str] | None = None
    examples_dir: Path = EXAMPLES_DIR
    quick: bool = True
    pilot_max_new_tokens: int = 16
    pilot_max_prompt_tokens: int | None = None
    # time budgets per use case, beyond the first batch of each step: the shadow step collects what the
    # gate projects it needs (rollout.gate.projected_sample_size) while it fits; the split step fills
    # its treatment arm while it fits, then looks once
    shadow_seconds: float = 180.0
    split_seconds: float = 90.0
    max_shadow_looks: int = 3
    promote_after_step: int = 1
    pilot_unprofitable: bool = False  # pilot even where rollout.roi.pilot_skip_reason says it is wasted
    # the operator signed in for the run (`sparsepilot run`), or None: the use cases it adds from a folder
    # other than the samples' are added as theirs (as `usecase add` does), the run's start names them, and
    # so do the pilot and gate rows of a person's use cases (`pilot_actor`)
    operator: str | None = None


@dataclass
class UseCaseOutcome:
    name: str
    ok: bool = True
    error: str | None = None
    seconds: float = 0.0
    calibration: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    note: str | None = None


def is_samples_folder(folder: Path) -> bool:
    """Is ``folder`` the samples' own (examples/usecases)? Their use cases are the pipeline's; those of
    any other folder (`run --specs DIR`) are a person's, added only for an operator, as `usecase add`."""
    return Path(folder).resolve() == EXAMPLES_DIR.resolve()


def adder_of(examples_dir: Path, operator: str | None) -> str:
    """Who adds the specs of ``examples_dir``: the pipeline for the samples, else the signed-in operator
    (the pipeline where nobody signed in: a caller of `run_main_job` other than the CLI)."""
    return audit.SYSTEM_ACTOR if is_samples_folder(examples_dir) or operator is None else operator


def pilot_actor(name: str, operator: str | None, theirs: set[str]) -> str:
    """Who calibrates, evaluates, pilots and gates ``name`` in a run, as the audit log says: the operator
    signed in for it where it is a person's use case (``theirs``: `rollout.usecases.added_by_people`, what
    the sign-in was for), the pipeline for the samples it adds and runs itself, which need nobody."""
    return operator if operator is not None and name in theirs else audit.SYSTEM_ACTOR


def add_sample_use_cases(examples_dir: Path, actor: str = audit.SYSTEM_ACTOR) -> list[dict[str, Any]]:
    """Add every spec in examples_dir whose use case does not exist yet, as ``actor``; existing ones are
    left alone."""
    from rollout.spec import load_spec
    from rollout.usecases import add_usecase, names

    added = []
    for path in sorted(examples_dir.glob("*.yaml")):
        if load_spec(path).name not in names():
            added.append(add_usecase(path, actor=actor).to_dict())
    return added


def sample_names(examples_dir: Path) -> list[str]:
    from rollout.spec import load_spec

    return [load_spec(p).name for p in sorted(examples_dir.glob("*.yaml"))]


def extra_requests(decision: dict[str, Any], seconds_per_request: float, seconds_left: float) -> int:
    """How many more requests to collect before the next look: what the gate projects the decision
    needs (plus 10%, as the estimate moves), capped by the time left; 0 = stop looking. Every look
    counts toward gate.max_looks, so a look on less than half of what is wanted is not spent."""
    projected = decision.get("projected_requests")
    if (
        decision.get("outcome") != "EXTEND"
        or not projected
        or "traffic-exhausted" in decision.get("reasons", [])
    ):
        return 0
    have = decision.get("n_pairs") or (decision.get("n_control") or 0) + (decision.get("n_treatment") or 0)
    wanted = max(0, -(-projected * 11 // 10) - have)  # ceil(1.1 * projected), in integers
    affordable = int(seconds_left // max(seconds_per_request, 1e-6)) if seconds_left > 0 else 0
    more = min(wanted, affordable)
    return more if more >= max(1, wanted // 2) else 0


def run_use_case(
    name: str, s: MainJobSettings, stage: Callable[[str], None], actor: str = audit.SYSTEM_ACTOR
) -> UseCaseOutcome:
    from flows.calibrate import calibrate_flow
    from flows.evaluate import evaluate_flow
    from rollout.roi import evaluation_pilot_skip

    out = UseCaseOutcome(name)
    t0 = time.perf_counter()
    try:
        stage("validate+calibrate")
        out.calibration = calibrate_flow(name, quick=s.quick, actor=actor)
        stage("evaluate")
        out.evaluation = evaluate_flow(name, quick=s.quick, actor=actor)
        # A pilot would compare dense with dense, or spend traffic where nothing can be saved: say so.
        skip = evaluation_pilot_skip(
            out.evaluation, met_budget=out.calibration.get("met_budget"), pilot_anyway=s.pilot_unprofitable
        )
        out.note = None if skip is None else skip.said("--pilot-all")  # `sparsepilot run`'s override
        if out.note is None:
            phase = phase_of(name)
            if not lifecycle.can(phase, "pilot"):
                out.note = f"{phase}: no pilot traffic in this run"
            else:
                run_short_pilot(name, s, stage, out, actor)
        stage("done")
    except Exception as exc:  # noqa: BLE001 - one use case failing must not hide the others' results
        out.ok = False
        out.error = f"{type(exc).__name__}: {exc}"
        stage("failed")
    out.seconds = time.perf_counter() - t0
    return out


def run_short_pilot(
    name: str,
    s: MainJobSettings,
    stage: Callable[[str], None],
    out: UseCaseOutcome,
    actor: str = audit.SYSTEM_ACTOR,
) -> None:
    """Shadow (looking again while the gate's projection fits the time budget), then the first split
    step; every gate decision is appended to out.decisions. `actor` (`pilot_actor`) pilots and gates."""
    from flows.gate import gate_flow
    from flows.pilot import pilot_flow
    from rollout.usecases import load_spec_version

    spec = load_spec_version(name).spec
    pilot_kw = {
        "max_new_tokens": s.pilot_max_new_tokens,
        "max_prompt_tokens": s.pilot_max_prompt_tokens,
        "pilot_anyway": s.pilot_unprofitable,  # --pilot-all: the pilot starts where it would not pay
        "actor": actor,
    }
    step = pilot_batches.current_step(name)
    if step is None or (step["kind"] == "shadow" and step["pilot_status"] == "running"):
        stage("pilot shadow")
        t1 = time.perf_counter()
        batches = math.ceil(spec.rollout.shadow.min_samples / spec.rollout.batch_size)
        pilot_flow(name, batches=batches, **pilot_kw)
        per_request = (time.perf_counter() - t1) / (batches * spec.rollout.batch_size)
        stage("gate shadow")
        decision = gate_flow(name, promote_after_step=s.promote_after_step, actor=actor)
        out.decisions.append(decision)
        deadline = time.perf_counter() + s.shadow_seconds
        for _ in range(s.max_shadow_looks - 1):
            more = extra_requests(decision, per_request, deadline - time.perf_counter())
            if more == 0:
                break
            stage("pilot shadow")
            pilot_flow(name, batches=1, batch_size=more, **pilot_kw)
            stage("gate shadow")
            decision = gate_flow(name, promote_after_step=s.promote_after_step, actor=actor)
            out.decisions.append(decision)
    step = pilot_batches.current_step(name)
    if step is not None and step["kind"] == "split" and step["pilot_status"] == "running":
        stage("pilot split")
        t1 = time.perf_counter()
        pilot_flow(name, batches=1, **pilot_kw)
        per_batch = time.perf_counter() - t1
        # At a small traffic % the treatment arm fills slowly: collect more batches while they fit
        # the split-step time budget, then look once (every look counts toward gate.max_looks).
        share = max(step["traffic_pct"] / 100.0, 1e-6)
        needed = math.ceil(step["min_samples"] / (spec.rollout.batch_size * share))
        extra = min(needed - 1, int((s.split_seconds - per_batch) // max(per_batch, 1e-6)))
        if extra > 0:
            pilot_flow(name, batches=extra, **pilot_kw)
        stage("gate split")
        out.decisions.append(gate_flow(name, promote_after_step=s.promote_after_step, actor=actor))


def summary_rows(names: list[str]) -> list[dict[str, Any]]:
    """One row per use case from the state DB (rollout.queries.job_summary)."""
    return queries.read(queries.job_summary, names)


def _interval(v: Any, lo: Any, hi: Any, fmt: str) -> str:
    """'2.00 [1.80, 2.20]'; where no interval was measured (one timing pair: the state DB stores no ends,
    rollout.runs) the estimate says so, in every surface's words (`roi.NO_INTERVAL`), where it read "2.00"
    alone, as if measured; '-' without a figure."""
    if v is None:
        return "-"
    text = format(v, fmt)
    if lo is None or hi is None:
        return f"{text} ({roi.NO_INTERVAL})"
    return f"{text} [{format(lo, fmt)}, {format(hi, fmt)}]"


def _quality_cell(r: dict[str, Any]) -> str:
    """The quality delta with the bounds that say something (rollout.queries.quality_interval: a bound at
    the scale's end is left out, as on the dashboard) and where both come from (queries.quality_from)."""
    if r["quality_delta"] is None:
        return "-"
    text = format(r["quality_delta"], "+.3f")
    bounds = queries.quality_interval(r["quality_low"], r["quality_high"], "+.3f")
    if bounds != "-":
        text += f" {bounds}" if bounds.startswith("[") else f" [{bounds}]"
    source = queries.quality_from(r)
    return f"{text} ({source})" if source else text


def render_table(rows: list[dict[str, Any]], outcomes: dict[str, dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title="SparsePilot main job")
    # the speed-up cell is the prefill one (the evaluation's `speedup`); the dollars beside it rest on the
    # per-request speed-up, prefill and decode together (rollout.roi), whose decode part the decode cell says
    for col in ("use case", "decision", "waits for", "quality delta [interval]",
                "prefill speed-up [interval]", "$/month saved [interval]", "payback", "decode"):  # fmt: skip
        table.add_column(col, overflow="fold")  # a narrow column wraps a long number, never cuts it to "…"
    for r in rows:
        o = outcomes.get(r["use_case"]) or {}
        decision = r["decision"] if o.get("ok", True) else f"ERROR: {o.get('error')}"
        if o.get("note") and r["decision"] == "-":
            decision = o["note"]
        elif o.get("note"):
            decision = f"{r['decision']}; {o['note']}"
        payback = "-" if r["payback_days"] is None else f"{r['payback_days']:.0f} days"
        if r.get("saves_nothing"):  # a dense plan: its $/month is timing noise (rollout.roi.plan_money)
            payback = "never (saves nothing)"
        elif r["saved_usd_month"] is not None and r["saved_usd_month"] <= 0:
            payback = "never (no saving)"
        elif r.get("not_established"):
            payback = "none (saving not established)"
        table.add_row(
            r["use_case"],
            decision,
            r.get("waits_for") or "-",
            _quality_cell(r),
            _interval(r["speedup"], r["speedup_low"], r["speedup_high"], ".2f"),
            _interval(r["saved_usd_month"], r["saved_usd_month_low"], r["saved_usd_month_high"], ",.0f"),
            payback,
            r.get("decode") or "-",
        )
    # a use case whose plan saves nothing (its $ are timing noise: the cell above would read as a saving),
    # whose speed-up and $ were timed on an overloaded host, or whose $ are priced at a spec version that is
    # no longer current, says so under the table (why a saving is not established: the decision's note)
    warned = [
        f"{r['use_case']}: {w}"
        for r in rows
        for w in (
            r.get("saves_nothing"),
            ((outcomes.get(r["use_case"]) or {}).get("evaluation") or {}).get("measured_under_overload"),
            r.get("priced_at"),
        )
        if w
    ]
    if warned:
        table.caption = "\n".join(warned)
        table.caption_justify = "left"
    return table


class StageClock:
    """One line per finished stage with its time and the time since the job started, printed in a
    terminal (above the live bars) and in logs or CI alike (where the bars print nothing), and kept in
    the log file too."""

    def __init__(self, name: str, job_start: float, emit: Callable[[str], None]) -> None:
        self.name, self.job_start, self.emit = name, job_start, emit
        self.label: str | None = None
        self.since = time.perf_counter()

    def start(self, label: str) -> None:
        now = time.perf_counter()
        if self.label is not None:
            line = (
                f"{self.name}: {self.label} {'failed' if label == 'failed' else 'done'} in "
                f"{_duration(now - self.since)} ({_duration(now - self.job_start)} into the run)"
            )
            self.emit(line)
            logging.getLogger("sparsepilot.progress").info(line)
        self.label, self.since = (None if label in ("done", "failed") else label), now


def _duration(seconds: float) -> str:
    whole = round(seconds)  # rounded once: 1199.6 s is "20 min 00 s", never "19 min 60 s"
    return f"{whole} s" if whole < 90 else f"{whole // 60} min {whole % 60:02d} s"


def run_main_job(settings: MainJobSettings | None = None, *, console: Any = None) -> dict[str, Any]:
    """Run the pipeline for the sample (or given) use cases; returns the summary (rows + timings)."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from rollout.db import migrate
    from rollout.mlflow_store import ensure_store
    from rollout.settings import configure_environment

    s = settings or MainJobSettings()
    cfg = configure_environment()
    migrate.prepare_for_run(cfg.database_url)  # SQLite migrated; PostgreSQL only checked: init's, as owner
    # the MLflow store at head before any flow: its first creation is not atomic (rollout.mlflow_store)
    ensure_store(cfg)
    t0 = time.perf_counter()
    added = add_sample_use_cases(s.examples_dir, adder_of(s.examples_dir, s.operator))
    names = s.use_cases or sample_names(s.examples_dir)
    # the audit log says who started it, and who pilots and gates a person's use case (`pilot_actor`)
    theirs = set(added_by_people(names)) if s.operator is not None else set()
    if s.operator is not None:
        run_started(names, s.operator)
    outcomes: dict[str, UseCaseOutcome] = {}
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} stages"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        overall = progress.add_task(counted(len(names), "use case"), total=len(names))
        for name in names:
            tid = progress.add_task(f"{name}: starting", total=len(STAGES) - 1)
            # one stage, one line: never wrapped at a narrow (or, off a terminal, the default 80-column) width
            clock = StageClock(name, t0, partial(progress.console.print, soft_wrap=True, highlight=False))

            def stage(label: str, _tid: int = tid, _name: str = name, _clock: StageClock = clock) -> None:
                done = STAGES.index(label) if label in STAGES else progress.tasks[_tid].completed
                progress.update(_tid, description=f"{_name}: {label}", completed=done)
                _clock.start(label)

            outcomes[name] = run_use_case(name, s, stage, pilot_actor(name, s.operator, theirs))
            progress.advance(overall)
    rows = summary_rows(names)
    # what the approval would take on production traffic (the job asks after promote_after_step)
    plans = {n: pilot_plan_of(n, approval_after=s.promote_after_step + 1) for n in names}
    return {
        "added": added,
        "rows": rows,
        "plans": plans,
        "outcomes": {n: o.__dict__ for n, o in outcomes.items()},
        "pipeline_seconds": time.perf_counter() - t0,
        "ok": all(o.ok for o in outcomes.values()),
    }


def ephemeral_api_url() -> str | None:
    """The API URL of the Prefect server this process started (embedded default), if any."""
    try:
        from prefect.server.api.server import SubprocessASGIServer
    except ImportError:  # pragma: no cover
        return None
    for server in list(SubprocessASGIServer._instances.values()):
        if getattr(server, "running", False) and server.port:
            return server.api_url
    return None


def serve_after(rows: list[dict[str, Any]], serve_fn: Callable[[], int]) -> int:
    """Keep a paused approval run per waiting decision while `serve_fn` (the dashboard) runs. The
    dashboard subprocess is pointed at this process's Prefect server, so its approvals resume these
    very runs."""
    import os

    from flows.approval import release_waiting, start_waiting

    try:
        for r in rows:
            if r["awaiting"] in ("approval", "rollback_approval") and r["decision_id"]:
                start_waiting(r["decision_id"])
        url = ephemeral_api_url()
        if url and not os.environ.get("PREFECT_API_URL"):
            os.environ["PREFECT_API_URL"] = url
        return serve_fn()
    finally:
        release_waiting()
