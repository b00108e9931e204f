"""The monitor's import path (`monitor NAME --observations FILE`) behaves like the pilot's import: a file
that fails the observation checks, brings a (request, arm) already stored with other values, or brings
requests the pilot's gate judged, is refused naming the file and rows, with nothing stored and no look
recorded (it used to be judged INVALID, which rolled a healthy champion back under `rollback: auto`, or
was stored silently and answered with an earlier decision). A retried look logs one MLflow run. A
monitor that cannot look (traffic exhausted) warns, keeps one audit entry a day, and the use case says
the champion has not been looked at since its promotion. Real state DB, MLflow and Prefect test server."""

from __future__ import annotations

import json
import logging

import pytest
from sqlalchemy import func, select

from tests.flows.test_approvals import _promoted


def _write(path, rows) -> str:  # noqa: ANN001
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _rows(prefix: str, n: int, errors: int = 0) -> list[dict]:
    """n rows, `errors` of them errors spread through the file as in a slice of traffic in time (errors
    first would be a file sorted by `error`, refused alone)."""
    return [
        {
            "request_id": f"{prefix}{i}",
            "arm": "treatment",
            "quality": 0.9,
            "latency_ms": 500.0,
            "error": i * errors % n < errors,
        }
        for i in range(n)
    ]


def _state(name: str) -> tuple[str, str | None, int, int]:
    """(phase, champion version, monitor decisions, rows in the monitor step)."""
    from rollout import registry
    from rollout.db.models import GateDecision, Observation, PilotStep, UseCase
    from rollout.db.session import session_scope

    with session_scope() as s:
        phase = s.scalar(select(UseCase.phase).where(UseCase.name == name))
        looks = s.scalar(select(func.count()).select_from(GateDecision).where(GateDecision.kind == "monitor"))
        stored = s.scalar(
            select(func.count())
            .select_from(Observation)
            .join(PilotStep, PilotStep.id == Observation.pilot_step_id)
            .where(PilotStep.kind == "monitor")
        )
    return phase, registry.current_aliases(name).get("champion"), looks, stored


def test_a_file_failing_its_checks_is_refused_and_never_rolls_back(flow_use_case, tmp_path) -> None:
    """rollback: auto; a healthy export (0 errors in 200) with one cache hit at 0 ms, the same as a CSV,
    and one with a request repeated: each refused naming the file and its line (path:LINE, as the pilot's
    import and the parse errors do: the CSV's data row 3 is its line 4, under the header; the monitor
    named 'row 3'); the champion keeps serving, nothing stored."""
    from flows.monitor import monitor_flow
    from rollout.observations_io import ObservationImportError

    name = flow_use_case(rollback="auto")
    champion = _promoted(name)
    slip = _rows("p", 200)
    slip[17]["latency_ms"] = 0.0
    path = _write(tmp_path / "prod.jsonl", slip)
    with pytest.raises(ObservationImportError) as refused:
        monitor_flow(name, observations_file=path)
    message = str(refused.value)
    assert path in message and "nothing was stored and no look was recorded" in message
    assert "prod.jsonl:18 (id 'p17/treatment'): latency_ms" in message, message
    head = "request_id,arm,quality,latency_ms,error\n"
    csv = tmp_path / "prod.csv"
    csv.write_text(
        head + "c0,treatment,0.9,500,false\nc1,treatment,0.9,500,false\nc2,treatment,0.9,0,false\n"
    )
    with pytest.raises(ObservationImportError, match=r"prod\.csv:4 \(id 'c2/treatment'\): latency_ms"):
        monitor_flow(name, observations_file=str(csv))
    retried = _rows("d", 20) + _rows("d", 1)  # the same (request, arm) twice: a retry in the export
    with pytest.raises(ObservationImportError, match="more than once"):
        monitor_flow(name, observations_file=_write(tmp_path / "dup.jsonl", retried))
    assert _state(name) == ("promoted", champion, 0, 0)


