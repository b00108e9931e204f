"""The scheduled cycle (`sparsepilot serve`'s use-case-cycle) piloted a plan the portfolio said was not
piloted ("no pilot: the plan keeps 100.00% of blocks (as dense)"): a dense-vs-dense pilot heading to a
GO. It now asks the rule the pilot obeys (rollout.pilot_batches.pilot_skip) and says why it pilots
nothing. Real flows on the tiny model (calibrate, evaluate, the cycle under a real Prefect server)."""

from __future__ import annotations

from sqlalchemy import func, select

from tests.fixtures.flows import EXAMPLE, QUICK_CAL, QUICK_EVAL, price_evaluation
from tests.rollout.test_not_piloted import PAYS

EXAMPLE_ROWS = EXAMPLE.parent / "support_chat.jsonl"


def test_the_cycle_does_not_pilot_what_the_portfolio_says_is_not_piloted(flow_use_case) -> None:  # noqa: ANN001
    from flows.calibrate import calibrate_flow
    from flows.cycle import cycle_flow
    from flows.evaluate import evaluate_flow
    from rollout import queries
    from rollout.db.models import Observation, Pilot, UseCase
    from rollout.db.session import session_scope

    name = flow_use_case()
    calibrate_flow(name, limits=QUICK_CAL)
    evaluate_flow(name, suite=QUICK_EVAL)
    # what real flows on the tiny model measured (review s46 D13): a plan keeping every block
    price_evaluation(
        name, density=1.0, savings_month_usd=-25.4, savings_month_low=-148.8, savings_month_high=25.2
    )
    row = next(r for r in queries.read(queries.portfolio) if r["name"] == name)
    assert row["phase"] == "evaluated"
    assert row["waits_for"] == "no pilot: the plan keeps 100.00% of blocks (as dense)"

    out = cycle_flow(name, batches=1)
    assert "pilot" not in out and "gate" not in out, out
    assert out["pilot_skipped"].startswith("the plan keeps 100.00% of blocks (as dense)"), out
    assert out["phase_after"] == "evaluated"
    with session_scope() as s:
        uc = s.scalar(select(UseCase).where(UseCase.name == name))
        assert s.scalar(select(func.count()).select_from(Pilot).where(Pilot.use_case_id == uc.id)) == 0
        assert s.scalar(select(func.count()).select_from(Observation)) == 0
    row = next(r for r in queries.read(queries.portfolio) if r["name"] == name)
    assert row["waits_for"] == "no pilot: the plan keeps 100.00% of blocks (as dense)"  # still true


def test_the_cycle_says_a_missed_budget_in_the_pilots_words(flow_use_case) -> None:  # noqa: ANN001
    """The cycle checked `runs.latest_plan_met_budget` before the rule the pilot obeys, which already
    says a missed budget (whatever `pilot_anyway`: the plan is the dense model), in other words and with
    no `pilot_skipped`. One check now: the pilot's (rollout.calibration_outcome's words)."""
    from flows.cycle import cycle_flow
    from rollout import lifecycle
    from rollout.db.models import Pilot
    from rollout.db.session import session_scope
    from rollout.pilots import get_use_case
    from tests.flows.test_not_piloted_cli import _missed_budget_challenger

    name = flow_use_case()
    _missed_budget_challenger(name)
    with session_scope() as s:
        uc = get_use_case(s, name)
        lifecycle.set_phase(s, uc, "calibrated", actor="test", reason="calibrated")
        lifecycle.set_phase(s, uc, "evaluated", actor="test", reason="evaluated")
    for anyway in (False, True):
        out = cycle_flow(name, batches=1, pilot_anyway=anyway)
        assert out["pilot_skipped"] == "no sparse plan met the quality budget: stays dense, not piloted", out
        assert "pilot" not in out and out["phase_after"] == "evaluated", out
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(Pilot).where(Pilot.use_case_id == uc.id)) == 0


