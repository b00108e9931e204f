"""Review s46 C1, C2, C6: the writers of observations (`store_batch`, the streaming `import_file`) and the
pilot they write into, at the same time as an operator's abort or another audit writer, on SQLite and on
a throwaway PostgreSQL, with real threads. A slow step of the real code (the observation checks wrapped
to wait) opens the window; what lands in it is the real code path.

- a batch answered across an abort is refused, nothing stored (C6);
- an abort that comes while an import runs waits for it (its audit rows after the import's); one that
  commits between the import's first read and its hold refuses it, nothing stored (C2);
- an import that starts its pilot holds the audit chain's lock only at its end: another use case's audit
  writer finishes while it runs (C1)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from tests.flows.test_state_races import _in_thread
from tests.trust.test_pilot_rules import _challenger, _dataset_ids


@pytest.fixture
def use_case(trust_db: str, mlflow_home: Any, tiny_model_dir, pilot_dataset, tmp_path):  # noqa: ANN001, ANN201
    """Factory: a use case on the tiny model in this test's home and state DB (no Prefect server)."""
    from tests.fixtures.flows import use_case_factory

    return use_case_factory(tiny_model_dir, pilot_dataset, tmp_path)


def _rows(ids: list[str]) -> list[dict[str, Any]]:
    return [{"request_id": r, "arm": a, "quality": 0.8, "latency_ms": 100.0, "tokens": 4, "error": False}
            for r in ids for a in ("control", "treatment")]  # fmt: skip


