"""After an abort, every text said "calibrate a new challenger (or add a new spec version) to pilot again"
(the INVALID's remedy, the portfolio's "start over with a new challenger"), which led nowhere: on an
unchanged spec `calibrate` reuses its finished run, and a new spec version whose calibration finds the
same plan registers the same model version (one per plan hash), so `pilot` refused the challenger again.
Now a person pilots an aborted pilot's challenger again (`pilot NAME --again --reason TEXT`,
`pilot_batches.start_again`): a new pilot, its GO at the next level of the use case's alpha spending,
audited; never the pipeline, and never after a NO-GO or a rejection, which judged the plan. Real state DB."""

from __future__ import annotations

from pathlib import Path

import pytest

from .test_decision_money import _go_awaiting_approval
from .test_not_piloted import PAYS, _challenger


@pytest.mark.parametrize("stood", ["running", "awaiting approval"])
def test_an_aborted_pilots_challenger_is_piloted_again_by_a_person(
    sp_home, tmp_path: Path, stood: str
) -> None:  # noqa: ANN001
    from sqlalchemy import select

    from rollout import pilot_batches, pilots
    from rollout.db.models import AuditEntry, Pilot
    from rollout.db.session import session_scope

    _challenger(tmp_path, "pays", **PAYS)
    if stood == "running":
        first = pilot_batches.ensure_pilot("pays")["pilot_id"]
    else:  # a GO waiting for approval, aborted rather than rejected: the abort judged nothing
        _go_awaiting_approval("pays")
        with session_scope() as s:
            first = s.scalar(select(Pilot.id))
    pilot_batches.abort("pays", actor="olga", reason="the serving system sent 30% to sparse, not 10%")
    refused = str(pilot_batches.pilot_refusal("pays"))
    assert refused.startswith(
        "pays: pilot 1 of this challenger was aborted; `sparsepilot pilot pays --again --reason TEXT` pilots "
        "its challenger again"
    ), refused
    with pytest.raises(pilots.PilotStateError, match="was aborted"):  # the pipeline never restarts it
        pilot_batches.ensure_pilot("pays", pilot_anyway=True)
    with pytest.raises(pilots.PilotStateError, match="--again needs a --reason"):
        pilot_batches.start_again("pays", actor="olga", reason=" \u200b")

    out = pilot_batches.start_again("pays", actor="olga", reason="split fixed at 10%")
    assert (out["pilot"], out["aborted"]) == ("pilot 2", "pilot 1")
    with session_scope() as s:
        one, two = s.get(Pilot, first), s.get(Pilot, out["pilot_id"])
        assert two.model_version_id == one.model_version_id and two.status == "running"
        assert two.go_alpha < one.go_alpha  # the aborted pilot counts toward the use case's alpha
        row = s.scalar(select(AuditEntry).where(AuditEntry.action == "pilot.again"))
        assert (row.actor, row.entity_id) == ("olga", str(two.id))
        assert row.details["reason"] == "split fixed at 10%" and row.details["aborted_pilot_id"] == first
    assert pilot_batches.pilot_refusal("pays") is None  # `pilot NAME`, imports and the cycle go on with it
    assert pilot_batches.ensure_pilot("pays")["pilot_id"] == out["pilot_id"]
    with pytest.raises(pilots.PilotStateError, match="pilot 2 of this challenger is running, not aborted"):
        pilot_batches.start_again("pays", actor="olga", reason="twice")


def test_a_rejected_challenger_is_not_piloted_again(sp_home, tmp_path: Path) -> None:  # noqa: ANN001
    from rollout import approvals, pilot_batches, pilots
    from rollout.auth import Identity

    _challenger(tmp_path, "pays", **PAYS)
    did, _ = _go_awaiting_approval("pays")
    for who in ("alice", "bob"):
        approvals.approve(did, Identity(who, "approver", "cli-env"), "no", reject=True)
    with pytest.raises(pilots.PilotStateError) as refused:
        pilot_batches.start_again("pays", actor="olga", reason="try once more")
    assert str(refused.value) == (
        f"pays: pilot 1 of this challenger has ended (stopped) and is not piloted again; "
        f"{pilots.pilot_again('pays')}"
    )
    from .test_not_piloted import _pilots

    assert _pilots("pays") == 1  # nothing started


