"""The stored rows as the gate and the monitor read them (`pilots.step_observations`,
`pilots.monitor_observations`): one table in evidence order, judged exactly as the same rows one dict each
were judged before the read became a table (the same decision, the same data fingerprint)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from rollout import pilots
from rollout.db.models import PilotStep
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