def test_a_file_given_to_a_monitor_with_nothing_to_monitor_is_an_error(
    trust_env, flow_use_case, tmp_path
) -> None:  # noqa: ANN001
    """Review s49 R5: `monitor NAME --observations FILE` with no champion (never promoted, rolled back)
    said "nothing promoted, nothing to monitor" with exit 0 and never read the file, a file that does
    not exist included: a cron shipping each day's log after an automatic rollback kept "succeeding".
    Now the file not imported is an error naming why and the file (exit 2), a missing file is one
    whatever the state, and the scheduled monitor, which samples, still has nothing to monitor (exit 0)."""
    from typer.testing import CliRunner

    from sparsepilot.cli import app
    from tests.fixtures.trust import password_of

    name = flow_use_case()  # never promoted

    def monitor(*args: str):  # noqa: ANN202
        return CliRunner().invoke(
            app, ["monitor", name, *args, "--password-stdin"], input=password_of("olga") + "\n",
            env={"SPARSEPILOT_USER": "olga"},
        )  # fmt: skip

    path = _write(tmp_path / "today.jsonl", _rows("t", 4))
    res = monitor("--observations", path)
    said = f"error: {name}: nothing promoted (phase registered), nothing to monitor: {path} was not imported"
    assert res.exit_code == 2 and said in res.output, res.output
    missing = str(tmp_path / "nowhere.jsonl")
    res = monitor("--observations", missing)
    assert res.exit_code == 2 and f"error: {missing}: file not found; nothing was imported" in res.output
    res = monitor()
    assert res.exit_code == 0 and f"{name}: nothing promoted, nothing to monitor" in res.output, res.output
    assert _state(name) == ("registered", None, 0, 0)


def test_a_corrected_file_is_a_new_look_with_its_own_decision(flow_use_case, tmp_path) -> None:
    """The refused file recorded no decision, so its corrected version (the same ids) is judged afresh:
    25% errors against a 5% ceiling shows at this look, not the stale INVALID."""
    from flows.monitor import monitor_flow
    from rollout.observations_io import ObservationImportError

    name = flow_use_case(rollback="manual")
    _promoted(name)
    rows = _rows("f", 40, errors=10)
    rows[5]["latency_ms"] = 0.0
    with pytest.raises(ObservationImportError):
        monitor_flow(name, observations_file=_write(tmp_path / "bad.jsonl", rows))
    rows[5]["latency_ms"] = 500.0
    fixed = monitor_flow(name, observations_file=_write(tmp_path / "fixed.jsonl", rows))
    assert (fixed["outcome"], fixed["created"], fixed["awaiting"]) == ("NO-GO", True, "rollback_approval")
    assert "treatment_error_rate 0.25 > 0.05" in fixed["explanation"], fixed["explanation"]


def test_a_retried_look_logs_one_mlflow_run(flow_use_case, tmp_path) -> None:
    """The same file imported three times (a retry): one decision, one MLflow run (the gate's rule)."""
    from flows.monitor import monitor_flow
    from rollout import tracking

    name = flow_use_case(rollback="manual")
    _promoted(name)
    path = _write(tmp_path / "a.jsonl", _rows("r", 12))
    looks = [monitor_flow(name, observations_file=path) for _ in "abc"]
    assert [(m["outcome"], m["created"]) for m in looks] == [("GO", True), ("GO", False), ("GO", False)]
    assert len({m["decision_id"] for m in looks}) == 1
    client = tracking.client()
    experiment = client.get_experiment_by_name(tracking.experiment_name(name))
    runs = client.search_runs([experiment.experiment_id], "tags.`sparsepilot.flow` = 'monitor'")
    assert [r.data.params.get("decision_id") for r in runs] == [str(looks[0]["decision_id"])]


