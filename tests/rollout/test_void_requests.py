"""Review s48 S2: a reference-free use case scores both arms against the control's (dense) answer. Where the
control could not answer, the treatment's row was stored as an error with quality 0 although the treatment
was never asked: a dense arm failing 2% of requests made a sparse arm that never fails a NO-GO, and the
monitor roll back a healthy champion. Such a request is now void in both arms (no row, whichever arm the
split assigned it to), said to `on_void`, kept as used (never drawn again) and counted with its batch."""

from __future__ import annotations

from typing import Any

import pandas as pd
import pytest

from rollout.arms.base import ArmAnswer, ArmRequest
from rollout.arms.step import NO_REFERENCE, run_batch
from tests.trust.test_pilot_rules import _challenger

KW = {"max_new_tokens": 4, "max_prompt_tokens": None}


class Dense:
    """A control endpoint that fails the requests in `fail` (an HTTP 503 as the HTTP arms report it)."""

    label, max_concurrency = "dense", 1

    def __init__(self, fail: set[str]) -> None:
        self.fail = fail

    def answer(self, req: ArmRequest, task: str, **_: Any) -> ArmAnswer:
        if req.request_id in self.fail:
            return ArmAnswer(0.0, 50.0, 0, True, "HTTP 503")
        return ArmAnswer(1.0, 50.0, 10, False, "the answer")

    def close(self) -> None:
        pass


class Sparse:
    """A treatment that never fails and answers as the control does; `asked`: the requests it saw."""

    label, max_concurrency = "sparse", 1

    def __init__(self) -> None:
        self.asked: list[str] = []

    def answer(self, req: ArmRequest, task: str, **_: Any) -> ArmAnswer:
        self.asked.append(req.request_id)
        return ArmAnswer(1.0, 40.0, 10, False, "the answer")

    def close(self) -> None:
        pass


@pytest.mark.parametrize("kind", ["shadow", "split"])
def test_a_request_the_control_gave_no_reference_for_is_void_in_both_arms(kind: str) -> None:
    ids = [f"r{i}" for i in range(400)]
    fail = set(ids[::25])  # the dense arm fails 4%
    requests = [(r, {"prompt": f"p {r}", "reference": None}) for r in ids]
    sparse, void = Sparse(), {}
    rows = run_batch(Dense(fail), sparse, requests, kind=kind, salt="s", traffic_pct=50, task="rouge_l",
                     on_void=void.__setitem__, **KW)  # fmt: skip
    df = pd.DataFrame(rows)
    assert set(void) == fail and all(v == f"{NO_REFERENCE}: HTTP 503" for v in void.values())
    assert not set(df.request_id) & fail  # no row in either arm, control-assigned ones included
    assert set(df.request_id) == set(ids) - fail and not df.error.any()
    assert not set(sparse.asked) & fail
    treatment = df[df.arm == "treatment"]
    assert len(treatment) == len(sparse.asked) and (treatment.quality == 1.0).all()
    if kind == "split":  # both halves of the split lose their void requests
        assert 0 < len(treatment) < len(df)


def test_a_sparse_arm_that_never_fails_is_not_stopped_for_the_dense_arms_failures() -> None:
    """The review's case: split 50%, dense failing 2%, the sparse arm's ceiling 1%: NO-GO before."""
    import numpy as np

    from rollout.gate import GateSettings, decide

    rng = np.random.default_rng(5)
    ids = [f"r{i}" for i in range(1500)]
    fail = {r for r in ids if rng.random() < 0.02}
    rows = run_batch(Dense(fail), Sparse(), [(r, {"prompt": r}) for r in ids], kind="split", salt="s",
                     traffic_pct=50, task="rouge_l", **KW)  # fmt: skip
    settings = GateSettings(alpha=0.05, margin=0.03, min_samples_per_arm=100, max_error_rate=0.01,
                            max_error_rate_increase=0.01, guardrail_min_samples=100)  # fmt: skip
    d = decide(pd.DataFrame(rows), settings, mode="split", planned_treatment_share=0.5)
    assert d.outcome == "GO", (d.outcome, d.reasons)
    assert not any(g.breached for g in d.guardrails)


