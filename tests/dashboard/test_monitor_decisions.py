"""A decision the monitor made after promotion is the monitor's wherever a decision is listed: its "GO"
(no guardrail breached) and its "NO-GO" (a rollback asked for) read as plain "GO" / "NO-GO" in the
portfolio's decision column, filter and chart, the use-case page's outcome and timeline, the Approvals
card and `usecase show`, beside the gate's; only the headline set them apart. They now read "GO
(monitor)", "NO-GO (monitor)" (`rollout.queries.decision_words`), and the headline's counts, which say
the same words, still add up to the use cases with a decision.

Seeded portfolio (tests.fixtures.dashboard); the monitor's looks written by `rollout.pilots.record_decision`
as `rollout.decisions.monitor_look` writes them."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select

from tests.dashboard.apptest_helpers import new_app, open_page

NAME = "contract-summarisation"  # seeded: pilot 1's GO awaiting approval; promoted here


def _monitor_look(seeded: dict[str, Any], outcome: str, awaiting: str = "none") -> int:
    """The seeded GO approved and its pilot promoted, then a monitor look of `outcome`; its id."""
    from rollout import pilots
    from rollout.db.models import GateDecision, Pilot, UseCase
    from rollout.db.session import session_scope

    with session_scope() as s:
        uc = s.scalar(select(UseCase).where(UseCase.name == NAME))
        gate = s.get(GateDecision, seeded[f"{NAME}:decision"])
        pilot = s.get(Pilot, gate.pilot_id)
        gate.resolution, pilot.status, uc.phase = "approved", "promoted", "promoted"
        d, _ = pilots.record_decision(
            s,
            idempotency_key=f"monitor:test:{outcome}",
            use_case=uc,
            outcome=outcome,
            kind="monitor",
            pilot=pilot,
            evidence={"guardrails": {"ok": outcome == "GO"}},
            explanation=f"Monitor: {outcome}.",
            data_fingerprint=outcome[0] * 64,
            awaiting=awaiting,
        )
        return d.id


def test_a_monitors_go_is_the_monitors_on_the_portfolio(seeded: dict[str, Any]) -> None:
    _monitor_look(seeded, "GO")
    at = new_app()
    df = at.dataframe[0].value.set_index("name")
    assert df.loc[NAME, "decision"] == "GO (monitor)"  # the table, and its CSV download
    assert "GO (monitor)" in at.multiselect(key="f_decision").options
    (chart,) = at.get("vega_lite_chart")
    spec = json.loads(chart.proto.spec)
    colour = next(layer for layer in spec["layer"] if "color" in layer.get("encoding", {}))["encoding"][
        "color"
    ]
    assert "GO (monitor)" in colour["scale"]["domain"]  # the legend
    captions = " ".join(c.value for c in at.caption)
    assert "1 after promotion (1 GO (monitor))" in captions
    assert "monitor GO" not in captions


def test_a_monitors_rollback_request_is_the_monitors_on_every_page(seeded: dict[str, Any]) -> None:
    from typer.testing import CliRunner

    from rollout import queries
    from sparsepilot.cli import app

    decided = queries.read(queries.portfolio_totals)["decided"]
    first = _monitor_look(seeded, "GO")
    alarm = _monitor_look(seeded, "NO-GO", awaiting="rollback_approval")
    totals = queries.read(queries.portfolio_totals)
    assert totals["decisions_after_promotion"] == {"NO-GO (monitor)": 1}
    assert totals["decided"] == decided  # the same use case, its decision counted once, in its words

    at = new_app()
    at.query_params["name"] = NAME
    open_page(at, "use_case")
    assert {m.label: m.value for m in at.metric}["Outcome"] == "NO-GO (monitor)"
    timeline = str(at.get("vega_lite_chart")[-1].proto)
    assert f"#{first} GO (monitor)" in timeline and f"#{alarm} NO-GO (monitor)" in timeline

    open_page(at, "approvals")
    heads = [h.value for h in at.subheader]
    assert any(h.startswith(f"#{alarm} {NAME}: NO-GO (monitor), waiting for") for h in heads), heads

    shown = CliRunner().invoke(app, ["usecase", "show", NAME])
    assert shown.exit_code == 0, shown.output
    assert f"(NO-GO (monitor), decision {alarm})" in " ".join(shown.output.split())
