"""Which decision the business owner reads as "the latest": the current pilot's, in one set of words on
the portfolio, its headline and the use-case page (review s46 D12, D5, D9, D10).

Seeded portfolio (tests.fixtures.dashboard) changed through the product's writers: `rollout.approvals`
(a rejected GO), `rollout.lifecycle`, `rollout.pilots.start_pilot`, `rollout.pilots.record_decision`."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from tests.dashboard.apptest_helpers import new_app, open_page

NAME = "contract-summarisation"  # seeded: pilot 1 at its split step, a GO awaiting approval


def _row(name: str = NAME) -> dict[str, Any]:
    from rollout import queries

    return next(r for r in queries.read(queries.portfolio) if r["name"] == name)


def _metrics(at: Any) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def _reject_and_start_pilot_2(seeded: dict[str, Any]) -> None:
    """Pilot 1's GO rejected by two approvers (against the gate: an override), a new challenger (another
    plan) calibrated and evaluated, then its pilot 2 started: at its shadow step, nothing judged yet."""
    from rollout import approvals, lifecycle, pilots
    from rollout.auth import Identity
    from rollout.db.models import ModelVersion, UseCase
    from rollout.db.session import session_scope

    for who in ("alice", "carol"):
        approvals.approve(
            seeded[f"{NAME}:decision"],
            Identity(who, "approver", "local-account"),
            "legal wants less",
            reject=True,
        )
    with session_scope() as s:
        uc = s.scalar(select(UseCase).where(UseCase.name == NAME))
        assert uc.phase == "stopped"
        lifecycle.set_phase(s, uc, "calibrated", actor="test", reason="a new challenger")
        lifecycle.set_phase(s, uc, "evaluated", actor="test", reason="evaluated")
    assert _row()["decision"] is None  # between pilots: pilot 1's decision is another plan's
    with session_scope() as s:
        uc = s.scalar(select(UseCase).where(UseCase.name == NAME))
        mv = ModelVersion(
            use_case_id=uc.id,
            base_model_ref="smollm2-135m",
            plan={"density": 0.3},
            plan_hash="plan-2",
            mlflow_model_name=f"sparsepilot-{NAME}",
            mlflow_version="3",
            density=0.3,
        )
        s.add(mv)
        s.flush()
        spec, _ = pilots.load_current_spec(s, uc)
        pilots.start_pilot(s, uc, mv, spec, actor="test")


def test_a_new_pilot_is_not_shown_with_the_previous_pilots_rejected_go(seeded: dict[str, Any]) -> None:
    from rollout import queries

    before = _row()
    assert before["decision"] == "GO" and before["quality_source"] == "gate"
    assert queries.read(queries.portfolio_totals)["decisions"].get("GO") == 1
    _reject_and_start_pilot_2(seeded)

    row = _row()
    assert row["pilot_status"] == "running" and row["step_kind"] == "shadow"
    assert row["decision"] is None and row["resolution"] is None  # pilot 2 has no look yet
    assert row["quality_source"] == "evaluation"  # not pilot 1's gate interval [-0.011, +0.001]
    assert (row["quality_low"], row["quality_high"]) != (-0.011, 0.001)
    assert row["waits_for"].startswith("more samples (0/")
    assert "GO" not in queries.read(queries.portfolio_totals)["decisions"]  # the headline's count

    at = new_app()
    df = at.dataframe[0].value.set_index("name")
    assert df.loc[NAME, "decision"] == "-" and df.loc[NAME, "quality from"].startswith("evaluation")
    assert not any(m.label == "Latest decisions" and m.value.startswith("1 GO") for m in at.metric)
    at.query_params["name"] = NAME
    open_page(at, "use_case")
    assert "Outcome" not in _metrics(at)  # no "GO" of pilot 1 on pilot 2's page
    captions = [c.value for c in at.caption]
    assert "No gate decision of the current pilot yet." in captions
    assert any(c.startswith("Waits for: more samples (0/") for c in captions), captions


def test_a_promoted_champions_quality_stays_the_gates_after_a_monitor_look(seeded: dict[str, Any]) -> None:
    """D5: the first monitor look (guardrails only, no quality) became "the latest decision": the quality
    fell back to the offline evaluation's wider interval, and the monitor's GO counted with the gate's."""
    from rollout import pilots, queries
    from rollout.db.models import GateDecision, Pilot, UseCase
    from rollout.db.session import session_scope

    gate = _row()
    with session_scope() as s:
        uc = s.scalar(select(UseCase).where(UseCase.name == NAME))
        d = s.get(GateDecision, seeded[f"{NAME}:decision"])
        pilot = s.get(Pilot, d.pilot_id)
        d.resolution, pilot.status, uc.phase = "approved", "promoted", "promoted"
        pilots.record_decision(
            s,
            idempotency_key="monitor:test:1",
            use_case=uc,
            outcome="GO",
            kind="monitor",
            pilot=pilot,
            evidence={"guardrails": {"ok": True}},
            explanation="Monitor: no guardrail breached.",
            data_fingerprint="m" * 64,
        )
    row = _row()
    assert row["decision"] == "GO" and row["decision_kind"] == "monitor"
    assert row["quality_source"] == "gate"
    assert (row["quality_low"], row["quality_high"]) == (gate["quality_low"], gate["quality_high"])
    totals = queries.read(queries.portfolio_totals)
    assert "GO" not in totals["decisions"]  # a monitor look is no gate GO
    assert totals["decisions_after_promotion"] == {"GO (monitor)": 1}  # counted apart, not lost