def test_stored_requests_with_other_values_are_refused(flow_use_case, tmp_path) -> None:
    """Look 1: r0..r11, no errors. The same ids with 10 errors (a backfilled export) are refused by name,
    not answered with look 1's GO and the errors dropped."""
    from flows.monitor import monitor_flow
    from rollout.observations_io import ObservationImportError

    name = flow_use_case(rollback="manual")
    champion = _promoted(name)
    first = monitor_flow(name, observations_file=_write(tmp_path / "a.jsonl", _rows("r", 12)))
    assert first["outcome"] == "GO" and first["created"]
    with pytest.raises(ObservationImportError) as refused:
        monitor_flow(name, observations_file=_write(tmp_path / "b.jsonl", _rows("r", 12, errors=10)))
    assert "r0/treatment, r2/treatment" in str(refused.value)  # r1 and r7 keep no error
    assert "already stored with different values" in str(refused.value)
    assert _state(name) == ("promoted", champion, 1, 12)


def test_requests_the_pilots_gate_judged_or_void_requests_are_refused(flow_use_case, tmp_path) -> None:
    """q0..q19 are evidence of the pilot's gate step; a production export overlapping the pilot period
    brings them again: refused (a request is evidence once), nothing of the file stored. A request void in
    the monitor step itself (the dense model gave no reference: review V, V1: it was imported, void and
    observed at once) or in the gate's (it was refused as "judged", which it never was) is refused as void."""
    from flows.monitor import monitor_flow
    from rollout import pilots
    from rollout.arms.step import NO_REFERENCE
    from rollout.db.models import Pilot, PilotStep, VoidRequest
    from rollout.db.session import session_scope
    from rollout.observations_io import ObservationImportError

    name = flow_use_case(rollback="manual")
    champion = _promoted(name)
    with session_scope() as s:
        pilot = s.scalar(select(Pilot).order_by(Pilot.id.desc()))
        step = s.scalar(select(PilotStep).where(PilotStep.pilot_id == pilot.id, PilotStep.kind != "monitor"))
        pairs = [{**r, "arm": arm} for r in _rows("q", 20) for arm in ("control", "treatment")]
        pilots.record_observations(s, step, pairs, batch_id="gate-batch", source="pilot-flow")
        monitor = pilots.open_monitor_step(s, pilot, min_samples=1)  # the step a monitor look opens
        for rid, void_in in (("g0", step), ("m0", monitor)):
            s.add(
                VoidRequest(pilot_step_id=void_in.id, batch_id="b-void", request_id=rid, reason=NO_REFERENCE)
            )
    with pytest.raises(ObservationImportError, match="judged in an earlier step of this pilot"):
        monitor_flow(name, observations_file=_write(tmp_path / "q.jsonl", _rows("n", 5) + _rows("q", 20)))
    with pytest.raises(ObservationImportError) as refused:
        monitor_flow(
            name,
            observations_file=_write(tmp_path / "v.jsonl", _rows("n", 5) + [*_rows("g", 1), *_rows("m", 1)]),
        )
    assert "request(s) g0/treatment, m0/treatment are void in this pilot" in str(refused.value)
    assert "judged in an earlier step" not in str(refused.value)
    assert _state(name) == ("promoted", champion, 0, 0)


