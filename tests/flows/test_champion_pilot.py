"""Which pilot is the champion's (`rollout.pilots.promoted_pilot`: what the monitor samples, a rollback
ends, the use-case page's monitor line reads) once a use case has promoted more than one challenger. Every
promoted pilot used to stay "promoted" for good: promote pilot 1, then pilot 2 over it, then pilot 3 of
pilot 1's plan (the same model version, a rollback's pop in the champions' lineage), roll pilot 3 back,
and the dense baseline served while pilot 2 was still "the promoted pilot", its model named as the
monitored champion. Real state DB and MLflow registry."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from tests.flows.test_approvals import _pilot_with_decision
from tests.flows.test_state_races import ALICE, BOB, _identity, _promoted


@pytest.fixture
def use_case(trust_db: str, mlflow_home: Any, tiny_model_dir, pilot_dataset, tmp_path):  # noqa: ANN001, ANN201
    from tests.fixtures.flows import use_case_factory

    return use_case_factory(tiny_model_dir, pilot_dataset, tmp_path)


def _pilots(name: str) -> tuple[list[tuple[int, str, str]], list[str], int | None, Any]:
    """(pilot number, status, MLflow version) of each pilot, the champions in force, the promoted
    pilot's number and the use-case page's monitor line."""
    from rollout import pilots, queries, registry
    from rollout.db.models import ModelVersion, Pilot
    from rollout.db.session import session_scope

    with session_scope() as s:
        uc = pilots.get_use_case(s, name)
        rows = [
            (p.pilot_number, p.status, s.get(ModelVersion, p.model_version_id).mlflow_version)
            for p in s.scalars(select(Pilot).order_by(Pilot.id))
        ]
        promoted = pilots.promoted_pilot(s, uc)
        return (
            rows,
            registry.champions(s, uc.id),
            promoted and promoted.pilot_number,
            queries.monitor_state(s, uc.id),
        )


@pytest.mark.parametrize("trust_db", ["sqlite"], indirect=True)
def test_a_pilot_whose_champion_a_later_promotion_replaced_is_no_longer_the_promoted_one(use_case) -> None:
    from rollout import approvals, pilot_batches

    name = use_case(rollback="manual")
    _promoted(name)  # the dense baseline v1, then pilot 1's challenger v2
    second = _pilot_with_decision(name, "GO", "approval", key="second", tau=0.8)
    assert approvals.approve(second, _identity(ALICE), "pilot 2 passed").took_effect
    rows, champions, promoted, _ = _pilots(name)
    # pilot 1's champion is the one a rollback returns to: it stays promoted, under pilot 2
    assert (rows, champions, promoted) == ([(1, "promoted", "2"), (2, "promoted", "3")], ["1", "2", "3"], 2)

    third = _pilot_with_decision(name, "GO", "approval", key="third", tau=0.9)  # pilot 1's plan again
    assert approvals.approve(third, _identity(ALICE), "pilot 3 passed").took_effect
    rows, champions, promoted, _ = _pilots(name)
    assert champions == ["1", "2"]  # v3 left the champions in force; v2 serves as pilot 3's
    assert (rows, promoted) == ([(1, "replaced", "2"), (2, "replaced", "3"), (3, "promoted", "2")], 3)

    approvals.request_rollback(name, _identity(BOB), "p95 regressed")
    rows, champions, promoted, monitor = _pilots(name)
    assert champions == ["1"]  # the dense baseline serves: no pilot's champion does
    assert [r[1] for r in rows] == ["replaced", "replaced", "rolled_back"]
    assert (promoted, monitor, pilot_batches.monitor_target(name)) == (None, None, None)


def test_a_promotion_replaces_the_pilots_no_rollback_returns_to() -> None:
    """The pure rule: an earlier promoted pilot stays promoted only while its version is a champion under
    the new top (where rollbacks return to); the top's own version, or one out of the lineage, is replaced."""
    from rollout.pilots import replaced_by_promotion

    assert replaced_by_promotion(["1", "2", "3"], [(1, "2")]) == []
    assert replaced_by_promotion(["1", "2"], [(1, "2"), (2, "3")]) == [1, 2]
    assert replaced_by_promotion(["1", "2", "4"], [(1, "2"), (3, None)]) == [3]


def _running_pilot(name: str, tau: float) -> int:
    """Another challenger registered and its pilot started (the use case piloting); its pilot's id."""
    from rollout import pilots, registry
    from rollout.db.models import ModelVersion
    from rollout.db.session import session_scope
    from sparse_core import SparsePlan

    with session_scope() as s:
        model = pilots.load_current_spec(s, pilots.get_use_case(s, name))[0].model
    mv = registry.register_version(
        name, SparsePlan(tau=tau), model, actor=registry.SYSTEM_PIPELINE, density=0.5
    )
    registry.set_alias(
        name,
        "challenger",
        model_version_id=mv.id,
        actor=registry.SYSTEM_PIPELINE,
        reason="test",
        idempotency_key=f"c-{tau}",
    )
    with session_scope() as s:
        uc = pilots.get_use_case(s, name)
        spec, _ = pilots.load_current_spec(s, uc)
        return pilots.start_pilot(s, uc, s.get(ModelVersion, mv.id), spec, actor="test").id


def _phase(name: str) -> str:
    from rollout.usecases import phase_of

    return phase_of(name)


@pytest.mark.parametrize("trust_db", ["sqlite"], indirect=True)
def test_the_champion_stays_monitored_and_roll_back_able_while_another_challenger_pilots(use_case) -> None:
    """Finding 1 (fix-p): while a second challenger piloted, the phase `piloting` refused the monitor and a
    person's rollback, so the sparse champion serving production went unwatched for the whole pilot. Its
    rollback leaves the pilot running, the use case piloting: the pilot's control arm is dense, not the
    champion."""
    from rollout import approvals, pilot_batches

    name = use_case(rollback="manual")
    first = _promoted(name)  # the dense baseline v1, then pilot 1's challenger v2
    _running_pilot(name, tau=0.8)
    assert _phase(name) == "piloting"
    target = pilot_batches.monitor_target(name)
    assert target is not None and target["pilot_id"] == first["pilot_id"]

    approvals.request_rollback(name, _identity(BOB), "p95 regressed")
    rows, champions, promoted, _ = _pilots(name)
    assert champions == ["1"]
    assert ([r[1] for r in rows], promoted, _phase(name)) == (["rolled_back", "running"], None, "piloting")
    assert pilot_batches.monitor_target(name) is None


