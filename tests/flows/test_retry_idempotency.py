"""A task that fails right after its write is committed is retried by Prefect and leaves no duplicate:
alias moves (calibrate's register task), observations (the pilot's store task), gate decisions (the gate
task, which also advances the pilot: once). The failure is injected from outside with a SQLAlchemy
after_commit hook, so production code carries no test switches."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from tests.fixtures.flows import QUICK_CAL


class InjectedFailure(RuntimeError):
    pass


@contextmanager
def fail_once_after_commit(model_cls: type) -> Iterator[dict[str, Any]]:
    """Raise once, right after the first commit that inserted a `model_cls` row."""
    state = {"fired": 0}

    def after_flush(session: Session, _ctx: Any) -> None:
        if any(isinstance(o, model_cls) for o in session.new):
            session.info["wrote_target"] = True

    def after_commit(session: Session) -> None:
        if session.info.pop("wrote_target", False) and state["fired"] == 0:
            state["fired"] += 1
            raise InjectedFailure(f"injected failure after committing a {model_cls.__name__}")

    event.listen(Session, "after_flush", after_flush)
    event.listen(Session, "after_commit", after_commit)
    try:
        yield state
    finally:
        event.remove(Session, "after_flush", after_flush)
        event.remove(Session, "after_commit", after_commit)


def test_retried_tasks_leave_no_duplicates(flow_use_case) -> None:
    from flows.calibrate import calibrate_flow
    from flows.gate import gate_flow
    from flows.pilot import pilot_flow
    from rollout import registry
    from rollout.db.models import AliasMove, GateDecision, ModelVersion, Observation, Pilot, PilotStep
    from rollout.db.session import session_scope

    name = flow_use_case()

    with fail_once_after_commit(AliasMove) as alias_fail:
        cal = calibrate_flow(name, limits=QUICK_CAL)
    assert alias_fail["fired"] == 1
    moves = registry.alias_history(name)
    assert [(m["alias"], m["status"]) for m in moves] == [("challenger", "committed")]
    assert registry.current_aliases(name) == {"challenger": cal["mlflow_version"]}

    with fail_once_after_commit(Observation) as obs_fail:
        summary = pilot_flow(name, batches=2)
    assert obs_fail["fired"] == 1
    with session_scope() as s:
        n_obs = s.scalar(select(func.count()).select_from(Observation))
        n_keys = s.scalar(
            select(func.count()).select_from(
                select(Observation.request_id, Observation.arm).distinct().subquery()
            )
        )
    assert n_obs == n_keys == 2 * 8 * 2  # 2 batches x 8 requests x both arms (shadow), each once
    assert [b["passed"] for b in summary["batches"]] == [True, True]

    with fail_once_after_commit(GateDecision) as gate_fail:
        decision = gate_flow(name)
    assert gate_fail["fired"] == 1
    assert decision["created"] is False  # the retry found the decision its first attempt wrote
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(GateDecision)) == 1
        pilot = s.scalar(select(Pilot))
        steps = s.scalar(select(func.count()).select_from(PilotStep).where(PilotStep.pilot_id == pilot.id))
        assert steps == (2 if decision["outcome"] == "GO" else 1)  # advanced at most once
        assert pilot.current_step_index == steps - 1
        assert s.scalar(select(func.count()).select_from(ModelVersion)) == 2  # challenger + dense baseline

    # A plain re-run on unchanged data is a retry too: same decision, nothing new.
    again = gate_flow(name) if decision["outcome"] != "GO" else None
    if again is not None:
        assert again["decision_id"] == decision["decision_id"] and again["created"] is False


def test_a_reverted_spec_makes_its_calibration_the_challenger_again(flow_use_case, tmp_path) -> None:
    """v1 calibrates, v2 (another estimator: another plan) calibrates, the spec is reverted to v1: the
    calibration reuses v1's run and moves @challenger back to its version (a new key: v1's first move is
    committed), so the evaluation's target and the pilot follow it. The move is cut off right after its
    commit: the task's retry finds it and moves nothing more; a rerun moves nothing."""
    import yaml

    from flows.calibrate import calibrate_flow
    from rollout import pilot_batches, pilots, registry, runs
    from rollout.db.models import AliasMove
    from rollout.db.session import session_scope
    from rollout.usecases import add_usecase

    name = flow_use_case()
    v1 = tmp_path / f"{name}.yaml"
    a = calibrate_flow(name, limits=QUICK_CAL)
    spec = yaml.safe_load(v1.read_text())
    spec["quality_budget"]["estimator"] = "quest"
    v2 = tmp_path / "v2.yaml"
    v2.write_text(yaml.safe_dump(spec))
    assert add_usecase(v2, actor="t", new_version=True).status == "new_version"
    b = calibrate_flow(name, limits=QUICK_CAL)
    assert b["model_version_id"] != a["model_version_id"]
    assert registry.current_aliases(name)["challenger"] == b["mlflow_version"]

    assert add_usecase(v1, actor="t", new_version=True).status == "reverted"
    with fail_once_after_commit(AliasMove) as alias_fail:
        c = calibrate_flow(name, limits=QUICK_CAL)
    assert alias_fail["fired"] == 1
    assert c["reused"] and c["challenger_moved"]
    assert c["calibration_run_id"] == a["calibration_run_id"]
    assert c["model_version_id"] == a["model_version_id"]
    assert registry.current_aliases(name)["challenger"] == a["mlflow_version"]
    moves = [(m["alias"], m["to_version"], m["status"]) for m in registry.alias_history(name)]
    assert moves == [
        ("challenger", a["mlflow_version"], "committed"),
        ("challenger", b["mlflow_version"], "committed"),
        ("challenger", a["mlflow_version"], "committed"),
    ]
    with session_scope() as s:
        uc_id = pilots.get_use_case(s, name).id
    assert runs.latest_calibrated_version(uc_id)["model_version_id"] == a["model_version_id"]
    assert pilot_batches.ensure_pilot(name)["model_version_id"] == a["model_version_id"]

    again = calibrate_flow(name, limits=QUICK_CAL)
    assert again["reused"] and not again["challenger_moved"]
    assert len(registry.alias_history(name)) == 3


