"""The dashboard's SQL on a real PostgreSQL 15 (throwaway cluster): same answers as on SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import update

from rollout import queries
from rollout.db.models import Observation
from rollout.db.session import session_scope
from tests.fixtures.dashboard import seed_small_portfolio

pytestmark = pytest.mark.postgres


def test_queries_on_postgres(pg_migrated_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARSEPILOT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SPARSEPILOT_DATABASE_URL", pg_migrated_url)
    ids = seed_small_portfolio(tmp_path / "artifacts")
    uc_id = ids["contract-summarisation"]
    with session_scope() as s:
        rows = {r["name"]: r for r in queries.portfolio(s)}
        totals = queries.portfolio_totals(s)
        stats = queries.step_arm_stats(s, uc_id)
        latencies = queries.latency_histogram(s, uc_id, bins=10)
        pending = queries.pending_decisions(s)
        audit = queries.audit_entries(s, actions=["gate.decide"])
    c = rows["contract-summarisation"]
    assert (c["quality_delta"], c["quality_low"], c["quality_high"]) == (-0.005, -0.011, 0.001)
    s_ = rows["support-chat"]  # no decision: the evaluation's bounds, its rows read from the report's JSON
    assert (s_["quality_source"], s_["evaluation_rows"], s_["quality_low"]) == ("evaluation", 60, -0.06)
    assert c["waits_for"] == "approval to promote" and c["step_observations"] == 240
    assert rows["document-qa"]["waits_for"] == "more samples (120/300 in the smaller arm)"
    assert totals["savings_month_usd"] == pytest.approx(2460) and totals["pending_approvals"] == 1
    stats_by = {(r["step_index"], r["arm"]): r for r in stats}
    assert stats_by[(1, "treatment")]["n"] == 120
    assert all(r["error_rate"] == 0.0 for r in stats)
    hist = latencies["bins"]
    assert sum(h["count"] for h in hist) == 480 and max(h["latency_ms"] for h in hist) < 470
    assert [p["use_case"] for p in pending] == ["contract-summarisation"]
    assert len(audit) == 2
    # the step's latencies are those the gate judges: the rows timed under overload counted, not averaged
    assert all(r["latency_left_out"] == 0 for r in stats)
    with session_scope() as s:
        s.execute(
            update(Observation)
            .where(Observation.use_case_id == uc_id, Observation.arm == "control")
            .values(overloaded=True)
        )
    with session_scope() as s:
        by = {(r["step_index"], r["arm"]): r for r in queries.step_arm_stats(s, uc_id)}
    assert (by[(1, "control")]["latency_mean"], by[(1, "control")]["latency_left_out"]) == (None, 120)
    assert by[(1, "treatment")]["latency_mean"] == stats_by[(1, "treatment")]["latency_mean"]
    assert by[(1, "treatment")]["latency_left_out"] == 0


def test_simultaneous_signatures_on_postgres_are_serialised(
    pg_migrated_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """approve() locks the decision row: while another transaction holds it, a signature waits, then
    sees what that transaction did. Two rejections of a GO (an override, so two different approvers are
    needed) end as one first signature plus one that takes effect, never two first signatures."""
    import threading

    from sqlalchemy import create_engine, select

    from rollout import approvals
    from rollout.auth import Identity
    from rollout.db.models import GateDecision

    monkeypatch.setenv("SPARSEPILOT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SPARSEPILOT_DATABASE_URL", pg_migrated_url)
    did = seed_small_portfolio(tmp_path / "artifacts")["contract-summarisation:decision"]
    results: list = []

    def sign(name: str) -> None:
        results.append(
            approvals.approve(did, Identity(name, "approver", "cli-env"), "quality too close", reject=True)
        )

    engine = create_engine(pg_migrated_url)
    try:
        with engine.connect() as conn:
            tx = conn.begin()
            conn.execute(select(GateDecision.id).where(GateDecision.id == did).with_for_update())
            first = threading.Thread(target=sign, args=("bob",))
            first.start()
            first.join(2.0)
            assert first.is_alive() and results == []  # waits for the lock instead of reading past it
            tx.rollback()
        first.join(30)
        second = threading.Thread(target=sign, args=("carol",))
        second.start()
        second.join(30)
    finally:
        engine.dispose()
    assert [(r.needs_second_approver, r.took_effect) for r in results] == [(True, False), (False, True)]
    with session_scope() as s:
        assert s.get(GateDecision, did).resolution == "rejected"
