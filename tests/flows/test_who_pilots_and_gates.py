"""Who did it: `sparsepilot pilot NAME` and `sparsepilot gate NAME` make the operator sign in, but the
state changes they caused (the pilot's start, the gate's decision and the pilot stopped, the phase moves)
were recorded in the audit log as the pipeline (`sparsepilot-pipeline`): pilot_flow and gate_flow took
no actor, so a business owner reading the log could not tell who started a pilot. The flows now take
the signed-in person's name; the scheduled cycle, which nobody starts, stays the pipeline's. Real
`sparsepilot` processes, a real Prefect API, the state DB and MLflow, the tiny model's arms."""

from __future__ import annotations

from typing import Any

from tests.fixtures.flows import PAYS
from tests.fixtures.trust import password_of


def _challenger_that_pays(name: str) -> None:
    """`name`'s plan registered and its calibration and evaluation recorded as the flows record them (a
    plan within the budget that pays), no model work: the pilot then starts on it."""
    from rollout import lifecycle, pilots, registry
    from rollout.db.models import CalibrationRun, EvaluationRun
    from rollout.db.session import session_scope
    from sparse_core import SparsePlan

    with session_scope() as s:
        spec, _ = pilots.load_current_spec(s, pilots.get_use_case(s, name))
    mv = registry.register_version(
        name, SparsePlan(tau=0.9), spec.model, actor=registry.SYSTEM_PIPELINE, density=PAYS["density"]
    )
    with session_scope() as s:
        uc = pilots.get_use_case(s, name)
        run = {"use_case_id": uc.id, "model_version_id": mv.id, "spec_version": 1, "status": "succeeded"}
        metrics = {"met_budget": True, "prefill_met_budget": True, "density": PAYS["density"]}
        s.add(CalibrationRun(idempotency_key=f"calibrate:{name}", metrics=metrics, **run))
        s.add(
            EvaluationRun(
                idempotency_key=f"evaluate:{name}", roi={"decode": {"status": "dense"}}, **run, **PAYS
            )
        )
        lifecycle.set_phase(s, uc, "calibrated", actor="test", reason="calibrated")
        lifecycle.set_phase(s, uc, "evaluated", actor="test", reason="evaluated")


def _actors(name: str) -> list[tuple[str, str, Any]]:
    """(action, actor, to) of the use case's audit rows about its pilots, decisions and phase, in order."""
    from sqlalchemy import select

    from rollout.db.models import AuditEntry
    from rollout.db.session import session_scope
    from rollout.pilots import get_use_case

    with session_scope() as s:
        uc = get_use_case(s, name)
        rows = s.scalars(select(AuditEntry).where(AuditEntry.use_case_id == uc.id).order_by(AuditEntry.id))
        return [
            (r.action, r.actor, (r.details or {}).get("to"))
            for r in rows
            if r.action.startswith(("pilot.", "decision.", "usecase.phase")) and r.actor != "test"
        ]


def _worse_pairs(name: str, n: int) -> None:
    """`n` shadow pairs in the running pilot's step where the sparse arm is clearly worse: a NO-GO. Worse by
    half a point, not a whole one: after the pilot's own batch (the tiny model's arms alike) a whole point
    makes the look's bounds cross (`decide`'s crossed-bounds rule; a NO-GO too, where the futility test
    rejects, but with a second reason); this test is about who acts, not about crossings."""
    from rollout import pilots
    from rollout.db.models import Pilot
    from rollout.db.session import session_scope

    rows = [
        {"request_id": f"w{i}", "arm": arm, "quality": q, "latency_ms": 100.0, "tokens": 0, "error": False}
        for i in range(n)
        for arm, q in (("control", 1.0), ("treatment", 0.5))
    ]
    with session_scope() as s:
        uc = pilots.get_use_case(s, name)
        step = pilots.current_step(s, s.get(Pilot, pilots.active_pilot(s, uc).id))
        pilots.record_observations(s, step, rows, batch_id="worse", source="imported")


def _as_olga(*args: str) -> None:
    """`sparsepilot ARGS` signed in as the operator olga (--password-stdin), in this process."""
    from typer.testing import CliRunner

    from sparsepilot.cli import app

    res = CliRunner().invoke(
        app, [*args, "--password-stdin"], input=password_of("olga") + "\n", env={"SPARSEPILOT_USER": "olga"}
    )
    assert res.exit_code == 0, res.output


def test_a_pilot_and_a_gate_look_by_a_signed_in_operator_are_theirs(
    trust_env, flow_use_case, prefect_harness: str, monkeypatch
) -> None:  # noqa: ANN001
    name = flow_use_case("olgas-chat")
    _challenger_that_pays(name)
    monkeypatch.setenv("PREFECT_API_URL", prefect_harness)
    _as_olga("pilot", name, "--json")
    assert _actors(name) == [("pilot.start", "olga", None), ("usecase.phase", "olga", "piloting")]

    _worse_pairs(name, 40)
    _as_olga("gate", name, "--json")
    assert _actors(name)[2:] == [
        ("decision.gate", "olga", None),
        ("pilot.status", "olga", "stopped"),
        ("usecase.phase", "olga", "stopped"),
    ]


def test_the_scheduled_cycle_pilots_and_gates_as_the_pipeline(flow_use_case) -> None:  # noqa: ANN001
    from flows.cycle import cycle_flow
    from rollout.audit import SYSTEM_ACTOR

    name = flow_use_case()
    _challenger_that_pays(name)
    out = cycle_flow(name, batches=1)
    assert out["pilot"]["batches"] and out["gate"]["decision_id"], out
    said = _actors(name)
    assert said[:3] == [
        ("pilot.start", SYSTEM_ACTOR, None),
        ("usecase.phase", SYSTEM_ACTOR, "piloting"),
        ("decision.gate", SYSTEM_ACTOR, None),
    ]
    assert {actor for _, actor, _ in said} == {SYSTEM_ACTOR}, said


def test_a_run_pilots_a_persons_use_case_as_its_operator_and_the_samples_as_the_pipeline(
    flow_use_case,
) -> None:  # noqa: ANN001
    """`sparsepilot run` asks an operator to sign in for a person's use case (`rollout.usecases
    .added_by_people`); its pilot and gate rows are now theirs. The samples it runs for itself stay the
    pipeline's."""
    from flows.main_job import MainJobSettings, UseCaseOutcome, pilot_actor, run_short_pilot
    from rollout.audit import SYSTEM_ACTOR
    from rollout.usecases import added_by_people

    assert pilot_actor("a-sample", "olga", {"theirs"}) == SYSTEM_ACTOR
    assert pilot_actor("theirs", None, {"theirs"}) == SYSTEM_ACTOR  # nobody signed in: the pipeline's run
    name = flow_use_case()  # added by a person
    _challenger_that_pays(name)
    actor = pilot_actor(name, "olga", set(added_by_people([name])))
    assert actor == "olga"
    quick = MainJobSettings(max_shadow_looks=1, shadow_seconds=0, split_seconds=0, pilot_max_new_tokens=4)
    out = UseCaseOutcome(name)
    run_short_pilot(name, quick, lambda _stage: None, out, actor)
    said = _actors(name)
    assert out.decisions and said[:3] == [
        ("pilot.start", "olga", None),
        ("usecase.phase", "olga", "piloting"),
        ("decision.gate", "olga", None),
    ]
    assert {a for _, a, _ in said} == {"olga"}, said
