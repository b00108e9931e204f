"""The stored rows as the gate and the monitor read them (`pilots.step_observations`,
`pilots.monitor_observations`): one table in evidence order, judged exactly as the same rows one dict each
were judged before the read became a table (the same decision, the same data fingerprint)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from rollout import pilots
from rollout.db.models import PilotStep, UseCase
from rollout.db.session import session_scope
from rollout.gate import GateSettings, decide
from rollout.spec import parse_spec

from .test_gate_spending import _use_case
from .usecase_helpers import example_spec


def _batch(prefix: str, n: int, rng: np.random.Generator) -> list[dict]:
    rows = []
    for i in range(n):
        q = float(rng.uniform(0.5, 1.0))
        for arm, delta in (("control", 0.0), ("treatment", -0.01)):
            rows.append(
                {
                    "request_id": f"{prefix}-{i}",
                    "arm": arm,
                    "quality": round(q + delta, 4),
                    "latency_ms": float(rng.integers(50, 200)),
                    "tokens": int(rng.integers(0, 300)),
                    "error": bool(rng.random() < 0.05),
                    "overloaded": bool(rng.random() < 0.1),
                }
            )
    return rows


def test_the_step_table_is_the_rows_in_evidence_order_and_decides_alike(sp_home) -> None:  # noqa: ANN001
    spec = parse_spec(example_spec("docs-qa"), "docs-qa.yaml")
    rng = np.random.default_rng(7)
    batches = [("pilot-flow", _batch("a", 30, rng)), ("imported", _batch("b", 40, rng))]
    batches.append(("pilot-flow", _batch("c", 20, rng)))
    with session_scope() as s:
        uc, mvs = _use_case(s)
        pilot = pilots.start_pilot(s, uc, mvs[0], spec, actor="test")
        step = pilots.current_step(s, pilot)
        assert step.kind == "shadow"
        for k, (source, rows) in enumerate(batches):
            pilots.record_observations(s, step, rows, batch_id=f"batch-{k}", source=source)
        salt = pilot.salt
        step_id = step.id
    with session_scope() as s:
        step = s.get(PilotStep, step_id)
        table = pilots.step_observations(s, step)
        settings = pilots.gate_settings(spec, step)
    # the rows in evidence order: the imported batch by its salted stream key, the others as they came
    imported = sorted(batches[1][1], key=lambda r: pilots.stream_key(r["request_id"], salt))
    expected = [*batches[0][1], *imported, *batches[2][1]]
    assert list(table.columns) == list(pilots.OBSERVATION_FIELDS)
    as_dicts = pd.DataFrame(expected, columns=list(pilots.OBSERVATION_FIELDS))
    pd.testing.assert_frame_equal(table, as_dicts)
    assert table["error"].dtype == bool and table["quality"].dtype == float
    before, now = decide(as_dicts, settings, mode="paired"), decide(table, settings, mode="paired")
    assert now.outcome == before.outcome and now.data_fingerprint == before.data_fingerprint
    assert now.to_dict() == before.to_dict()


def test_an_empty_step_reads_as_an_empty_table(sp_home) -> None:  # noqa: ANN001
    spec = parse_spec(example_spec("docs-qa"), "docs-qa.yaml")
    with session_scope() as s:
        uc, mvs = _use_case(s)
        step = pilots.current_step(s, pilots.start_pilot(s, uc, mvs[0], spec, actor="test"))
        table = pilots.step_observations(s, step)
        monitor = pilots.monitor_observations(s, step)
    assert table.empty and list(table.columns) == list(pilots.OBSERVATION_FIELDS)
    assert monitor.empty and list(monitor.columns) == [*pilots.OBSERVATION_FIELDS, "look"]
    assert decide(table, GateSettings(), mode="paired").outcome == "INVALID"


def test_the_gate_takes_the_imports_since_its_last_look_together(sp_home) -> None:  # noqa: ANN001
    """Two imports with no look between enter the gate's stream as one, by key (the monitor's table keeps
    each file its own); a look recorded with `judged_through` keeps the rows it judged in place; one
    recorded before looks said so (its counts only) keeps the order it judged them in, import by import."""
    spec = parse_spec(example_spec("docs-qa"), "docs-qa.yaml")
    rng = np.random.default_rng(9)
    imports = [_batch(prefix, 30, rng) for prefix in ("a", "b", "c", "d")]
    with session_scope() as s:
        uc, mvs = _use_case(s)
        pilot = pilots.start_pilot(s, uc, mvs[0], spec, actor="test")
        step = pilots.current_step(s, pilot)
        salt, step_id, uc_id = pilot.salt, step.id, uc.id

    def store(k: int) -> None:
        with session_scope() as s:
            step = s.get(PilotStep, step_id)
            pilots.record_observations(s, step, imports[k], batch_id=f"imp-{k}", source="imported")

    def look(evidence: dict) -> None:
        with session_scope() as s:
            step = s.get(PilotStep, step_id)
            n = len(pilots.decisions_for_step(s, step))
            pilots.record_decision(
                s, idempotency_key=f"look-{n}", use_case=s.get(UseCase, uc_id), pilot=step.pilot,
                step=step, outcome="EXTEND", evidence={"quality": {}, **evidence}, explanation="",
                data_fingerprint=str(n), look_index=n + 1,
            )  # fmt: skip

    def gate_table() -> list[str]:
        with session_scope() as s:
            return list(pilots.step_observations(s, s.get(PilotStep, step_id))["request_id"])

    def by_key(*ks: int) -> list[str]:
        rows = [r for k in ks for r in imports[k]]
        return [r["request_id"] for r in sorted(rows, key=lambda r: pilots.stream_key(r["request_id"], salt))]

    store(0), store(1)
    assert gate_table() == by_key(0, 1)  # one stream, as one file with both imports' rows gives
    with session_scope() as s:
        monitor = pilots.monitor_observations(s, s.get(PilotStep, step_id))
    assert list(monitor["request_id"]) == by_key(0) + by_key(1)  # each file its own look
    look({"n_control": 60, "n_treatment": 60})  # a look recorded before `judged_through`, on imports 0 and 1
    store(2)
    with session_scope() as s:
        table, through = pilots.step_evidence(s, s.get(PilotStep, step_id))
    assert list(table["request_id"]) == by_key(0) + by_key(1) + by_key(2)  # as that look judged them
    look({"judged_through": through})
    store(3)
    assert gate_table() == by_key(0) + by_key(1) + by_key(2) + by_key(3)