def test_the_sample_ratio_mismatchs_way_out_names_the_command_that_pilots_again() -> None:
    """The INVALID's remedy and the portfolio's 'Waits for' said "calibrate a new challenger" / "start over
    with a new challenger" after a mismatch of the serving system's split; at the limit (a NO-GO) the way on
    is another plan, never `--again`."""
    from rollout.decisions import invalid_remedy
    from rollout.pilots import pilot_again
    from rollout.queries import waits_for

    remedy = invalid_remedy("pays", "INVALID", ["sample-ratio-mismatch"], 10.0)
    assert remedy.startswith(
        'To start over: `sparsepilot pilot pays --abort --reason "..."`, then '
        "`sparsepilot pilot pays --again "
        '--reason "..."` pilots its challenger again, with the serving system sending 10% of the requests to '
        "the sparse model;"
    ), remedy
    row = {"name": "pays", "pilot_status": "running", "decision": "INVALID", "decision_kind": "gate",
           "awaiting": "none", "decision_reasons": ["sample-ratio-mismatch"]}  # fmt: skip
    assert waits_for(row) == (
        "an operator: abort the pilot (`sparsepilot pilot pays --abort --reason TEXT`) and pilot its "
        "challenger again (`sparsepilot pilot pays --again --reason TEXT`) (data not trusted: sample ratio "
        "mismatch)"
    )
    at_max = invalid_remedy("pays", "NO-GO", ["max-duration-invalid", "sample-ratio-mismatch"], 10.0)
    assert at_max.startswith(f"To pilot again: {pilot_again('pays')}; pilot it with the serving system")
    assert "--again" not in at_max and "`sparsepilot usecase add SPEC --new-version`" in at_max


def _spec_version(tmp_path: Path, spending: str) -> None:
    """A new spec version of `pays` whose gate spends alpha `spending`-wise (`usecase add --new-version`)."""
    import yaml

    from rollout.usecases import add_usecase

    spec_file = next((tmp_path / "pays").glob("*.yaml"))
    spec = yaml.safe_load(spec_file.read_text())
    spec["gate"]["alpha_spending"] = spending
    spec_file.write_text(yaml.safe_dump(spec))
    add_usecase(spec_file, actor="test-owner", new_version=True)


@pytest.mark.parametrize(
    ("first", "then", "ends"),
    [
        ("use_case", "pilot", "piloted"),  # pilot 1 at 0.0304: `use_case` leaves 0.0076 for pilot 2
        ("pilot", None, "not piloted again"),  # pilot 1 at alpha itself: nothing left under either spending
        ("before spending", None, "not piloted again"),  # a pilot with no stored level ran at alpha
    ],
)
def test_every_refusal_of_again_names_a_way_that_works_or_none(
    sp_home, tmp_path: Path, first: str, then: str | None, ends: str
) -> None:  # noqa: ANN001
    """Under `gate.alpha_spending: pilot` every pilot runs at alpha on its own, so `--again` (a fresh alpha
    each try) is refused. Its refusal named a `use_case` spec version, then `--again`, even where the
    earlier pilots had spent all of alpha: that `--again` was refused in turn, naming `alpha_spending:
    pilot`: a loop, no command worked. Each refusal's named spec version is followed here literally until
    `--again` pilots it or the refusal names no further `--again`; a spec version named twice is a loop."""
    import re

    from rollout import pilot_batches, pilots
    from rollout.db.models import Pilot
    from rollout.db.session import session_scope

    from .test_not_piloted import _pilots

    _challenger(tmp_path, "pays", **PAYS)
    if first == "pilot":
        _spec_version(tmp_path, "pilot")
    started = pilot_batches.ensure_pilot("pays")["pilot_id"]
    if first == "before spending":
        with session_scope() as s:
            s.get(Pilot, started).go_alpha = None
    pilot_batches.abort("pays", actor="olga", reason="trending badly")
    if then:
        _spec_version(tmp_path, then)
    added: list[str] = []
    while True:
        try:
            out = pilot_batches.start_again("pays", actor="olga", reason="once more")
        except pilots.PilotStateError as refused:
            text = str(refused)
            named = re.search(r"version with gate\.alpha_spending: (\w+)", text)  # the spec change named
            if named is None:  # no spec change named: it works as it is, or there is no way
                assert ends in text and "--again" not in text, text
                assert text.endswith(pilots.pilot_again("pays")), text
                assert _pilots("pays") == 1
                return
            assert named.group(1) not in added, f"a loop: {added} then {text}"
            added.append(named.group(1))
            _spec_version(tmp_path, named.group(1))
            continue
        assert ends == "piloted" and added == ["use_case"], (ends, added)
        assert out["pilot"] == "pilot 2" and 0 < out["go_alpha"] < 0.0304
        return


