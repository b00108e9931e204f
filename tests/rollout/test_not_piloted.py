"""The portfolio said "no pilot: the plan keeps 100.00% of blocks (as dense)" while the scheduled cycle
and `sparsepilot pilot` started a pilot of it anyway (a dense-vs-dense pilot, heading to a GO): only the
main job asked `rollout.roi.pilot_skip_reason`. The rule now lives in one place that every path which
starts a pilot goes through (`rollout.pilot_batches.ensure_pilot_in`), and the portfolio's words are
its words. Real state DB, a use case added through `add_usecase`, its runs as the flows record them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest


def _challenger(tmp_path: Path, name: str, *, at_calibration: float | None = None, **evaluation: Any) -> None:
    """`name` added, calibrated (a plan within the budget, of density `at_calibration` unless the
    evaluation says) and, with `evaluation`'s columns, evaluated (with none, left calibrated: no
    evaluation of its plan)."""
    from rollout import lifecycle
    from rollout.db.models import EvaluationRun
    from rollout.db.session import session_scope
    from rollout.pilots import get_use_case
    from sparse_core import SparsePlan

    from .usecase_helpers import add_calibrated

    density = evaluation.get("density", at_calibration)
    metrics = {"met_budget": True, "prefill_met_budget": True, "density": density}
    _, mv_id = add_calibrated(
        tmp_path, name, SparsePlan(tau=0.9), density=density, metrics=metrics, key=f"calibrate:{name}"
    )
    with session_scope() as s:
        uc = get_use_case(s, name)
        lifecycle.set_phase(s, uc, "calibrated", actor="test", reason="calibrated")
        if not evaluation:
            return
        s.add(
            EvaluationRun(
                idempotency_key=f"evaluate:{name}",
                use_case_id=uc.id,
                model_version_id=mv_id,
                spec_version=1,
                status="succeeded",
                roi={"decode": {"status": "dense"}},
                **evaluation,
            )
        )
        lifecycle.set_phase(s, uc, "evaluated", actor="test", reason="evaluated")


def _pilots(name: str) -> int:
    from sqlalchemy import func, select

    from rollout.db.models import Pilot
    from rollout.db.session import session_scope
    from rollout.pilots import get_use_case

    with session_scope() as s:
        uc = get_use_case(s, name)
        return s.scalar(select(func.count()).select_from(Pilot).where(Pilot.use_case_id == uc.id))


DENSE = {"density": 1.0, "savings_month_usd": -25.4, "savings_month_low": -148.8, "savings_month_high": 25.2}
PAYS = {"density": 0.4, "savings_month_usd": 600.0, "savings_month_low": 410.0, "savings_month_high": 800.0}


def test_a_plan_the_portfolio_says_is_not_piloted_starts_no_pilot_on_any_path(sp_home, tmp_path) -> None:  # noqa: ANN001
    from rollout import pilot_batches, queries
    from rollout.db.session import session_scope
    from rollout.pilot_batches import NotPiloted, ensure_pilot_in

    _challenger(tmp_path / "a", "dense-plan", **DENSE)
    row = next(r for r in queries.read(queries.portfolio) if r["name"] == "dense-plan")
    assert row["waits_for"] == "no pilot: the plan keeps 100.00% of blocks (as dense)"

    skip = pilot_batches.pilot_skip("dense-plan")  # what the cycle asks before its pilot batch
    assert skip is not None and row["waits_for"] == f"no pilot: {skip.why}"  # one rule, one wording
    with (
        session_scope() as s,
        pytest.raises(NotPiloted, match=r"dense-plan: not piloted: the plan keeps 100"),
    ):
        ensure_pilot_in(s, "dense-plan")  # the cycle's, `sparsepilot pilot`'s and an import's way in
    with pytest.raises(NotPiloted, match=r"--pilot-anyway"):
        pilot_batches.ensure_pilot("dense-plan")
    assert _pilots("dense-plan") == 0  # nothing started

    step = pilot_batches.ensure_pilot("dense-plan", pilot_anyway=True)  # an operator's explicit choice
    assert step["kind"] == "shadow" and _pilots("dense-plan") == 1
    assert pilot_batches.pilot_skip("dense-plan") is None  # a running pilot keeps running
    assert pilot_batches.ensure_pilot("dense-plan")["pilot_id"] == step["pilot_id"]
    assert pilot_batches.pilot_refusal("dense-plan") is None

    # what `sparsepilot pilot` asks before its flow: once the pilot has ended, that is what it says (it
    # said "not piloted: the plan keeps 100.00% ..." while the flow said the pilot had ended)
    pilot_batches.abort("dense-plan", actor="test", reason="test")
    ended = "dense-plan: pilot 1 of this challenger was aborted; `sparsepilot pilot dense-plan --again"
    assert str(pilot_batches.pilot_refusal("dense-plan")).startswith(ended)
    assert str(pilot_batches.pilot_refusal("dense-plan", pilot_anyway=True)).startswith(ended)
    with pytest.raises(pilot_batches.pilots.PilotStateError, match=re.escape(ended)):
        pilot_batches.ensure_pilot("dense-plan", pilot_anyway=True)


def test_a_plan_that_keeps_every_block_is_not_piloted_before_its_evaluation(sp_home, tmp_path) -> None:  # noqa: ANN001
    """Review s49 R2: with no evaluation only the calibration's outcome was asked, so a plan calibrated
    at density 1.000 was piloted by an import straight after `calibrate`, dense against dense, and
    promoted. The density its calibration found now decides as an evaluation's would, on every path
    (the cycle's question, `sparsepilot pilot`'s, an import); --pilot-anyway still pilots it. A sparse
    plan not yet evaluated is piloted as before (the saving rules need an evaluation's figures)."""
    import json

    from rollout import pilot_batches

    name = "dense-unevaluated"
    _challenger(tmp_path / "d", name, at_calibration=1.0)
    assert (
        str(pilot_batches.pilot_skip(name)) == "the plan keeps 100.00% of blocks (as dense): nothing to pilot"
    )
    assert str(pilot_batches.pilot_refusal(name)) == (
        f"{name}: not piloted: the plan keeps 100.00% of blocks (as dense): nothing to pilot; nothing was "
        f"started (`sparsepilot pilot {name} --pilot-anyway` pilots it regardless)"
    )
    ids = ["r0", "r1"]
    path = tmp_path / "shadow.jsonl"
    rows = [
        {"request_id": i, "arm": arm, "quality": 0.9, "latency_ms": 400.0, "error": False}
        for i in ids
        for arm in ("control", "treatment")
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    anyway = f"`sparsepilot pilot {name} --observations {path} --pilot-anyway` pilots it regardless"
    with pytest.raises(pilot_batches.NotPiloted, match=re.escape(anyway)):
        pilot_batches.import_file(name, str(path), ids)  # the review's path: an import after calibrate
    assert _pilots(name) == 0
    assert pilot_batches.import_file(name, str(path), ids, pilot_anyway=True)["stored"]["inserted"] == 4
    assert _pilots(name) == 1

    _challenger(tmp_path / "s", "sparse-unevaluated", at_calibration=0.4)
    assert pilot_batches.pilot_skip("sparse-unevaluated") is None
    assert pilot_batches.pilot_refusal("sparse-unevaluated") is None


def _start_in_process(name: str, barrier: Any, queue: Any) -> None:
    import time

    from rollout import pilot_batches, pilots
    from rollout.db.session import get_engine

    get_engine().dispose(close=False)  # the parent's pooled connections are not this process's
    start = pilots.start_pilot

    def slow_start(*args: Any, **kwargs: Any) -> Any:  # the other process reads meanwhile, as under load
        time.sleep(0.5)
        return start(*args, **kwargs)

    pilots.start_pilot = slow_start
    barrier.wait()
    try:
        info = pilot_batches.ensure_pilot(name)
        queue.put(("ok", info["pilot_id"], info["kind"]))
    except Exception as exc:  # noqa: BLE001 - what the process met, for the assertion to show
        queue.put(("error", f"{type(exc).__name__}: {exc}", None))


def test_a_plan_whose_saving_is_established_is_piloted(sp_home, tmp_path) -> None:  # noqa: ANN001
    """...by one pilot, however many start it at once: two processes (two `sparsepilot pilot NAME` runs, or
    a pilot run and the cycle) starting the first pilot behind a barrier both read "no pilot" in SQLite's
    deferred transaction, and the second's start failed with the raw IntegrityError on
    uq_pilots_use_case_number; now they take turns and share the pilot the first started. Real processes
    (forked: the modules are imported once), the test's SQLite state DB."""
    import multiprocessing as mp

    from rollout import pilot_batches, queries

    _challenger(tmp_path / "b", "pays", **PAYS)
    row = next(r for r in queries.read(queries.portfolio) if r["name"] == "pays")
    assert not row["waits_for"].startswith("no pilot")
    assert pilot_batches.pilot_skip("pays") is None
    ctx = mp.get_context("fork")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_start_in_process, args=("pays", barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert {r[0] for r in results} == {"ok"} and len({r[1] for r in results}) == 1, results
    assert results[0][2] == "shadow" and _pilots("pays") == 1


def test_no_saving_expected_is_not_piloted_either(sp_home, tmp_path) -> None:  # noqa: ANN001
    from rollout import pilot_batches, queries

    costs = {**PAYS, "savings_month_usd": -35.0, "savings_month_low": -80.0, "savings_month_high": 10.0}
    _challenger(tmp_path / "c", "costs", **costs)
    row = next(r for r in queries.read(queries.portfolio) if r["name"] == "costs")
    assert row["waits_for"] == "no pilot: no saving expected (-$35/month, at best $10)"
    with pytest.raises(pilot_batches.NotPiloted, match="no saving expected"):
        pilot_batches.ensure_pilot("costs")
    assert _pilots("costs") == 0


NOT_ESTABLISHED = {
    "density": 0.4,
    "savings_month_usd": 600.0,
    "savings_month_low": -20.0,
    "savings_month_high": 900.0,
}


def test_a_refusal_names_the_override_of_the_command_that_was_run(sp_home, tmp_path) -> None:  # noqa: ANN001
    """Review s49 V3: `sparsepilot pilot NAME` refused a saving not established with "... re-evaluate on a
    quiet host (or pilot anyway with --pilot-all)", the flag of `sparsepilot run`, which `pilot` does not
    take (its own is --pilot-anyway). The finding names no flag; each command adds its own."""
    from rollout import pilot_batches

    _challenger(tmp_path, "wide", **NOT_ESTABLISHED)
    refused = str(pilot_batches.pilot_refusal("wide"))
    assert refused == (
        "wide: not piloted: saving not established ($600/month, interval -$20, $900): the speed "
        "measurement does not support a saving; re-evaluate on a quiet host; nothing was started "
        "(`sparsepilot pilot wide --pilot-anyway` pilots it regardless)"
    ), refused
    skip = pilot_batches.pilot_skip("wide")  # what `run` (flows.main_job) and the cycle say it with
    assert skip.said("--pilot-all").endswith("re-evaluate on a quiet host (or pilot anyway with --pilot-all)")
    assert "--pilot-all" not in str(skip)
