"""Decisions that were decided but are not in effect (rollout.unfinished), on a real state DB, MLflow
registry and Prefect API: a run that dies after MLflow moved, or while MLflow is down, used to leave a use
case stuck (an approved rollback nobody could finish), unmonitored (a promotion MLflow serves while the
state waits for approval), or judged again (a committed rollback the monitor did not know of); and a
person's rollback and the monitor's used to roll back two versions."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from sqlalchemy import func, select

from rollout.audit import MONITOR_ACTOR, SYSTEM_ACTOR
from sparsepilot.commands.pipeline import monitor_said
from tests.flows.test_approvals import (
    ALICE,
    BOB,
    _breach_waits_for_a_person,
    _pilot_with_decision,
    _promote_on_a_go,
    _promoted,
)


class Killed(BaseException):
    """The process dies here (SIGKILL, OOM): only `finally` blocks run."""


def _phase(name: str) -> str:
    from rollout.db.models import UseCase
    from rollout.db.session import session_scope

    with session_scope() as s:
        return s.scalar(select(UseCase.phase).where(UseCase.name == name))


def _champion_moves(name: str) -> int:
    from rollout.db.models import AliasMove
    from rollout.db.session import session_scope

    with session_scope() as s:
        return s.scalar(select(func.count()).select_from(AliasMove).where(AliasMove.alias == "champion"))


def _mlflow_down(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    def down(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        raise ConnectionError("tracking server unreachable")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", down)


def _killed_after(monkeypatch: pytest.MonkeyPatch, function: str) -> None:
    """`rollout.registry.<function>` completes (both stores committed), then the process dies."""
    from rollout import registry

    real = getattr(registry, function)

    def then_die(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        real(*args, **kwargs)
        raise Killed

    monkeypatch.setattr(registry, function, then_die)


def _approval_killed_after_its_promote_move(monkeypatch: pytest.MonkeyPatch, name: str) -> int:
    """A GO awaiting approval, whose approval by alice dies right after MLflow moved `champion`: its
    decision's id."""
    from rollout import approvals
    from rollout.auth import Identity

    did = _pilot_with_decision(name, "GO", "approval")
    with monkeypatch.context() as mp:
        _killed_after(mp, "promote")
        with pytest.raises(Killed):
            approvals.approve(did, Identity(*ALICE), "ship it")
    return did


def _export(tmp_path, name: str, errors: int, n: int = 20) -> str:  # noqa: ANN001
    rows = [
        {
            "request_id": f"{name}{i}",
            "arm": "treatment",
            "quality": 0.9,
            "latency_ms": 500.0,
            "error": i < errors,
        }
        for i in range(n)
    ]
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _alarm(name: str, key: str, *, automatic: bool) -> int:
    """The monitor's NO-GO on the promoted pilot, as `decisions.monitor_look` records it: under `rollback:
    auto` it rolls back itself (awaiting nothing), else the use case waits for a person's approval."""
    from rollout import audit, lifecycle, pilots
    from rollout.db.session import session_scope

    with session_scope() as s:
        uc = pilots.get_use_case(s, name)
        d, _ = pilots.record_decision(
            s,
            idempotency_key=f"monitor:{key}",
            use_case=uc,
            pilot=pilots.promoted_pilot(s, uc),
            kind="monitor",
            outcome="NO-GO",
            evidence={},
            explanation="Monitor: NO-GO. "
            + (
                "The champion is rolled back automatically."
                if automatic
                else "A rollback waits for a person."
            ),
            data_fingerprint=key.ljust(64, "m")[:64],
            awaiting="none" if automatic else "rollback_approval",
            actor=audit.MONITOR_ACTOR,
        )
        if not automatic:
            lifecycle.set_phase(s, uc, "awaiting_approval", actor=audit.MONITOR_ACTOR, reason="alarm")
        return d.id