def _mlflow_runs(name: str, flow: str) -> list[Any]:
    from rollout import tracking

    c = tracking.client()
    exp = c.get_experiment_by_name(tracking.experiment_name(name))
    if exp is None:
        return []
    return c.search_runs([exp.experiment_id], f"tags.`sparsepilot.flow` = '{flow}'")


def _tracking_down(*_a: Any, **_k: Any) -> str:
    raise ConnectionError("tracking server unreachable")


def test_a_gate_decision_whose_mlflow_log_failed_is_logged_next_time(flow_use_case, monkeypatch) -> None:
    """MLflow is down when the gate logs its decision: the decision is recorded, the flow fails. The next
    gate run finds the decision already recorded and logs it; its record is then cut off once, and the
    task's retry finds the run in MLflow instead of logging a second one. A third run logs nothing."""
    import pytest

    import flows.gate as gate_mod
    from flows.common import load_context
    from flows.gate import gate_flow
    from rollout import pilot_batches, run_links, runs

    name = flow_use_case()
    ctx = load_context(name)
    runs.record_unregistered_challenger(name, ctx.spec.model, key="no-model")
    info = pilot_batches.ensure_pilot(name)
    ids = [r.id for r in ctx.traffic(info["salt"]).take(8, set())]
    rows = [
        {"request_id": rid, "arm": arm, "quality": 0.8, "latency_ms": 100.0, "tokens": 16, "error": False}
        for rid in ids
        for arm in ("control", "treatment")
    ]
    pilot_batches.store_batch(info["step_id"], rows, "b-direct", "pilot-flow")

    with monkeypatch.context() as mp:
        mp.setattr(gate_mod, "log_run", _tracking_down)
        with pytest.raises(ConnectionError):
            gate_flow(name)
    assert _mlflow_runs(name, "gate") == []

    real, cut = run_links.decision_logged, {"n": 0}

    def cut_once(decision_id: int, run_id: str) -> None:
        cut["n"] += 1
        if cut["n"] == 1:
            raise InjectedFailure("injected failure before the decision's run was recorded")
        real(decision_id, run_id)

    with monkeypatch.context() as mp:
        mp.setattr(run_links, "decision_logged", cut_once)
        again = gate_flow(name)
    assert cut["n"] == 2 and again["created"] is False
    logged = _mlflow_runs(name, "gate")
    assert [r.data.params["decision_id"] for r in logged] == [str(again["decision_id"])]
    assert run_links.unlogged_gate_decisions(name) == []

    assert gate_flow(name)["decision_id"] == again["decision_id"]
    assert len(_mlflow_runs(name, "gate")) == 1