def test_a_tightened_budget_is_calibrated_again_before_any_pilot(flow_use_case, tmp_path) -> None:  # noqa: ANN001
    """A spec version tightening the KL budget tenfold (review s50 E2): the tick piloted the plan
    calibrated to v1's budget as "spec v2" (and spent the use case's alpha on it). It now calibrates
    again under v2 (then evaluates) and starts no pilot of the old plan. The old plan's pilot 1, running
    when v2 came, ran on with no batch (the new plan is not piloted: it keeps every block), the use case
    "piloting" for good; the calibration under v2 stops it now ("spec v2 recalibrates this use case")."""
    import yaml

    from flows.cycle import cycle_flow
    from rollout import lifecycle, pilot_batches
    from rollout.audit import SYSTEM_ACTOR
    from rollout.db.models import AuditEntry, CalibrationRun, EvaluationRun, ModelVersion, Pilot
    from rollout.db.session import session_scope
    from rollout.pilots import get_use_case
    from rollout.usecases import add_usecase
    from sparse_core import SparsePlan

    sample = {"path": str(EXAMPLE_ROWS), "task": "loglik", "references_required": True}
    name = flow_use_case(dataset=sample)  # the sample's 72 rows: the cycle's evaluation scores 18
    spec = yaml.safe_load((tmp_path / f"{name}.yaml").read_text())
    plan = SparsePlan(tau=0.9)
    with session_scope() as s:  # a plan calibrated and evaluated under v1, one that pays
        uc = get_use_case(s, name)
        mv = ModelVersion(
            use_case_id=uc.id,
            base_model_ref=spec["model"],
            plan=plan.to_dict(),
            plan_hash=plan.content_hash(),
        )
        s.add(mv)
        s.flush()
        met = {"met_budget": True, "prefill_met_budget": True, "density": 0.4}
        s.add(
            CalibrationRun(
                idempotency_key="v1",
                use_case_id=uc.id,
                spec_version=1,
                status="succeeded",
                model_version_id=mv.id,
                metrics=met,
            )
        )
        s.add(
            EvaluationRun(
                idempotency_key="v1",
                use_case_id=uc.id,
                model_version_id=mv.id,
                spec_version=1,
                status="succeeded",
                roi={"decode": {"status": "dense"}},
                **PAYS,
            )
        )
        lifecycle.set_phase(s, uc, "calibrated", actor="test", reason="calibrated")
        lifecycle.set_phase(s, uc, "evaluated", actor="test", reason="evaluated")
    old_pilot = pilot_batches.ensure_pilot(name)["pilot_id"]  # pilot 1 of the v1 plan, running
    spec["quality_budget"]["kl"] = spec["quality_budget"]["kl"] / 10
    del spec["quality_budget"]["decode"]  # the cycle's own calibration kept cheap: prefill only, 4 texts
    spec["quality_budget"]["calibration"]["max_texts"] = 4
    (tmp_path / "v2.yaml").write_text(yaml.safe_dump(spec))
    add_usecase(tmp_path / "v2.yaml", actor="test-owner", new_version=True)

    out = cycle_flow(name, batches=1)
    assert "pilot" not in out and "gate" not in out, out
    assert out["calibrated_again"] == (
        "the challenger was calibrated under spec v1, and v2 changed quality_budget.calibration.max_texts, "
        "quality_budget.decode, quality_budget.kl"
    ), out
    assert out["calibration"]["reused"] is False and "evaluation" in out, out
    assert (out["phase_before"], out["phase_after"]) == ("piloting", "evaluated"), out
    with session_scope() as s:
        uc = get_use_case(s, name)
        pilots = s.scalars(select(Pilot).where(Pilot.use_case_id == uc.id)).all()
        assert [(p.id, p.status) for p in pilots] == [(old_pilot, "stopped")]  # and no new one
        stopped = s.scalars(
            select(AuditEntry).where(
                AuditEntry.action == "pilot.status", AuditEntry.entity_id == str(old_pilot)
            )
        ).one()
        assert (stopped.actor, stopped.details["reason"]) == (
            SYSTEM_ACTOR,
            "spec v2 recalibrates this use case",
        )
        runs = s.scalars(select(CalibrationRun.spec_version).where(CalibrationRun.use_case_id == uc.id))
        assert sorted(runs) == [1, 2]
