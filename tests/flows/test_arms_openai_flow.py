"""An `openai` pilot arm through the real flows (Prefect test server, MLflow, GX, SQLite): both arms point at
OpenAI-compatible test servers on loopback answering from the tiny model. The shadow step completes over
HTTP; then the treatment server fails every request (HTTP 500) and the split step ends in a guardrail
NO-GO, with the failures stored as error observations and nothing crashing. A misconfigured arm stops the
pilot flow with a PilotError naming it, before any request is sent."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.fixtures.flows import QUICK_CAL, skip_if_host_overloaded
from tests.fixtures.openai_server import openai_server
from tests.flows.test_pipeline_e2e import _pilot_until_decided


def test_openai_arms_complete_a_step_and_a_failing_endpoint_is_a_guardrail_no_go(
    flow_use_case, tiny_model_dir: Path
) -> None:
    from flows.calibrate import calibrate_flow
    from flows.pilot import PilotError, pilot_flow
    from rollout.db.models import Observation, Pilot, PilotStep
    from rollout.db.session import session_scope

    with (
        openai_server("ok", model_dir=tiny_model_dir, model_name="dense") as (control_url, _),
        openai_server("ok", model_dir=tiny_model_dir, model_name="sparse") as (treatment_url, treated),
    ):
        arms = {
            "control": {"kind": "openai", "url": control_url, "model": "dense", "max_concurrency": 2},
            "treatment": {"kind": "openai", "url": treatment_url, "model": "sparse", "timeout_s": 10},
        }
        name = flow_use_case(pilot={"arms": arms})
        calibrate_flow(name, limits=QUICK_CAL)

        treated.api_key = "only-with-a-key"  # the arm has no api_key_env: refused before any request
        with pytest.raises(PilotError, match=rf"{name}: pilot\.arms\.treatment: .*refused the credentials"):
            pilot_flow(name, batches=1)
        treated.api_key = None
        assert treated.requests == []

        shadow = _pilot_until_decided(name, "shadow")
        # the servers run on this host: a busy host slows them as it does an in-process model (review s48 L1)
        skip_if_host_overloaded(shadow)
        assert shadow["outcome"] == "GO", shadow["explanation"]
        served = len(treated.requests)
        assert served >= 8 and all(b["model"] == "sparse" and b["echo"] for b in treated.requests)

        treated.behaviour = "error500"
        split = _pilot_until_decided(name, "split")
        assert split["outcome"] == "NO-GO", split["explanation"]
        # which error check breaches first depends on the random split (3 sparse rows of 8 can breach the
        # excess over the dense arm before the sparse arm's own rate has enough rows): either is this NO-GO
        assert re.search(
            r"Safety limit broken: (treatment error rate|error rate increase) is 1 ", split["explanation"]
        ), split["explanation"]
        assert len(treated.requests) > served

    with session_scope() as s:
        pilot = s.scalar(select(Pilot))
        assert pilot.status == "stopped"
        step = s.scalar(select(PilotStep).where(PilotStep.pilot_id == pilot.id, PilotStep.index == 1))
        rows = s.scalars(select(Observation).where(Observation.pilot_step_id == step.id)).all()
    treatment = [o for o in rows if o.arm == "treatment"]
    assert treatment and all(o.error and o.quality == 0.0 and o.latency_ms > 0 for o in treatment)
    assert not any(o.error for o in rows if o.arm == "control")
