"""A new spec version that changes what calibration reads (its quality budget, here) left the challenger
calibrated for the old one: the next scheduled tick piloted it as "spec v2", a plan 3.5x over v2's KL
budget, and spent the use case's alpha on it (review s50 E2); `usecase add --new-version` said only
"changed: quality_budget.kl". Now the challenger is not calibrated for v2 (`runs.not_calibrated`, one rule
for the cycle, `pilot NAME` and the dashboard): no pilot of it starts, and the add says what follows. A
change calibration does not read (the schedule, the gate) leaves the challenger as it was. Real state
DB, real `add_usecase` for both versions (the cycle itself: tests/flows/test_cycle_not_piloted.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.trust import password_of
from tests.rollout.test_not_piloted import PAYS, _challenger, _pilots
from tests.rollout.usecase_helpers import example_spec, write_spec

STALE = (
    "chat: spec v2 is not calibrated: run `sparsepilot calibrate chat` (the challenger was calibrated under "
    "spec v1, and v2 changed quality_budget.kl); nothing was started"
)


def _cli(*args: str) -> Any:
    """`sparsepilot ARGS` in this process, signed in as olga (an operator)."""
    from typer.testing import CliRunner

    from sparsepilot.cli import app

    return CliRunner().invoke(app, [*args, "--password-stdin"], input=password_of("olga") + "\n")


def _new_version(tmp_path: Path, change: dict[str, Any]) -> list[str]:
    """`usecase add --new-version` of `chat`'s version 1 spec (as `_challenger` added it) with `change`
    merged into it; returns what it printed after its "changed:" line."""
    spec = {**example_spec(), "name": "chat", "model": str(tmp_path / "model")}
    for key, value in change.items():
        spec[key] = {**spec[key], **value}
    res = _cli("usecase", "add", str(write_spec(tmp_path / "v2", spec)), "--new-version")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0] == "chat v2: stored as a new version", lines
    changed = next(i for i, line in enumerate(lines) if line.startswith("  changed: "))
    return [line.strip() for line in lines[changed + 1 :] if not line.startswith("  warning: ")]


def _stale_go_words(did: int) -> tuple[str, str]:
    """What a refusal of decision `did` (a GO of the v1 plan under a v2 that tightened the KL budget) says
    changed, and its way on."""
    changed = (
        "spec v2 changed quality_budget.kl after the plan pilot 1 runs was calibrated under v1: the plan has "
        "not been calibrated under v2"
    )
    remedy = (
        f"Reject it (`sparsepilot approve chat --decision {did} --reject --reason TEXT`) and run "
        "`sparsepilot calibrate chat`: a plan calibrated under v2 is piloted anew"
    )
    return changed, remedy


@pytest.mark.parametrize(
    ("change", "stale", "notes"),
    [
        ({"quality_budget": {"kl": 0.001}}, True, ["calibration fields changed (quality_budget.kl): "]),
        ({"schedule": {"cron": "*/5 * * * *"}}, False, ["schedule changed: restart `sparsepilot serve`"]),
        ({"gate": {"non_inferiority_margin": 0.04}}, False, []),  # how the pilot is judged, not the plan
    ],
    ids=["budget", "schedule", "gate"],
)
def test_a_new_version_that_changes_what_calibration_reads_pilots_no_old_plan(
    trust_env,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    change: dict[str, Any],
    stale: bool,
    notes: list[str],
) -> None:  # noqa: ANN001
    from rollout import pilot_batches, pilots, queries

    _challenger(tmp_path, "chat", **PAYS)  # calibrated and evaluated under v1: a plan that pays
    assert pilot_batches.pilot_refusal("chat") is None
    monkeypatch.setenv("SPARSEPILOT_USER", "olga")
    said = _new_version(tmp_path, change)  # what the change means, after what changed
    assert len(said) == len(notes) and all(n.startswith(w) for n, w in zip(said, notes, strict=True)), said

    refusal = pilot_batches.pilot_refusal("chat")  # what `sparsepilot pilot chat` asks before its flow
    row = next(r for r in queries.read(queries.portfolio) if r["name"] == "chat")
    if stale:
        assert str(refusal) == STALE
        res = _cli("pilot", "chat")  # refused before any flow run
        assert res.exit_code == 2 and res.stderr.strip().splitlines()[-1] == f"error: {STALE}", res.output
        assert pilot_batches.not_calibrated("chat").fields == ("quality_budget.kl",)  # the cycle's question
        with pytest.raises(pilots.PilotStateError, match="spec v2 is not calibrated"):
            pilot_batches.ensure_pilot("chat", pilot_anyway=True)  # no override pilots it
        assert _pilots("chat") == 0
        assert row["waits_for"] == (
            "calibration under spec v2 (the challenger was calibrated under spec v1, and v2 changed "
            "quality_budget.kl): the next scheduled cycle, or `sparsepilot calibrate chat`"
        )
    else:
        assert refusal is None and pilot_batches.not_calibrated("chat") is None
        assert pilot_batches.ensure_pilot("chat")["spec_version"] == 2 and _pilots("chat") == 1


CHANGES = [({"quality_budget": {"kl": 0.001}}, True), ({"schedule": {"cron": "*/5 * * * *"}}, False)]


@pytest.mark.parametrize(("change", "stale"), CHANGES, ids=["budget", "schedule"])
def test_a_go_of_a_plan_calibrated_for_an_earlier_budget_is_not_promoted(
    trust_env, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, change: dict[str, Any], stale: bool
) -> None:  # noqa: ANN001
    """Pilot 1's GO waits for approval when v2 tightens the KL budget tenfold: it was approved and promoted,
    a plan that missed the current budget. The signature (the dashboard's and `approve`'s), the CLI's check
    before any approval run and the Approvals card now refuse it by the pilot's rule
    (`runs.plan_not_calibrated`); rejecting it stays open. A schedule change holds nothing."""
    from rollout import approval_runs, approvals, queries
    from rollout.auth import Identity
    from tests.rollout.test_decision_money import _go_awaiting_approval

    _challenger(tmp_path, "chat", **PAYS)
    did, _ = _go_awaiting_approval("chat")
    monkeypatch.setenv("SPARSEPILOT_USER", "olga")
    _new_version(tmp_path, change)

    held = queries.read(approvals.promotion_held_words, did)  # the card's words, its button disabled
    waits = next(r["waits_for"] for r in queries.read(queries.portfolio) if r["name"] == "chat")
    if not stale:
        assert held is None and waits == "approval to promote"
        approval_runs.check_promotable(did)
        return
    changed, remedy = _stale_go_words(did)
    assert held == f"Not approvable: {changed}. {remedy}."
    # the portfolio said "approval to promote" beside the card's "Not approvable": it names the way on
    assert waits == (
        "a rejection, then a calibration under spec v2 (v2 changed quality_budget.kl after the plan was "
        f"calibrated under v1; no promotion of it is signed): `sparsepilot approve chat --decision {did} "
        "--reject --reason TEXT`, then `sparsepilot calibrate chat`"
    )
    refusal = f"decision {did} is not promoted: {changed}; nothing was recorded. {remedy}"
    with pytest.raises(approvals.ApprovalError) as before_any_run:
        approval_runs.check_promotable(did)  # `approve` / `promote --decision`, before any approval run
    assert str(before_any_run.value) == refusal
    alice = Identity(name="alice", role="approver", source="cli-env")
    with pytest.raises(approvals.ApprovalError) as signed:
        approvals.approve(did, alice, "the GO is clear")  # the dashboard's click, under the lock
    assert str(signed.value) == refusal
    assert queries.read(queries.pending_decisions)[0]["id"] == did  # nothing recorded: it still waits
    assert approvals.approve(did, alice, "planned for v1's budget", reject=True).action == "reject"


@pytest.mark.parametrize(("change", "stale"), CHANGES, ids=["budget", "schedule"])
def test_a_calibration_under_a_new_budget_stops_the_old_plans_running_pilot(
    trust_env, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, change: dict[str, Any], stale: bool
) -> None:  # noqa: ANN001
    """Pilot 1 of the v1 plan runs when v2 tightens the budget and a calibration under v2 succeeds: the old
    pilot ran on, taking no batch where the new plan was not piloted (the cycle pilots the challenger),
    the use case "piloting" for good. It is stopped now, audited "spec v2 recalibrates this use case", and
    the use case is calibrated; as a supersession it judged nothing. Where v2 leaves the plan calibrated
    (a schedule), it runs on until the new plan's pilot supersedes it. The real `runs` functions the
    calibrate flow calls; the flow itself: tests/flows/test_cycle_not_piloted.py."""
    from sqlalchemy import select

    from rollout import pilot_batches, pilots, runs
    from rollout.db.models import AuditEntry, ModelVersion, Pilot
    from rollout.db.session import session_scope
    from sparse_core import SparsePlan

    _challenger(tmp_path, "chat", **PAYS)
    pilot_id = pilot_batches.ensure_pilot("chat")["pilot_id"]
    monkeypatch.setenv("SPARSEPILOT_USER", "olga")
    _new_version(tmp_path, change)
    with session_scope() as s:  # what the calibrate flow's register task records: a new plan
        uc = pilots.get_use_case(s, "chat")
        plan = SparsePlan(tau=0.7)
        mv = ModelVersion(
            use_case_id=uc.id, base_model_ref="m", plan=plan.to_dict(), plan_hash=plan.content_hash()
        )
        s.add(mv)
        s.flush()
        uc_id, mv_id = uc.id, mv.id
    run = runs.open_calibration(uc_id, 2, "calibrate:chat:v2", {}, None)
    with session_scope() as s:
        mv = s.get(ModelVersion, mv_id)
        s.expunge(mv)
    runs.calibration_succeeded(
        "chat", run["id"], model_version=mv, mlflow_run_id="r2", metrics={}, density=0.2
    )

    with session_scope() as s:
        pilot, uc = s.get(Pilot, pilot_id), pilots.get_use_case(s, "chat")
        rows = s.scalars(
            select(AuditEntry).where(
                AuditEntry.action == "pilot.status", AuditEntry.entity_id == str(pilot_id)
            )
        ).all()
        if not stale:
            assert (pilot.status, uc.phase, rows) == ("running", "piloting", [])
            return
        assert (pilot.status, uc.phase) == ("stopped", "calibrated")
        assert [(r.details["to"], r.details["reason"]) for r in rows] == [
            ("stopped", "spec v2 recalibrates this use case")
        ]
        assert pilots.plan_ended(s, uc, pilot.model_version_id) is None  # judged nothing


@pytest.mark.parametrize(("change", "stale"), CHANGES, ids=["budget", "schedule"])
def test_the_old_plans_running_pilot_takes_no_batch_before_a_calibration_under_the_new_budget(
    trust_env, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, change: dict[str, Any], stale: bool
) -> None:  # noqa: ANN001
    """Pilot 1 of the v1 plan runs when v2 tightens the budget: `pilot chat` (and an import, the flow's
    own `ensure_pilot`) fed it batch after batch, a plan judged for v1's budget, until a calibration
    stopped it (`_refusal` let the challenger's running pilot through before asking `not_calibrated`).
    It is refused now, in the words of a new pilot's refusal; the scheduled cycle calibrates first
    (tests/flows/test_cycle_not_piloted.py), which stops it. A schedule change feeds it as before. The
    portfolio's "Waits for" said "more samples", which no batch could bring; it names the calibration."""
    from rollout import pilot_batches, pilots, queries

    _challenger(tmp_path, "chat", **PAYS)
    pilot_id = pilot_batches.ensure_pilot("chat")["pilot_id"]
    monkeypatch.setenv("SPARSEPILOT_USER", "olga")
    _new_version(tmp_path, change)

    refusal = pilot_batches.pilot_refusal("chat")  # what `sparsepilot pilot chat` asks before its flow
    if not stale:
        assert refusal is None and pilot_batches.ensure_pilot("chat")["pilot_id"] == pilot_id
        return
    said = STALE.replace("nothing was started", "pilot 1 of this challenger takes no batch until then")
    assert str(refusal) == said
    with pytest.raises(pilots.PilotStateError) as fed:
        pilot_batches.ensure_pilot("chat", pilot_anyway=True)  # the pilot flow's and an import's first step
    assert str(fed.value) == said and _pilots("chat") == 1
    # the portfolio says what it waits for: the calibration, not "more samples" no batch can bring
    row = next(r for r in queries.read(queries.portfolio) if r["name"] == "chat")
    assert row["waits_for"] == (
        "calibration under spec v2 (the challenger was calibrated under spec v1, and v2 changed "
        "quality_budget.kl): the next scheduled cycle, or `sparsepilot calibrate chat`; its running pilot "
        "takes no batch until then"
    ), row["waits_for"]


@pytest.mark.parametrize(("change", "stale"), CHANGES, ids=["budget", "schedule"])
def test_a_go_of_a_plan_calibrated_for_an_earlier_budget_does_not_continue_the_ramp(
    trust_env, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, change: dict[str, Any], stale: bool
) -> None:  # noqa: ANN001
    """A short pilot's GO before the plan's last step waits for approval when v2 tightens the budget: its
    promotion is refused (above), but one approver could still continue the ramp, more traffic for a plan
    that missed v2's budget. `check_continuable` refuses it now by the same rule, before any approval run
    and under the signature's lock; the Approvals card says so and disables the button. A schedule
    change continues as before."""
    from rollout import approval_runs, approvals, pilot_batches, pilots, queries
    from rollout.auth import Identity
    from rollout.db.models import Pilot
    from rollout.db.session import session_scope

    _challenger(tmp_path, "chat", **PAYS)
    info = pilot_batches.ensure_pilot("chat")
    with session_scope() as s:  # its GO at step 0, the plan's ramp after it: what `promote_after_step` asks
        pilot = s.get(Pilot, info["pilot_id"])
        d, _ = pilots.record_decision(
            s,
            idempotency_key="t:go:chat",
            use_case=pilots.get_use_case(s, "chat"),
            pilot=pilot,
            step=pilots.current_step(s, pilot),
            outcome="GO",
            evidence={"reasons": ["non-inferior"], "later_steps": [{"index": 1, "traffic_pct": 50.0}]},
            explanation="GO",
            data_fingerprint="f" * 64,
            awaiting="approval",
        )
        pilots.stop_pilot(s, pilot, status="awaiting_approval", actor="test", reason="GO")
        did = d.id
    monkeypatch.setenv("SPARSEPILOT_USER", "olga")
    _new_version(tmp_path, change)

    held = queries.read(approvals.continue_held, did)  # the card's continue button, disabled
    if not stale:
        assert held is False
        approval_runs.check_continuable(did)
        return
    changed, remedy = _stale_go_words(did)
    assert held is True
    words = queries.read(approvals.promotion_held_words, did)
    assert words == f"Not approvable, and its ramp does not continue: {changed}. {remedy}."
    refusal = f"decision {did} does not continue the ramp: {changed}; nothing was recorded. {remedy}"
    with pytest.raises(approvals.ApprovalError) as before_any_run:
        approval_runs.check_continuable(did)  # `approve --continue-ramp`, before any approval run
    assert str(before_any_run.value) == refusal
    alice = Identity(name="alice", role="approver", source="cli-env")
    with pytest.raises(approvals.ApprovalError) as signed:
        approvals.approve(did, alice, "more traffic", continue_ramp=True)  # the card's click, under the lock
    assert str(signed.value) == refusal
    assert queries.read(queries.pending_decisions)[0]["id"] == did  # nothing recorded: it still waits
