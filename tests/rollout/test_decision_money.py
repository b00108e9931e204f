"""The money on an Approvals card (`queries.pending_decisions`' `roi`) came from the use case's newest
evaluation: while pilot 1's GO of model version 1 ($600/month) waited, an operator calibrated and
evaluated version 2 ($2,400/month), and the card asked an approver to promote version 1 on version 2's
figure, 4x, with no caveat (review s46 T2-5). A card now shows the evaluation of the plan its pilot runs
(`runs.version_evaluation`), or says that plan has none. Real state DB, runs as the flows record them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .test_not_piloted import PAYS, _challenger


def _go_awaiting_approval(name: str, *, pilot_anyway: bool = False) -> tuple[int, int]:
    """Pilot 1 of `name`'s challenger started (`pilot_anyway`: as `ensure_pilot`'s), and its GO recorded,
    waiting for approval. Returns (the decision's id, the model version its pilot runs)."""
    from rollout import pilot_batches, pilots
    from rollout.db.models import Pilot
    from rollout.db.session import session_scope

    info = pilot_batches.ensure_pilot(name, pilot_anyway=pilot_anyway)
    with session_scope() as s:
        uc = pilots.get_use_case(s, name)
        pilot = s.get(Pilot, info["pilot_id"])
        d, _ = pilots.record_decision(
            s,
            idempotency_key=f"t:go:{name}",
            use_case=uc,
            pilot=pilot,
            step=pilots.current_step(s, pilot),
            outcome="GO",
            evidence={"reasons": ["non-inferior"]},
            explanation="GO",
            data_fingerprint="f" * 64,
            awaiting="approval",
        )
        pilots.stop_pilot(s, pilot, status="awaiting_approval", actor="test", reason="GO")
        return d.id, pilot.model_version_id


def _another_plan_evaluated(name: str, **evaluation: Any) -> int:
    """A second plan of `name` calibrated and evaluated while the decision waits (calibrate and evaluate
    run in any phase). Returns its model version."""
    from rollout.db.models import CalibrationRun, EvaluationRun, ModelVersion
    from rollout.db.session import session_scope
    from rollout.pilots import get_use_case
    from sparse_core import SparsePlan

    plan = SparsePlan(tau=0.7)
    with session_scope() as s:
        uc = get_use_case(s, name)
        mv = ModelVersion(
            use_case_id=uc.id,
            base_model_ref="m",
            plan=plan.to_dict(),
            plan_hash=plan.content_hash(),
            density=0.2,
        )
        s.add(mv)
        s.flush()
        s.add(
            CalibrationRun(
                idempotency_key=f"calibrate:{name}:2",
                use_case_id=uc.id,
                spec_version=1,
                status="succeeded",
                model_version_id=mv.id,
                metrics={"met_budget": True},
            )
        )
        s.add(
            EvaluationRun(
                idempotency_key=f"evaluate:{name}:2",
                use_case_id=uc.id,
                model_version_id=mv.id,
                spec_version=1,
                status="succeeded",
                roi={"decode": {"status": "dense"}},
                density=0.2,
                **evaluation,
            )
        )
        return mv.id


def _card(decision_id: int) -> dict[str, Any]:
    from rollout import queries

    return next(r for r in queries.read(queries.pending_decisions) if r["id"] == decision_id)


def test_the_card_shows_the_money_of_the_plan_its_pilot_runs(sp_home, tmp_path: Path) -> None:  # noqa: ANN001
    from rollout import queries

    _challenger(tmp_path, "pays", **PAYS)  # version 1: $600/month [410, 800]
    did, mv1 = _go_awaiting_approval("pays")
    mv2 = _another_plan_evaluated(
        "pays", savings_month_usd=2400.0, savings_month_low=2000.0, savings_month_high=2900.0
    )
    assert mv2 != mv1
    money = _card(did)["roi"]
    assert (money["savings_month_usd"], money["savings_month_low"], money["savings_month_high"]) == (
        600.0,
        410.0,
        800.0,
    )
    assert money["not_established"] is None and money["caveats"] == []
    # the portfolio still shows the use case's newest evaluation (what calibrate / evaluate just did)
    assert queries.read(queries.portfolio)[0]["savings_month_usd"] == 2400.0


def test_a_card_whose_plan_has_no_evaluation_says_so(sp_home, tmp_path: Path) -> None:  # noqa: ANN001
    _challenger(tmp_path, "unpriced")  # calibrated, never evaluated: piloted on the calibration alone
    did, mv1 = _go_awaiting_approval("unpriced")
    _another_plan_evaluated(
        "unpriced", savings_month_usd=2400.0, savings_month_low=2000.0, savings_month_high=2900.0
    )
    card = _card(did)
    assert card["roi"] is None
    assert card["roi_missing"] == f"model version {mv1}, the plan pilot 1 runs, has no evaluation"