class FlakySparse(Sparse):
    """A treatment that fails the requests in `fail` (a shared cause: those the dense arm fails too) and
    in `extra` (its own)."""

    def __init__(self, fail: set[str]) -> None:
        super().__init__()
        self.fail = fail

    def answer(self, req: ArmRequest, task: str, **kw: Any) -> ArmAnswer:
        if req.request_id in self.fail:
            self.asked.append(req.request_id)
            return ArmAnswer(0.0, 40.0, 0, True, "HTTP 500")
        return super().answer(req, task, **kw)


def test_both_error_rate_checks_compare_the_arms_on_the_requests_the_dense_arm_answered() -> None:
    """Review s49 V2: with the dense arm's failures void, is the control's error rate missing failures the
    sparse arm's includes? No: a void request is in neither arm, so both rates are of the same requests,
    those the dense arm answered. The excess check then reads the sparse arm's failures where the dense
    arm answered: never less than the true increase (it leaves out only requests the sparse arm would have
    rescued), so it errs toward NO-GO, never GO. The ceiling reads the sparse arm's rate on those requests:
    a failure it shares with the dense arm is the dense model's, counted as void (docs/flows.md)."""
    from rollout.gate import GateSettings, decide

    ids = [f"r{i}" for i in range(1000)]
    dense_fails, own = set(ids[::25]), set(ids[1::50])  # 4% (shared by the sparse arm), 2% the sparse arm's
    sparse = FlakySparse(dense_fails | own)
    rows = run_batch(Dense(dense_fails), sparse, [(r, {"prompt": r}) for r in ids], kind="shadow", salt="s",
                     traffic_pct=100, task="rouge_l", **KW)  # fmt: skip
    df = pd.DataFrame(rows)
    assert set(df[df.arm == "control"].request_id) == set(df[df.arm == "treatment"].request_id)
    assert not set(sparse.asked) & dense_fails and not df[df.arm == "control"].error.any()
    settings = GateSettings(alpha=0.05, margin=0.03, min_samples_per_arm=100, max_error_rate=0.05,
                            max_error_rate_increase=0.05, guardrail_min_samples=100)  # fmt: skip
    checks = {g.name: g for g in decide(df, settings, mode="paired").guardrails}
    answered = len(ids) - len(dense_fails)
    assert checks["treatment_error_rate"].value == pytest.approx(len(own) / answered)
    assert checks["error_rate_increase"].value == pytest.approx(len(own) / answered)
    # the true increase, had every request been judged: (4% + 2%) - 4% = 2%, no more than what is read
    assert (len(own) + len(dense_fails)) / len(ids) - len(dense_fails) / len(ids) <= len(own) / answered


@pytest.fixture
def use_case(trust_db: str, mlflow_home: Any, tiny_model_dir, pilot_dataset, tmp_path):  # noqa: ANN001, ANN201
    from tests.fixtures.flows import use_case_factory

    return use_case_factory(tiny_model_dir, pilot_dataset, tmp_path)