def _no_go(tag: str) -> None:
    """The current challenger's pilot started and judged NO-GO, as `gate_step` records one."""
    from rollout import pilot_batches, pilots
    from rollout.db.models import Pilot
    from rollout.db.session import session_scope

    info = pilot_batches.ensure_pilot("pays")
    with session_scope() as s:
        uc, p = pilots.get_use_case(s, "pays"), s.get(Pilot, info["pilot_id"])
        d, _ = pilots.record_decision(
            s, idempotency_key=f"t:nogo:{tag}", use_case=uc, pilot=p, step=pilots.current_step(s, p),
            outcome="NO-GO", evidence={"reasons": ["futility"]}, explanation="NO-GO",
            data_fingerprint=tag * 64, awaiting="none",
        )  # fmt: skip
        pilots.stop_pilot(s, p, status="stopped", actor="pipeline", reason=f"decision {d.id}: NO-GO")


def _calibrated(key: str, mv_id: int | None = None) -> int:
    """A finished calibration whose challenger is `mv_id` (a calibration that found that plan again), or
    a new plan's model version, evaluated: what `latest_challenger` returns next."""
    from rollout.db.models import CalibrationRun, EvaluationRun, ModelVersion
    from rollout.db.session import session_scope
    from rollout.pilots import get_use_case
    from sparse_core import SparsePlan

    with session_scope() as s:
        uc = get_use_case(s, "pays")
        if mv_id is None:
            plan = SparsePlan(tau=0.7)
            mv = ModelVersion(use_case_id=uc.id, base_model_ref="m", plan=plan.to_dict(),
                              plan_hash=plan.content_hash(), density=0.4)  # fmt: skip
            s.add(mv)
            s.flush()
            mv_id = mv.id
            s.add(EvaluationRun(idempotency_key=f"evaluate:{key}", use_case_id=uc.id, model_version_id=mv_id,
                                spec_version=1, status="succeeded", roi={"decode": {"status": "dense"}},
                                **PAYS))  # fmt: skip
        met = {"met_budget": True, "prefill_met_budget": True, "density": 0.4}
        s.add(CalibrationRun(idempotency_key=key, use_case_id=uc.id, spec_version=1, status="succeeded",
                             model_version_id=mv_id, metrics=met))  # fmt: skip
        return mv_id


