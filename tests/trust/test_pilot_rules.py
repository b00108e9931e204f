"""A pilot pinned to its spec version, operator abort, and imports checked against the step's design
(issue 15, items 2 and 5)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import func, select
from typer.testing import CliRunner

from tests.fixtures.flows import tiny_spec
from tests.fixtures.trust import password_of

runner = CliRunner()
# the gate of the review's scenarios (the tiny spec's margin is 0.2)
MARGIN_003 = {"alpha": 0.05, "non_inferiority_margin": 0.03, "score_type": "bounded", "max_looks": 10,
              "guardrails": {"max_error_rate": 0.05, "p95_latency_ms": 60000}}  # fmt: skip


def _challenger(name: str) -> int:
    """A registered challenger with its succeeded calibration run (what `pilot` needs); no model work."""
    from rollout import registry
    from rollout.db.models import CalibrationRun
    from rollout.db.session import session_scope
    from rollout.pilots import get_use_case, load_current_spec
    from sparse_core import SparsePlan

    with session_scope() as s:
        uc = get_use_case(s, name)
        spec, _ = load_current_spec(s, uc)
        uc_id, model = uc.id, spec.model
    mv = registry.register_version(name, SparsePlan(tau=0.9), model, actor=registry.SYSTEM_PIPELINE)
    with session_scope() as s:
        s.add(CalibrationRun(idempotency_key=f"cal-{mv.id}", use_case_id=uc_id, spec_version=1,
                             status="succeeded", model_version_id=mv.id))  # fmt: skip
    return mv.id


def _dataset_ids(name: str, n: int) -> list[str]:
    """n of the rows the use case keeps apart from calibration: the requests an import may carry."""
    from flows.common import load_context

    return [r["id"] for r in load_context(name).split()[1][:n]]


def _obs(rid: str, arm: str, quality: float = 0.8) -> dict:
    return {"request_id": rid, "arm": arm, "quality": quality, "latency_ms": 100.0, "error": False}


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _import(name: str, path: str, *extra: str, user: str = "olga"):  # noqa: ANN202
    return runner.invoke(
        app_(), ["pilot", name, "--observations", path, *extra, "--password-stdin"],
        input=password_of(user) + "\n", env={"SPARSEPILOT_USER": user},
    )  # fmt: skip


def app_():  # noqa: ANN201
    from sparsepilot.cli import app

    return app


def _counts() -> dict[str, int]:
    from rollout.db.models import AuditEntry, Observation, Pilot
    from rollout.db.session import session_scope

    with session_scope() as s:
        return {
            m.__name__: s.scalar(select(func.count()).select_from(m))
            for m in (Pilot, Observation, AuditEntry)
        }


def test_a_new_spec_version_applies_to_the_next_pilot_not_the_running_one(
    trust_env, flow_use_case, tiny_model_dir: Path, pilot_dataset: Path, tmp_path: Path
) -> None:
    from rollout import pilots
    from rollout.db.models import Pilot
    from rollout.db.session import session_scope
    from rollout.usecases import add_usecase
    from tests.flows.test_approvals import _pilot_with_decision

    name = flow_use_case()
    _pilot_with_decision(name, "EXTEND", "none")  # pilot under v1 (the fixture's margin 0.2, alpha 0.05)
    loose = tiny_spec(tiny_model_dir, name, dataset_file=pilot_dataset)  # the same rows as version 1
    loose["gate"]["non_inferiority_margin"] = 0.5
    loose["gate"]["alpha"] = 0.45
    path = tmp_path / "v2.yaml"
    path.write_text(yaml.safe_dump(loose))
    assert add_usecase(path, actor="olga", new_version=True).version == 2
    with session_scope() as s:
        pilot = s.scalar(select(Pilot))
        step = pilots.current_step(s, pilot)
        pinned, sv = pilots.load_step_spec(s, step.id)
        current, _ = pilots.load_current_spec(s, pilots.get_use_case(s, name))
        assert (pilot.spec_version, sv.version) == (1, 1)
        assert (pinned.gate.non_inferiority_margin, pinned.gate.alpha) == (0.2, 0.05)
        assert current.gate.non_inferiority_margin == 0.5
        # the gate reads the pilot's own rules (flows/gate.py: load_step_spec)
        assert pilots.gate_settings(pinned, step).margin == 0.2


def test_operator_aborts_a_pilot_and_its_open_decision_closes(trust_env, flow_use_case) -> None:
    from rollout.db.models import AuditEntry, GateDecision, Pilot, PilotStep, UseCase
    from rollout.db.session import session_scope
    from tests.flows.test_approvals import _pilot_with_decision

    name = flow_use_case()
    did = _pilot_with_decision(name, "EXTEND", "none")
    args = ["pilot", name, "--abort", "--reason", "wrong traffic mix", "--password-stdin"]
    res = runner.invoke(app_(), args, input=password_of("victor") + "\n", env={"SPARSEPILOT_USER": "victor"})
    assert res.exit_code == 2 and "needs the operator role" in res.output
    # an abort is no flow run: it works while the Prefect server is down (the flow commands' check of
    # PREFECT_API_URL refused it)
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{sock.getsockname()[1]}/api"
    olga = {"SPARSEPILOT_USER": "olga", "PREFECT_API_URL": down}
    res = runner.invoke(app_(), args, input=password_of("olga") + "\n", env=olga)
    assert res.exit_code == 0, res.output
    with session_scope() as s:
        assert s.scalar(select(Pilot.status)) == "stopped"
        assert s.scalars(select(PilotStep.status)).all() == ["aborted"]
        assert s.get(GateDecision, did).resolution == "aborted"
        assert s.scalar(select(UseCase.phase)) == "stopped"
        row = s.scalar(select(AuditEntry).where(AuditEntry.action == "pilot.abort"))
        assert row.actor == "olga" and row.details["reason"] == "wrong traffic mix"
    res = runner.invoke(app_(), args, input=password_of("olga") + "\n", env={"SPARSEPILOT_USER": "olga"})
    assert res.exit_code == 2 and "has no active pilot to abort" in res.output


def test_a_refused_import_starts_no_pilot(trust_env, flow_use_case, tmp_path: Path) -> None:
    name = flow_use_case()
    _challenger(name)
    ids = _dataset_ids(name, 4)
    before = _counts()
    one_arm = _write(tmp_path / "one.jsonl", [_obs(r, "control") for r in ids])
    res = _import(name, one_arm)
    assert res.exit_code == 2 and "nothing was stored" in res.output and "Traceback" not in res.output
    assert _counts() == before  # no pilot, no observation, no audit row
    good = _write(tmp_path / "good.jsonl", [_obs(r, a) for r in ids for a in ("control", "treatment")])
    res = _import(name, good)
    assert res.exit_code == 0, res.output
    assert _counts()["Pilot"] == 1 and _counts()["Observation"] == 8


def test_split_step_imports_follow_the_design(trust_env, flow_use_case, tmp_path: Path) -> None:
    from rollout import pilots
    from rollout.db.models import AuditEntry, Observation, Pilot
    from rollout.db.session import session_scope

    name = flow_use_case()
    _challenger(name)
    ids = _dataset_ids(name, 40)
    shadow = _write(
        tmp_path / "shadow.jsonl", [_obs(r, a) for r in ids[:8] for a in ("control", "treatment")]
    )
    res = _import(name, shadow, "--external-assignment")  # a shadow step has no arms to assign
    assert res.exit_code == 2 and "--external-assignment is for a split step" in res.output
    assert _import(name, shadow).exit_code == 0
    with session_scope() as s:  # the evidence names who brought it
        entry = s.scalar(select(AuditEntry).where(AuditEntry.action == "observations.import"))
        assert (entry.actor, entry.details["rows"], entry.details["inserted"]) == ("olga", 16, 16)
        assert entry.details["file"] == shadow
        # and the pilot it started is hers (s47: its start said the pipeline)
        start = s.scalar(select(AuditEntry).where(AuditEntry.action == "pilot.start"))
        assert start.actor == "olga"
    with session_scope() as s:
        pilot = s.scalar(select(Pilot))
        spec, _ = pilots.load_pilot_spec(s, pilot)
        pilots.advance(s, pilot, spec, actor="test")
        salt, pct = pilot.salt, pilots.current_step(s, pilot).traffic_pct
    fresh = ids[8:]
    assigned = [_obs(r, pilots.assign_arm(r, salt, pct)) for r in fresh]
    before = _counts()

    again = [_obs(ids[0], pilots.assign_arm(ids[0], salt, pct))]  # the shadow step judged it
    res = _import(name, _write(tmp_path / "again-shadow.jsonl", again))
    assert res.exit_code == 2 and f"request(s) {ids[0]}/" in res.output, res.output
    assert "were judged in an earlier step of this pilot; a request is evidence once" in res.output
    assert _counts() == before
    both = _write(tmp_path / "both.jsonl", [_obs(fresh[0], "control"), _obs(fresh[0], "treatment")])
    res = _import(name, both)
    assert res.exit_code == 2 and f"request(s) {fresh[0]} appear in both arms" in res.output
    flipped = [{**o, "arm": "treatment" if o["arm"] == "control" else "control"} for o in assigned[:3]]
    res = _import(name, _write(tmp_path / "flipped.jsonl", flipped))
    assert res.exit_code == 2 and "not in the arm the pilot's hash assignment gives them" in res.output
    assert _counts() == before

    res = _import(name, _write(tmp_path / "external.jsonl", flipped), "--external-assignment")
    assert res.exit_code == 0, res.output
    res = _import(name, _write(tmp_path / "assigned.jsonl", assigned[3:]))
    assert res.exit_code == 0, res.output
    conflicting = [{**assigned[5], "quality": 0.1}]
    before = _counts()
    res = _import(name, _write(tmp_path / "conflict.jsonl", conflicting))
    assert res.exit_code == 2
    assert f"{fresh[5]}/{assigned[5]['arm']} are already stored with different values" in res.output
    assert _counts() == before
    res = _import(name, _write(tmp_path / "again.jsonl", assigned[3:]))  # identical re-import: nothing new
    assert res.exit_code == 0 and _counts() == {**before, "AuditEntry": before["AuditEntry"]}
    with session_scope() as s:
        sources = dict(s.execute(select(Observation.source, func.count()).group_by(Observation.source)).all())
    assert sources == {"imported": 16 + len(assigned) - 3, "imported-external": 3}
    # the gate's look says which rows rest on the serving system's own assignment
    from rollout import decisions
    from rollout.db.models import GateDecision

    with session_scope() as s:
        step_id = pilots.current_step(s, s.scalar(select(Pilot))).id
    look = decisions.gate_step(name, step_id)
    assert "3 of this step's rows were assigned to arms by the serving system" in look["explanation"]
    with session_scope() as s:
        assert s.get(GateDecision, look["decision_id"]).evidence["externally_assigned_rows"] == 3


def test_gate_and_monitor_need_an_operator_who_signs_in(trust_env, flow_use_case, tmp_path: Path) -> None:
    """A gate look moves a pilot to its next traffic step on GO, and a monitor look can roll the champion
    back: neither runs for nobody or for a viewer, and a refused one records nothing."""
    from rollout.db.models import GateDecision
    from rollout.db.session import session_scope

    name = flow_use_case()
    breach = _write(tmp_path / "breach.jsonl", [_obs("a", "treatment")])
    for args in (["gate", name], ["monitor", name, "--observations", str(breach)]):
        res = runner.invoke(app_(), args, env={"SPARSEPILOT_USER": ""})
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        res = runner.invoke(
            app_(), [*args, "--password-stdin"], input=password_of("victor") + "\n",
            env={"SPARSEPILOT_USER": "victor"},
        )  # fmt: skip
        assert res.exit_code == 2 and "needs the operator role" in res.output, res.output
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(GateDecision)) == 0


def test_run_pilots_a_persons_use_case_only_for_an_operator(trust_env, flow_use_case, tmp_path: Path) -> None:
    """Review s46 A3: `run --use-case NAME` calibrates, pilots and gates NAME; for a use case a person
    added it needs an operator, as `pilot` and `gate` do, and a refused one starts nothing. The samples
    the main job adds for itself (created by the pipeline) need nobody."""
    from rollout import audit
    from rollout.db.models import AuditEntry
    from rollout.db.session import session_scope
    from rollout.usecases import add_usecase, added_by_people

    name = flow_use_case()  # added by a person ("test-owner")
    sample = tmp_path / "sample.yaml"
    sample.write_text((tmp_path / f"{name}.yaml").read_text().replace(f"name: {name}", "name: a-sample"))
    add_usecase(sample, actor=audit.SYSTEM_ACTOR)  # as `run` adds the samples
    assert added_by_people([name, "a-sample", "not-there"]) == [name]
    empty = tmp_path / "no-specs"
    empty.mkdir()
    with session_scope() as s:
        rows_before = s.scalar(select(func.count()).select_from(AuditEntry))
    for who in ("", "victor"):
        args = ["run", "--use-case", name, "--specs", str(empty), *(["--password-stdin"] if who else [])]
        res = runner.invoke(
            app_(), args,
            input=password_of(who) + "\n" if who else None, env={"SPARSEPILOT_USER": who},
        )  # fmt: skip
        said = "nobody is signed in" if not who else "needs the operator role"
        assert res.exit_code == 2 and said in res.output and "Traceback" not in res.output, res.output
        assert f"run (pilot and gate {name})" in res.output or not who
    with session_scope() as s:  # nothing started: no calibration.started, no row at all but the failures
        actions = s.scalars(select(AuditEntry.action).where(AuditEntry.id > rows_before)).all()
        assert set(actions) <= {"auth.sign_in_failed"}, actions


def test_run_adds_a_folder_of_specs_only_for_an_operator_and_as_theirs(
    trust_env, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s47: `run --specs DIR` added DIR's use cases (as the pipeline's, so every later run treated
    them as samples) for anybody, while `usecase add` needs an operator. Now the use cases it would add
    need an operator's sign-in, refused before anything runs, and are added as theirs; the samples'
    own folder (`make run`) still needs nobody."""
    import io

    from flows.main_job import MainJobSettings, adder_of
    from rollout.db.models import AuditEntry
    from rollout.db.session import session_scope
    from rollout.usecases import not_added
    from sparsepilot.commands.pipeline import _require_operator_for_theirs

    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "theirs.yaml").write_text(yaml.safe_dump(tiny_spec(tiny_model_dir, "theirs")))
    for who in ("", "victor"):
        res = runner.invoke(
            app_(), ["run", "--specs", str(specs), *(["--password-stdin"] if who else [])],
            input=password_of(who) + "\n" if who else None, env={"SPARSEPILOT_USER": who},
        )  # fmt: skip
        said = (
            "nobody is signed in" if not who else f"run (usecase add theirs from {specs}) needs the operator"
        )
        assert res.exit_code == 2 and said in res.output and "Traceback" not in res.output, res.output
    assert not_added(["theirs"]) == ["theirs"]
    with session_scope() as s:  # nothing ran: the failed sign-in is all the audit log holds
        assert set(s.scalars(select(AuditEntry.action)).all()) <= {"auth.sign_in_failed"}
    samples = MainJobSettings()  # the samples' folder: nobody signs in (stdin holds no password)
    _require_operator_for_theirs(samples, password_stdin=False)
    assert samples.operator is None and adder_of(samples.examples_dir, "olga") == "sparsepilot-pipeline"
    monkeypatch.setenv("SPARSEPILOT_USER", "olga")
    monkeypatch.setattr("sys.stdin", io.StringIO(password_of("olga") + "\n"))
    theirs = MainJobSettings(examples_dir=specs)
    _require_operator_for_theirs(theirs, password_stdin=True)
    # the main job adds them as olga's (`add_sample_use_cases`): a later run pilots them for an operator only
    assert theirs.operator == "olga" and adder_of(specs, theirs.operator) == "olga"