@pytest.mark.parametrize("trust_db", ["sqlite"], indirect=True)
def test_the_champion_a_rollback_returned_to_is_monitored_and_roll_back_able(use_case) -> None:
    """Finding 2 (fix-p): once pilot 2's champion was rolled back, pilot 1's (v2) served again, but the
    phase `rolled_back` allowed nothing: the monitor had no target and `rollback` said "there is no
    champion of ours to roll back"."""
    from rollout import approvals, pilot_batches

    name = use_case(rollback="manual")
    first = _promoted(name)
    second = _pilot_with_decision(name, "GO", "approval", key="second", tau=0.8)
    assert approvals.approve(second, _identity(ALICE), "pilot 2 passed").took_effect
    approvals.request_rollback(name, _identity(BOB), "p95 regressed")
    rows, champions, promoted, _ = _pilots(name)
    assert (champions, promoted, _phase(name)) == (["1", "2"], 1, "rolled_back")
    target = pilot_batches.monitor_target(name)
    assert target is not None and target["pilot_id"] == first["pilot_id"]

    approvals.request_rollback(name, _identity(BOB), "v2 regressed too")
    rows, champions, promoted, _ = _pilots(name)
    assert (champions, [r[1] for r in rows], promoted) == (["1"], ["rolled_back", "rolled_back"], None)
    assert pilot_batches.monitor_target(name) is None


def test_an_alarm_while_another_challenger_pilots_leaves_the_pilot_alone(flow_use_case, tmp_path) -> None:  # noqa: ANN001
    """The monitor's alarm (`rollback: manual`) about the champion while a second challenger pilots waits on
    its decision alone: the use case stays piloting (an "awaiting_approval" phase would have stopped the
    pilot's batches, and keeping the champion set it "promoted" under a running pilot), the monitor
    pauses until a person decides, and the approved rollback leaves the pilot running."""

    from flows.monitor import monitor_flow
    from rollout import approvals, pilot_batches, registry
    from tests.flows.test_approvals import _promoted as _go_promoted
    from tests.flows.test_approvals import breach_export

    name = flow_use_case(rollback="manual")
    champion = _go_promoted(name)
    _running_pilot(name, tau=0.8)
    prod = breach_export(tmp_path)
    mon = monitor_flow(name, observations_file=str(prod))
    assert (mon["outcome"], mon["awaiting"], mon["automatic_rollback"]) == (
        "NO-GO",
        "rollback_approval",
        False,
    )
    assert (_phase(name), registry.current_aliases(name)["champion"]) == ("piloting", champion)
    assert pilot_batches.monitor_target(name) is None  # the person decides first
    with pytest.raises(approvals.ApprovalError, match=f"decision {mon['decision_id']} waits for approval"):
        approvals.request_rollback(name, _identity(BOB), "again")
    # a file given meanwhile is not imported, and the refusal says why (it read "nothing promoted")
    with pytest.raises(pilot_batches.pilots.PilotStateError) as refused:
        monitor_flow(name, observations_file=str(prod))
    did = mon["decision_id"]
    assert str(refused.value) == (
        f"{name}: the monitor's alarm (decision {did}) waits for a person, who rolls the champion back "
        f"(`sparsepilot approve {name} --decision {did} --reason TEXT`) or keeps it, which resumes the "
        f"monitor (`sparsepilot approve {name} --decision {did} --reject --reason TEXT`): {prod} was not "
        "imported"
    )

    approvals.approve(mon["decision_id"], _identity(BOB), "error rate too high")
    rows_now, champions, promoted, _ = _pilots(name)
    assert (len(champions), [r[1] for r in rows_now], promoted) == (1, ["rolled_back", "running"], None)
    assert registry.current_aliases(name)["champion"] == champions[0] != champion
    assert _phase(name) == "piloting"


def _alarm(name: str, info: dict[str, Any]) -> int:
    """The monitor's alarm about the champion `info` (its sampled rows failed their data check, policy
    manual): a rollback decision waiting for a person. Its id."""
    from rollout import decisions

    failed = {"passed": False, "failures": ["bad rows"], "report": {}}
    look = decisions.monitor_look(name, info, [], failed, "m-1")
    assert (look["outcome"], look["awaiting"]) == ("INVALID", "rollback_approval"), look
    return look["decision_id"]


def _waits(name: str) -> str:
    from rollout import queries

    return next(r["waits_for"] for r in queries.read(queries.portfolio) if r["name"] == name)


