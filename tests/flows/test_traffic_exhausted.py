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


def test_a_pilot_on_a_request_log_draws_it_in_the_pilots_order_not_the_files(flow_use_case, tmp_path) -> None:
    """A captured log sorted by prompt length (an export's order, where a sparse plan loses least on the
    short prompts first) is handed out by the pilot's salted key, batch after batch, with every prompt
    calibration read passed over: the gate's stream carries nothing of the file's order."""
    import json

    from sqlalchemy import select

    from flows.calibrate import calibrate_flow
    from flows.common import load_context
    from flows.pilot import pilot_flow
    from rollout.db.models import Observation, Pilot
    from rollout.db.session import session_scope
    from rollout.traffic import prompt_key, traffic_order_key

    rows = [json.loads(line) for line in (EXAMPLE.parent / "support_chat.jsonl").read_text().splitlines()]
    by_length = sorted(rows, key=lambda r: len(r["prompt"]))
    log = tmp_path / "captured.jsonl"
    log.write_text(
        "".join(json.dumps({"id": f"log-{i}", "prompt": r["prompt"]}) + "\n" for i, r in enumerate(by_length))
    )
    rollout = {
        "shadow": {"min_samples": 8},
        "steps": [{"traffic_pct": 50, "min_samples": 8}],
        "batch_size": 6,
        "traffic_source": {"kind": "request-log", "path": str(log)},
    }
    name = flow_use_case(rollout=rollout)
    calibrate_flow(name, limits=QUICK_CAL)
    fitted = {prompt_key(r["prompt"]) for r in load_context(name).split()[0]}
    usable = [f"log-{i}" for i, r in enumerate(by_length) if prompt_key(r["prompt"]) not in fitted]
    assert 12 < len(usable) < len(rows)

    pilot_flow(name, batches=2, batch_size=6)
    with session_scope() as s:
        salt = s.scalar(select(Pilot.salt))
        ids = s.scalars(
            select(Observation.request_id).where(Observation.arm == "treatment").order_by(Observation.id)
        ).all()
    assert ids == sorted(usable, key=lambda i: traffic_order_key(i, salt))[:12]
    assert ids != usable[:12]  # the file's order would have handed out its 12 shortest prompts first