def test_a_persons_rollback_and_the_monitors_roll_back_one_version(flow_use_case) -> None:
    """The monitor records a breach under `rollback: auto` while a person rolls back by hand: whichever
    carries out second finds the champion it was about gone and moves nothing (it used to roll back the
    version the first had returned to); its decision is closed "superseded", with an audit entry."""
    from rollout import approvals, registry
    from rollout.auth import Identity
    from rollout.db.models import AuditEntry, GateDecision
    from rollout.db.session import session_scope
    from rollout.unfinished import unfinished_of

    name = flow_use_case(rollback="auto")
    champion = _promoted(name)
    monitors = _alarm(name, "race", automatic=True)
    assert unfinished_of(name).decision_id == monitors  # the monitor's own rollback, not yet carried out
    by_hand = approvals.request_rollback(name, Identity(*BOB), "p95 regressed")
    back = registry.current_aliases(name)["champion"]
    assert back != champion and by_hand["effect"]["alias_move"]["from_version"] == champion
    with session_scope() as s:  # the person's rollback closed the monitor's: it can never come back
        assert s.get(GateDecision, monitors).resolution == "superseded"
    before = _champion_moves(name)
    late = approvals.apply_rollback(monitors, None, reason="breach", automatic=True)
    assert late["action"] == "none" and f"asked to roll back champion v{champion}" in late["reason"]
    assert registry.current_aliases(name)["champion"] == back and _champion_moves(name) == before
    with session_scope() as s:
        assert s.get(GateDecision, monitors).resolution == "superseded"
        entries = s.scalars(
            select(AuditEntry.details).where(AuditEntry.action == "rollback.superseded")
        ).all()
        assert entries == [
            {"by": f"rollback {by_hand['decision_id']}"},
            {"by": f"v{back}", "about": champion, "serving": back},
        ]
    assert unfinished_of(name) is None and _phase(name) == "rolled_back"
    # the registry refuses a rollback about a champion that does not serve, whoever asks
    with pytest.raises(registry.RegistryError, match=f"about champion v{champion}, but v{back} serves"):
        registry.rollback(name, actor=Identity(*BOB), reason="x", idempotency_key="x", expected=champion)


def test_an_approved_rollback_whose_move_failed_is_listed_and_finished(
    flow_use_case, tmp_path, monkeypatch
) -> None:
    """`rollback: manual`: a person approves the monitor's rollback while MLflow is down. The decision
    was resolved, the champion that breached kept serving, and `approve`, `rollback` and `promote` all
    refused: nothing could finish it. Now the approvals page lists it with the command, `approve` names
    that command, and the use case's next scheduled cycle finishes it."""
    from flows.cycle import cycle_flow
    from rollout import approvals, queries, registry
    from rollout.auth import Identity
    from tests.dashboard.apptest_helpers import new_app, open_page

    name = flow_use_case(rollback="manual")
    champion = _promoted(name)
    mon = _breach_waits_for_a_person(name, tmp_path, champion)
    with monkeypatch.context() as mp:
        _mlflow_down(mp)
        with pytest.raises(registry.RegistryError, match="unreachable"):
            approvals.approve(mon["decision_id"], Identity(*BOB), "error rate too high")
    assert registry.current_aliases(name)["champion"] == champion and _phase(name) == "awaiting_approval"
    [row] = queries.read(queries.approved_not_applied)
    assert (row["id"], row["action"], row["failed_move"], row["automatic"]) == (
        mon["decision_id"],
        "rollback",
        True,
        False,
    )
    at = open_page(new_app(), "approvals")
    shown = " ".join(w.value for w in at.warning)
    assert "was approved by bob, but the rollback did not complete \\(its alias move failed" in shown
    assert f"sparsepilot rollback {name} --reason" in shown
    with pytest.raises(approvals.ApprovalError, match="already approved by bob; if it did not take effect"):
        approvals.approve(mon["decision_id"], Identity(*ALICE), "again")
    out = cycle_flow(name)
    assert out["finished"]["finished"]["decision_id"] == mon["decision_id"]
    assert registry.current_aliases(name)["champion"] != champion and _phase(name) == "rolled_back"
    assert registry.alias_history(name)[-1]["actor"] == "bob"  # the approver's rollback, carried out
    assert queries.read(queries.approved_not_applied) == []
    assert [a for a, act, _ in _audit_rows() if act == "approval.finished"] == [SYSTEM_ACTOR]