def test_the_use_case_page_says_what_the_portfolio_says_it_waits_for(seeded: dict[str, Any]) -> None:
    """D9: the page's "Waits for" read "-" (a person only) where the portfolio said "more samples"."""
    row = _row("document-qa")  # seeded: a running split step, its latest look EXTEND
    assert row["decision"] == "EXTEND" and row["waits_for"].startswith("more samples")
    at = new_app()
    at.query_params["name"] = "document-qa"
    open_page(at, "use_case")
    assert _metrics(at)["Waits for"] == row["waits_for"]


def test_an_invalid_look_waits_for_an_abort_not_for_more_samples(seeded: dict[str, Any]) -> None:
    """D10: a running pilot whose latest look is INVALID (sample-ratio mismatch) read "more samples
    (240/300)", while the gate's explanation says the only way out is `pilot --abort` and a new
    challenger (rollout.decisions.invalid_remedy); the use-case page says the same."""
    from rollout import pilots
    from rollout.db.models import GateDecision, Pilot, PilotStep, UseCase
    from rollout.db.session import session_scope
    from rollout.decisions import invalid_remedy
    from tests.fixtures.dashboard import evidence

    with session_scope() as s:
        old = s.get(GateDecision, seeded["document-qa:decision"])
        ev = {
            **evidence(-0.005, -0.011, 0.001, 120, "INVALID"),
            "reasons": ["sample-ratio-mismatch"],
            "srm_p_value": 1e-9,
            "n_control": 400,
            "n_treatment": 120,
        }
        pilots.record_decision(
            s,
            idempotency_key="gate-dqa-2",
            use_case=s.get(UseCase, old.use_case_id),
            pilot=s.get(Pilot, old.pilot_id),
            step=s.get(PilotStep, old.pilot_step_id),
            look_index=2,
            outcome="INVALID",
            evidence=ev,
            explanation="Decision: INVALID. Sample-ratio mismatch. "
            + invalid_remedy("document-qa", "INVALID", ["sample-ratio-mismatch"], 10.0),
            data_fingerprint="c" * 64,
        )
    row = _row("document-qa")
    assert row["decision"] == "INVALID" and row["step_observations"] < row["min_samples"]
    assert row["waits_for"] == (
        "an operator: abort the pilot (`sparsepilot pilot document-qa --abort --reason TEXT`) and pilot its "
        "challenger again (`sparsepilot pilot document-qa --again --reason TEXT`) (data not trusted: sample "
        "ratio mismatch)"
    )
    at = new_app()
    at.query_params["name"] = "document-qa"
    open_page(at, "use_case")
    assert _metrics(at)["Waits for"] == row["waits_for"]


def test_a_rejected_go_reads_as_rejected_wherever_the_decision_is_shown(seeded: dict[str, Any]) -> None:
    """A stopped use case whose GO two approvers rejected read "GO" in the portfolio's decision column,
    its headline ("1 GO"), the use-case page's Outcome, its pilots' last outcome and the main job's table:
    each now says what stands (`queries.decision_standing`)."""
    from rollout import approvals, queries
    from rollout.auth import Identity

    for who in ("alice", "carol"):  # against the gate: an override, two approvers
        approvals.approve(
            seeded[f"{NAME}:decision"], Identity(who, "approver", "local-account"), "legal", reject=True
        )
    row = _row()
    assert (row["phase"], row["decision"], row["resolution"]) == ("stopped", "GO", "rejected")
    assert "GO" not in queries.read(queries.portfolio_totals)["decisions"]
    summary = queries.read(queries.job_summary, [NAME])[0]["decision"]
    assert summary.startswith("GO") and summary.endswith(", rejected"), summary
    assert queries.read(queries.pilot_history, row["id"])[-1]["last_outcome"] == "GO, rejected"

    at = new_app()
    assert at.dataframe[0].value.set_index("name").loc[NAME, "decision"] == "GO, rejected"
    assert not any(m.label == "Latest decisions" and m.value.startswith("1 GO") for m in at.metric)
    at.query_params["name"] = NAME
    open_page(at, "use_case")
    assert _metrics(at)["Outcome"] == "GO, rejected"
    assert row["decision_standing"] == "GO, rejected"
    pilots = next(d.value for d in at.dataframe if "last_outcome" in d.value.columns)  # "Last outcome"
    assert list(pilots["last_outcome"]) == ["GO, rejected"]