def test_a_monitor_with_no_traffic_left_warns_and_says_so(flow_use_case, pilot_dataset) -> None:
    """Every request of the dataset is in the pilot's step: the scheduled monitor cannot look. It logs a
    WARNING, keeps one `monitor.skipped` audit entry however often it ticks that day, and the use case
    (usecase show, the dashboard's page) says the champion has not been looked at since its promotion."""
    from flows.monitor import monitor_flow
    from rollout import audit, pilots, queries, usecases
    from rollout.db.models import AuditEntry, Pilot, PilotStep, UseCase
    from rollout.db.session import session_scope

    name = flow_use_case(rollback="auto")
    _promoted(name)
    ids = [json.loads(line)["id"] for line in pilot_dataset.read_text().splitlines()]
    with session_scope() as s:
        pilot = s.scalar(select(Pilot).order_by(Pilot.id.desc()))
        step = s.scalar(select(PilotStep).where(PilotStep.pilot_id == pilot.id, PilotStep.kind != "monitor"))
        rows = [
            {"request_id": i, "arm": a, "quality": 0.9, "latency_ms": 500.0, "error": False}
            for i in ids
            for a in ("control", "treatment")
        ]
        pilots.record_observations(s, step, rows, batch_id="gate-batch", source="pilot-flow")

    seen: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = seen.append  # type: ignore[method-assign]
    flow_logger = logging.getLogger("prefect.flow_runs")
    flow_logger.addHandler(handler)
    try:
        ticks = [monitor_flow(name) for _ in range(2)]
    finally:
        flow_logger.removeHandler(handler)
    assert [t["status"] for t in ticks] == ["skipped", "skipped"]
    warned = [r.getMessage() for r in seen if r.levelno == logging.WARNING]
    assert len(warned) == 2 and all("traffic exhausted" in w for w in warned), warned
    with session_scope() as s:
        entries = s.scalars(select(AuditEntry).where(AuditEntry.action == audit.MONITOR_SKIPPED)).all()
        assert [(e.actor, e.details["reason"]) for e in entries] == [
            (audit.MONITOR_ACTOR, "traffic-exhausted")
        ]
        uc_id = s.scalar(select(UseCase.id).where(UseCase.name == name))
        page = queries.use_case(s, name)
    assert page["monitor"]["last_look_at"] is None and page["monitor"]["last_skip_at"] is not None
    shown = usecases.show_usecase(name)["monitor"]
    assert shown.startswith("Monitor: no look since the promotion (")
    assert "could not look at" in shown and "traffic exhausted" in shown
    assert queries.describe_monitor_state(queries.read(queries.monitor_state, uc_id)) == shown
    # a skip recorded before details were stored redacted (as the code before wrote it) keeps its
    # secret in the stored row; what the use-case page and `usecase show` say of it is redacted
    with session_scope() as s:
        skip = s.scalars(select(AuditEntry).where(AuditEntry.action == audit.MONITOR_SKIPPED)).one()
        explanation = "MLflow at https://ops:hunter2@mlflow.internal/ refused the look"
        audit._append(
            s,
            AuditEntry(
                actor=audit.MONITOR_ACTOR,
                action=audit.MONITOR_SKIPPED,
                use_case_id=skip.use_case_id,
                entity=skip.entity,
                entity_id=skip.entity_id,
                details={"reason": "mlflow-down", "explanation": explanation},
            ),
        )
    state = queries.read(queries.monitor_state, uc_id)
    assert state["last_skip"] == "MLflow at https://ops:***@mlflow.internal/ refused the look", state
    assert "hunter2" not in usecases.show_usecase(name)["monitor"]


def _new_version(name: str, tiny_model_dir, pilot_dataset, tmp_path, **overrides) -> None:  # noqa: ANN001
    """An operator's new spec version of `name` (`usecase add --new-version`), differing by `overrides`."""
    import yaml

    from rollout.usecases import add_usecase
    from tests.fixtures.flows import tiny_spec

    path = tmp_path / "v2.yaml"
    path.write_text(yaml.safe_dump(tiny_spec(tiny_model_dir, name, dataset_file=pilot_dataset, **overrides)))
    assert add_usecase(path, actor="an-operator", new_version=True).status == "new_version"


@pytest.mark.parametrize(("promoted_under", "later"), [("manual", "auto"), ("auto", "manual")])
def test_a_later_spec_version_leaves_the_champions_rollback_policy(
    flow_use_case, tiny_model_dir, pilot_dataset, tmp_path, promoted_under, later
) -> None:
    """The champion keeps the rollback policy it was promoted under: an operator's new spec version that
    says otherwise applies from the next promotion. (The monitor read the current version: an operator's
    version with `rollback: auto` made the operator's import roll back a champion an approver promoted
    under `manual`, with no approver involved.)"""
    from flows.monitor import monitor_flow

    name = flow_use_case(rollback=promoted_under)
    champion = _promoted(name)
    _new_version(name, tiny_model_dir, pilot_dataset, tmp_path, rollback=later)
    look = monitor_flow(name, observations_file=_write(tmp_path / "prod.jsonl", _rows("p", 40, errors=10)))
    assert look["outcome"] == "NO-GO", look["explanation"]
    if promoted_under == "manual":
        assert (look["automatic_rollback"], look["awaiting"]) == (False, "rollback_approval")
        assert _state(name)[:2] == ("awaiting_approval", champion)
    else:
        assert look["automatic_rollback"] and look["rollback"]["action"] == "rolled_back", look
        assert _state(name)[1] != champion
    assert f"(rollback policy: {promoted_under})" in look["explanation"], look["explanation"]