@pytest.mark.parametrize("cut", ["killed after the move", "MLflow down"])
def test_the_monitor_finishes_its_own_rollback_before_it_looks_again(
    flow_use_case, tmp_path, monkeypatch, cut: str
) -> None:
    """`rollback: auto`: the monitor's rollback either committed in both stores and the run died before
    the use case was marked rolled back, or failed on MLflow. The next monitor run used to judge another
    batch of a model MLflow no longer served (and then ask a person to roll back a rollback), or left
    the breached champion serving while its decision said "rolled back automatically". Now it finishes
    that rollback first, with one alias move, and takes no look. Given a file (the MLflow-down case), it
    then says the file was not imported (an error: its rows were served before the rollback), where it
    exited 0 with "finished" and the file's rows were lost without a word; the scheduled monitor (no file)
    says "finished"."""
    from flows.monitor import monitor_flow
    from rollout import registry
    from rollout.db.models import GateDecision
    from rollout.db.session import session_scope

    name = flow_use_case(rollback="auto")
    champion = _promoted(name)
    with monkeypatch.context() as mp:
        if cut == "MLflow down":
            _mlflow_down(mp)
        else:
            _killed_after(mp, "rollback")
        with pytest.raises((Killed, registry.RegistryError)):
            monitor_flow(name, observations_file=_export(tmp_path, "breach", errors=8))
    assert _phase(name) == "promoted"
    with session_scope() as s:
        decided = s.scalars(select(GateDecision.id).where(GateDecision.kind == "monitor")).all()
    moves = _champion_moves(name)
    if cut == "MLflow down":
        from rollout.pilots import PilotStateError

        healthy = _export(tmp_path, "healthy", errors=0)
        with pytest.raises(PilotStateError) as refused:
            monitor_flow(name, observations_file=healthy)
        assert str(refused.value).startswith(
            f"{name}: the monitor first carried out decision {decided[-1]} (rollback), decided earlier but "
            f"not yet in effect; {healthy} was not imported"
        ), refused.value
        assert registry.current_aliases(name)["champion"] != champion and _phase(name) == "rolled_back"
    else:
        again = monitor_flow(name)
        assert again["status"] == "finished" and again["finished"]["decision_id"] == decided[-1]
        assert registry.current_aliases(name)["champion"] != champion and _phase(name) == "rolled_back"
        restored = registry.current_aliases(name)["champion"]
        assert monitor_said(name, again) == (  # `sparsepilot monitor` printed this dict raw
            f"{name}: carried out decision {decided[-1]} (rollback), decided earlier; "
            f"champion {champion} -> {restored} (committed)"
        )
    assert _champion_moves(name) == moves  # one move: a failed one is retried under its own key
    # the monitor finished it, and says so (it was recorded as `sparsepilot-pipeline`, the cycle's name)
    assert [(a, d["decision"]) for a, act, d in _audit_rows() if act == "approval.finished"] == [
        (MONITOR_ACTOR, decided[-1])
    ]
    with session_scope() as s:
        assert s.scalars(select(GateDecision.id).where(GateDecision.kind == "monitor")).all() == decided
        assert s.get(GateDecision, decided[-1]).resolution == "auto_rolled_back"
    # a later pilot's GO waiting for its approval has nothing to do with that rollback, though the last
    # champion move is still it: nothing is unfinished, and nothing touches the use case's phase
    from rollout import lifecycle, pilots
    from rollout.unfinished import unfinished_of

    waiting = _pilot_with_decision(name, "GO", "approval")
    with session_scope() as s:
        uc = pilots.get_use_case(s, name)
        lifecycle.set_phase(s, uc, "awaiting_approval", actor="test", reason=f"decision {waiting}")
    assert unfinished_of(name) is None


def test_a_promotion_cut_off_after_mlflow_moved_is_listed_and_finished(flow_use_case, monkeypatch) -> None:
    """The approval's run dies after MLflow moved `champion`, before the use case was marked promoted:
    MLflow served the challenger, the state waited for approval, the monitor never watched it, and no
    page said so. Now it is listed once it has stalled, and finishing it promotes the use case."""
    from flows.promote import finish_unfinished
    from rollout import queries, registry
    from rollout.db.session import session_scope
    from rollout.unfinished import STALLED_AFTER, stalled

    name = flow_use_case()
    did = _approval_killed_after_its_promote_move(monkeypatch, name)
    champion = registry.current_aliases(name)["champion"]
    assert _phase(name) == "piloting"  # MLflow serves the challenger; the state never heard of it
    assert queries.read(queries.approved_not_applied) == []  # decided a moment ago: perhaps still running
    later = dt.datetime.now(dt.UTC) + STALLED_AFTER
    with session_scope() as s:
        [u] = stalled(s, now=later)
    assert (u.decision_id, u.action, u.failed_move, u.command()) == (
        did,
        "promote",
        False,
        f"sparsepilot promote {name} --decision {did} --reason ...",
    )
    moves = _champion_moves(name)
    assert finish_unfinished(name) is None  # signed a moment ago: perhaps still being applied directly
    from rollout import unfinished

    monkeypatch.setattr(unfinished, "APPLY_GRACE", dt.timedelta(0))  # the approver died: a later tick
    assert finish_unfinished(name)["finished"]["decision_id"] == did
    assert _phase(name) == "promoted" and registry.current_aliases(name)["champion"] == champion
    assert _champion_moves(name) == moves and finish_unfinished(name) is None
    # a new calibration while it is promoted moves the phase on; the promotion, done, is not unfinished
    from rollout import lifecycle, pilots
    from rollout.unfinished import unfinished_of

    with session_scope() as s:
        lifecycle.set_phase(s, pilots.get_use_case(s, name), "calibrated", actor="test", reason="new spec")
    assert unfinished_of(name) is None