def test_void_requests_are_kept_as_used_and_counted_once(use_case) -> None:  # noqa: ANN001
    """Stored with their batch, the void requests are among the pilot's used ids (the next batch draws
    others: a request the dense arm always fails must not come back batch after batch), and a retried
    store keeps each once."""
    from sqlalchemy import func, select

    from rollout import pilot_batches
    from rollout.db.models import Observation, VoidRequest
    from rollout.db.session import session_scope

    name = use_case()
    _challenger(name)
    info = pilot_batches.ensure_pilot(name, pilot_anyway=True)
    rows = [{"request_id": "a", "arm": a, "quality": 0.9, "latency_ms": 10.0, "tokens": 3, "error": False}
            for a in ("control", "treatment")]  # fmt: skip
    void = {"b": f"{NO_REFERENCE}: HTTP 503 from https://user:hunter2@dense.example/v1", "c": NO_REFERENCE}
    for _ in range(2):  # the second: a retried store
        stored = pilot_batches.store_batch(info["step_id"], rows, "b-1", "pilot-flow", void)
        assert stored["void"] == 2
    again = pilot_batches.ensure_pilot(name, pilot_anyway=True)
    assert again["used_request_ids"] == ["a", "b", "c"]
    _, used = pilot_batches.step_traffic_use(info["step_id"])
    assert used == {"a", "b", "c"}
    with session_scope() as s:
        kept = s.execute(select(VoidRequest.request_id, VoidRequest.batch_id, VoidRequest.reason)
                         .order_by(VoidRequest.request_id)).all()  # fmt: skip
        observed = s.scalar(select(func.count()).select_from(Observation))
    assert [(r, b) for r, b, _ in kept] == [("b", "b-1"), ("c", "b-1")] and observed == 2
    assert "hunter2" not in kept[0][2]


def test_a_void_request_is_refused_by_an_import_into_its_own_step(use_case, tmp_path) -> None:  # noqa: ANN001
    """Review V, V1: a request voided in a step could be imported into that step afterwards (the dense arm
    answered it this time): void and observed at once. seen_request_ids(but=step) left out the step's own
    voids. Now refused, saying it is void (not "judged in an earlier step"); nothing stored."""
    import json

    from sqlalchemy import func, select

    from rollout import pilot_batches
    from rollout.db.models import Observation
    from rollout.db.session import session_scope
    from rollout.observations_io import ObservationImportError
    from tests.trust.test_pilot_rules import _dataset_ids

    name = use_case()
    _challenger(name)
    info = pilot_batches.ensure_pilot(name, pilot_anyway=True)
    ids = _dataset_ids(name, 3)
    a, b, c = ids
    row = {"quality": 0.9, "latency_ms": 10.0, "tokens": 3, "error": False}
    pair = [{**row, "request_id": a, "arm": arm} for arm in ("control", "treatment")]
    pilot_batches.store_batch(info["step_id"], pair, "b-1", "pilot-flow", {b: NO_REFERENCE})
    f = tmp_path / "obs.jsonl"
    f.write_text("".join(json.dumps({**row, "request_id": r, "arm": arm}) + "\n"
                         for r in (c, b) for arm in ("control", "treatment")))  # fmt: skip
    with pytest.raises(ObservationImportError) as refused:
        pilot_batches.import_file(name, str(f), set(ids))
    message = str(refused.value)
    assert f"request(s) {b}/control, {b}/treatment are void in this pilot" in message, message
    assert "judged in an earlier step" not in message and "nothing was stored" in message
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(Observation)) == 2


def test_a_gate_look_counts_its_steps_void_requests_in_its_evidence_and_explanation(use_case) -> None:  # noqa: ANN001
    """Review s49 V1: the look's evidence said nothing of the step's void requests; it counts them now and
    its explanation says they are in neither arm (both error rates are of the requests the dense arm
    answered). A step without any says nothing of them."""
    from rollout import decisions, pilot_batches, queries

    name = use_case()
    _challenger(name)
    info = pilot_batches.ensure_pilot(name, pilot_anyway=True)
    row = {"quality": 0.9, "latency_ms": 10.0, "tokens": 3, "error": False}
    pairs = [{**row, "request_id": r, "arm": a} for r in ("a", "b") for a in ("control", "treatment")]
    pilot_batches.store_batch(info["step_id"], pairs[:2], "b-1", "pilot-flow")
    first = decisions.evidence(decisions.gate_step(name, info["step_id"])["decision_id"])
    assert first["void_requests"] == 0
    pilot_batches.store_batch(
        info["step_id"], pairs[2:], "b-2", "pilot-flow", {"v1": NO_REFERENCE, "v2": "x"}
    )
    look = decisions.gate_step(name, info["step_id"])
    assert decisions.evidence(look["decision_id"])["void_requests"] == 2
    assert (
        "Note: 2 requests void: the dense answer failed; not evidence (in neither arm: both arms' error "
        "rates are of the requests the dense arm answered)." in look["explanation"]
    ), look["explanation"]
    shown = queries.read(queries.step_voids, info["use_case_id"])  # what `usecase show` says, on either DB
    assert [(v["pilot_number"], v["step_index"], v["void"]) for v in shown] == [(1, 0, 2)]