@pytest.mark.parametrize("trust_db", ["sqlite"], indirect=True)
def test_no_promotion_while_the_champions_alarm_waits_and_the_portfolio_says_so(use_case) -> None:
    """While pilot 2's GO waited for approval, the monitor's alarm about pilot 1's champion waiting for a
    person was said nowhere in the portfolio ("approval to promote"), and approving the GO promoted over
    it: the champion alias moved to v3 and the alarm still waited, its approval then "rolling back" a
    champion that no longer served. Now the alarm outranks the pilot in "waits for", and the promotion is
    refused, on the dashboard's path (`approvals.approve`) and the CLI's (before any approval run starts),
    naming the alarm and its commands, until a person decides it."""
    from flows.approval import approve_decision
    from rollout import approvals, registry

    name = use_case(rollback="manual")
    info = _promoted(name)
    second = _pilot_with_decision(name, "GO", "approval", key="second", tau=0.8)
    alarm = _alarm(name, info)
    assert _waits(name) == (
        f"approval to roll back the champion (the monitor's alarm, decision {alarm}: `sparsepilot approve "
        f"{name} --decision {alarm} --reason TEXT` rolls it back, with `--reject` keeps it), before any "
        "promotion"
    )
    refusal = (
        f"decision {second} is not promoted while the monitor's alarm about {name}'s serving champion "
        f"(decision {alarm}) waits for a person; nothing was recorded. Decide the alarm first: roll the "
        f"champion back (`sparsepilot approve {name} --decision {alarm} --reason TEXT`) or keep it "
        f"(`sparsepilot approve {name} --decision {alarm} --reject --reason TEXT`), then promote"
    )
    for sign in (approvals.approve, approve_decision):  # the dashboard's path, the CLI's
        with pytest.raises(approvals.ApprovalError) as refused:
            sign(second, _identity(ALICE), "pilot 2 passed")
        assert str(refused.value) == refusal
    rows, champions, promoted, _ = _pilots(name)
    assert (champions, promoted, _phase(name)) == (["1", "2"], 1, "piloting")

    assert approvals.approve(alarm, _identity(BOB), "bad rows").took_effect  # rolled back to the dense v1
    assert _waits(name) == "approval to promote"
    assert approvals.approve(second, _identity(ALICE), "pilot 2 passed").took_effect
    rows, champions, promoted, _ = _pilots(name)
    assert (champions, promoted, registry.current_aliases(name)["champion"]) == (["1", "3"], 2, "3")