def test_a_breach_rolls_back_even_when_mlflow_logging_fails_and_the_look_is_logged_later(
    flow_use_case, tmp_path, monkeypatch
) -> None:
    """`rollback: auto`: the monitor logged its look to MLflow before it rolled back, so a tracking
    server that failed the log kept the breached champion serving until another look breached again,
    and the look was never logged. Now the fail-safe comes first, and the next monitor run logs the look
    it missed (one run per look)."""
    import flows.monitor as monitor_mod
    from flows.monitor import monitor_flow
    from rollout import registry, run_links
    from tests.flows.test_retry_idempotency import _mlflow_runs, _tracking_down

    name = flow_use_case(rollback="auto")
    champion = _promoted(name)
    with monkeypatch.context() as mp:
        mp.setattr(monitor_mod, "log_run", _tracking_down)
        with pytest.raises(ConnectionError):
            monitor_flow(name, observations_file=_export(tmp_path, "breach", errors=8))
    assert registry.current_aliases(name)["champion"] != champion and _phase(name) == "rolled_back"
    [missed] = run_links.unlogged_monitor_decisions(name)
    assert _mlflow_runs(name, "monitor") == []
    assert monitor_flow(name)["status"] == "skipped"  # nothing promoted now; the missed look is logged
    assert [r.data.params["decision_id"] for r in _mlflow_runs(name, "monitor")] == [
        str(missed["decision_id"])
    ]
    assert run_links.unlogged_monitor_decisions(name) == []


def test_an_old_automatic_rollback_never_rolls_back_a_later_promotion_of_the_same_version(
    flow_use_case, monkeypatch
) -> None:
    """The monitor's automatic rollback failed and a person rolled back by hand. The monitor's decision
    stayed open; when a later pilot promoted the same model version again, it was taken for unfinished
    and rolled the new champion back on the earlier pilot's evidence. Now the person's rollback closes
    it, and a monitor decision counts only for the pilot it judged."""
    from rollout import approvals, registry
    from rollout.auth import Identity
    from rollout.db.models import GateDecision
    from rollout.db.session import session_scope
    from rollout.unfinished import unfinished_of

    name = flow_use_case(rollback="auto")
    champion = _promoted(name)
    first_alarm = _alarm(name, "first", automatic=True)
    with monkeypatch.context() as mp:
        _mlflow_down(mp)
        with pytest.raises(registry.RegistryError):
            approvals.apply_rollback(first_alarm, None, reason="breach", automatic=True)
    approvals.request_rollback(name, Identity(*BOB), "breach; the automatic rollback failed")
    with session_scope() as s:
        assert s.get(GateDecision, first_alarm).resolution == "superseded"
    again = _pilot_with_decision(name, "GO", "approval", key="second")
    approvals.approve(again, Identity(*ALICE), "the second pilot passed")
    assert registry.current_aliases(name)["champion"] == champion and _phase(name) == "promoted"
    assert unfinished_of(name) is None  # the earlier alarm is not this promotion's