def test_the_monitor_samples_under_the_champions_spec_version(
    flow_use_case, tiny_model_dir, pilot_dataset, tmp_path
) -> None:
    """A sampled look takes the batch size (and the traffic and arms) of the spec version the champion was
    promoted under (8 requests here), not a later version's (4)."""
    from flows.monitor import monitor_flow
    from rollout import pilot_batches
    from rollout.db.models import PilotStep
    from rollout.db.session import session_scope

    name = flow_use_case(rollback="manual")
    _promoted(name)
    _new_version(name, tiny_model_dir, pilot_dataset, tmp_path, rollout={
        "shadow": {"min_samples": 8}, "steps": [{"traffic_pct": 50, "min_samples": 8}], "batch_size": 4,
    })  # fmt: skip
    info = pilot_batches.monitor_target(name)
    assert (info["spec_version"], info["min_samples"]) == (1, 8)
    look = monitor_flow(name)
    assert look["created"], look
    with session_scope() as s:
        assert s.get(PilotStep, info["step_id"]).min_samples == 8
    assert _state(name)[3] == 2 * 8  # both arms of 8 requests
    judged = look["latency"]  # what `sparsepilot monitor` says of the rows its latency guardrail left out
    assert (judged["rows_judged"] + judged["rows_left_out"], judged["arms_measured_here"]) == (
        2 * 8,
        ["control", "treatment"],
    )


def test_a_running_pilot_samples_under_its_own_spec_version(
    flow_use_case, tiny_model_dir, pilot_dataset, tmp_path
) -> None:
    """The pilot flow read the newest spec version's batch size (and traffic and arms) for a pilot that
    started under an earlier one, whose gate judges by its own version's rules (docs/flows.md: a new
    version applies to the next pilot): batches of 4 here where the pilot's version says 8."""
    from flows.calibrate import calibrate_flow
    from flows.pilot import pilot_flow
    from tests.fixtures.flows import QUICK_CAL

    name = flow_use_case()
    calibrate_flow(name, limits=QUICK_CAL)
    first = pilot_flow(name, batches=1)
    _new_version(name, tiny_model_dir, pilot_dataset, tmp_path, rollout={
        "shadow": {"min_samples": 8}, "steps": [{"traffic_pct": 50, "min_samples": 8}], "batch_size": 4,
    })  # fmt: skip
    second = pilot_flow(name, batches=1)
    assert second["pilot_id"] == first["pilot_id"]  # the same pilot, still running
    assert first["step_kind"] == second["step_kind"] == "shadow"  # both arms answer every request
    assert [b["inserted"] for b in first["batches"]] == [2 * 8], first["batches"]
    assert [b["inserted"] for b in second["batches"]] == [2 * 8], second["batches"]