def _write(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _counts(name: str) -> dict[str, Any]:
    from rollout import pilots
    from rollout.db.models import AuditEntry, Observation, ObservationBatch, Pilot
    from rollout.db.session import session_scope

    with session_scope() as s:
        uc = pilots.get_use_case(s, name)
        return {
            "observations": s.scalar(select(func.count()).select_from(Observation).where(
                Observation.use_case_id == uc.id)),
            "batches": s.scalar(select(func.count()).select_from(ObservationBatch)),
            "pilots": [p.status for p in s.scalars(select(Pilot).where(Pilot.use_case_id == uc.id))],
            "audit": [a.action for a in s.scalars(select(AuditEntry).order_by(AuditEntry.id))],
        }  # fmt: skip


def test_a_batch_answered_across_an_abort_is_refused_and_nothing_is_stored(use_case) -> None:  # noqa: ANN001
    """C6: the pilot flow's order (`ensure_pilot`, the arms answer, `store_batch`) with the operator's
    abort in between: the batch used to land in the aborted step, reported stored."""
    from rollout import pilot_batches, pilots

    name = use_case()
    _challenger(name)
    info = pilot_batches.ensure_pilot(name)
    before = _counts(name)
    pilot_batches.abort(name, actor="olga", reason="wrong traffic mix")
    with pytest.raises(pilots.PilotStateError) as refused:
        pilot_batches.store_batch(info["step_id"], _rows(_dataset_ids(name, 8)), "b-1", "pilot-flow")
    assert str(refused.value) == (
        f"{name}: pilot 1 was aborted while this batch was answered; nothing was stored"
    )
    after = _counts(name)
    assert (after["observations"], after["batches"], after["pilots"]) == (0, 0, ["stopped"])
    assert after["audit"][len(before["audit"]) :][-1] == "usecase.phase"  # the abort's; nothing after it
    assert pilot_batches.step_refusal(info["step_id"]) == {
        "stopped": "pilot aborted", "explanation": "pilot 1 was aborted",
    }  # fmt: skip


def test_a_batch_for_a_step_the_pilot_has_left_is_refused(use_case) -> None:  # noqa: ANN001
    """A batch answered for the shadow step while a gate look moved the pilot on to its split step."""
    from rollout import pilot_batches, pilots
    from rollout.db.session import session_scope

    name = use_case()
    _challenger(name)
    info = pilot_batches.ensure_pilot(name)
    with session_scope(immediate=True) as s:
        pilot = pilots.active_pilot(s, pilots.get_use_case(s, name))
        pilots.advance(s, pilot, pilots.load_pilot_spec(s, pilot)[0], actor="test")
    with pytest.raises(pilots.PilotStateError, match=r"pilot 1 has left step 0 \(passed\) for step 1 while"):
        pilot_batches.store_batch(info["step_id"], _rows(_dataset_ids(name, 8)), "b-1", "pilot-flow")
    assert _counts(name)["observations"] == 0


def _slow_checks(
    monkeypatch: pytest.MonkeyPatch, *, until: threading.Event, hold_s: float, then_s: float = 0.0
) -> threading.Event:
    """The import's observation checks (its first chunk) wait until `until` is set (at most `hold_s`),
    then `then_s` more: the import is under way, its transaction open. Returns the event set when the
    first check begins."""
    from rollout import pilot_batches

    real = pilot_batches.validate_observation_rows
    checking = threading.Event()

    def slow(*args: Any, **kwargs: Any) -> dict[str, Any]:
        if not checking.is_set():
            checking.set()
            until.wait(hold_s)
            time.sleep(then_s)
        return real(*args, **kwargs)

    monkeypatch.setattr(pilot_batches, "validate_observation_rows", slow)
    return checking


def test_an_abort_during_an_import_waits_for_it(use_case, monkeypatch, tmp_path: Path) -> None:  # noqa: ANN001
    """C2: on PostgreSQL the abort committed at once and the import then committed its rows into the
    stopped pilot, audited after the abort, reported a success. Now the abort waits for the import on
    both engines (SQLite did already): the import's rows and entry come before the abort's."""
    from rollout import pilot_batches

    name = use_case()
    _challenger(name)
    pilot_batches.ensure_pilot(name)
    ids = _dataset_ids(name, 20)
    path = _write(tmp_path / "obs.jsonl", _rows(ids))
    abort_sent = threading.Event()
    # the import waits until the abort is sent, and 1.5 s more: the abort reaches the state DB meanwhile
    checking = _slow_checks(monkeypatch, until=abort_sent, hold_s=60.0, then_s=1.5)
    out: dict[str, Any] = {}
    t = _in_thread(lambda: pilot_batches.import_file(name, path, set(ids)), out, "import")
    assert checking.wait(120)

    def abort() -> Any:
        abort_sent.set()
        return pilot_batches.abort(name, actor="olga", reason="wrong traffic mix")

    a = _in_thread(abort, out, "abort")
    t.join(120)
    a.join(120)
    assert isinstance(out["import"], dict), out["import"]
    assert out["import"]["stored"]["inserted"] == 40
    assert isinstance(out["abort"], tuple), out["abort"]
    audit = _counts(name)["audit"]
    assert audit.index("observations.import") < audit.index("pilot.abort"), audit


@pytest.mark.postgres
def test_an_abort_that_commits_before_the_import_holds_its_pilot_refuses_the_import(
    trust_env,
    pg_migrated_url: str,
    mlflow_home: Any,
    tiny_model_dir,
    pilot_dataset,
    tmp_path: Path,
    monkeypatch,
) -> None:  # noqa: ANN001
    """C2, the other order (PostgreSQL: SQLite's write lock, held from the import's start, rules it out):
    the abort commits after the import read its pilot and before it holds it. The import sees the abort
    and stores nothing; it used to store its rows into the stopped pilot."""
    from rollout import pilot_batches, pilots
    from tests.fixtures.flows import use_case_factory

    monkeypatch.setenv("SPARSEPILOT_DATABASE_URL", pg_migrated_url)
    name = use_case_factory(tiny_model_dir, pilot_dataset, tmp_path)()
    _challenger(name)
    pilot_batches.ensure_pilot(name)
    ids = _dataset_ids(name, 10)
    path = _write(tmp_path / "obs.jsonl", _rows(ids))
    real = pilot_batches.ensure_pilot_in

    def then_abort(session: Any, use_case: str, **kw: Any) -> dict[str, Any]:
        info = real(session, use_case, **kw)
        out: dict[str, Any] = {}
        _in_thread(lambda: pilot_batches.abort(name, actor="olga", reason="stop"), out, "abort").join(60)
        assert isinstance(out.get("abort"), tuple), out  # committed: the import held nothing yet
        return info

    monkeypatch.setattr(pilot_batches, "ensure_pilot_in", then_abort)
    with pytest.raises(
        pilots.PilotStateError, match=r"pilot 1 was aborted while the import of .* began; nothing"
    ):
        pilot_batches.import_file(name, path, set(ids))
    counts = _counts(name)
    assert (counts["observations"], counts["pilots"]) == (0, ["stopped"])
    assert "observations.import" not in counts["audit"]


def test_a_pilot_run_aborted_while_it_answers_stores_nothing_and_answers_no_more_batches(
    flow_use_case, monkeypatch
) -> None:  # noqa: ANN001
    """C6 through the flow: `pilot --batches 3` whose arms are answering batch 1 when the operator aborts
    the pilot. The batch used to be stored in the aborted step and reported passed, and batches 2 and 3
    sent to the arms; now the batch is discarded, said so, and no other batch is answered."""
    import flows.pilot as pilot_module
    from rollout import pilot_batches

    name = flow_use_case()
    _challenger(name)
    real = pilot_module.answer_batch
    answered: list[int] = []

    def answer_while_aborted(*args: Any, **kwargs: Any) -> Any:
        rows = real(*args, **kwargs)  # the real arms (the tiny model in this process)
        answered.append(len(rows))
        if len(answered) == 1:  # the operator's abort lands while batch 1 is answered
            pilot_batches.abort(name, actor="olga", reason="the challenger misbehaves")
        return rows

    monkeypatch.setattr(pilot_module, "answer_batch", answer_while_aborted)
    summary = pilot_module.pilot_flow(name, batches=3, batch_size=4)
    assert len(answered) == 1, answered  # batches 2 and 3 were never sent to the arms
    assert summary["stopped"] == "pilot aborted", summary
    assert "pilot 1 was aborted while this batch was answered; nothing was stored" in summary["explanation"]
    assert [(b["passed"], b["stored"]) for b in summary["batches"]] == [(False, False)]
    counts = _counts(name)
    assert (counts["observations"], counts["batches"], counts["pilots"]) == (0, 0, ["stopped"])


@pytest.mark.postgres
def test_an_import_that_starts_its_pilot_keeps_no_audit_writer_waiting(
    trust_env,
    pg_migrated_url: str,
    mlflow_home: Any,
    tiny_model_dir,
    pilot_dataset,
    tmp_path: Path,
    monkeypatch,
) -> None:  # noqa: ANN001
    """C1: the first import (it starts the pilot, with its audit entries) held PostgreSQL's audit lock
    for its whole length: a failed sign-in of another account waited until the import committed. Now the
    other writer is done while the import still runs; the import's entries follow, the chain intact."""
    from rollout import audit, pilot_batches
    from rollout.db.session import session_scope
    from tests.fixtures.flows import use_case_factory

    monkeypatch.setenv("SPARSEPILOT_DATABASE_URL", pg_migrated_url)
    name = use_case_factory(tiny_model_dir, pilot_dataset, tmp_path)()
    _challenger(name)  # no pilot yet: the import starts it
    ids = _dataset_ids(name, 10)
    path = _write(tmp_path / "obs.jsonl", _rows(ids))
    other_done = threading.Event()
    checking = _slow_checks(monkeypatch, until=other_done, hold_s=20.0)
    out: dict[str, Any] = {}
    t = _in_thread(lambda: pilot_batches.import_file(name, path, set(ids)), out, "import")
    assert checking.wait(120)  # the pilot is started in the import's transaction, its rows not yet in

    with session_scope() as s:  # one audit row about nothing of this use case (a failed sign-in's)
        audit.record(s, audit.ANONYMOUS_ACTOR, "auth.sign_in_failed", entity="account", entity_id="bob")
    import_running = t.is_alive()
    other_done.set()
    t.join(120)
    assert import_running  # the other writer did not wait for the import to commit
    assert isinstance(out["import"], dict), out["import"]
    actions = _counts(name)["audit"]
    tail = actions[actions.index("auth.sign_in_failed") :]
    assert tail[:2] == ["auth.sign_in_failed", "pilot.start"] and tail[-1] == "observations.import", tail
    with session_scope() as s:
        assert audit.verify_chain(s).ok


def test_two_first_imports_at_once_share_the_pilot_the_first_started(
    use_case, monkeypatch, tmp_path: Path
) -> None:  # noqa: ANN001
    """Review s46 T3-5: two imports into a use case with no pilot yet both found none and both started
    one; on PostgreSQL the second failed with the database's own IntegrityError (uq_pilots_use_case_number).
    Now the second waits for the first's start and imports into the same pilot."""
    from rollout import pilot_batches

    name = use_case()
    _challenger(name)  # no pilot yet: each import would start it
    ids = _dataset_ids(name, 40)
    a, b = _write(tmp_path / "a.jsonl", _rows(ids[:20])), _write(tmp_path / "b.jsonl", _rows(ids[20:]))
    go = threading.Event()
    checking = _slow_checks(monkeypatch, until=go, hold_s=3.0, then_s=0.5)
    out: dict[str, Any] = {}
    ta = _in_thread(lambda: pilot_batches.import_file(name, a, set(ids)), out, "a")
    assert checking.wait(120)  # the first has started the pilot, its transaction still open
    tb = _in_thread(lambda: pilot_batches.import_file(name, b, set(ids)), out, "b")
    time.sleep(1.0)
    go.set()
    ta.join(180)
    tb.join(180)
    assert all(isinstance(v, dict) for v in out.values()) and len(out) == 2, out
    assert out["a"]["info"]["pilot"] == out["b"]["info"]["pilot"], out
    counts = _counts(name)
    assert counts["pilots"] == ["running"], counts["pilots"]
    assert counts["observations"] == 80
    assert counts["audit"].count("pilot.start") == 1 and counts["audit"].count("observations.import") == 2