def _scheduled_use_case(name: str, actor: str, model_dir: Path) -> None:
    """A use case whose current spec has a schedule, added by ``actor`` (its rows only: no dataset check)."""
    from rollout.db.models import SpecVersion, UseCase
    from rollout.db.session import session_scope
    from rollout.spec import parse_spec

    spec = parse_spec(tiny_spec(model_dir, name), source=name).to_dict()
    with session_scope() as s:
        uc = UseCase(name=name, owner="team", criticality="low")
        s.add(uc)
        s.flush()
        s.add(SpecVersion(use_case_id=uc.id, version=1, spec=spec, spec_hash=name, created_by=actor))


def test_serve_schedules_a_persons_use_case_only_for_an_operator(
    trust_env, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s47: `serve` schedules each use case's cycle, which pilots and gates it, for anybody. A use
    case a person added now needs an operator's sign-in, as `run` does, refused before anything is
    scheduled; the pipeline's own samples need nobody."""
    import io

    _scheduled_use_case("a-sample", "sparsepilot-pipeline", tiny_model_dir)
    _scheduled_use_case("theirs", "olga", tiny_model_dir)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # a serve that got past the sign-in stops there
    for who in ("", "victor"):
        res = runner.invoke(
            app_(), ["serve", "--work-pool", "p", *(["--password-stdin"] if who else [])],
            input=password_of(who) + "\n" if who else None, env={"SPARSEPILOT_USER": who},
        )  # fmt: skip
        said = "nobody is signed in" if not who else "serve (the cycle pilots and gates) theirs needs the"
        assert res.exit_code == 2 and said in res.output and "schedule " not in res.output, res.output
    from sparsepilot.commands.pipeline import _require_operator_for_scheduled

    _require_operator_for_scheduled(["a-sample"], password_stdin=False)  # the samples alone: nobody
    monkeypatch.setenv("SPARSEPILOT_USER", "olga")
    monkeypatch.setattr("sys.stdin", io.StringIO(password_of("olga") + "\n"))
    _require_operator_for_scheduled(None, password_stdin=True)  # an operator: served


def test_a_run_an_operator_signed_in_for_names_them_in_the_audit_log(trust_env, tiny_model_dir: Path) -> None:
    """Review s47: `run` on a person's use case asked an operator to sign in, then recorded nothing of
    them: every row it wrote named the pipeline. Its start is now an audit entry by the operator on each
    use case it runs (`rollout.usecases.run_started`, called by the main job)."""
    from rollout.db.models import AuditEntry
    from rollout.db.session import session_scope
    from rollout.usecases import run_started

    _scheduled_use_case("theirs", "olga", tiny_model_dir)
    assert run_started(["theirs", "not-there"], "olga") == 1
    with session_scope() as s:
        row = s.scalars(select(AuditEntry).where(AuditEntry.action == "run.started")).one()
        assert (row.actor, row.entity, row.details["command"]) == ("olga", "use_case", "sparsepilot run")


@pytest.mark.parametrize("user", ["victor"])
def test_viewers_cannot_import(trust_env, flow_use_case, tmp_path: Path, user: str) -> None:
    name = flow_use_case()
    res = _import(name, _write(tmp_path / "x.jsonl", [_obs("a", "control")]), user=user)
    assert res.exit_code == 2 and "needs the operator role" in res.output


def test_a_relative_model_path_resolves_against_the_spec_file(
    trust_env, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Like dataset.path: the spec's directory, not the working directory (issue 15, item 9)."""
    import os
    import shutil

    from rollout.usecases import add_usecase, load_spec_version

    spec_dir = tmp_path / "specs"
    shutil.copytree(tiny_model_dir, spec_dir / "models" / "tiny")
    spec = tiny_spec(tiny_model_dir, "relative-model")
    spec["model"] = "models/tiny"
    (spec_dir / "uc.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)  # "models/tiny" does not exist relative to here
    add_usecase(spec_dir / "uc.yaml", actor="olga")
    stored = load_spec_version("relative-model").spec.model
    assert stored == os.path.realpath(spec_dir / "models" / "tiny")


def test_an_imports_file_order_carries_no_weight(trust_env, flow_use_case, tmp_path: Path) -> None:
    """A shadow export sorted by latency, where the sparse model loses only on the slowest fifth of the
    requests (a mean loss of exactly the margin): in file order the identical pairs come first and the
    GO test fires on them; stored, the rows enter the evidence stream by their salted stream key, and the
    same rows give no GO. Both arms of a request stay together, and an import after a gate look comes
    after the rows that look judged."""
    import numpy as np
    import pandas as pd

    from rollout import decisions, pilot_batches, pilots
    from rollout.db.models import Pilot
    from rollout.db.session import session_scope
    from rollout.gate import GateSettings, decide

    name = flow_use_case(gate=MARGIN_003)
    _challenger(name)
    n = 600
    ids = [f"exp-{i:04d}" for i in range(n + 100)]
    slow = np.random.default_rng(3).random(n) < 0.15
    rows = []
    for i, rid in enumerate(ids[:n]):  # file order: by latency; the last 120 are the slow ones
        lost = i >= n - 120 and slow[i]
        rows.append({**_obs(rid, "control", 1.0), "latency_ms": 100.0 + i})
        rows.append({**_obs(rid, "treatment", 0.0 if lost else 1.0), "latency_ms": 90.0 + i})
    settings = GateSettings(margin=0.03, min_samples_per_arm=20)
    in_file = decide(pd.DataFrame(rows), settings, mode="paired")
    assert in_file.outcome == "GO"  # what storing the file's order would have shipped

    # The pilot's salt is random, and at a true loss of exactly the margin a random order still gives GO
    # with probability up to alpha (it did once in CI): a fixed salt makes the order, and the test, exact.
    pilot_batches.ensure_pilot(name)
    with session_scope() as s:
        s.scalar(select(Pilot)).salt = "0123456789abcdef"
    pilot_batches.import_file(name, _write(tmp_path / "sorted.jsonl", rows), known_ids=ids)
    with session_scope() as s:
        pilot = s.scalar(select(Pilot))
        table = pilots.step_observations(s, pilots.current_step(s, pilot))  # as the gate reads it
        salt = pilot.salt
    stored = table.to_dict("records")
    keys = [pilots.stream_key(r["request_id"], salt) for r in stored]
    assert keys == sorted(keys) and {r["request_id"] for r in stored} == set(ids[:n])
    assert all(stored[i]["request_id"] == stored[i + 1]["request_id"] for i in range(0, len(stored), 2))
    as_stored = decide(table, settings, mode="paired")
    assert as_stored.outcome != "GO", as_stored.explanation
    with session_scope() as s:
        step_id = pilots.current_step(s, s.scalar(select(Pilot))).id
    look = decisions.gate_step(name, step_id)
    assert look["outcome"] != "GO" and decisions.evidence(look["decision_id"])["judged_through"] > 0

    more = [_obs(rid, arm, 1.0) for rid in ids[n:] for arm in ("control", "treatment")]
    pilot_batches.import_file(name, _write(tmp_path / "more.jsonl", more), known_ids=ids)
    with session_scope() as s:
        pilot = s.scalar(select(Pilot))
        after = pilots.step_observations(s, pilots.current_step(s, pilot)).to_dict("records")
    assert after[: len(stored)] == stored  # each look's stream extends the one before
    assert {r["request_id"] for r in after[len(stored) :]} == set(ids[n:])


def _sorted_export(n: int, ids: list[str]) -> list[dict]:
    """A shadow export sorted by latency whose sparse model loses only on the slowest fifth (15% of it: a
    mean loss of the margin, 0.03): the first four fifths are identical pairs."""
    import numpy as np

    slow = np.random.default_rng(3).random(n) < 0.15
    rows = []
    for i, rid in enumerate(ids[:n]):
        lost = i >= n - n // 5 and slow[i]
        rows.append({**_obs(rid, "control", 1.0), "latency_ms": 100.0 + i})
        rows.append({**_obs(rid, "treatment", 0.0 if lost else 1.0), "latency_ms": 90.0 + i})
    return rows


def _fixed_salt(name: str) -> str:
    """The pilot started with a known salt: at a true loss of exactly the margin a random order still gives
    GO with probability up to alpha, so a fixed one makes the order, and the test, exact."""
    from rollout import pilot_batches
    from rollout.db.models import Pilot
    from rollout.db.session import session_scope

    pilot_batches.ensure_pilot(name)
    with session_scope() as s:
        s.scalar(select(Pilot)).salt = salt = "0123456789abcdef"
    return salt


def test_an_export_in_pages_is_judged_as_the_one_file(trust_env, flow_use_case, tmp_path: Path) -> None:
    """Review S1: the latency-sorted export split into 5 files (a paginated export API, `split -l`), imported
    one after another, then ONE gate look. Each file's rows were ordered by key, but the files entered the
    stream in the order they came, so the identical pairs came first again and the look said GO; now the
    rows stored since the step's last look enter together by key: the stream one file gives, no GO."""
    from rollout import decisions, pilot_batches, pilots
    from rollout.db.models import Pilot
    from rollout.db.session import session_scope

    name = flow_use_case(gate=MARGIN_003)
    _challenger(name)
    n = 300  # the first 4 pages, 240 identical pairs, say GO on their own
    ids = [f"exp-{i:04d}" for i in range(n)]
    rows = _sorted_export(n, ids)
    salt = _fixed_salt(name)
    per = len(rows) // 5
    for p in range(5):
        page = _write(tmp_path / f"page{p}.jsonl", rows[p * per : (p + 1) * per])
        pilot_batches.import_file(name, page, ids)
    with session_scope() as s:
        step = pilots.current_step(s, s.scalar(select(Pilot)))
        stored, step_id = pilots.step_observations(s, step).to_dict("records"), step.id
    look = decisions.gate_step(name, step_id)
    assert look["outcome"] != "GO", look["explanation"]
    keys = [pilots.stream_key(r["request_id"], salt) for r in stored]
    assert keys == sorted(keys) and len(stored) == len(rows)  # one file's stream: by key across the pages


def test_a_split_step_refuses_an_import_of_one_arm(trust_env, flow_use_case, tmp_path: Path) -> None:
    """Review S3: a split step's rows as two logs, the dense deployment's then the sparse one's. With a look
    between them the dense-only stream's GO capital grew by about the margin a row and the look said GO
    for a sparse arm of any quality. An import whose arm counts contradict the step's share is refused,
    naming the file and its counts; the same rows in files of both arms are taken as one file."""
    import numpy as np

    from rollout import decisions, pilot_batches, pilots
    from rollout.db.models import Pilot
    from rollout.db.session import session_scope
    from rollout.pilot_batches import ObservationImportError

    steps = {"shadow": {"min_samples": 8}, "steps": [{"traffic_pct": 10, "min_samples": 8}], "batch_size": 8}
    name = flow_use_case(gate=MARGIN_003, rollout=steps)
    _challenger(name)
    ids = [f"exp-{i:04d}" for i in range(600)]
    salt = _fixed_salt(name)
    with session_scope() as s:
        pilot = s.scalar(select(Pilot))
        spec, _ = pilots.load_pilot_spec(s, pilot)
        pilots.advance(s, pilot, spec, actor="test")
    rng = np.random.default_rng(8)
    rows = []
    for rid in ids:  # the sparse arm 0.10 worse than dense (margin 0.03)
        arm = pilots.assign_arm(rid, salt, 10)
        q = float(rng.beta(8, 2))
        rows.append(_obs(rid, arm, max(0.0, q - 0.10) if arm == "treatment" else q))
    dense = [r for r in rows if r["arm"] == "control"]
    sparse = [r for r in rows if r["arm"] == "treatment"]
    for label, part in (("dense", dense), ("sparse", sparse)):
        path = _write(tmp_path / f"{label}.jsonl", part)
        with pytest.raises(ObservationImportError) as refused:
            pilot_batches.import_file(name, path, ids)
        said = str(refused.value)
        n_t, n_c = (0, len(part)) if label == "dense" else (len(part), 0)
        assert said.startswith(f"{path}: ") and f"its new rows hold {n_t} sparse and {n_c} dense" in said
        assert "import the step's rows of both arms together" in said
    assert _counts()["Observation"] == 0
    for half in (rows[::2], rows[1::2]):  # both arms in each: taken together up to the next look
        pilot_batches.import_file(name, _write(tmp_path / f"half{len(half)}.jsonl", half), ids)
    with session_scope() as s:
        step = pilots.current_step(s, s.scalar(select(Pilot)))
        stored, step_id = pilots.step_observations(s, step).to_dict("records"), step.id
    keys = [pilots.stream_key(r["request_id"], salt) for r in stored]
    assert (step.kind, keys == sorted(keys), len(stored)) == ("split", True, len(rows))
    look = decisions.gate_step(name, step_id)
    assert look["outcome"] != "GO", look["explanation"]


def test_the_duration_limit_counts_from_the_pilots_start_across_its_steps(trust_env, flow_use_case) -> None:
    """`gate.max_duration_days` bounds the pilot ("an inconclusive pilot stops after this long"; the planner
    sums its steps' days against it). It was counted from the current step's start, so a pilot 27 days in,
    just entering a step, read 0 days and could go on for another limit per step."""
    import datetime as dt

    from rollout import pilots
    from rollout.db.models import Pilot
    from rollout.db.session import session_scope
    from tests.flows.test_approvals import _pilot_with_decision

    name = flow_use_case()
    _pilot_with_decision(name, "EXTEND", "none")
    with session_scope() as s:
        pilot = s.scalar(select(Pilot).order_by(Pilot.id.desc()))
        pilot.started_at = pilot.started_at - dt.timedelta(days=27)
        step = pilots.current_step(s, pilot)
        assert step.started_at > pilot.started_at + dt.timedelta(days=26)  # the step itself just began
        assert pilots.elapsed_days(step) == pytest.approx(27.0, abs=0.01)


def test_the_cli_names_a_pilot_by_its_number_within_its_use_case(
    trust_env, flow_use_case, tmp_path: Path
) -> None:
    """The second use case's first pilot (row id 2) was printed "pilot 2 of tiny-b", "tiny-b: pilot 2
    aborted" and "pilot 2 of this challenger has ended", while `usecase show`, the dashboard and the
    gate's alpha spending call it pilot 1 (review O6)."""
    from rollout.db.models import Pilot
    from rollout.db.session import session_scope

    for name in ("tiny-a", "tiny-b"):
        flow_use_case(name)
        _challenger(name)
        rows = [_obs(r, a) for r in _dataset_ids(name, 2) for a in ("control", "treatment")]
        res = _import(name, _write(tmp_path / f"{name}.jsonl", rows))
        assert res.exit_code == 0, res.output
    assert "pilot 1 of tiny-b" in res.output and "pilot 2" not in res.output, res.output
    with session_scope() as s:
        assert s.scalar(select(Pilot.id).where(Pilot.pilot_number == 1).order_by(Pilot.id.desc())) == 2
    args = ["pilot", "tiny-b", "--abort", "--reason", "wrong traffic mix", "--password-stdin"]
    res = runner.invoke(app_(), args, input=password_of("olga") + "\n", env={"SPARSEPILOT_USER": "olga"})
    assert res.exit_code == 0 and "tiny-b: pilot 1 aborted" in res.output, res.output
    rows = [_obs(r, a) for r in _dataset_ids("tiny-b", 3)[2:] for a in ("control", "treatment")]
    res = _import("tiny-b", _write(tmp_path / "again.jsonl", rows))
    assert res.exit_code == 2 and "tiny-b: pilot 1 of this challenger was aborted" in res.output, res.output


def test_whoever_loosened_the_gate_does_not_approve_its_go(
    trust_env, flow_use_case, tiny_model_dir: Path, pilot_dataset: Path, tmp_path: Path
) -> None:
    """Review s46 A13: alice (an approver) adds spec version 2 with a looser gate (margin 0.2 -> 0.5,
    alpha 0.05 -> 0.45); the pilot under it says GO. Alice's approval is refused, nothing written;
    bob's (any other approver) takes effect on its own, as for any GO."""
    from rollout import approvals
    from rollout.auth import Identity
    from rollout.db.models import Approval, Pilot
    from rollout.db.session import session_scope
    from rollout.usecases import add_usecase
    from tests.flows.test_approvals import _pilot_with_decision

    name = flow_use_case()  # version 1: margin 0.2, alpha 0.05
    loose = tiny_spec(tiny_model_dir, name, dataset_file=pilot_dataset)
    loose["gate"]["non_inferiority_margin"] = 0.5
    loose["gate"]["alpha"] = 0.45
    path = tmp_path / "v2.yaml"
    path.write_text(yaml.safe_dump(loose))
    assert add_usecase(path, actor="alice", new_version=True).version == 2
    did = _pilot_with_decision(name, "GO", "approval")
    with session_scope() as s:
        assert s.scalar(select(Pilot.spec_version)) == 2
    alice, bob = Identity("alice", "approver", "cli-password"), Identity("bob", "approver", "cli-password")
    with pytest.raises(approvals.ApprovalError) as err:
        approvals.approve(did, alice, "looks fine")
    assert str(err.value) == (
        f"decision {did} was judged under spec version 2, whose gate is looser than spec version 1's (the "
        "first spec version: no earlier pilot of the use case was promoted or approved): margin 0.2 -> "
        "0.5, alpha 0.05 -> 0.45; loosened by alice in version 2 (margin 0.2 -> 0.5, alpha 0.05 -> 0.45); "
        "its GO needs an approver other than alice, who loosened it in version 2; nothing was recorded"
    )
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(Approval)) == 0
    assert approvals.approve(did, bob, "pilot evidence reviewed").took_effect


def _new_version(tmp_path: Path, model: Path, dataset: Path, name: str, actor: str, **change: object) -> int:
    """Spec version n+1 of ``name`` by ``actor``: version 1's spec with ``change`` (``margin``, ``alpha``,
    ``description``) applied."""
    from rollout.usecases import add_usecase

    spec = tiny_spec(model, name, dataset_file=dataset)
    if "margin" in change:
        spec["gate"]["non_inferiority_margin"] = change["margin"]
    if "alpha" in change:
        spec["gate"]["alpha"] = change["alpha"]
    if "description" in change:
        spec["description"] = change["description"]
    path = tmp_path / f"{actor}-{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return add_usecase(path, actor=actor, new_version=True).version


def _approvals_count() -> int:
    from rollout.db.models import Approval
    from rollout.db.session import session_scope

    with session_scope() as s:
        return s.scalar(select(func.count()).select_from(Approval))


@pytest.mark.parametrize("rewords", ["alice", "bob"])
def test_whoever_loosened_the_gate_does_not_approve_its_go_after_a_later_version(
    rewords: str, trust_env, flow_use_case, tiny_model_dir: Path, pilot_dataset: Path, tmp_path: Path
) -> None:
    """Review s46 T3-1: A13 compared the pilot's spec version only with the one before it. alice loosens
    the gate in v2, then she (or bob) adds v3 that only rewords the description; the pilot runs under v3,
    v3 against v2 changes nothing, and alice approved its GO alone. Now the gate is compared with the
    last accepted one (v1: no pilot was promoted): alice is refused, naming v2 and its changes, nothing
    is written; bob, who loosened nothing, approves it with one signature."""
    from rollout import approvals
    from rollout.auth import Identity
    from rollout.db.models import Pilot
    from rollout.db.session import session_scope
    from tests.flows.test_approvals import _pilot_with_decision

    name = flow_use_case()  # version 1: margin 0.2, alpha 0.05
    args = (tmp_path, tiny_model_dir, pilot_dataset, name)
    assert _new_version(*args, "alice", margin=0.5, alpha=0.45) == 2
    assert _new_version(*args, rewords, margin=0.5, alpha=0.45, description="same gate, reworded") == 3
    did = _pilot_with_decision(name, "GO", "approval")
    with session_scope() as s:
        assert s.scalar(select(Pilot.spec_version)) == 3
    alice, bob = Identity("alice", "approver", "cli-password"), Identity("bob", "approver", "cli-password")
    with pytest.raises(approvals.ApprovalError) as err:
        approvals.approve(did, alice, "looks fine")
    msg = str(err.value)
    assert msg.startswith(f"decision {did} was judged under spec version 3, whose gate is looser than spec "
                          "version 1's"), msg  # fmt: skip
    assert "loosened by alice in version 2 (margin 0.2 -> 0.5, alpha 0.05 -> 0.45); " in msg, msg
    assert msg.endswith(
        "needs an approver other than alice, who loosened it in version 2; nothing was recorded"
    )
    assert _approvals_count() == 0
    assert approvals.approve(did, bob, "pilot evidence reviewed").took_effect


def test_a_gate_loosened_then_tightened_back_is_no_loosening(
    trust_env, flow_use_case, tiny_model_dir: Path, pilot_dataset: Path, tmp_path: Path
) -> None:
    """Review s46 T3-1, decided: the rule is about the gate the GO is judged under. alice loosens the gate
    in v2, bob brings it back to v1's in v3: the pilot's gate is no looser than the one last accepted, so
    alice approves its GO alone. Loosened, then tightened only part of the way back, it is still looser:
    alice is refused for what remains (the margin), not for what bob took back (alpha)."""
    from rollout import approvals
    from rollout.auth import Identity
    from tests.flows.test_approvals import _pilot_with_decision

    name = flow_use_case()  # version 1: margin 0.2, alpha 0.05
    args = (tmp_path, tiny_model_dir, pilot_dataset, name)
    alice = Identity("alice", "approver", "cli-password")
    assert _new_version(*args, "alice", margin=0.5, alpha=0.45) == 2
    assert _new_version(*args, "bob", margin=0.3, alpha=0.05) == 3
    did = _pilot_with_decision(name, "GO", "approval", key="part-way")
    with pytest.raises(approvals.ApprovalError) as err:
        approvals.approve(did, alice, "looks fine")
    msg = str(err.value)
    assert "): margin 0.2 -> 0.3; loosened by alice in version 2 (margin 0.2 -> 0.5); its GO" in msg, msg
    assert _approvals_count() == 0
    assert approvals.approve(did, Identity("bob", "approver", "cli-password"), "reviewed").took_effect
    # the next pilot runs under v4, whose gate bob brought all the way back to v1's... but the pilot
    # above, under v3, was promoted: v3 is now what was accepted, and v4 is tighter than it
    assert _new_version(*args, "bob", margin=0.2, alpha=0.05, description="back to v1's gate") == 4
    again = _pilot_with_decision(name, "GO", "approval", key="back", tau=0.8)
    assert approvals.approve(again, alice, "looks fine").took_effect


def test_a_loosened_gate_once_accepted_is_the_new_baseline(
    trust_env, flow_use_case, tiny_model_dir: Path, pilot_dataset: Path, tmp_path: Path
) -> None:
    """Review s46 T3-1: the baseline is the spec version of the use case's last promoted pilot. alice
    loosens the gate in v2; bob approves the GO of the pilot under it (promoted). Later versions that keep
    that gate (a rewording, v3) loosen nothing against what was accepted: alice approves the next GO
    alone. A second loosening after it (v4, by carol) bars carol, not alice."""
    from rollout import approvals
    from rollout.auth import Identity
    from tests.flows.test_approvals import _pilot_with_decision

    name = flow_use_case()  # version 1: margin 0.2, alpha 0.05
    args = (tmp_path, tiny_model_dir, pilot_dataset, name)
    alice, bob = Identity("alice", "approver", "cli-password"), Identity("bob", "approver", "cli-password")
    assert _new_version(*args, "alice", margin=0.5) == 2
    first = _pilot_with_decision(name, "GO", "approval", key="first")
    assert approvals.approve(first, bob, "reviewed").took_effect
    assert _new_version(*args, "bob", margin=0.5, description="reworded") == 3
    second = _pilot_with_decision(name, "GO", "approval", key="second", tau=0.8)
    assert approvals.approve(second, alice, "the second pilot passed").took_effect
    assert _new_version(*args, "carol", margin=0.6, description="reworded") == 4
    third = _pilot_with_decision(name, "GO", "approval", key="third", tau=0.7)
    with pytest.raises(
        approvals.ApprovalError,
        match=r"than spec version 3's \(the version pilot \d+ ran "
        r"under, the last accepted\): margin 0.5 -> 0.6; loosened by carol in version 4",
    ):
        approvals.approve(third, Identity("carol", "approver", "cli-password"), "looks fine")
    assert approvals.approve(third, alice, "the third pilot passed").took_effect


def test_loosenings_compare_each_setting_with_the_baseline_and_the_version_before() -> None:
    """The pure part of T3-1's rule: only settings looser than the baseline's count, and of them, each
    version that raised one against the version before it, with its author."""
    from rollout.approvals import loosenings

    def v(version: int, author: str, margin: float, alpha: float | None = None) -> tuple:
        gate = {"non_inferiority_margin": margin} | ({} if alpha is None else {"alpha": alpha})
        return version, author, {"gate": gate}

    assert loosenings([v(1, "o", 0.2)]) == ([], [])
    assert loosenings([v(1, "o", 0.2), v(2, "a", 0.1), v(3, "b", 0.2)]) == ([], [])  # net: no looser
    assert loosenings([v(1, "o", 0.2), v(2, "a", 0.5, 0.3), v(3, "b", 0.4, 0.3), v(4, "c", 0.4, 0.05)]) == (
        ["margin 0.2 -> 0.4"],
        [(2, "a", ["margin 0.2 -> 0.5"])],
    )
    # spread over versions and authors; alpha absent means its default 0.05
    assert loosenings([v(1, "o", 0.2), v(2, "a", 0.3), v(3, "b", 0.3, 0.1), v(4, "a", 0.25, 0.2)]) == (
        ["margin 0.2 -> 0.25", "alpha 0.05 -> 0.2"],
        [(2, "a", ["margin 0.2 -> 0.3"]), (3, "b", ["alpha 0.05 -> 0.1"]), (4, "a", ["alpha 0.1 -> 0.2"])],
    )


_GATE_SPEC = {
    "latency_slo_ms": {"p95": 800},
    "gate": {"non_inferiority_margin": 0.2, "alpha": 0.05, "planned_effect": 0.0, "guardrails": {}},
    "rollout": {
        "shadow": {"min_samples": 100},
        "steps": [{"traffic_pct": 10, "min_samples": 200}, {"traffic_pct": 50, "min_samples": 400}],
    },
}


def _changed(path: str, value: object) -> dict:
    """`_GATE_SPEC` with the setting at ``path`` (dotted; a list index as a number) set to ``value``,
    or removed where ``value`` is ...."""
    import copy

    spec = copy.deepcopy(_GATE_SPEC)
    *parents, last = path.split(".")
    node: Any = spec
    for key in parents:
        node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
    if value is ...:
        node.pop(int(last) if last.isdigit() else last)
    else:
        node[last] = value
    return spec


@pytest.mark.parametrize(
    ("path", "looser", "tighter", "said"),
    [
        ("gate.alpha_spending", "pilot", "use_case", "alpha spending use_case -> pilot"),
        ("gate.max_looks", 40, 10, "max looks 20 -> 40"),
        ("gate.max_duration_days", 28, 7, "max duration days 14 -> 28"),
        ("gate.guardrails.max_error_rate", 0.05, 0.005, "error-rate ceiling 0.01 -> 0.05"),
        ("gate.guardrails.max_error_rate_increase", 0.03, 0.005, "error-rate increase ceiling 0.01 -> 0.03"),
        ("gate.guardrails.p95_latency_ms", 1200, 500, "latency SLO ms 800 -> 1200"),  # the gate's own SLO
        ("latency_slo_ms.p95", 1500, 400, "latency SLO ms 800 -> 1500"),  # the spec's, which the gate takes
        ("gate.guardrails.max_latency_exceedance", 0.2, 0.01, "latency exceedance 0.05 -> 0.2"),
        ("gate.guardrails.min_samples", 10, 60, "guardrail min samples 30 -> 10"),
        ("rollout.shadow.min_samples", 20, 300, "shadow min samples 100 -> 20"),
        ("rollout.steps.1.min_samples", 100, 800, "step 2 min samples 400 -> 100"),
        ("rollout.steps.1", ..., None, "ramp steps 2 -> 1"),
    ],
)
def test_loosenings_know_which_way_each_gate_setting_makes_a_go_easier(
    path: str, looser: object, tighter: object, said: str
) -> None:
    """Review s46 A13 compared only the margin and alpha: raising a guardrail's ceiling, spending alpha
    per pilot, allowing more looks or cutting the ramp or its rows made a GO easier unnoticed, and whoever
    did it approved the GO alone. Each setting is compared the way that makes a GO easier, and the other
    way is no loosening."""
    from rollout.approvals import loosenings

    base = (1, "owner", _GATE_SPEC)
    assert loosenings([base, (2, "alice", _changed(path, looser))]) == ([said], [(2, "alice", [said])])
    if tighter is not None:
        assert loosenings([base, (2, "alice", _changed(path, tighter))]) == ([], [])


def test_loosenings_leave_planning_values_and_traffic_shares_alone() -> None:
    """The planning values tune the bets but keep the GO's level; a step's traffic share changes who is
    served, not the evidence a GO needs; a step added is more to pass: none is a loosening."""
    from rollout.approvals import loosenings

    base = (1, "owner", _GATE_SPEC)
    more_steps = _changed(
        "rollout.steps", [*_GATE_SPEC["rollout"]["steps"], {"traffic_pct": 90, "min_samples": 9}]
    )
    for spec in (
        _changed("gate.planned_effect", 0.05),
        _changed("rollout.steps.0.traffic_pct", 40),
        more_steps,
    ):
        assert loosenings([base, (2, "alice", spec)]) == ([], [])


def test_an_aborted_pilot_goes_on_by_the_command_its_refusal_names(
    trust_env, flow_use_case, tmp_path: Path
) -> None:
    """After an abort, the refusal said "calibrate a new challenger (or add a new spec version) to pilot
    again", which led nowhere (calibration reuses its finished run, one model version per plan hash). The
    command it names now, run as written, starts pilot 2 of the same challenger, and its import lands."""
    import re

    name = flow_use_case()
    _challenger(name)
    ids = _dataset_ids(name, 4)
    res = _import(
        name, _write(tmp_path / "a.jsonl", [_obs(r, a) for r in ids[:2] for a in ("control", "treatment")])
    )
    assert res.exit_code == 0, res.output
    args = ["pilot", name, "--abort", "--reason", "split set to 30%, not 10%", "--password-stdin"]
    res = runner.invoke(app_(), args, input=password_of("olga") + "\n", env={"SPARSEPILOT_USER": "olga"})
    assert res.exit_code == 0, res.output
    rows = _write(tmp_path / "b.jsonl", [_obs(r, a) for r in ids[2:] for a in ("control", "treatment")])
    res = _import(name, rows)
    assert res.exit_code == 2 and "pilot 1 of this challenger was aborted" in res.output, res.output
    named = re.search(r"`sparsepilot (pilot [^`]*--again[^`]*)`", " ".join(res.output.split()))
    assert named is not None, res.output
    assert named.group(1) == f"pilot {name} --again --reason TEXT"  # run as written, TEXT filled in
    args = ["pilot", name, "--again", "--reason", "split fixed", "--password-stdin"]
    res = runner.invoke(app_(), args, input=password_of("olga") + "\n", env={"SPARSEPILOT_USER": "olga"})
    assert res.exit_code == 0 and f"{name}: pilot 2 started" in res.output, res.output
    res = _import(name, rows)
    assert res.exit_code == 0 and f"pilot 2 of {name}" in res.output, res.output
