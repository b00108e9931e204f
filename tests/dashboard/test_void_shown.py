"""Review s49 V1: a reference-free use case's void requests (the dense answer failed: used, never evidence,
migration 0012) were counted in `void_requests` and in the batch's MLflow run only: neither `usecase show`
nor the use-case page said how many there were. Both now say it per pilot step, in one sentence
(`rollout.pilots.void_note`)."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select
from typer.testing import CliRunner

from rollout.db.models import Pilot, PilotStep, UseCase, VoidRequest
from rollout.db.session import session_scope
from sparsepilot.cli import app
from tests.dashboard.apptest_helpers import new_app, open_page

SAID = "pilot 1 step 1 (split 10%): 2 requests void: the dense answer failed; not evidence"


def test_usecase_show_and_the_use_case_page_say_each_steps_void_requests(seeded: dict[str, Any]) -> None:
    with session_scope() as s:
        step = s.scalars(
            select(PilotStep)
            .join(Pilot, Pilot.id == PilotStep.pilot_id)
            .join(UseCase, UseCase.id == Pilot.use_case_id)
            .where(UseCase.name == "contract-summarisation", PilotStep.index == 1)
        ).one()
        s.add_all(
            VoidRequest(pilot_step_id=step.id, batch_id="b-9", request_id=r, reason="HTTP 503") for r in "ab"
        )
    runner = CliRunner()
    text = " ".join(runner.invoke(app, ["usecase", "show", "contract-summarisation"]).stdout.split())
    assert SAID in text, text
    shown = json.loads(runner.invoke(app, ["usecase", "show", "contract-summarisation", "--json"]).stdout)
    assert [(v["step_index"], v["void"]) for v in shown["void_requests"]] == [(1, 2)]
    at = new_app()
    at.query_params["name"] = "contract-summarisation"
    open_page(at, "use_case")
    assert f"Pilot 1 step 1: {SAID.split(': ', 1)[1]}" in [c.value for c in at.caption]
