"""A pilot never replays its dataset, and never draws a row calibration read: when every row kept apart
from calibration has been used once, the step stays EXTEND with "traffic exhausted", the decision says
how many distinct requests were used, and waits-for says so."""

from __future__ import annotations

from pathlib import Path

from tests.fixtures.flows import EXAMPLE, QUICK_CAL


def test_pilot_stops_at_the_end_of_its_dataset_and_the_gate_says_traffic_exhausted(
    flow_use_case, tmp_path
) -> None:
    from sqlalchemy import select

    from flows.calibrate import calibrate_flow
    from flows.common import load_context
    from flows.gate import gate_flow
    from flows.pilot import pilot_flow
    from rollout import queries
    from rollout.db.models import Observation
    from rollout.db.session import session_scope

    rows = (EXAMPLE.parent / "support_chat.jsonl").read_text().splitlines()[:40]
    data = Path(tmp_path / "forty.jsonl")
    data.write_text("\n".join(rows) + "\n")
    name = flow_use_case(dataset={"path": str(data), "task": "loglik", "references_required": True})
    calibrate_flow(name, limits=QUICK_CAL)
    calibration, held_apart = load_context(name).split()
    assert len(held_apart) == 10 and len(calibration) == 30

    first = pilot_flow(name, batches=3, batch_size=6)
    assert [b["inserted"] for b in first["batches"]] == [12, 8]  # 6 + 4 requests, both arms each
    assert first["traffic_exhausted"] is True
    again = pilot_flow(name, batches=1, batch_size=6)
    assert again["batches"] == [] and again["traffic_exhausted"] is True
    with session_scope() as s:
        ids = s.scalars(select(Observation.request_id).where(Observation.arm == "treatment")).all()
    # every row kept apart from calibration once, no replayed ids, none of the rows calibration read
    assert len(ids) == len(set(ids)) == 10 and set(ids) == {r["id"] for r in held_apart}

    decision = gate_flow(name)
    assert decision["outcome"] == "EXTEND" and "traffic-exhausted" in decision["reasons"]
    assert (
        "Traffic exhausted: all 10 distinct requests of the dataset's rows kept apart from calibration "
        "were used" in decision["explanation"]
    )
    with session_scope() as s:
        row = next(r for r in queries.portfolio(s) if r["name"] == name)
    assert row["waits_for"].startswith("traffic exhausted (10 distinct requests used")