def test_a_monitor_look_counts_its_steps_void_requests_in_its_evidence_and_explanation(use_case) -> None:  # noqa: ANN001
    """Review s49 H2: a gate look counted its step's void requests, the monitor's look said nothing of its
    own (a champion judged on fewer requests than were drawn, silently). It counts the monitor step's now,
    said as the gate's look says them; a look without any says nothing of them."""
    from rollout import decisions, pilot_batches
    from tests.flows.test_state_races import _monitor_rows, _promoted

    name = use_case()
    info = _promoted(name)
    passed = {"passed": True, "failures": [], "report": {}}
    rows = _monitor_rows(name, "m-1", n=10)
    pilot_batches.store_batch(info["step_id"], rows, "m-1", "monitor")
    first = decisions.monitor_look(name, info, rows, passed, "m-1")
    assert decisions.evidence(first["decision_id"])["void_requests"] == 0
    assert "void" not in first["explanation"], first["explanation"]
    rows = _monitor_rows(name, "m-2", n=10, skip=10)
    pilot_batches.store_batch(info["step_id"], rows, "m-2", "monitor", {"v1": NO_REFERENCE, "v2": "x"})
    look = decisions.monitor_look(name, info, rows, passed, "m-2")
    assert decisions.evidence(look["decision_id"])["void_requests"] == 2
    assert look["explanation"].endswith(
        "Note: 2 requests void: the dense answer failed; not evidence (in neither arm: both arms' error "
        "rates are of the requests the dense arm answered)."
    ), look["explanation"]


def test_a_monitor_look_counts_only_the_voids_since_the_last_kept_alarm(use_case) -> None:  # noqa: ANN001
    """A monitor look judges the rows since the last alarm a person kept (`pilots.monitor_observations`), but
    its void count was the whole step's: a look after a kept alarm said "2 requests void" of requests drawn
    before that alarm, none of them excluded from its evidence. It counts the voids since the kept alarm."""
    from rollout import decisions, pilot_batches, registry
    from tests.flows.test_approvals import _kept_by_two
    from tests.flows.test_state_races import _monitor_rows, _promoted

    name = use_case(rollback="manual")
    info = _promoted(name)
    champion = registry.current_aliases(name)["champion"]
    rows = _monitor_rows(name, "m-1", n=10)
    pilot_batches.store_batch(info["step_id"], rows, "m-1", "monitor", {"v1": NO_REFERENCE, "v2": "x"})
    failed = {"passed": False, "failures": ["latency_ms: 0 ms"], "report": {}}  # the fail-safe's alarm
    alarm = decisions.monitor_look(name, info, rows, failed, "m-1")
    assert alarm["outcome"] != "GO" and decisions.evidence(alarm["decision_id"])["void_requests"] == 2
    _kept_by_two(name, alarm["decision_id"], champion, ("a known outage", "the outage is fixed"))
    rows = _monitor_rows(name, "m-2", n=10, skip=10)
    pilot_batches.store_batch(info["step_id"], rows, "m-2", "monitor", {"v3": NO_REFERENCE})
    passed = {"passed": True, "failures": [], "report": {}}
    look = decisions.monitor_look(name, info, rows, passed, "m-2")
    assert decisions.evidence(look["decision_id"])["void_requests"] == 1, look["explanation"]
    assert "Note: 1 request void: the dense answer failed" in look["explanation"], look["explanation"]