@pytest.mark.parametrize("trust_db", ["sqlite"], indirect=True)
def test_no_promotion_while_the_champions_rollback_is_not_in_effect(use_case, monkeypatch) -> None:  # noqa: ANN001
    """The approved alarm's rollback whose MLflow move failed while pilot 2 pilots: the champion that
    breached keeps serving, and the portfolio said "approval to promote" (the alarm was not the current
    decision); pilot 2's GO promoted over it. Now it says the rollback is to be finished, and the
    promotion is refused naming the command that finishes it."""
    from mlflow import MlflowClient

    from rollout import approvals

    name = use_case(rollback="manual")
    info = _promoted(name)
    second = _pilot_with_decision(name, "GO", "approval", key="second", tau=0.8)
    alarm = _alarm(name, info)
    real = MlflowClient.set_registered_model_alias

    def down(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        raise ConnectionError("tracking server unreachable")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", down)
    with pytest.raises(Exception, match="unreachable"):
        approvals.approve(alarm, _identity(BOB), "bad rows")
    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", real)
    assert _waits(name) == (
        f"the rollback to be finished (approved by bob; not in effect): sparsepilot rollback {name}"
    )
    with pytest.raises(approvals.ApprovalError) as refused:
        approvals.approve(second, _identity(ALICE), "pilot 2 passed")
    assert str(refused.value) == (
        f"decision {second} is not promoted while the rollback of {name}'s champion (decision {alarm}) is "
        f"decided but not in effect; nothing was recorded. Finish it first (`sparsepilot rollback {name} "
        "--reason TEXT`), then promote"
    )


@pytest.mark.parametrize("trust_db", ["sqlite"], indirect=True)
def test_an_alarm_recorded_after_the_gos_signature_holds_its_promotion(use_case, monkeypatch) -> None:  # noqa: ANN001
    """The window the signature's refusal leaves: pilot 2's GO signed (no alarm waited), then the monitor
    records its alarm about pilot 1's champion, then the promotion's effect runs. It moved the champion to
    v3 over the alarm, whose approval then said "rolls back" and moved nothing. Now the promotion is held
    under the decision's lock, nothing moved, the approval standing: the alarm is decided first (the
    portfolio says so, the cycle and `promote --decision` do not finish the promotion meanwhile), then the
    promotion is finished as signed."""
    from rollout import approvals, registry, unfinished
    from rollout.approvals import signing

    name = use_case(rollback="manual")
    info = _promoted(name)
    second = _pilot_with_decision(name, "GO", "approval", key="second", tau=0.8)
    alarms: list[int] = []
    effect = signing.apply_decision

    def alarm_then_effect(decision_id: int, payload: Any, **kw: Any) -> Any:
        alarms.append(_alarm(name, info))  # after the signature committed, before its effect
        return effect(decision_id, payload, **kw)

    monkeypatch.setattr(signing, "apply_decision", alarm_then_effect)
    with pytest.raises(approvals.ApprovalError) as held:  # PromotionHeld: the signature was recorded
        approvals.approve(second, _identity(ALICE), "pilot 2 passed")
    monkeypatch.setattr(signing, "apply_decision", effect)
    (alarm,) = alarms
    # when it is finished, as the portfolio says it below: it said "at once by `promote --decision`", which
    # its signer's grace refuses
    words = (
        f"decision {second} is approved, but not promoted while the monitor's alarm about {name}'s serving "
        f"champion (decision {alarm}) waits for a person; nothing was moved, the approval stands. Decide "
        f"the alarm first: roll the champion back (`sparsepilot approve {name} --decision {alarm} --reason "
        f"TEXT`) or keep it (`sparsepilot approve {name} --decision {alarm} --reject --reason TEXT`); once "
        f"it is decided, the promotion is finished by the scheduled cycle's first run from "
        f"{_signed_at(second) + unfinished.APPLY_GRACE:%H:%M} UTC (its signer's grace), or `sparsepilot "
        f"promote {name} --decision {second} --reason TEXT` from then"
    )
    assert (type(held.value).__name__, str(held.value)) == ("PromotionHeld", words)
    assert _pilots(name)[1:3] == (["1", "2"], 1)  # pilot 1's champion serves, its alarm waits
    assert _waits(name).startswith(
        f"approval to roll back the champion (the monitor's alarm, decision {alarm}"
    )
    assert unfinished.unfinished_of(name) is None  # the cycle leaves it
    with pytest.raises(approvals.ApprovalError) as person:  # `promote --decision`: said, nothing claimed
        approvals.unfinished_promotion(second, by="carol")
    assert str(person.value) == words

    assert approvals.approve(alarm, _identity(BOB), "bad rows").took_effect  # rolled back to the dense v1
    assert _pilots(name)[1:3] == (["1"], None)
    pending = unfinished.unfinished_of(name)  # the signed promotion, finished now, over v1 (P2: said)
    assert (pending.action, pending.champion_changed) == ("promote", _changed("2", "1"))
    # in its signer's grace nobody carries it out (the signer was refused, held; the cycle waits for the
    # grace): the portfolio said "being carried out now"; it says when and by what it is finished
    decided, signed = _signed_at(alarm), _signed_at(second)
    assert _waits(name) == (
        f"the promotion to be finished (approved by alice; {_changed('2', '1')}; held while the monitor's "
        f"alarm about the champion waited, decided at {decided:%H:%M} UTC; not in effect): by the scheduled "
        f"cycle's first run from {signed + unfinished.APPLY_GRACE:%H:%M} UTC (its signer's grace), or "
        f"`sparsepilot promote {name} --decision {second}` from then"
    )
    assert (pending.held_until, pending.finish_from) == (decided, signed + unfinished.APPLY_GRACE)
    # `promote --decision` in that grace is refused, by the same words: it said the promotion "was signed
    # a moment ago and is being carried out", while nobody was
    with pytest.raises(registry.MoveInProgress) as early:
        approvals.unfinished_promotion(second, by="carol")
    assert str(early.value) == (
        f"{name}: alice's promotion (decision {second}) was held while the monitor's alarm about the "
        f"champion waited, decided at {decided:%H:%M} UTC, and is not in effect; nothing was recorded. It is "
        f"finished by the scheduled cycle's first run from {signed + unfinished.APPLY_GRACE:%H:%M} UTC (its "
        f"signer's grace), or `sparsepilot promote {name} --decision {second}` from then"
    )
    monkeypatch.setattr(unfinished, "APPLY_GRACE", unfinished.APPLY_GRACE * 0)  # its signer gave up
    approval_id = approvals.unfinished_promotion(second, by="carol")
    assert approval_id is not None
    done = approvals.apply_promotion(second, approval_id, reason="alarm decided", finished_by="carol")
    # the same rule as a stale failed move's (`promotion_moves`): promoted over v1, and said so
    assert (done["done"], done["champion_changed"]) == (True, _changed("2", "1"))
    assert _champion_moves(name)[-1] == (f"promote:{second}", "1", "3", "committed")
    rows, champions, promoted, _ = _pilots(name)
    assert (champions, promoted, _phase(name)) == (["1", "3"], 2, "promoted")


@pytest.mark.parametrize("trust_db", ["sqlite"], indirect=True)
def test_a_promotion_its_approval_run_took_up_and_held_names_the_runs_time(use_case, monkeypatch) -> None:  # noqa: ANN001
    """As above, but alice's signature resumed the GO's approval run, which took the promotion up and was
    held: the cycle and `promote --decision` finish it once that run is no longer taken to be at work
    (`STALLED_AFTER` from its take-up, `unfinished.held_finish_from`), and the words said "(its signer's
    grace)" of that time too. They name the run's time now: the hold's, the portfolio's and the refusal
    of `promote --decision`. (Prefect's side, pausing and resuming the run, stands in for itself.)"""
    from rollout import approval_runs, approvals, registry, unfinished
    from rollout.approvals import signing
    from rollout.approvals.waiter import taken_up_at
    from rollout.db.models import GateDecision
    from rollout.db.session import session_scope

    name = use_case(rollback="manual")
    info = _promoted(name)
    second = _pilot_with_decision(name, "GO", "approval", key="second", tau=0.8)
    run = "5b0c7d1e-0000-4000-8000-0000000be1d0"
    assert "skip" not in approval_runs.register(second, run, lambda _run: False)
    monkeypatch.setattr(signing, "_flow_run_state_safe", lambda _run: (True, "Paused"))
    monkeypatch.setattr(signing, "_resume", lambda _run, _payload: None)  # resumed: the run carries it out
    signed = approvals.approve(second, _identity(ALICE), "pilot 2 passed")
    assert signed.resumed_flow_run_id == run, signed
    alarm = _alarm(name, info)  # after the signature, before the run's effect
    assert approval_runs.take_up(second, run) is None
    with session_scope() as s:
        taken = taken_up_at(s, s.get(GateDecision, second), run)
    after = (
        f"{taken + unfinished.STALLED_AFTER:%H:%M} UTC (5 minutes after its approval run took it up and was "
        "held)"
    )
    with pytest.raises(approvals.PromotionHeld) as held:  # what the run's promote flow runs
        approvals.apply_promotion(second, signed.approval_id, reason="pilot 2 passed")
    assert str(held.value).endswith(
        f"once it is decided, the promotion is finished by the scheduled cycle's first run from {after}, or "
        f"`sparsepilot promote {name} --decision {second} --reason TEXT` from then"
    ), str(held.value)

    assert approvals.approve(alarm, _identity(BOB), "bad rows").took_effect
    pending = unfinished.unfinished_of(name)
    assert pending.finish_from == taken + unfinished.STALLED_AFTER
    by = (
        f"by the scheduled cycle's first run from {after}, or `sparsepilot promote {name} --decision {second}"
    )
    by += "`"
    assert _waits(name).endswith(f"not in effect): {by} from then"), _waits(name)
    with pytest.raises(registry.MoveInProgress) as early:
        approvals.unfinished_promotion(second, by="carol")
    assert str(early.value).endswith(f"It is finished {by} from then"), str(early.value)


@pytest.mark.parametrize(
    "trust_db", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_migration_0013_marks_replaced_the_promoted_pilots_of_a_state_db_made_before(
    use_case, trust_db
) -> None:  # noqa: ANN001
    """A state DB made before "replaced" existed kept every promoted pilot "promoted": after pilot 1,
    pilot 2 over it, pilot 3 of pilot 1's plan and pilot 3 rolled back, pilot 2 read as the promoted one
    (its model the monitored champion's) while the dense baseline served. Migration 0013 replays the
    promotions over the state DB's alias history and marks them as a promotion marks them now."""
    from sqlalchemy import text

    from rollout import approvals
    from rollout.db import migrate
    from rollout.db.session import get_engine

    name = use_case(rollback="manual")
    _promoted(name)
    for key, tau in (("second", 0.8), ("third", 0.9)):  # pilot 3: pilot 1's plan again
        did = _pilot_with_decision(name, "GO", "approval", key=key, tau=tau)
        assert approvals.approve(did, _identity(ALICE), f"{key} passed").took_effect
    approvals.request_rollback(name, _identity(BOB), "p95 regressed")
    now = _pilots(name)
    assert (now[0], now[1], now[2]) == (
        [(1, "replaced", "2"), (2, "replaced", "3"), (3, "rolled_back", "2")],
        ["1"],
        None,
    )

    migrate.downgrade(trust_db, "0012")  # as the code before "replaced" left it
    with get_engine(trust_db).begin() as conn:
        conn.execute(text("UPDATE pilots SET status = 'promoted' WHERE status = 'replaced'"))
    assert _pilots(name)[2] == 2  # the dense baseline serves, pilot 2 reads as the champion's
    migrate.upgrade(trust_db)
    assert _pilots(name) == now


def test_migration_0013_replays_each_promotion() -> None:
    """The migration's pure rule: a pilot whose champion a rollback returns to stays promoted; one whose
    version a later promotion served again or took out of the champions is replaced; the newest
    promotion's own pilot is never touched (its rollback, moved but not recorded, is
    `rollout.unfinished`'s)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[2] / "migrations" / "versions" / "0013_replaced_pilots.py"
    spec = importlib.util.spec_from_file_location("m0013", path)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    pilots = {"promote:1": (1, "2"), "promote:2": (2, "3"), "promote:3": (3, "2")}
    base = [("baseline:1", None, "1"), ("promote:1", "1", "2"), ("promote:2", "2", "3")]
    assert m.replaced(base, pilots) == set()  # pilot 1's champion is where a rollback of pilot 2 returns
    assert m.replaced([*base, ("rollback:9", "3", "2")], pilots) == set()
    assert m.replaced([*base, ("promote:3", "3", "2")], pilots) == {1, 2}
    assert m.replaced([*base[:2], ("rollback:9", "2", "1")], pilots) == set()


def _failed_promotion(name: str, monkeypatch) -> tuple[dict[str, Any], int]:  # noqa: ANN001
    """Pilot 1 promoted (v2 serves), then pilot 2's GO approved by alice while MLflow is down: its champion
    move (v2 -> v3) recorded and failed. Pilot 1's champion info and pilot 2's decision."""

    info = _promoted(name)
    second = _pilot_with_decision(name, "GO", "approval", key="second", tau=0.8)
    _approve_while_mlflow_is_down(second, "pilot 2 passed", monkeypatch)
    return info, second


def _approve_while_mlflow_is_down(decision: int, reason: str, monkeypatch) -> None:  # noqa: ANN001
    """alice approves `decision` while MLflow refuses alias moves: its move is recorded and fails."""
    from mlflow import MlflowClient

    from rollout import approvals, registry

    real = MlflowClient.set_registered_model_alias

    def down(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        raise ConnectionError("tracking server unreachable")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", down)
    with pytest.raises(registry.RegistryError, match="unreachable"):
        approvals.approve(decision, _identity(ALICE), reason)
    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", real)


def _champion_moves(name: str) -> list[tuple[str, str | None, str, str]]:
    from rollout import registry

    return [
        (m["idempotency_key"], m["from_version"], m["to_version"], m["status"])
        for m in registry.alias_history(name)
        if m["alias"] == "champion"
    ]


@pytest.mark.parametrize("trust_db", ["sqlite"], indirect=True)
def test_a_failed_promotion_is_not_finished_over_the_champions_alarm(use_case, monkeypatch) -> None:  # noqa: ANN001
    """Pilot 2's GO approved while MLflow was down (its move recorded, failed), then the monitor's alarm
    about pilot 1's serving champion. The cycle's finisher and `promote --decision` finished the promotion
    over the waiting alarm (a move recorded was "finished as begun"), and approving the alarm then said
    "rolls back" and moved nothing. Now a move MLflow does not show has not taken effect: the promotion is
    held while the alarm waits, the portfolio names the alarm, and the alarm's approval rolls back."""
    from rollout import approvals, registry, unfinished

    name = use_case(rollback="manual")
    info, second = _failed_promotion(name, monkeypatch)
    alarm = _alarm(name, info)
    monkeypatch.setattr(unfinished, "APPLY_GRACE", unfinished.APPLY_GRACE * 0)  # a later tick of the cycle
    assert _waits(name).startswith(
        f"approval to roll back the champion (the monitor's alarm, decision {alarm}"
    )
    assert unfinished.claim_to_finish(name, "sparsepilot-pipeline") is None  # the cycle leaves it
    with pytest.raises(approvals.PromotionHeld, match=f"not promoted while the monitor's alarm .*{alarm}"):
        approvals.unfinished_promotion(second, by="carol")  # `promote --decision`
    assert registry.current_aliases(name)["champion"] == "2"

    done = approvals.approve(alarm, _identity(BOB), "bad rows")
    assert "champion rolls back to the previous one" in done.message
    rows, champions, promoted, _ = _pilots(name)
    assert (champions, promoted, registry.current_aliases(name)["champion"]) == (["1"], None, "1")
    assert rows == [(1, "rolled_back", "2"), (2, "awaiting_approval", "3")]


def _signed_at(decision_id: int) -> Any:
    """When decision `decision_id`'s newest signature was recorded (UTC)."""
    from rollout.db.models import Approval, as_utc
    from rollout.db.session import session_scope

    with session_scope() as s:
        at = s.scalar(
            select(Approval.created_at)
            .where(Approval.decision_id == decision_id)
            .order_by(Approval.id.desc())
        )
        return as_utc(at)


def _changed(then: str, now: str) -> str:
    """What a promotion finished over a champion that changed since its GO was signed says."""
    return (
        f"the champion changed since the GO was signed (v{then} served then, v{now} serves now): it is "
        f"promoted over v{now} as signed"
    )


@pytest.mark.parametrize("trust_db", ["sqlite"], indirect=True)
def test_a_failed_promotion_a_rollback_made_stale_is_promoted_over_the_champion_now(
    use_case, monkeypatch
) -> None:  # noqa: ANN001
    """Pilot 2's promotion move failed (v2 -> v3), then the alarm about v2 was approved (v2 -> v1). Its
    stale row is never retried (retried, MLflow moved v1 -> v3 while the row said from v2). It used to be
    superseded and the pilot stopped for `pilot --again`, while the same GO held with no move recorded was
    promoted over v1 as signed: two rules for one situation. Now both are promoted over the champion
    serving: the stale row superseded, a new move recorded from v1, and the portfolio, the alias history
    and the audit log say that the champion changed since the GO was signed."""
    from rollout import approvals, pilot_batches, registry, unfinished
    from rollout.db.models import AuditEntry
    from rollout.db.session import session_scope

    name = use_case(rollback="manual")
    info, second = _failed_promotion(name, monkeypatch)
    alarm = _alarm(name, info)
    approvals.approve(alarm, _identity(BOB), "bad rows")  # v2 -> v1
    with pytest.raises(registry.RegistryError, match="v2 to v3, but 'rollback:.*committed since"):
        registry.promote(  # its key's retry alone is refused: the registry's rule
            name, version="3", actor=_identity(ALICE), reason="again", idempotency_key=f"promote:{second}"
        )
    # between the rollback and the cycle's tick: what finishing it will do (P2)
    assert _waits(name) == (
        f"the promotion to be finished (approved by alice; {_changed('2', '1')}; not in effect): "
        f"sparsepilot promote {name} --decision {second}"
    )
    monkeypatch.setattr(unfinished, "APPLY_GRACE", unfinished.APPLY_GRACE * 0)
    u = unfinished.claim_to_finish(name, "sparsepilot-pipeline")  # what the cycle's finisher runs
    assert (u.decision_id, u.action) == (second, "promote")
    done = approvals.apply_promotion(
        second, u.approval_id, reason="finish", finished_by="sparsepilot-pipeline"
    )
    assert (done["action"], done["done"], done["champion_changed"]) == ("promoted", True, _changed("2", "1"))
    stale = next(m for m in registry.alias_history(name) if m["idempotency_key"] == f"promote:{second}")
    assert _champion_moves(name) == [
        ("baseline:1", None, "1", "committed"),
        ("promote:1", "1", "2", "committed"),
        (f"promote:{second}", "2", "3", "superseded"),
        (f"rollback:{alarm}", "2", "1", "committed"),
        (f"promote:{second}:{stale['id']}", "1", "3", "committed"),
    ]
    assert (
        f"is recorded again from the champion serving now ('promote:{second}:{stale['id']}')"
        in (stale["error"])
    )
    assert registry.alias_history(name)[-1]["reason"] == f"pilot 2 passed ({_changed('2', '1')})"
    rows, champions, promoted, _ = _pilots(name)
    assert (champions, registry.current_aliases(name)["champion"]) == (["1", "3"], "3")
    assert (rows, promoted, _phase(name)) == ([(1, "rolled_back", "2"), (2, "promoted", "3")], 2, "promoted")
    assert pilot_batches.monitor_target(name)["pilot_id"] != info["pilot_id"]  # v3 is watched
    assert unfinished.unfinished_of(name) is None
    assert approvals.promotion_in_effect(second).startswith(
        f"{name}: decision {second} was approved by alice; it took effect: champion v3 since"
    )
    with session_scope() as s:
        audited = s.scalar(
            select(AuditEntry.details).where(AuditEntry.action == "promotion.champion_changed")
        )
    assert (audited["signed_over"], audited["promoted_over"]) == ("2", "1")


@pytest.mark.parametrize("trust_db", ["sqlite"], indirect=True)
def test_a_promotion_mlflow_shows_done_is_recorded_and_the_moot_alarm_moves_nothing(
    use_case, monkeypatch
) -> None:  # noqa: ANN001
    """Pilot 2's promotion cut off after MLflow moved the champion to v3 (its row left pending), then the
    alarm about v2. Held by the state DB alone (the cycle leaves it); a person's `promote --decision` asks
    MLflow, which shows it done: recorded as done. Approving the alarm, about a v2 that no longer serves,
    moves nothing and says so: it used to say "rolls back to the previous one"."""
    from rollout import approvals, registry, unfinished

    name = use_case(rollback="manual")
    info = _promoted(name)
    second = _pilot_with_decision(name, "GO", "approval", key="second", tau=0.8)
    committed = registry._committed

    def cut_off(*args: Any, **kwargs: Any) -> Any:
        raise registry.RegistryError("the state DB was busy")  # MLflow moved; the row stays pending

    monkeypatch.setattr(registry, "_committed", cut_off)
    with pytest.raises(registry.RegistryError, match="busy"):
        approvals.approve(second, _identity(ALICE), "pilot 2 passed")
    monkeypatch.setattr(registry, "_committed", committed)
    assert registry.current_aliases(name)["champion"] == "3"
    alarm = _alarm(name, info)
    monkeypatch.setattr(unfinished, "APPLY_GRACE", unfinished.APPLY_GRACE * 0)
    assert unfinished.claim_to_finish(name, "sparsepilot-pipeline") is None
    approval_id = approvals.unfinished_promotion(second, by="carol")
    done = approvals.apply_promotion(second, approval_id, reason="finish", finished_by="carol")
    assert (done["action"], done["done"], _pilots(name)[1:3]) == ("promoted", True, (["1", "2", "3"], 2))

    said = approvals.approve(alarm, _identity(BOB), "bad rows").message
    assert "rolls back" not in said
    assert f"decision {alarm} asked to roll back champion v2, but v3 serves now" in said
    assert "nothing moved" in said
    assert registry.current_aliases(name)["champion"] == "3"


@pytest.mark.parametrize("trust_db", ["sqlite"], indirect=True)
def test_a_monitors_rollback_a_persons_superseded_leaves_no_failed_move(use_case, monkeypatch) -> None:  # noqa: ANN001
    """`rollback: auto`: the monitor's own rollback failed (MLflow down: its move `rollback:<id>` failed),
    then a person's `rollback` came first and closed the monitor's decision "superseded". Its move row was
    left "failed" for good: the alias history showed a rollback still to be retried, which the registry
    refuses (stale). Now the row is marked superseded with the decision, saying by what."""
    from mlflow import MlflowClient

    from rollout import approvals, registry, unfinished
    from tests.flows.test_unfinished_effects import _alarm as _own_rollback

    name = use_case(rollback="auto")
    _promoted(name)
    mon = _own_rollback(name, "auto", automatic=True)
    real = MlflowClient.set_registered_model_alias

    def down(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        raise ConnectionError("tracking server unreachable")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", down)
    with pytest.raises(registry.RegistryError, match="unreachable"):
        approvals.apply_rollback(mon, None, reason="breach", automatic=True)
    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", real)
    by_hand = approvals.request_rollback(name, _identity(BOB), "p95 regressed")["decision_id"]
    moves = {m["idempotency_key"]: m for m in registry.alias_history(name)}
    assert (moves[f"rollback:{mon}"]["status"], moves[f"rollback:{by_hand}"]["status"]) == (
        "superseded",
        "committed",
    )
    assert (
        f"superseded by rollback {by_hand} before its move took effect" in moves[f"rollback:{mon}"]["error"]
    )
    assert (unfinished.unfinished_of(name), _pilots(name)[1]) == (None, ["1"])


# a pilot's control arm pointed at a served endpoint (docs/serving.md): the champion's, say
CONTROL_ENDPOINT = {"arms": {"control": {"kind": "mlflow", "url": "http://127.0.0.1:5001"}}}


def _held_promotion(name: str, info: dict[str, Any], second: int, monkeypatch) -> int:  # noqa: ANN001
    """Pilot 2's GO signed by alice (no alarm waited), then the monitor's alarm about pilot 1's champion
    recorded before the promotion's effect ran: the promotion held, nothing moved. The alarm's id."""
    from rollout import approvals
    from rollout.approvals import signing

    alarms: list[int] = []
    effect = signing.apply_decision

    def alarm_then_effect(decision_id: int, payload: Any, **kw: Any) -> Any:
        alarms.append(_alarm(name, info))
        return effect(decision_id, payload, **kw)

    monkeypatch.setattr(signing, "apply_decision", alarm_then_effect)
    with pytest.raises(approvals.PromotionHeld):
        approvals.approve(second, _identity(ALICE), "pilot 2 passed")
    monkeypatch.setattr(signing, "apply_decision", effect)
    return alarms[0]


@pytest.mark.parametrize("trust_db", ["sqlite"], indirect=True)
@pytest.mark.parametrize("begun", ["held", "failed"])
def test_a_promotion_measured_against_the_champions_endpoint_is_not_promoted_over_another(
    use_case, monkeypatch, begun
) -> None:  # noqa: ANN001
    """Pilot 2's control arm is a served endpoint (the champion's, `serve-model --alias champion`): its GO
    says v3 is no worse than v2. The monitor's alarm about v2 is approved (v2 -> v1) while the promotion is
    held (no move recorded) or its move failed. It was promoted over v1 "as signed", the rule of a dense
    control: v3 went to production measured only against the champion just rolled back. Now it is not
    promoted: its move (if any) superseded, pilot 2 and the use case stopped for `pilot --again`, the
    portfolio, `promote`'s result and the audit log saying why."""
    from rollout import approvals, registry, unfinished
    from rollout.db.models import AuditEntry
    from rollout.db.session import session_scope

    name = use_case(rollback="manual", pilot=CONTROL_ENDPOINT)
    if begun == "held":
        info = _promoted(name)
        second = _pilot_with_decision(name, "GO", "approval", key="second", tau=0.8)
        alarm = _held_promotion(name, info, second, monkeypatch)
    else:
        info, second = _failed_promotion(name, monkeypatch)
        alarm = _alarm(name, info)
    assert approvals.approve(alarm, _identity(BOB), "bad rows").took_effect  # v2 -> v1
    said = (
        "the champion changed since the GO was signed (v2 served then, v1 serves now), and the pilot's "
        "control arm was the mlflow endpoint http://127.0.0.1:5001, not the dense model: the GO was "
        "measured against what it served then (v2, the champion of its time), so it is not promoted"
    )
    assert unfinished.unfinished_of(name).champion_changed == said  # what finishing it will do
    monkeypatch.setattr(unfinished, "APPLY_GRACE", unfinished.APPLY_GRACE * 0)
    u = unfinished.claim_to_finish(name, "sparsepilot-pipeline")  # what the cycle's finisher runs
    done = approvals.apply_promotion(
        second, u.approval_id, reason="finish", finished_by="sparsepilot-pipeline"
    )
    assert (done["action"], done["alias_moves"]) == ("superseded", [])
    assert done["reason"].startswith(
        f"decision {second}'s promotion was approved but is not carried out: {said}"
    )
    assert f"`sparsepilot pilot {name} --again --reason TEXT`" in done["reason"]
    rows, champions, promoted, _ = _pilots(name)
    assert (champions, registry.current_aliases(name)["champion"], promoted) == (["1"], "1", None)
    assert (rows[-1], _phase(name)) == ((2, "stopped", "3"), "stopped")
    assert [m[3] for m in _champion_moves(name) if m[0] == f"promote:{second}"] == (
        ["superseded"] if begun == "failed" else []
    )
    assert unfinished.unfinished_of(name) is None
    assert f"sparsepilot pilot {name} --again --reason TEXT" in _waits(name)
    with session_scope() as s:
        audited = s.scalar(select(AuditEntry.details).where(AuditEntry.action == "promotion.superseded"))
    assert (audited["signed_over"], audited["serving"], audited["decision_id"]) == ("2", "1", second)


@pytest.mark.parametrize("trust_db", ["sqlite"], indirect=True)
def test_a_go_measured_against_the_champions_endpoint_while_it_changed_is_not_signed(use_case) -> None:  # noqa: ANN001
    """Pilot 2's control arm is a served endpoint (the champion's); while its step collects, a person
    rolls pilot 1's champion back (v2 -> v1), then the step's GO waits for approval. Its evidence was
    measured against v2, the champion of its time (the rule above catches a change after the signature
    only): signing it promoted v3 over v1. Now the promotion is refused, on the dashboard's path and the
    CLI's, naming the change and the way on (abort, then `pilot --again`: tests/rollout/test_pilot_again.py);
    the card says the same."""
    from flows.approval import approve_decision
    from rollout import approvals, pilot_batches, pilots
    from rollout.db.models import GateDecision, Pilot
    from rollout.db.session import session_scope

    name = use_case(rollback="manual", pilot=CONTROL_ENDPOINT)
    _promoted(name)  # the dense baseline v1, then pilot 1's challenger v2
    pilot_id = _running_pilot(name, tau=0.8)  # pilot 2 (v3) collects against the endpoint serving v2
    approvals.request_rollback(name, _identity(BOB), "p95 regressed")  # v2 -> v1 meanwhile
    with session_scope() as s:  # then its step's GO, awaiting approval
        pilot = s.get(Pilot, pilot_id)
        go, _ = pilots.record_decision(
            s,
            idempotency_key="test:go-over-a-change",
            use_case=pilots.get_use_case(s, name),
            pilot=pilot,
            step=pilots.current_step(s, pilot),
            outcome="GO",
            evidence={"reasons": []},
            explanation="Decision: GO.",
            data_fingerprint="f" * 64,
            awaiting="approval",
        )
        pilots.stop_pilot(s, pilot, status="awaiting_approval", actor="test", reason="GO")
        go = go.id
    changed = (
        "the champion changed while pilot 2 collected step 0's observations (v2 served when the step began, "
        "v1 serves now), and its control arm was the mlflow endpoint http://127.0.0.1:5001, not the dense "
        "model: the GO was measured against v2, the champion of its time, in part or in whole"
    )
    way = (
        f"Abort the pilot (`sparsepilot pilot {name} --abort --reason TEXT`) and pilot its challenger again "
        f"(`sparsepilot pilot {name} --again --reason TEXT`), measured against v1"
    )
    for sign in (approvals.approve, approve_decision):  # the dashboard's path, the CLI's
        with pytest.raises(approvals.ApprovalError) as refused:
            sign(go, _identity(ALICE), "pilot 2 passed")
        assert str(refused.value) == f"decision {go} is not promoted: {changed}; nothing was recorded. {way}"
    with session_scope() as s:
        assert approvals.promotion_held_words(s, go) == f"Not approvable: {changed}. {way}."
        assert s.get(GateDecision, go).resolution is None
    # the portfolio said "approval to promote" beside the card's "Not approvable": it names the way on
    assert _waits(name) == (
        f"an operator: abort the pilot (`sparsepilot pilot {name} --abort --reason TEXT`) and pilot its "
        f"challenger again (`sparsepilot pilot {name} --again --reason TEXT`), measured against v1 (its GO "
        "was measured against v2, the champion when its step began; no promotion of it is signed)"
    )
    assert _pilots(name)[1:3] == (["1"], None)  # nothing promoted
    pilot_batches.abort(name, actor="ops", reason="control measured against v2")  # the way on's first half
    assert (_pilots(name)[0][-1], _phase(name)) == ((2, "stopped", "3"), "stopped")


@pytest.mark.parametrize("trust_db", ["sqlite"], indirect=True)
def test_a_promotion_finished_after_a_new_budget_says_so_in_its_audit_entry(
    use_case, monkeypatch, tiny_model_dir, pilot_dataset, tmp_path
) -> None:  # noqa: ANN001
    """Pilot 1's GO approved while MLflow was down (its move failed), then spec v2 tightens the KL budget
    its plan was calibrated for under v1. The promotion is still carried out (the signature stands; the
    calibration rule refuses signing, not finishing), but the finisher's `approval.finished` entry said
    nothing of v2: the trail read as a plan promoted within the current budget. It says so now."""
    import yaml

    from rollout import approvals
    from rollout.db.models import AuditEntry, CalibrationRun, Pilot, UseCase
    from rollout.db.session import session_scope
    from rollout.usecases import add_usecase
    from tests.fixtures.flows import tiny_spec

    name = use_case(rollback="manual")
    first = _pilot_with_decision(name, "GO", "approval")
    with session_scope() as s:  # its plan calibrated under v1, as the calibrate flow records it
        uc = s.scalar(select(UseCase).where(UseCase.name == name))
        mv = s.scalar(select(Pilot.model_version_id).where(Pilot.use_case_id == uc.id))
        s.add(
            CalibrationRun(
                idempotency_key="cal:v1",
                use_case_id=uc.id,
                spec_version=1,
                model_version_id=mv,
                status="succeeded",
            )
        )
    _approve_while_mlflow_is_down(first, "pilot 1 passed", monkeypatch)
    spec = tiny_spec(tiny_model_dir, name, dataset_file=pilot_dataset, rollback="manual")
    spec["quality_budget"]["kl"] = spec["quality_budget"]["kl"] / 10
    (tmp_path / "v2.yaml").write_text(yaml.safe_dump(spec))
    add_usecase(tmp_path / "v2.yaml", actor="test-owner", new_version=True)
    approval_id = approvals.unfinished_promotion(first, by="carol")  # `promote --decision`, carol's
    done = approvals.apply_promotion(first, approval_id, reason="MLflow is back", finished_by="carol")
    assert (done["action"], done["done"]) == ("promoted", True)
    with session_scope() as s:
        finished = s.scalar(select(AuditEntry.details).where(AuditEntry.action == "approval.finished"))
    assert finished["spec_changed"] == (
        "spec changed since approval: v1 -> v2 (quality_budget.kl): the plan was not calibrated under v2; "
        "carried out as signed"
    ), finished