@pytest.mark.parametrize("effect", ["keep", "reject"])
def test_a_keep_or_rejection_whose_approver_died_after_signing_is_finished(
    flow_use_case, monkeypatch, effect: str
) -> None:
    """The signature commits before the paused run is resumed; an approver whose process died in between
    (Ctrl-C on a stalled Prefect API) left a kept champion unmonitored, or a rejected pilot waiting, for
    good: nothing listed it and every command refused. Now it is unfinished, and the cycle finishes it."""
    import uuid

    from flows.promote import finish_unfinished
    from rollout import approvals, unfinished
    from rollout.approvals import signing
    from rollout.auth import Identity
    from rollout.db.models import GateDecision
    from rollout.db.session import session_scope
    from rollout.unfinished import unfinished_of

    name = flow_use_case(rollback="manual")
    if effect == "keep":
        _promoted(name)
        decided = _alarm(name, "alarm", automatic=False)  # waits for a person (monitor_look)
    else:
        decided = _pilot_with_decision(name, "GO", "approval", key="rejected")
    with session_scope() as s:
        s.get(GateDecision, decided).flow_run_id = str(uuid.uuid4())  # its paused approval run
    monkeypatch.setattr(signing, "_flow_run_state_safe", lambda _run: (True, "Paused"))  # as `approve` asks
    # against the recommendation (the monitor's rollback, the gate's GO): two approvers
    assert approvals.approve(decided, Identity(*ALICE), "not now", reject=True).needs_second_approver

    def stalled(*_args) -> None:  # noqa: ANN002
        raise KeyboardInterrupt  # the approver gives up on a Prefect API that does not answer

    with monkeypatch.context() as mp:
        mp.setattr(signing, "_resume", stalled)
        with pytest.raises(KeyboardInterrupt):
            approvals.approve(decided, Identity(*BOB), "agreed", reject=True)
    u = unfinished_of(name)
    assert (u.decision_id, u.action, u.command()) == (
        decided,
        effect,
        f"sparsepilot approve {name} --decision {decided} --reject --reason ...",
    )
    assert finish_unfinished(name) is None  # resumed a moment ago (to all it can tell): left to the run
    monkeypatch.setattr(unfinished, "APPLY_GRACE", dt.timedelta(0))  # the grace has passed
    finish_unfinished(name)  # the run never took it up: the cycle claims it and finishes it
    assert _phase(name) == ("promoted" if effect == "keep" else "stopped")
    assert unfinished_of(name) is None
    if effect == "keep":  # a later alarm waits for a person: the kept one is done with, not kept again
        _alarm(name, "later", automatic=False)
        assert unfinished_of(name) is None and _phase(name) == "awaiting_approval"


def test_the_monitor_still_judges_while_mlflow_is_down(flow_use_case, tmp_path, monkeypatch) -> None:
    """MLflow down: the catch-up of an earlier look's log ran before each look and failed first, so no
    look was taken for the whole outage (a breach under `rollback: manual` told nobody). The catch-up is
    now best effort: the look is recorded, the person is asked, and only its own log fails."""
    import flows.monitor as monitor_mod
    from flows.monitor import monitor_flow
    from rollout import tracking
    from rollout.db.models import GateDecision
    from rollout.db.session import session_scope
    from tests.flows.test_retry_idempotency import _tracking_down

    name = flow_use_case(rollback="manual")
    _promoted(name)
    with monkeypatch.context() as mp:
        mp.setattr(monitor_mod, "log_run", _tracking_down)
        mp.setattr(tracking, "find_run", _tracking_down)
        for look, errors in (("healthy", 0), ("breach", 8)):
            with pytest.raises(ConnectionError):
                monitor_flow(name, observations_file=_export(tmp_path, look, errors=errors))
    with session_scope() as s:
        outcomes = s.scalars(select(GateDecision.outcome).where(GateDecision.kind == "monitor")).all()
    assert outcomes == ["GO", "NO-GO"] and _phase(name) == "awaiting_approval"


def _cli_as(who: str, *args: str, monkeypatch: pytest.MonkeyPatch, accounts: str):  # noqa: ANN202
    """`sparsepilot ARGS --password-stdin` in this process (typer's runner), signed in as `who`."""
    from typer.testing import CliRunner

    from sparsepilot.cli import app
    from tests.fixtures.trust import password_of

    monkeypatch.setenv("SPARSEPILOT_ACCOUNTS", accounts)
    monkeypatch.setenv("SPARSEPILOT_USER", who)
    return CliRunner().invoke(app, [*args, "--password-stdin"], input=password_of(who) + "\n")


def _audit_rows(after: int = 0) -> list[tuple[str, str, dict]]:
    from rollout.db.models import AuditEntry
    from rollout.db.session import session_scope

    with session_scope() as s:
        rows = s.execute(
            select(AuditEntry.actor, AuditEntry.action, AuditEntry.details)
            .where(AuditEntry.id > after)
            .order_by(AuditEntry.id)
        ).all()
    return [(a, act, d or {}) for a, act, d in rows]