def test_a_pilot_batch_whose_mlflow_log_failed_is_logged_next_time(flow_use_case, monkeypatch) -> None:
    """MLflow is down when the pilot logs its stored batch: the flow fails. The next pilot run draws new
    requests, and logs the stored batch (from its stored rows) before its own: each batch once."""
    import pytest

    import flows.pilot as pilot_mod
    from flows.calibrate import calibrate_flow
    from flows.pilot import pilot_flow
    from rollout import run_links
    from rollout.db.models import Observation
    from rollout.db.session import session_scope

    name = flow_use_case()
    calibrate_flow(name, limits=QUICK_CAL)
    with monkeypatch.context() as mp:
        mp.setattr(pilot_mod, "log_run", _tracking_down)
        with pytest.raises(ConnectionError):
            pilot_flow(name, batches=1)
    with session_scope() as s:
        first = set(s.scalars(select(Observation.batch_id)))
    assert len(first) == 1 and _mlflow_runs(name, "pilot") == []

    second = pilot_flow(name, batches=1)
    with session_scope() as s:
        stored = set(s.scalars(select(Observation.batch_id)))
    assert stored == first | {second["batches"][0]["batch_id"]} and len(stored) == 2
    logged = sorted(r.data.params["batch_id"] for r in _mlflow_runs(name, "pilot"))
    assert logged == sorted(stored)
    (early,) = [r for r in _mlflow_runs(name, "pilot") if r.data.params["batch_id"] in first]
    assert early.data.metrics["control_n"] == early.data.metrics["treatment_n"] == 8.0
    assert run_links.unlogged_batches(name) == []


def test_a_calibration_is_redone_when_what_it_reads_changes_and_only_then(
    flow_use_case, monkeypatch, tmp_path
) -> None:  # noqa: ANN001
    """A calibration recorded under an earlier held-out split rule (sparse_core.corpus.SPLIT_RULE; before
    review W5 the split went by position, so a repeated prompt could sit on both sides) held out other
    texts: its key differs, and the same settings calibrate again instead of reusing its plan.

    And `calibrate NAME` after a schedule-only (or cost-only) spec version calibrated again: the run's key
    hashed the whole spec. It names what calibration reads now (`rollout.recalibration.calibration_inputs`),
    so v1's calibration is reused under v2 and v3, and says so; a run keyed by an earlier build (the whole
    spec's hash) is still found, so none is orphaned and redone. One real calibration serves both halves."""
    import yaml

    import flows.calibrate as cal_flow
    from flows.common import stable_key
    from rollout.db.models import CalibrationRun, SpecVersion
    from rollout.db.session import session_scope
    from rollout.usecases import add_usecase
    from sparse_core.fingerprint import weights_fingerprint

    name = flow_use_case()
    with monkeypatch.context() as m:
        m.setattr(cal_flow, "SPLIT_RULE", "by-position")
        old = cal_flow.calibrate_flow(name, limits=QUICK_CAL)
    first = cal_flow.calibrate_flow(name, limits=QUICK_CAL)
    assert not first["reused"] and first["calibration_run_id"] != old["calibration_run_id"]
    assert cal_flow.calibrate_flow(name, limits=QUICK_CAL)["reused"]  # the same rule: reused

    spec = yaml.safe_load((tmp_path / f"{name}.yaml").read_text())
    for version, (section, field, value) in enumerate(
        [("schedule", "cron", "*/5 * * * *"), ("cost", "gpu_usd_per_hour", 3.5)], start=2
    ):
        spec[section][field] = value
        path = tmp_path / f"v{version}.yaml"
        path.write_text(yaml.safe_dump(spec))
        assert add_usecase(path, actor="t", new_version=True).status == "new_version"
        again = cal_flow.calibrate_flow(name, limits=QUICK_CAL)
        assert again["reused"] and again["calibration_run_id"] == first["calibration_run_id"], again
        said = f"calibrated under spec v1: v{version} changed nothing calibration reads"
        assert again["reused_from"] == said, again

    with session_scope() as s:  # the run as an earlier build keyed it: v1's whole-spec hash
        run = s.get(CalibrationRun, first["calibration_run_id"])
        v1 = s.scalar(
            select(SpecVersion).where(SpecVersion.use_case_id == run.use_case_id, SpecVersion.version == 1)
        )
        parts = (run.use_case_id, v1.spec_hash, v1.spec["model"], run.metrics["settings"])
        run.idempotency_key = "calibrate:" + stable_key(*parts, weights_fingerprint(v1.spec["model"]))
    again = cal_flow.calibrate_flow(name, limits=QUICK_CAL)
    assert again["reused"] and again["calibration_run_id"] == first["calibration_run_id"], again


def test_a_task_refused_for_want_of_its_claim_or_held_for_an_alarm_is_not_retried() -> None:
    """An approval's effect refused because another finisher holds the decision's claim is not retried (a
    second later the claimant still carries it out, or has): `flows.common._worth_retrying`; an error a
    retry may cure still is."""
    from types import SimpleNamespace

    from flows.common import _worth_retrying
    from rollout.approvals import ClaimRefused, PromotionHeld

    refused = ClaimRefused("decision 3 is being finished by bob; carol gives way; nothing was moved")
    assert _worth_retrying(None, None, SimpleNamespace(data=refused)) is False
    held = PromotionHeld("the monitor's alarm about the serving champion (decision 7) waits for a person")
    assert _worth_retrying(None, None, SimpleNamespace(data=held)) is False
    assert _worth_retrying(None, None, SimpleNamespace(data=ConnectionError("MLflow down"))) is True
