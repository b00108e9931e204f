"""`sparsepilot pilot NAME --observations FILE`: JSONL/CSV parsed strictly (errors name file, line and
field), checked with the GX observation suite before anything counts, stored once (a re-import adds
nothing)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from sqlalchemy import func, select

from tests.fixtures.trust import run_cli


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(ids: list[str], quality: float = 0.8) -> list[dict]:
    out = []
    for rid in ids:
        for arm, lat in (("control", 1200.0), ("treatment", 800.0)):
            out.append({"request_id": rid, "arm": arm, "quality": quality, "latency_ms": lat, "error": False})
    return out


def test_a_monitor_file_without_a_row_of_the_champion_is_refused(tmp_path: Path) -> None:
    """The monitor judges the champion's answers ('treatment'); a file of dense rows alone (a mislabelled
    export) used to pass and be judged GO on nothing."""
    from rollout.observations_io import ObservationImportError, read_observations

    rows = [
        {"request_id": f"r{i}", "arm": "control", "quality": 1, "latency_ms": 5, "error": False}
        for i in range(3)
    ]
    dense_only = _write_jsonl(tmp_path / "dense.jsonl", rows)
    assert len(read_observations(dense_only)) == 3  # a pilot step's import may be one arm at a time
    with pytest.raises(ObservationImportError, match=r"dense\.jsonl: no row with arm 'treatment' \(arms in"):
        read_observations(dense_only, require_arm="treatment")
    both = _write_jsonl(tmp_path / "both.jsonl", [*rows, {**rows[0], "arm": "treatment"}])
    assert len(read_observations(both, require_arm="treatment")) == 4


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        (
            "twice.csv",
            "request_id,arm,quality,latency_ms,error,quality\nr1,control,0.0,100,false,0.9\n",
            r"twice\.csv: header names column\(s\) quality more than once",
        ),
        (
            "twice.jsonl",
            '{"request_id": "r1", "arm": "control", "quality": 0.0, "latency_ms": 100, "error": false, '
            '"quality": 0.9}\n',
            r"twice\.jsonl:1: field 'quality': given twice in one object",
        ),
        (
            "blank.csv",
            "request_id,arm,quality,latency_ms,error\nr1,control,0.5,100,\n",
            r"blank\.csv:2: field 'error' is empty; write false",
        ),
        (
            "blank.jsonl",
            '{"request_id": "r1", "arm": "control", "quality": 1, "latency_ms": 5, "error": " "}\n',
            r"blank\.jsonl:1: field 'error' is empty",
        ),
    ],
)
def test_a_column_named_twice_or_an_empty_error_cell_is_refused(
    tmp_path: Path, name: str, text: str, match: str
) -> None:
    """A second 'quality' column used to win silently (csv.DictReader keeps the last), as did a second
    'quality' key in a JSONL object (json keeps the last: a score nobody saw was imported), and an empty
    'error' cell was read as "no error", a success for the error guardrails."""
    from rollout.observations_io import ObservationImportError, read_observations

    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ObservationImportError, match=match):
        read_observations(path)


def test_a_directory_given_as_observations_is_said_to_be_one(tmp_path: Path) -> None:
    """An export's folder given for its file was refused as "file not found", untrue words about a path
    that is there (the pilot's import and the monitor's check before its flow alike)."""
    from flows.monitor import require_file
    from rollout.observations_io import ObservationImportError, read_observations

    export = tmp_path / "export.jsonl"
    export.mkdir()
    said = rf"{export}: is a directory, not a file \(name each file of observations itself\)"
    with pytest.raises(ObservationImportError, match=said + "$"):
        read_observations(export)
    with pytest.raises(ObservationImportError, match=said + "; nothing was imported$"):
        require_file(str(export))
    with pytest.raises(ObservationImportError, match=rf"{tmp_path / 'nowhere.csv'}: file not found$"):
        read_observations(tmp_path / "nowhere.csv")


def test_parse_errors_name_file_line_and_field(tmp_path: Path) -> None:
    from rollout.observations_io import ObservationImportError, read_observations

    bad_json = tmp_path / "a.jsonl"
    bad_json.write_text(
        '{"request_id": "r1", "arm": "control", "quality": 1, "latency_ms": 5, "error": false}\n{oops\n'
    )
    with pytest.raises(ObservationImportError, match=r"a\.jsonl:2: not valid JSON"):
        read_observations(bad_json)
    missing = _write_jsonl(tmp_path / "b.jsonl", [{"request_id": "r1", "arm": "control", "quality": 1}])
    with pytest.raises(ObservationImportError, match=r"b\.jsonl:1: missing field\(s\) latency_ms, error"):
        read_observations(missing)
    bad_err = _write_jsonl(
        tmp_path / "c.jsonl",
        [{"request_id": "r", "arm": "control", "quality": 1, "latency_ms": 3, "error": "maybe"}],
    )
    with pytest.raises(ObservationImportError, match=r"c\.jsonl:1: field 'error' must be true/false"):
        read_observations(bad_err)
    csv = tmp_path / "d.csv"
    csv.write_text("request_id,arm,quality\nr1,control,0.5\n")
    with pytest.raises(
        ObservationImportError, match=r"d\.csv: header is missing column\(s\) latency_ms, error"
    ):
        read_observations(csv)
    csv.write_text(
        "request_id,arm,quality,latency_ms,error,tokens\nr1,control,0.5,120,0,33\nr1,treatment,0.4,90,1,\n"
    )
    assert read_observations(csv) == [
        {
            "request_id": "r1",
            "arm": "control",
            "quality": 0.5,
            "latency_ms": 120.0,
            "error": False,
            "tokens": 33,
        },
        {
            "request_id": "r1",
            "arm": "treatment",
            "quality": 0.4,
            "latency_ms": 90.0,
            "error": True,
            "tokens": 0,
        },
    ]


def test_gx_suite_rejects_nan_and_names_the_row() -> None:
    from rollout.observations_io import validate_observation_rows

    rows = _rows(["r1", "r2"])
    rows[3]["quality"] = float("nan")
    check = validate_observation_rows(rows, known_request_ids=["r1", "r2"], require_both_arms=True)
    assert check["passed"] is False
    assert any("row 4" in f and "quality" in f for f in check["failures"]), check["failures"]


def test_cli_import_validates_then_stores_once(flow_use_case, trust_accounts: str, tmp_path: Path) -> None:
    from flows.pilot import pilot_flow
    from rollout.db.models import Observation
    from rollout.db.session import session_scope
    from rollout.observations_io import ObservationImportError

    name = flow_use_case()
    _challenger(name)
    from flows.common import load_context

    calibration, kept_apart = load_context(name).split()
    dataset_ids = [r["id"] for r in kept_apart[:5]]  # what the pilot's own traffic would be

    def count() -> int:
        with session_scope() as s:
            return s.scalar(select(func.count()).select_from(Observation))

    nan_rows = _rows(dataset_ids)
    nan_rows[2]["latency_ms"] = float("nan")
    bad = _write_jsonl(tmp_path / "bad.jsonl", nan_rows)
    # the real command line: exit code 2, the file and the field named, nothing stored
    env = dict(os.environ, PREFECT_API_URL=_api_url(), SPARSEPILOT_ACCOUNTS=trust_accounts)
    res = run_cli("pilot", name, "--observations", str(bad), user="olga", env=env)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "bad.jsonl: failed the observation checks; nothing was stored" in res.stderr
    assert "bad.jsonl:3 (id" in res.stderr and "latency_ms" in res.stderr
    unknown = _write_jsonl(tmp_path / "unknown.jsonl", _rows(["not-in-dataset"]))
    with pytest.raises(ObservationImportError, match="request_id: not a request of this use case"):
        pilot_flow(name, observations_file=str(unknown))
    # held to what the pilot's own traffic is held to: never a request calibration read, never a replay
    fitted = _write_jsonl(tmp_path / "fitted.jsonl", _rows([calibration[0]["id"], dataset_ids[0]]))
    with pytest.raises(ObservationImportError, match="lines 1 .*: request_id: a request calibration read"):
        pilot_flow(name, observations_file=str(fitted))
    replay = _write_jsonl(tmp_path / "replay.jsonl", _rows([dataset_ids[0], f"{dataset_ids[0]}~r2"]))
    with pytest.raises(ObservationImportError, match="lines 3 .*: request_id: not a request of this use"):
        pilot_flow(name, observations_file=str(replay))
    assert count() == 0

    good = _write_jsonl(tmp_path / "good.jsonl", _rows(dataset_ids))
    first = pilot_flow(name, observations_file=str(good))
    assert first["batches"][0]["inserted"] == 10 and first["step_kind"] == "shadow"
    again = pilot_flow(name, observations_file=str(good))
    assert (again["batches"][0]["inserted"], again["batches"][0]["already_present"]) == (0, 10)
    assert count() == 10
    with session_scope() as s:
        assert set(s.scalars(select(Observation.source))) == {"imported"}


def test_an_import_is_checked_against_the_running_pilots_own_dataset(
    flow_use_case, tiny_model_dir, pilot_dataset: Path, tmp_path: Path
) -> None:
    """A pilot started under spec version 1 keeps it (a new version applies to the next pilot), so an
    import into it is read against version 1's requests, never those of a later version.
    (The import checked the ids against the newest version's dataset: the running pilot's own requests were
    refused as "not a request of this use case" and version 2's, which its traffic never hands out, let
    in.) A dataset whose content changed is also what the plan was calibrated on (rollout.recalibration),
    so once a version 3 changes the dataset the running pilot of the plan calibrated under version 1 takes
    no batch at all until a calibration under version 3 (which stops it): neither version's requests are
    stored."""
    import yaml

    from flows.common import load_context
    from flows.pilot import pilot_flow
    from rollout import pilot_batches
    from rollout.observations_io import ObservationImportError
    from rollout.pilots import PilotStateError
    from rollout.usecases import add_usecase
    from tests.fixtures.flows import tiny_spec

    name = flow_use_case()
    _challenger(name)
    v1_ids = [r["id"] for r in load_context(name).split()[1][:4]]
    first = pilot_flow(name, observations_file=str(_write_jsonl(tmp_path / "a.jsonl", _rows(v1_ids[:2]))))
    # version 2 changes nothing calibration reads (a schedule): the running pilot stays under version 1
    spec = tmp_path / "v2.yaml"
    v2 = tiny_spec(tiny_model_dir, name, dataset_file=pilot_dataset)
    spec.write_text(yaml.safe_dump({**v2, "schedule": {"cron": "0 * * * *"}}))
    assert add_usecase(spec, actor="an-operator", new_version=True).status == "new_version"
    later = _write_jsonl(tmp_path / "b.jsonl", _rows(v1_ids[2:]))
    # ids read from another version than the pilot's (the pilot changed between the reads): refused
    with pytest.raises(ObservationImportError, match="runs under spec version 1, not the version 2"):
        pilot_batches.import_file(name, str(later), set(v1_ids), spec_version=2)
    second = pilot_flow(name, observations_file=str(later))
    assert second["pilot_id"] == first["pilot_id"]  # the same pilot, still under version 1
    assert second["batches"][0]["inserted"] == 4, second

    # version 3: the same use case on another dataset (the same tickets under other ids)
    other = tmp_path / "other.jsonl"
    other.write_text(
        "".join(json.dumps({**json.loads(line), "id": f"v3-{json.loads(line)['id']}"}) + "\n"
                for line in pilot_dataset.read_text().splitlines())
    )  # fmt: skip
    spec = tmp_path / "v3.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(tiny_model_dir, name, dataset_file=other)))
    assert add_usecase(spec, actor="an-operator", new_version=True).status == "new_version"
    v3_ids = [r["id"] for r in load_context(name).split()[1][:2]]
    assert not set(v3_ids) & set(v1_ids)
    again = _write_jsonl(tmp_path / "c.jsonl", _rows(v1_ids[:2]))
    newer = _write_jsonl(tmp_path / "v3.jsonl", _rows(v3_ids))
    stale = r"spec v3 is not calibrated: run `sparsepilot calibrate .*v3 changed dataset \(file content\)"
    for path in (again, newer):
        with pytest.raises(PilotStateError, match=stale):
            pilot_flow(name, observations_file=str(path))
    assert _stored(first["pilot_id"]) == 8, "a batch of the stale plan's pilot was stored"


def test_observation_check_errors_name_the_files_line_as_its_parse_errors_do(
    flow_use_case, tmp_path: Path
) -> None:
    """Review U2: a CSV's parse errors named the file line (`obs.csv:5`), its observation checks the data
    row (`row 2` for the file's line 3, under the header). Both now name the file's line."""
    from flows.common import load_context
    from flows.pilot import pilot_flow
    from rollout.observations_io import ObservationImportError

    name = flow_use_case()
    _challenger(name)
    rid = load_context(name).split()[1][0]["id"]
    head = "request_id,arm,quality,latency_ms,error\n"
    obs = tmp_path / "obs.csv"
    obs.write_text(head + f"{rid},control,0.8,1200,false\n{rid},treatment,1.5,800,false\n")
    with pytest.raises(ObservationImportError) as err:
        pilot_flow(name, observations_file=str(obs))
    assert f"obs.csv:3 (id '{rid}/treatment'): quality: outside the declared range" in str(err.value)
    arms = tmp_path / "arms.csv"  # two bad lines: "lines 2 (...), 3 (...)"
    arms.write_text(head + f"{rid},sparse,0.8,1200,false\n{rid},dense,0.8,800,false\n")
    two = r"arms\.csv: lines 2 \(id .*\), 3 \(id .*\): arm: unknown"
    with pytest.raises(ObservationImportError, match=two):
        pilot_flow(name, observations_file=str(arms))
    cell = tmp_path / "cell.csv"  # a parse error: the same numbering
    cell.write_text(head + f"{rid},control,0.8,1200,false\n{rid},treatment,abc,800,false\n")
    with pytest.raises(ObservationImportError, match=r"cell\.csv:3: field 'quality'"):
        pilot_flow(name, observations_file=str(cell))
    spread = tmp_path / "spread.csv"  # review R1: a quoted cell over lines 2-3, a blank line 4
    spread.write_text(head + f'{rid},control,"0.8\n",1200,false\n\n{rid},treatment,1.5,800,false\n')
    with pytest.raises(ObservationImportError, match=rf"spread\.csv:5 \(id '{rid}/treatment'\): quality"):
        pilot_flow(name, observations_file=str(spread))


def test_csv_rows_and_errors_name_the_physical_line_each_row_starts_on(tmp_path: Path) -> None:
    """Review R1: rows were numbered by record (csv.DictReader skips blank lines, a quoted cell may span
    lines), so after either the pilot's and the monitor's messages named a line above the bad row."""
    from rollout.observations_io import ObservationImportError, read_numbered

    f = tmp_path / "obs.csv"
    head = b"request_id,arm,quality,latency_ms,error\n"
    body = b'r1,control,"0.5\n",120,false\n\n\nr1,treatment,0.5,"80\r\n",false\r\n\nr2,control,0.5,90,'
    f.write_bytes(head + body + b"0\n")
    assert [(line, row["request_id"], row["arm"]) for line, row in read_numbered(f)] == [
        (2, "r1", "control"),
        (6, "r1", "treatment"),
        (9, "r2", "control"),
    ]
    for last, refused in ((b"oops\n", "field 'error' must be true/false"), (b"0,1\n", "more values than")):
        f.write_bytes(head + body + last)
        with pytest.raises(ObservationImportError, match=rf"obs\.csv:9: {refused}"):
            read_numbered(f)


def test_a_spreadsheets_trailing_empty_columns_are_no_repeated_names(tmp_path: Path) -> None:
    """A CSV saved from a spreadsheet with trailing empty columns (`...,error,,`) was refused with "header
    names column(s) ,  more than once"; the empty names name no column, so the file is read, and a value
    under one is refused, naming the line and the column."""
    from rollout.observations_io import ObservationImportError, read_numbered

    f = tmp_path / "sheet.csv"
    f.write_text("request_id,arm,quality,latency_ms,error,,\nr1,control,0.5,120,0,,\nr2,control,0.5,90,0\n")
    rows = [row for _, row in read_numbered(f)]
    assert [r["request_id"] for r in rows] == ["r1", "r2"] and all("" not in r for r in rows)
    f.write_text("request_id,arm,quality,latency_ms,error,,\nr1,control,0.5,120,0,,x\n")
    with pytest.raises(ObservationImportError, match=r"sheet\.csv:2: a value under a column the header does "
                       r"not name \(column 7\)"):  # fmt: skip
        read_numbered(f)
    f.write_text("request_id,arm,quality,latency_ms,error,arm\nr1,control,0.5,120,0,treatment\n")
    with pytest.raises(ObservationImportError, match=r"header names column\(s\) arm more than once"):
        read_numbered(f)


def _challenger(name: str) -> None:
    """A registered challenger, as calibration leaves it (no model work needed for an import)."""
    from rollout import registry
    from rollout.db.models import CalibrationRun
    from rollout.db.session import session_scope
    from rollout.pilots import get_use_case
    from sparse_core import SparsePlan

    with session_scope() as s:
        uc_id = get_use_case(s, name).id
    mv = registry.register_version(name, SparsePlan(tau=0.9), _model_of(name), actor=registry.SYSTEM_PIPELINE)
    with session_scope() as s:
        s.add(CalibrationRun(idempotency_key="k", use_case_id=uc_id, spec_version=1, status="succeeded",
                             model_version_id=mv.id))  # fmt: skip


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value())


def _model_of(name: str) -> str:
    from rollout.db.session import session_scope
    from rollout.pilots import get_use_case, load_current_spec

    with session_scope() as s:
        return load_current_spec(s, get_use_case(s, name))[0].model


def test_a_csv_with_a_byte_order_mark_reads_as_excel_wrote_it(tmp_path: Path) -> None:
    from rollout.observations_io import read_observations

    f = tmp_path / "excel.csv"
    f.write_bytes("\ufeffrequest_id,arm,quality,latency_ms,error\nr1,control,0.5,120,FALSE\n".encode())
    assert read_observations(f) == [
        {
            "request_id": "r1",
            "arm": "control",
            "quality": 0.5,
            "latency_ms": 120.0,
            "error": False,
            "tokens": 0,
        }
    ]


def _stored(pilot_id: int) -> int:
    """The observations stored under pilot `pilot_id`'s steps."""
    from rollout.db.models import Observation, PilotStep
    from rollout.db.session import session_scope

    with session_scope() as s:
        steps = select(PilotStep.id).where(PilotStep.pilot_id == pilot_id)
        return s.scalar(
            select(func.count()).select_from(Observation).where(Observation.pilot_step_id.in_(steps))
        )