@pytest.mark.parametrize("ended", ["NO-GO", "aborted"])
def test_a_plan_is_judged_over_all_its_pilots_when_another_plans_pilot_came_between(
    sp_home, tmp_path: Path, ended: str
) -> None:  # noqa: ANN001
    """Only the use case's latest pilot was asked whether this plan was judged: once another plan's pilot
    came after it and the challenger moved back to it (a spec reverted: calibration finds the same plan),
    the pipeline piloted a NO-GO'd plan again, and restarted an aborted one without a person's --again."""
    from rollout import pilot_batches, pilots
    from rollout.db.session import session_scope

    from .test_not_piloted import _pilots

    _challenger(tmp_path, "pays", **PAYS)
    with session_scope() as s:
        plan_a = pilot_batches.latest_challenger(s, pilots.get_use_case(s, "pays").id).model_version_id
    if ended == "NO-GO":
        _no_go("a")
    else:
        pilot_batches.ensure_pilot("pays")
        pilot_batches.abort("pays", actor="olga", reason="the split was wrong")
    _calibrated("calibrate:pays:B")
    _no_go("b")  # plan B's pilot 2 came between
    _calibrated("calibrate:pays:A-again", plan_a)  # the challenger is plan A again
    refused = str(pilot_batches.pilot_refusal("pays", pilot_anyway=True))
    with pytest.raises(pilots.PilotStateError) as started:  # the pipeline's way in, and `pilot NAME`'s
        pilot_batches.ensure_pilot("pays", pilot_anyway=True)
    assert str(started.value) == refused
    if ended == "NO-GO":
        assert refused.startswith(
            "pays: pilot 1 of this challenger has ended (stopped) and is not piloted"
        ), refused
        with pytest.raises(pilots.PilotStateError, match="pilot 1 of this challenger has ended"):
            pilot_batches.start_again("pays", actor="olga", reason="once more")
        assert _pilots("pays") == 2
    else:
        assert refused.startswith(
            "pays: pilot 1 of this challenger was aborted; `sparsepilot pilot pays --again"
        ), refused
        out = pilot_batches.start_again("pays", actor="olga", reason="split fixed")
        assert (out["pilot"], out["aborted"]) == ("pilot 3", "pilot 1")


def test_every_text_around_an_invalid_look_and_its_abort_names_commands_that_work(
    sp_home, tmp_path: Path
) -> None:  # noqa: ANN001
    """A running pilot's INVALID (crossed bounds) waited for `pilot NAME --again` (refused as written: no
    --reason, and the pilot still ran) and never named the abort; `--again` on it said `pilot NAME` goes on
    with it (only INVALID again); after the abort the portfolio and `usecase show` named no way on. Each
    named command is run here as written (--abort, --again: their functions, with the reason TEXT)."""
    import re

    from rollout import pilot_batches, pilots, queries
    from rollout.db.models import Pilot
    from rollout.db.session import session_scope
    from rollout.usecases import show_usecase

    def named(text: str) -> list[str]:
        return re.findall(r"`sparsepilot pilot pays (--\w+) --reason TEXT`", text)

    def run(option: str) -> None:  # `sparsepilot pilot pays OPTION --reason TEXT`, literally
        act = {"--abort": pilot_batches.abort, "--again": pilot_batches.start_again}[option]
        act("pays", actor="olga", reason="TEXT")

    _challenger(tmp_path, "pays", **PAYS)
    info = pilot_batches.ensure_pilot("pays")
    with session_scope() as s:
        uc, p = pilots.get_use_case(s, "pays"), s.get(Pilot, info["pilot_id"])
        pilots.record_decision(
            s, idempotency_key="t:invalid", use_case=uc, pilot=p, step=pilots.current_step(s, p),
            outcome="INVALID", evidence={"reasons": ["crossed-bounds"]}, explanation="INVALID",
            data_fingerprint="e" * 64, awaiting="none",
        )  # fmt: skip
    waits = queries.read(queries.portfolio)[0]["waits_for"]
    assert named(waits) == ["--abort", "--again"], waits
    with pytest.raises(pilots.PilotStateError) as refused:  # the pilot still runs
        run("--again")
    assert named(str(refused.value)) == ["--abort", "--again"], str(refused.value)
    run("--abort")
    waits = queries.read(queries.portfolio)[0]["waits_for"]
    assert named(waits) == ["--again"], waits
    assert show_usecase("pays")["waits_for"] == waits
    run("--again")
    assert queries.read(queries.portfolio)[0]["pilot_status"] == "running"