def test_the_pages_of_a_sorted_export_are_one_look_together_and_a_page_alone_is_refused(
    flow_use_case, tmp_path
) -> None:
    """Review S1: the pages of a latency-sorted export, each its own monitor look, raised a false alarm every
    time (a rollback under `rollback: auto`). A page alone, its rows monotone in latency (probability under
    a random order 2/20!), is refused naming the file and the column, nothing stored; the pages given in one
    command are one look, their rows in stream-key order together; a (request, arm) in two pages is
    refused."""
    from flows.monitor import monitor_flow
    from rollout import pilot_batches
    from rollout.observations_io import ObservationImportError, read_numbered

    name = flow_use_case(rollback="auto")
    champion = _promoted(name)
    export = [{**r, "latency_ms": 100.0 + 10 * i} for i, r in enumerate(_rows("s", 60))]
    pages = [_write(tmp_path / f"page{k}.jsonl", export[20 * k : 20 * k + 20]) for k in range(3)]
    with pytest.raises(ObservationImportError) as refused:
        monitor_flow(name, observations_file=pages[0])
    said = str(refused.value)
    assert said.startswith(f"{pages[0]}: its 20 rows are sorted by latency_ms"), said
    assert "import all pages in one command" in said and "export in time slices" in said
    assert _state(name) == ("promoted", champion, 0, 0)
    again = [(p, read_numbered(p)) for p in (pages[0], _write(tmp_path / "again.jsonl", export[:1]))]
    with pytest.raises(
        ObservationImportError,
        match=r"s0/treatment \(\S*page0\.jsonl and \S*again\.jsonl:1\) are given in two",
    ):
        pilot_batches.store_monitor_import(pilot_batches.monitor_target(name), again, "b-again")
    # review V2: a page of an export sorted by `error` (10 errors first, 2/C(40, 10) = 2.4e-9; 25% against a
    # 5% ceiling) was judged alone, NO-GO and rolled back; latency and quality in no order
    by_error = sorted(_rows("e", 40, errors=10), key=lambda r: not r["error"])
    by_error = [{**r, "latency_ms": 500.0 + (i * 7) % 13} for i, r in enumerate(by_error)]
    with pytest.raises(ObservationImportError, match=r"err\.jsonl: its 40 rows are sorted by error"):
        monitor_flow(name, observations_file=_write(tmp_path / "err.jsonl", by_error))
    assert _state(name) == ("promoted", champion, 0, 0)
    look = monitor_flow(name, observations_file=pages)
    assert look["outcome"] == "GO", look["explanation"]
    assert _state(name) == ("promoted", champion, 1, 60)


def test_an_import_with_nothing_new_records_no_look_and_a_path_twice_is_one_file(
    flow_use_case, tmp_path
) -> None:
    """Review V3: a page of an earlier look given again alone stored no row and recorded a new look (the
    same again with its path twice: another); a path given twice skipped the check of a file alone. Now:
    a sorted page twice is refused as sorted; stored rows no look has judged (the look's record failed)
    make a look; a page of it alone, or twice by two spellings, records none and says so; a retry of the
    look finds its decision."""
    from flows.monitor import monitor_flow
    from rollout import pilot_batches
    from rollout.observations_io import ObservationImportError, read_numbered

    name = flow_use_case(rollback="manual")
    champion = _promoted(name)
    by_latency = [{**r, "latency_ms": 100.0 + i} for i, r in enumerate(_rows("s", 20))]
    page = _write(tmp_path / "page.jsonl", by_latency)
    with pytest.raises(ObservationImportError, match=r"page\.jsonl: its 20 rows are sorted by latency_ms"):
        monitor_flow(name, observations_file=[page, page])
    a, b = (_write(tmp_path / f"{k}.jsonl", _rows(k, 12)) for k in "ab")
    stored = pilot_batches.store_monitor_import(  # stored, its look never recorded
        pilot_batches.monitor_target(name), [(p, read_numbered(p)) for p in (a, b)], "b-unjudged"
    )
    assert (stored["inserted"], stored["nothing_new"]) == (24, None)
    look = monitor_flow(name, observations_file=[a, b])
    assert (look["outcome"], look["created"]) == ("GO", True), look["explanation"]
    assert _state(name) == ("promoted", champion, 1, 24)
    (tmp_path / "x").mkdir()
    again = str(tmp_path / "x" / ".." / "a.jsonl")  # the same file, spelt otherwise
    for given in (a, [a, again]):
        alone = monitor_flow(name, observations_file=given)
        assert alone == {
            "status": "nothing-new",
            "explanation": f"{name}: nothing new: every row of {a} was already judged (by an earlier "
            "monitor look); no look was recorded",
            "rows": 12,
        }
    retry = monitor_flow(name, observations_file=[b, a])
    assert (retry["decision_id"], retry["created"]) == (look["decision_id"], False)
    assert _state(name) == ("promoted", champion, 1, 24)
