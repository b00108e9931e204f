"""The portfolio's headline and chart against its own rows (review s46 D6, D7, D8): a dense plan's timing
noise counted as an established saving with a payback; an override's first signature missing from
"Waiting for approval"; stopped use cases plotted as expected savings. Seeded portfolio
(tests.fixtures.dashboard), changed through `rollout.approvals` and the ORM as the flows record runs."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from tests.dashboard.apptest_helpers import new_app


def _rows() -> dict[str, dict[str, Any]]:
    from rollout import queries

    return {r["name"]: r for r in queries.read(queries.portfolio)}


def _dense_support_chat() -> None:
    """support-chat's plan keeps every block; 3 noisy rounds said 1.03x: $155 [$53, $253], 394 days."""
    from rollout.db.models import EvaluationRun, UseCase
    from rollout.db.session import session_scope

    with session_scope() as s:
        uc = s.scalar(select(UseCase).where(UseCase.name == "support-chat"))
        last = s.scalar(select(func.max(EvaluationRun.id)).where(EvaluationRun.use_case_id == uc.id))
        run = s.get(EvaluationRun, last)
        run.density, run.roi = 1.0, {**run.roi, "decode": {"status": "dense"}}
        run.savings_month_usd, run.savings_month_low, run.savings_month_high = 155.0, 53.0, 253.0
        run.payback_days = 393.7


def test_a_dense_plans_timing_noise_is_no_established_saving(seeded: dict[str, Any]) -> None:
    from rollout import queries

    before = queries.read(queries.portfolio_totals)
    _dense_support_chat()
    row = _rows()["support-chat"]
    assert row["waits_for"] == "no pilot: the plan keeps 100.00% of blocks (as dense)"
    assert row["payback_days"] is None
    after = queries.read(queries.portfolio_totals)
    assert after["established"] == before["established"]
    assert after["savings_month_usd"] == before["savings_month_usd"]


def test_a_dense_plans_timing_noise_is_neither_plotted_nor_listed_as_a_saving(seeded: dict[str, Any]) -> None:
    """Review s50 V4: the chart plotted a dense plan's noise as an "Expected $/month saved" with no caveat,
    and the main job's table listed it with payback "-", while its page said it saves nothing. The row
    carries `plan_money`'s verdict: its caveat, left out of the chart (which says so), the table's note."""
    from flows.main_job import render_table
    from rollout import queries

    _dense_support_chat()
    row = _rows()["support-chat"]
    assert row["saves_nothing"].startswith("saves nothing: the plan keeps 100.00% of blocks")
    assert row["not_established"] == "the plan keeps 100.00% of blocks (as dense)"
    assert _rows()["document-qa"]["saves_nothing"] is None  # an established saving: nothing to say
    at = new_app()
    df = at.dataframe[0].value.set_index("name")
    assert df.loc["support-chat", "caveats"] == f"⚠ {row['saves_nothing']}"
    (chart,) = at.get("vega_lite_chart")
    spec = str(chart.proto)
    assert "document-qa" in spec and "support-chat" not in spec
    assert (
        "Not plotted: 1 use case whose plan keeps every block and decodes densely, so it saves nothing; "
        "its $/month is timing noise (support-chat)" in [c.value for c in at.caption]
    )
    (summary,) = queries.read(queries.job_summary, ["support-chat"])
    wide = summary | {"use_case": "wide", "saves_nothing": None, "not_established": "saving not established"}
    table = render_table([summary, wide], {})  # the payback column; why not established: the decision's note
    assert list(table.columns[6].cells) == ["never (saves nothing)", "none (saving not established)"]
    assert table.caption == f"support-chat: {row['saves_nothing']}"


def test_waiting_for_approval_counts_every_approvals_card(seeded: dict[str, Any]) -> None:
    from rollout import approvals, queries
    from rollout.auth import Identity

    r = approvals.approve(
        seeded["document-qa:decision"],
        Identity("alice", "approver", "local-account"),
        "ship it",
        reject=False,
    )
    assert r.needs_second_approver  # promoting on an EXTEND: an override's first signature
    assert _rows()["document-qa"]["waits_for"] == "a second approver"
    cards = queries.read(queries.pending_decisions)
    assert len(cards) == 2
    assert queries.read(queries.portfolio_totals)["pending_approvals"] == len(cards)
    at = new_app()
    assert {m.label: m.value for m in at.metric}["Waiting for approval"] == "2"


def test_stopped_use_cases_are_not_plotted_as_expected_savings(seeded: dict[str, Any]) -> None:
    from rollout.db.models import UseCase
    from rollout.db.session import session_scope

    with session_scope() as s:
        uc = s.scalar(select(UseCase).where(UseCase.name == "document-qa"))
        uc.phase = "stopped"
    at = new_app()
    (chart,) = at.get("vega_lite_chart")
    spec = str(chart.proto)  # the spec and its data
    assert "contract-summarisation" in spec and "document-qa" not in spec
    assert "$1,840" in spec  # the tooltip's dollars formatted, not 1840.0


def test_the_headline_says_when_nothing_is_established(seeded: dict[str, Any]) -> None:
    """D11: "0 use cases, interval - to -" when no saving was established."""
    from rollout.db.models import EvaluationRun
    from rollout.db.session import session_scope

    with session_scope() as s:
        for run in s.scalars(select(EvaluationRun)):
            run.savings_month_low = -1.0
    at = new_app()
    captions = [c.value for c in at.caption]
    assert any(c.startswith("no use case has an established saving yet; apart: ") for c in captions), captions
    assert not any("interval - to -" in c for c in captions)


def test_the_headline_counts_every_decision_as_the_table_shows_it(seeded: dict[str, Any]) -> None:
    """A use case whose latest decision is "GO, rejected" was counted in no bucket the headline showed:
    its counts did not add up to the use cases listed with a decision."""
    from rollout import approvals
    from rollout.auth import Identity
    from rollout.db.session import session_scope
    from tests.fixtures.dashboard import later_look_awaiting_approval

    for who in ("alice", "carol"):  # rejecting the gate's GO is an override: two approvers
        approvals.approve(
            seeded["contract-summarisation:decision"],
            Identity(who, "approver", "local-account"),
            "legal wants less",
            reject=True,
        )
    with session_scope() as s:  # document-qa's next look: a plain GO
        later_look_awaiting_approval(s, seeded["document-qa:decision"], outcome="GO")
    at = new_app()
    df = at.dataframe[0].value.set_index("name")
    assert df.loc["contract-summarisation", "decision"] == "GO, rejected"
    assert df.loc["document-qa", "decision"] == "GO"
    decided = (df["decision"] != "-").sum()
    assert decided == 2
    # review s48 B7: the value was "N GO · N EXTEND", cut off on the page at two-digit counts
    assert {m.label: m.value for m in at.metric}["Latest decisions"] == f"1 GO of {decided}"
    assert (
        "0 EXTEND · 0 NO-GO · 0 INVALID · 1 no longer standing (1 GO, rejected) · "
        f"{decided} use cases with a decision" in [c.value.rsplit(" · ", 1)[0] for c in at.caption]
    )
    # the decision filter offers the table's words, the standing ones among them
    pick = at.multiselect(key="f_decision")
    assert set(pick.options) == {"-", "GO", "GO, rejected"}
    pick.select("GO, rejected").run()
    assert list(at.dataframe[0].value["name"]) == ["contract-summarisation"]
