"""Review s49 V1: a reference-free use case's void requests (the dense answer failed: used, never evidence,
migration 0012) were counted in `void_requests` and in the batch's MLflow run only: neither `usecase show`
nor the use-case page said how many there were. Both now say it per pilot step, in one sentence
(`rollout.pilots.void_note`)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from typer.testing import CliRunner

from rollout.db.models import Pilot, PilotStep, UseCase, VoidRequest
from rollout.db.session import session_scope
from sparsepilot.cli import app

SAID = "pilot 1 step 1 (split 10%): 2 requests void: the dense answer failed; not evidence"


def add_void_requests(name: str, step_index: int, request_ids: str) -> None:
    """Void requests in a seeded use case's step, as `pilot_batches.store_batch` keeps them."""
    with session_scope() as s:
        step = s.scalars(
            select(PilotStep)
            .join(Pilot, Pilot.id == PilotStep.pilot_id)
            .join(UseCase, UseCase.id == Pilot.use_case_id)
            .where(UseCase.name == name, PilotStep.index == step_index)
        ).one()
        s.add_all(
            VoidRequest(pilot_step_id=step.id, batch_id="b-9", request_id=r, reason="HTTP 503")
            for r in request_ids
        )


def test_usecase_show_says_each_steps_void_requests(seeded: dict[str, Any]) -> None:
    """The use-case page says it under its steps table (tests/dashboard/test_pages.py, test_use_case_page)."""
    add_void_requests("contract-summarisation", 1, "ab")
    text = " ".join(CliRunner().invoke(app, ["usecase", "show", "contract-summarisation"]).stdout.split())
    assert SAID in text, text
