"""The portfolio said "no pilot: the plan keeps 100.00% of blocks (as dense)" while the scheduled cycle
and `sparsepilot pilot` started a pilot of it anyway (a dense-vs-dense pilot, heading to a GO): only the
main job asked `rollout.roi.pilot_skip_reason`. The rule now lives in one place that every path which
starts a pilot goes through (`rollout.pilot_batches.ensure_pilot_in`), and the portfolio's words are
its words. Real state DB, a use case added through `add_usecase`, its runs as the flows record them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


def _challenger(tmp_path: Path, name: str, **evaluation: Any) -> None:
    """`name` added, calibrated (a plan within the budget) and, with `evaluation`'s columns, evaluated
    (with none, left calibrated: no evaluation of its plan)."""
    from rollout import lifecycle
    from rollout.db.models import EvaluationRun
    from rollout.db.session import session_scope
    from rollout.pilots import get_use_case
    from sparse_core import SparsePlan

    from .usecase_helpers import add_calibrated

    density = evaluation.get("density")
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


def test_a_plan_whose_saving_is_established_is_piloted(sp_home, tmp_path) -> None:  # noqa: ANN001
    from rollout import pilot_batches, queries

    _challenger(tmp_path / "b", "pays", **PAYS)
    row = next(r for r in queries.read(queries.portfolio) if r["name"] == "pays")
    assert not row["waits_for"].startswith("no pilot")
    assert pilot_batches.pilot_skip("pays") is None
    assert pilot_batches.ensure_pilot("pays")["kind"] == "shadow" and _pilots("pays") == 1


def test_no_saving_expected_is_not_piloted_either(sp_home, tmp_path) -> None:  # noqa: ANN001
    from rollout import pilot_batches, queries

    costs = {**PAYS, "savings_month_usd": -35.0, "savings_month_low": -80.0, "savings_month_high": 10.0}
    _challenger(tmp_path / "c", "costs", **costs)
    row = next(r for r in queries.read(queries.portfolio) if r["name"] == "costs")
    assert row["waits_for"] == "no pilot: no saving expected (-$35/month, at best $10)"
    with pytest.raises(pilot_batches.NotPiloted, match="no saving expected"):
        pilot_batches.ensure_pilot("costs")
    assert _pilots("costs") == 0