def test_a_promotion_finished_by_another_approver_names_them_and_keeps_the_signers_words(
    flow_use_case, trust_accounts, monkeypatch
) -> None:
    """alice's approval dies after MLflow moved; bob finishes it with `promote NAME --decision N`. The rows
    it wrote said alice did it and that alice wrote bob's reason ("finish it"), bob appeared nowhere, the
    hint said a literal `NAME`, and `promote` printed a Python dict. Now the moves stay alice's with her
    words, `approval.finished` is bob's with his, the hint names the use case, and the line is a sentence."""
    from rollout import approvals, registry
    from rollout.auth import Identity

    name = flow_use_case()
    did = _approval_killed_after_its_promote_move(monkeypatch, name)
    with pytest.raises(approvals.ApprovalError) as refused:
        approvals.approve(did, Identity(*BOB), "again")
    assert f"`sparsepilot promote {name} --decision {did}` finishes it" in str(refused.value)
    signature = approvals.unfinished_promotion(did)
    seen = len(_audit_rows())
    [move] = [m for m in registry.alias_history(name) if m["idempotency_key"] == f"promote:{did}"]
    res = _cli_as(
        "bob", "promote", name, "--decision", str(did), "--reason", "finish it",
        monkeypatch=monkeypatch, accounts=trust_accounts,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert _phase(name) == "promoted"
    rows = _audit_rows()[seen:]
    assert [r for r in rows if "finish it" in json.dumps(r[2])] == [
        (
            "bob",
            "approval.finished",
            {
                "decision": did,
                "action": "promote",
                "approval_id": signature,
                "signed_by": "alice",
                "reason": "finish it",
            },
        )
    ]
    assert ("alice", "pilot.status") in [(a, act) for a, act, _ in rows]
    assert [d["reason"] for a, act, d in rows if act == "pilot.status"] == ["ship it"]
    # the first promotion: no champion of ours served before (no dense baseline registered)
    assert res.output.strip().endswith(
        f"{name}: finished decision {did}: champion none -> v{move['to_version']} (committed)"
    )


@pytest.mark.parametrize("effect", ["keep", "reject"])
def test_a_rejection_whose_approver_died_is_finished_by_approving_the_rejection_again(
    flow_use_case, trust_accounts, monkeypatch, effect: str
) -> None:
    """bob's second signature of a rejection commits, then his process dies before the paused run is
    resumed. His `approve --reject` again said only "decision N was already rejected by bob": nothing named
    a way to finish it (only a scheduled cycle did). Now the refusal names the command, and `approve
    --reject` by an approver finishes it, recorded as theirs (`approval.finished`), safe to repeat; within
    the grace after bob's signature it is left to his process, as `promote --decision` is (review s50 A2)."""
    import uuid

    from rollout import approvals, unfinished
    from rollout.approvals import signing
    from rollout.auth import Identity
    from rollout.db.models import GateDecision
    from rollout.db.session import session_scope
    from rollout.unfinished import unfinished_of

    name = flow_use_case(rollback="manual")
    if effect == "keep":
        _promoted(name)
        decided = _alarm(name, "alarm", automatic=False)
    else:
        decided = _pilot_with_decision(name, "GO", "approval", key="rejected")
    with session_scope() as s:
        s.get(GateDecision, decided).flow_run_id = str(uuid.uuid4())
    monkeypatch.setattr(signing, "_flow_run_state_safe", lambda _run: (True, "Paused"))
    approvals.approve(decided, Identity(*ALICE), "not now", reject=True)

    def died(*_args) -> None:  # noqa: ANN002
        raise Killed

    with monkeypatch.context() as mp:
        mp.setattr(signing, "_resume", died)
        with pytest.raises(Killed):
            approvals.approve(decided, Identity(*BOB), "agreed", reject=True)
    command = f"sparsepilot approve {name} --decision {decided} --reject --reason ..."
    with pytest.raises(
        approvals.ApprovalError, match=f"already rejected by bob; it did not take effect: `{command}`"
    ):
        approvals.approve(decided, Identity(*ALICE), "promote after all")
    args = ("approve", name, "--decision", str(decided), "--reject", "--reason", "finish it")
    res = _cli_as("carol", *args, monkeypatch=monkeypatch, accounts=trust_accounts)
    assert res.exit_code == 2 and "bob's rejection" in res.output and "signed a moment ago" in res.output
    monkeypatch.setattr(unfinished, "APPLY_GRACE", dt.timedelta(0))  # bob's process died: two minutes on
    seen = len(_audit_rows())
    res = _cli_as("carol", *args, monkeypatch=monkeypatch, accounts=trust_accounts)
    assert res.exit_code == 0, res.output
    assert f"{name}: finished decision {decided} (rejected earlier)" in res.output
    assert _phase(name) == ("promoted" if effect == "keep" else "stopped") and unfinished_of(name) is None
    rows = _audit_rows()[seen:]
    assert ("carol", "approval.finished") in [(a, act) for a, act, _ in rows]
    assert [a for a, _, d in rows if "finish it" in json.dumps(d)] == ["carol"]
    again = _cli_as("carol", *args, monkeypatch=monkeypatch, accounts=trust_accounts)
    assert again.exit_code == 2 and "already rejected by bob" in again.output  # done: nothing to finish


@pytest.mark.parametrize("monitor", ["gone", "live"])
def test_a_persons_rollback_after_the_monitors_died_mid_move(
    flow_use_case, trust_accounts, monkeypatch, monitor: str
) -> None:
    """`rollback: auto`: the monitor's rollback dies after its move began (pending). A person's `rollback`
    was told the rollback "is under way ... Look again in a moment: the use case is then rolled back",
    false with the monitor dead. Now a monitor whose lease holder is gone is cut off at once and the
    person's rollback finishes it (under its own key, recorded as theirs); a live holder's refusal says
    by when the person's `rollback` finishes it."""
    import subprocess

    from rollout import approvals, leases, registry
    from rollout.auth import Identity
    from rollout.db.models import UseCaseLease
    from rollout.db.session import session_scope

    name = flow_use_case(rollback="auto")
    champion = _promoted(name)
    alarm = _alarm(name, "cut", automatic=True)
    real = registry._apply_mlflow

    def moved_then_died(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        real(*args, **kwargs)
        raise Killed

    with monkeypatch.context() as mp:
        mp.setattr(registry, "_apply_mlflow", moved_then_died)
        with pytest.raises(Killed):
            approvals.apply_rollback(alarm, None, reason="breach", automatic=True)
    leases.acquire(name, "the-monitor", "monitor, pid 1 on elsewhere")  # the dead monitor's lease
    if monitor == "gone":
        dead = subprocess.Popen(["true"])
        dead.wait()
        with session_scope() as s:
            s.scalars(select(UseCaseLease)).one().pid = dead.pid
        res = _cli_as(
            "bob",
            "rollback",
            name,
            "--reason",
            "p95 regressed",
            monkeypatch=monkeypatch,
            accounts=trust_accounts,
        )
        assert res.exit_code == 0, res.output
        back = registry.current_aliases(name)["champion"]
        assert f"{name}: champion {champion} -> {back} (committed)" in res.output
        assert _phase(name) == "rolled_back" and back != champion
        assert [(a, d["decision"]) for a, act, d in _audit_rows() if act == "approval.finished"] == [
            ("bob", alarm)
        ]
    else:
        with pytest.raises(
            registry.MoveInProgress,
            match=rf"if it is not by \d\d:\d\d UTC, `sparsepilot rollback {name}` finishes it",
        ):
            approvals.request_rollback(name, Identity(*BOB), "p95 regressed")
        assert _phase(name) == "promoted"


def test_promote_on_a_promotion_signed_a_moment_ago_waits_for_its_signer(flow_use_case, monkeypatch) -> None:
    """alice's approval commits and her process is still to move the aliases. `promote NAME --decision N`
    finished it at once, beside her (two moves' "retried" / "committed" in the audit); `rollback` waits two
    minutes after another approver's signature. Now `promote` does too, and finishes it after that."""
    import re

    from rollout import approvals, registry, unfinished
    from rollout.auth import Identity

    name = flow_use_case()
    did = _pilot_with_decision(name, "GO", "approval")
    real = registry.promote

    def died(*_args, **_kwargs) -> None:  # noqa: ANN002, ANN003
        raise Killed  # before the move: nothing moved, nothing failed

    registry.promote = died
    try:
        with pytest.raises(Killed):
            approvals.approve(did, Identity(*ALICE), "ship it")
    finally:
        registry.promote = real
    with pytest.raises(registry.MoveInProgress) as busy:
        approvals.unfinished_promotion(did)
    said = str(busy.value)
    assert f"alice's promotion (decision {did}) was signed a moment ago and is being carried out" in said
    assert re.search(rf"if it is not by \d\d:\d\d UTC, `sparsepilot promote {name} --decision {did}`", said)
    monkeypatch.setattr(unfinished, "APPLY_GRACE", dt.timedelta(0))  # her process died: two minutes on,
    assert approvals.unfinished_promotion(did) is not None  # `promote` finishes it (its CLI: above)


def test_promote_again_says_where_the_promotion_stands(flow_use_case, trust_accounts, monkeypatch) -> None:
    """`promote NAME --decision N` on a promotion that took effect, or that a rollback has since undone,
    answered "already approved by alice; if it did not take effect, `sparsepilot promote NAME --decision
    N` finishes it": the command just run, and no word on which it was (review s47 C1). Now a retried
    promote says it is in effect (exit 0) and one since superseded says by what (exit 2)."""
    from rollout import approvals, registry
    from rollout.auth import Identity

    name = flow_use_case()
    did = _promote_on_a_go(name)
    champion = registry.current_aliases(name)["champion"]
    args = ("promote", name, "--decision", str(did), "--reason", "again")
    res = _cli_as("bob", *args, monkeypatch=monkeypatch, accounts=trust_accounts)
    assert res.exit_code == 0, res.output
    assert f"{name}: decision {did} was approved by alice; it took effect: champion v{champion} since " in (
        res.output
    )
    assert "finishes it" not in res.output
    back = approvals.request_rollback(name, Identity(*BOB), "p95 regressed")["decision_id"]
    with pytest.raises(approvals.ApprovalError) as refused:
        approvals.approve(did, Identity(*BOB), "again")
    said = str(refused.value)
    assert f"then was superseded by rollback decision {back}: champion v" in said
    assert "finishes it" not in said
    with pytest.raises(approvals.ApprovalError, match=f"superseded by rollback decision {back}.*calibrate"):
        approvals.promotion_in_effect(did)
    with pytest.raises(approvals.ApprovalError, match="nothing to roll back|no champion of ours"):
        approvals.request_rollback(name, Identity(*ALICE), "again")


def test_promote_after_the_grace_leaves_a_promotion_to_the_approval_run_carrying_it_out(
    flow_use_case, monkeypatch
) -> None:  # noqa: ANN001
    """alice's approval resumed the decision's approval run, which took it up and is in its MLflow call
    (slow: past the grace). `promote NAME --decision N` after the grace finished it beside the run: the
    move "retried" (MLflow called twice) and an `approval.finished` entry said bob finished what the run
    was doing, though he only raced it. Now, while the run that took the decision up is alive (its process
    here, or another host's) and has not stalled, the command says it is being carried out by that run."""
    import threading

    from flows.approval import join_waiting, start_waiting
    from rollout import approvals, registry, unfinished
    from rollout.auth import Identity

    name = flow_use_case()
    did = _pilot_with_decision(name, "GO", "approval")
    inside, raced, apply = threading.Event(), threading.Event(), registry._apply_mlflow

    def slow_for_the_run(*args: object) -> None:
        if not inside.is_set():  # the run's call: it waits until bob has tried
            inside.set()
            raced.wait(30)
        apply(*args)

    monkeypatch.setattr(registry, "_apply_mlflow", slow_for_the_run)
    run = start_waiting(did, poll_interval_s=1)
    signed = approvals.approve(did, Identity(*ALICE), "ship it")
    assert signed.resumed_flow_run_id == run, signed
    assert inside.wait(60)
    monkeypatch.setattr(unfinished, "APPLY_GRACE", dt.timedelta(0))  # the grace has passed
    try:
        with pytest.raises(registry.MoveInProgress) as busy:
            approvals.unfinished_promotion(did)
    finally:
        raced.set()
    said = str(busy.value)
    assert f"alice's promotion (decision {did}) is being carried out by its approval run {run}" in said
    assert f"`sparsepilot promote {name} --decision {did}` finishes it" in said
    assert join_waiting(did)["action"] == "promoted"
    assert _phase(name) == "promoted"
    acts = [a for _, a, _ in _audit_rows()]
    assert acts.count("alias.promote.committed") == 1
    assert "alias.promote.retried" not in acts and "approval.finished" not in acts


@pytest.mark.parametrize("effect", ["promotion", "rollback"])
def test_finishing_an_effect_already_in_effect_records_no_finisher(flow_use_case, effect: str) -> None:
    """bob's `promote --decision` (or `rollback`) saw alice's effect unfinished, then her own run completed
    it before his finishing ran (after his claim): everything he ran found done. His finishing recorded
    `approval.finished` all the same, saying he finished what nobody left undone. Now it records only what
    happened: nothing changed (`done`: False), no entry."""
    from rollout import approvals
    from rollout.approvals.waiter import claim_for_finisher
    from rollout.auth import Identity
    from rollout.db.models import Approval
    from rollout.db.session import session_scope

    name = flow_use_case()
    did = _promote_on_a_go(name)
    if effect == "rollback":
        did = approvals.request_rollback(name, Identity(*ALICE), "p95 regressed")["decision_id"]
    with session_scope(immediate=True) as s:
        signed = s.scalar(select(Approval.id).where(Approval.decision_id == did))
        claim_for_finisher(s, approvals.lock_decision(s, did), None, "bob")  # his check found it unfinished
    before = len(_audit_rows())
    finish = approvals.apply_promotion if effect == "promotion" else approvals.apply_rollback
    again = finish(did, signed, reason="finishing", finished_by="bob")
    assert [act for _, act, _ in _audit_rows()[before:]] == []
    assert again["done"] is False, again
