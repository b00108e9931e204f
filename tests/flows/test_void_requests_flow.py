"""Review s48 S2 through the real flows (Prefect test server, MLflow, GX, SQLite): a reference-free use
case whose control (dense) endpoint fails every request. The pilot's batches are void (no row, no INVALID,
counted), their requests never drawn again; the monitor skips its look rather than charging the dense
model's failures to a healthy champion and rolling it back under `rollback: auto`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tests.trust.test_pilot_rules import _challenger


@contextmanager
def _dense_down(flow_use_case, tmp_path, **overrides: Any) -> Iterator[tuple[str, Any, Any]]:  # noqa: ANN001
    """A use case on a reference-free request log (prompts of no dataset row: none is one calibration
    reads), both arms endpoints on loopback: the control (dense) failing every request with HTTP 500, the
    treatment (sparse) never asked. Yields (name, the dense server's state, the sparse server's)."""
    import json

    from tests.fixtures.openai_server import openai_server

    log = tmp_path / "captured.jsonl"
    log.write_text("".join(json.dumps({"id": f"log-{i}", "prompt": f"Where is parcel {i}?"}) + "\n"
                           for i in range(12)))  # fmt: skip
    with (
        openai_server("error500", model_name="dense") as (url, dense),
        openai_server("ok", model_name="sparse") as (sparse_url, sparse),
    ):
        arms = {"control": {"kind": "openai", "url": url, "model": "dense"},
                "treatment": {"kind": "openai", "url": sparse_url, "model": "sparse"}}  # fmt: skip
        rollout = {"shadow": {"min_samples": 8}, "steps": [{"traffic_pct": 50, "min_samples": 8}],
                   "batch_size": 3, "traffic_source": {"kind": "request-log", "path": str(log)}}  # fmt: skip
        yield flow_use_case(rollout=rollout, pilot={"arms": arms}, **overrides), dense, sparse


def test_a_pilot_batch_the_dense_endpoint_failed_is_void_and_its_requests_are_not_drawn_again(
    flow_use_case, tmp_path
) -> None:  # noqa: ANN001
    """Through the pilot flow (Prefect, GX, SQLite): a reference-free request log, the control endpoint
    failing every request (HTTP 500). Each batch is all void: no row, no INVALID, the voids counted in the
    summary and MLflow; the next batch draws other requests; the sparse endpoint was never asked."""
    from mlflow import MlflowClient
    from sqlalchemy import func, select

    from flows.pilot import pilot_flow
    from rollout.db.models import GateDecision, Observation, VoidRequest
    from rollout.db.session import session_scope

    with _dense_down(flow_use_case, tmp_path) as (name, dense, sparse):
        _challenger(name)
        summary = pilot_flow(name, batches=2, pilot_anyway=True)
        asked = len(dense.requests)
        assert sparse.requests == []
    assert [(b["passed"], b["inserted"], b["void"]) for b in summary["batches"]] == [(True, 0, 3)] * 2
    assert asked == 6  # one generation per request: no request twice
    with session_scope() as s:
        void = s.scalars(select(VoidRequest.request_id)).all()
        assert s.scalar(select(func.count()).select_from(Observation)) == 0
        assert s.scalar(select(func.count()).select_from(GateDecision)) == 0  # no INVALID look
    assert len(void) == len(set(void)) == 6
    runs = MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()], "tags.`sparsepilot.flow` = 'pilot'"
    )
    assert sorted(r.data.metrics["void"] for r in runs) == [3.0, 3.0]


def test_a_monitor_look_whose_every_request_is_void_rolls_nothing_back(flow_use_case, tmp_path) -> None:  # noqa: ANN001
    """The monitor (kind shadow, the dense model answering offline) with the dense endpoint down: its
    failures were the champion's errors, and `rollback: auto` rolled a healthy champion back. Now the
    look is skipped (audit `monitor.skipped`, reason no-reference), the voids kept, the champion kept.
    Its control arm an endpoint, the run warns what its quality checks then compare (the champion's own
    server can hardly breach them: fix-n N4), in its log and its result (`sparsepilot monitor` prints it);
    it said nothing."""
    import logging

    from sqlalchemy import func, select

    from flows.monitor import monitor_flow
    from rollout import registry
    from rollout.db.models import AuditEntry, GateDecision, UseCase, VoidRequest
    from rollout.db.session import session_scope
    from tests.flows.test_approvals import _promoted

    seen: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = seen.append  # type: ignore[method-assign]
    flow_logger = logging.getLogger("prefect.flow_runs")
    with _dense_down(flow_use_case, tmp_path, rollback="auto") as (name, _, sparse):
        champion = _promoted(name)
        flow_logger.addHandler(handler)
        try:
            look = monitor_flow(name, batch_size=4)
        finally:
            flow_logger.removeHandler(handler)
        assert sparse.requests == []
        url = _control_url(name)
    assert (look.get("status"), look.get("void")) == ("skipped", 4), look
    caveat = (
        f"{name}: the monitor's control arm is the openai endpoint {url}, not the dense model: its quality "
        "and excess-error checks compare the champion with what that endpoint serves, which, where it is "
        f"the champion's own server (`sparsepilot serve-model {name} --alias champion`), is the previous "
        "champion until that server restarts and the champion itself after, so those checks can hardly "
        "breach; only the error-rate and p95 latency checks watch the champion (docs/serving.md)"
    )
    assert look["control_caveat"] == caveat
    assert [r.getMessage() for r in seen if r.getMessage() == caveat] == [caveat], [
        r.getMessage() for r in seen
    ]
    assert "every sampled request (4) is void" in look["explanation"]
    with session_scope() as s:
        assert s.scalar(select(UseCase.phase).where(UseCase.name == name)) == "promoted"
        assert (
            s.scalar(select(func.count()).select_from(GateDecision).where(GateDecision.kind == "monitor"))
            == 0
        )
        assert s.scalar(select(func.count()).select_from(VoidRequest)) == 4
        skip = s.scalar(select(AuditEntry).where(AuditEntry.action == "monitor.skipped"))
    assert skip.details["reason"] == "no-reference"
    assert registry.current_aliases(name)["champion"] == champion


def _control_url(name: str) -> str:
    """The control arm's URL in `name`'s spec (one version: the one it was promoted under)."""
    from rollout import pilots
    from rollout.db.session import session_scope

    with session_scope() as s:
        spec, _ = pilots.load_current_spec(s, pilots.get_use_case(s, name))
    return spec.to_dict()["pilot"]["arms"]["control"]["url"]
