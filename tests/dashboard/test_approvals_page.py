"""The Approvals page under AppTest against a real seeded state DB: a click on a card someone else
resolved meanwhile, overrides of a running pilot's decision that asked nobody, and what a half-signed
override waits for on every page (review U)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy import select

from rollout import approvals, pilot_batches, queries
from rollout.auth import Identity
from rollout.db.models import Approval, GateDecision
from rollout.db.session import session_scope
from tests.dashboard.apptest_helpers import button_labels, new_app, open_page, sign_in, texts
from tests.fixtures.dashboard import later_look_awaiting_approval

CAROL = Identity("carol", "approver", "local-account")


def _errors(at: Any) -> str:
    return "\n".join(e.value.replace("\\", "") for e in at.error)  # as shown: markup escapes removed


def test_a_click_on_a_card_resolved_meanwhile_says_what_became_of_the_decision(
    seeded: dict[str, Any],
) -> None:
    """Review U1: alice's page shows a card; carol decides it (or an operator aborts the pilot) before
    alice clicks. The click used to be dropped (the card was not drawn on the rerun, so its button did
    not exist) under "Nothing is waiting for a decision"; it now reaches rollout.approvals, whose check
    says what became of the decision, and nothing of alice's is recorded."""
    with session_scope() as s:  # an EXTEND waiting for a person: rejecting it takes effect at once
        extend = later_look_awaiting_approval(s, seeded["document-qa:decision"])
    go = seeded["contract-summarisation:decision"]
    at = open_page(sign_in(new_app(), "alice"), "approvals")
    assert {f"approve_{extend}", f"approve_{go}"} <= {b.key for b in at.button}
    at.text_area(key=f"reason_{extend}").input("worth it this quarter")
    at.text_area(key=f"reason_{go}").input("evidence is clear")

    approvals.approve(extend, CAROL, "not worth a second look", reject=True)  # another browser, the CLI
    at.button(key=f"approve_{extend}").click().run()
    assert not at.exception, [e.value for e in at.exception]
    shown = _errors(at)
    assert f"decision {extend} was already rejected by carol" in shown, texts(at)
    assert "nothing was recorded" in shown

    pilot_batches.abort("contract-summarisation", actor="ops", reason="traffic spike")
    at.button(key=f"approve_{go}").click().run()
    assert not at.exception, [e.value for e in at.exception]
    shown = _errors(at)
    assert f"decision {go} was closed: pilot" in shown and "aborted by ops" in shown, texts(at)
    assert "(reason: traffic spike)" in shown
    with session_scope() as s:
        assert s.scalars(select(Approval.actor).where(Approval.actor == "alice")).all() == []
        assert s.get(GateDecision, go).resolution == "aborted"


def test_an_override_of_a_running_pilots_extend_is_started_and_co_signed_from_the_page(
    seeded: dict[str, Any],
) -> None:
    """Review U2/U6: document-qa's EXTEND asked nobody, so Approvals listed nothing and an override could
    be started or co-signed only from the CLI. The page offers "Promote anyway" on the running pilot's
    latest decision; once alice signs, the decision is listed with her signature and a button for a
    second approver, and the portfolio, the use-case page and Approvals say it waits for "a second
    approver" (the use-case page said "-")."""
    did = seeded["document-qa:decision"]
    at = open_page(sign_in(new_app(), "alice"), "approvals")
    assert f"approve_{did}" in {b.key for b in at.button}
    # review s48 B4: the card said "The gate recommends: reject", a button it does not have, of a pilot
    # the portfolio says waits for more samples
    said = [m.value for m in at.markdown if m.value.startswith("The gate recommends")]
    assert said == [  # contract-summarisation's GO, asked for; document-qa's EXTEND
        "The gate recommends: **approve**.",
        "The gate recommends: **keep the pilot collecting** (the use case waits for more samples (120/300 in "
        "the smaller arm)); promoting now is an override.",
    ], said
    assert f"reject_{did}" not in {b.key for b in at.button}  # stopping a pilot is `pilot --abort`
    assert "Promote anyway" in button_labels(at)
    at.text_area(key=f"reason_{did}").input("the business needs it this quarter")
    at.button(key=f"approve_{did}").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("Signature recorded, not yet in effect" in w.value for w in at.warning)

    with session_scope() as s:
        pending = {d["id"]: d for d in queries.pending_decisions(s)}
        assert pending[did]["waits_for"] == "a second approver"
        assert [a["actor"] for a in pending[did]["approvals"]] == ["alice"]
        assert did not in {d["id"] for d in queries.overridable_decisions(s)}
        row = next(r for r in queries.portfolio(s) if r["name"] == "document-qa")
        assert row["waits_for"] == "a second approver"

    at = open_page(sign_in(new_app(), "carol"), "approvals")
    assert f"#{did} document-qa: EXTEND, waiting for a second approver" in texts(at)
    assert "alice signed an override (approve)" in texts(at)
    assert "Co-sign the promotion" in button_labels(at)

    at.query_params["name"] = "document-qa"
    open_page(at, "use_case")
    assert {m.label: m.value for m in at.metric}["Waits for"] == "a second approver"


def test_a_half_signed_reject_of_a_go_waits_for_a_second_approver_on_the_use_case_page(
    seeded: dict[str, Any],
) -> None:
    """Review U6: the portfolio said "a second approver", the use-case page "approval to promote"."""
    go = seeded["contract-summarisation:decision"]
    first = approvals.approve(go, Identity("alice", "approver", "local-account"), "too risky", reject=True)
    assert first.needs_second_approver
    at = new_app()
    at.query_params["name"] = "contract-summarisation"
    open_page(at, "use_case")
    assert {m.label: m.value for m in at.metric}["Waits for"] == "a second approver"


def test_an_approval_with_mlflow_down_says_so_within_seconds(
    seeded: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review U5: with the tracking server down, MLflow's client retried 7 times with backoff and alice
    watched a running page for over 4 minutes. The dashboard asks MLflow for a short retry budget, so the
    approval is recorded and the page says at once that the promotion is not in effect."""
    budget = (
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
        "MLFLOW_HTTP_REQUEST_TIMEOUT",
    )
    for key in budget:  # dashboard/app.py sets them in this process: restored after the test
        monkeypatch.setenv(key, "x")
        monkeypatch.delenv(key)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    go = seeded["contract-summarisation:decision"]
    at = open_page(sign_in(new_app(), "alice"), "approvals")
    at.text_area(key=f"reason_{go}").input("evidence is clear")
    began = time.monotonic()
    at.button(key=f"approve_{go}").click().run(timeout=600)
    took = time.monotonic() - began
    assert not at.exception, [e.value for e in at.exception]
    assert took < 60, f"the click took {took:.0f} s"
    shown = "\n".join(w.value.replace("\\", "") for w in at.warning)
    assert f"Decision #{go} of contract-summarisation was approved by alice" in shown, texts(at)
    assert "not in effect" in shown


def test_a_withdrawn_signature_is_shown_as_withdrawn_and_counts_nothing(seeded: dict[str, Any]) -> None:
    """The card's signature table listed alice's withdrawn override signature (and her withdrawal) as
    if they stood, beside carol's first signature: each row now says whether it counts ("withdrawn by
    alice at ...", "a withdrawal: counts nothing", "counts"), and only carol's is counted: the card's
    warning, its co-sign button, the portfolio's "Waits for" and the headline; once the override takes
    effect but its promotion does not complete, the page's "approved by" (`queries.signed_by`) names
    neither alice's withdrawn signature nor her withdrawal."""
    did = seeded["document-qa:decision"]  # a running pilot's EXTEND that asked nobody
    alice = Identity("alice", "approver", "local-account")
    waiting = queries.read(queries.portfolio_totals)["pending_approvals"]  # the seeded GO's card
    assert approvals.approve(did, alice, "the business needs it").needs_second_approver
    approvals.withdraw(did, alice, "signed by mistake")
    assert approvals.approve(did, CAROL, "worth it").needs_second_approver  # a first signature again

    at = open_page(sign_in(new_app(), "alice"), "approvals")  # hers taken back, she may co-sign carol's
    table = next(d.value for d in at.dataframe if "against_recommendation" in d.value.columns)
    rows = list(zip(table["actor"], table["action"], table["status"], strict=True))
    assert rows[1:] == [("alice", "withdraw", "a withdrawal: counts nothing"), ("carol", "approve", "counts")]
    assert rows[0][:2] == ("alice", "approve") and rows[0][2].startswith("withdrawn by alice at ")
    assert rows[0][2].endswith(" UTC")
    assert "carol signed an override (approve)" in texts(at) and "alice signed" not in texts(at)
    assert "Co-sign the promotion" in button_labels(at)
    with session_scope() as s:
        row = next(r for r in queries.portfolio(s) if r["name"] == "document-qa")
        assert (row["signatures"], row["waits_for"]) == (1, "a second approver")
        assert queries.portfolio_totals(s)["pending_approvals"] == waiting + 1  # one card, not two
    # who signed it, as a decision decided but not in effect names them ("approved by ..."): carol, not
    # alice's withdrawn signature and her withdrawal beside her
    assert queries.signed_by(queries.read(queries.decision, did)["approvals"]) == ["carol"]


def test_an_oidc_approver_taken_off_the_dashboards_list_no_longer_counts_on_the_page(
    seeded: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ann, an OIDC approver, signed "promote anyway"; then she was taken off the approver list in the
    dashboard's secrets, which rollout never saw: her signature still counted, the page waited for a
    second approver and ben's click completed the override on it. The page says hers lapsed, and ben's
    click is the first signature (said on the page), as for a demoted local account."""
    from streamlit.testing.v1 import AppTest

    from tests.dashboard.apptest_helpers import APP

    monkeypatch.delenv("SPARSEPILOT_OIDC_APPROVERS", raising=False)
    did = seeded["document-qa:decision"]  # EXTEND on a running pilot: promoting is an override
    ann = Identity("oidc:ann@example.com", "approver", "oidc", subject="https://idp.example#ann")
    assert approvals.approve(did, ann, "the business needs it this quarter").needs_second_approver
    at = AppTest.from_file(str(APP), default_timeout=90)
    at.secrets["auth"] = {"redirect_uri": "http://127.0.0.1:8501/oauth2callback", "cookie_secret": "x"}
    at.secrets["sparsepilot"] = {"approvers": ["ben@example.com"]}
    at.user = {
        "is_logged_in": True,
        "exp": 4102444800,
        "email": "ben@example.com",
        "email_verified": True,
        "sub": "ben",
    }
    open_page(at.run(), "approvals")
    gone = "oidc:ann@example.com is no longer on the OIDC approver list"
    assert gone in texts(at).replace("\\", "")
    at.text_area(key=f"reason_{did}").input("agreed with ann")
    at.button(key=f"approve_{did}").click().run()
    assert not at.exception, [e.value for e in at.exception]
    shown = "\n".join(w.value.replace("\\", "") for w in at.warning)
    assert f"oidc:ann@example.com's signature no longer counts ({gone})" in shown, texts(at)
    with session_scope() as s:
        assert s.get(GateDecision, did).resolution is None


def test_a_secret_in_a_signatures_reason_is_stored_and_shown_redacted(seeded: dict[str, Any]) -> None:
    """Review s47 T3: a reason was stored redacted in its audit row but raw in its Approval row (another
    append-only table: it stayed for good) and shown raw in the card's table of signatures. The reason
    is redacted once, as every store keeps it; a row signed before is shown redacted."""
    secret = "hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567"
    did = seeded["document-qa:decision"]  # a running pilot's EXTEND that asked nobody: an override
    alice = Identity("alice", "approver", "local-account")
    assert approvals.approve(did, alice, f"worth it; the repro needs HF_TOKEN={secret}").needs_second_approver
    with session_scope() as s:  # carol's, as a signature was stored before: its reason as typed
        s.add(Approval(decision_id=did, actor="carol", role="approver", action="approve",
                       reason=f"agreed, token {secret}", against_recommendation=True))  # fmt: skip
    with session_scope() as s:
        stored = [
            a.reason
            for a in s.scalars(select(Approval).where(Approval.decision_id == did).order_by(Approval.id))
        ]
    assert stored[0] == "worth it; the repro needs HF_TOKEN=***", stored
    at = open_page(sign_in(new_app(), "alice"), "approvals")
    table = next(d.value for d in at.dataframe if "against_recommendation" in d.value.columns)
    assert list(table["reason"]) == ["worth it; the repro needs HF_TOKEN=***", "agreed, token hf_***"]


def test_a_closed_decisions_refusal_says_an_old_abort_reason_redacted(seeded: dict[str, Any]) -> None:
    """Review s47 T1: the refusal of a decision closed by `pilot --abort` quoted the abort's reason from
    its audit row as stored; a row written before details were stored redacted put its secret there."""
    from rollout import audit
    from rollout.db.models import AuditEntry

    go = seeded["contract-summarisation:decision"]
    pilot_batches.abort("contract-summarisation", actor="ops", reason="traffic spike")
    with session_scope() as s:  # the abort's row as the code before wrote it: its reason as typed
        entry = s.scalars(select(AuditEntry).where(AuditEntry.action == "pilot.abort")).one()
        raw = {"reason": "db https://ops:hunter2@db/x down"}
        where = {"use_case_id": entry.use_case_id, "entity": "pilot", "entity_id": entry.entity_id}
        audit._append(s, AuditEntry(actor="ops", action="pilot.abort", details=raw, **where))
    with pytest.raises(approvals.ApprovalError, match=r"\(reason: db https://ops:\*\*\*@db/x down\)"):
        approvals.approve(go, CAROL, "evidence is clear")


def _champions_alarm(seeded: dict[str, Any]) -> int:
    """The monitor's alarm about contract-summarisation's champion (policy manual), as
    `decisions.monitor_look` writes it: a rollback waiting for a person. Its id."""
    from rollout import pilots
    from rollout.db.models import Pilot, UseCase

    with session_scope() as s:
        uc = s.scalar(select(UseCase).where(UseCase.name == "contract-summarisation"))
        alarm, _ = pilots.record_decision(
            s,
            idempotency_key="monitor:test:alarm",
            use_case=uc,
            pilot=s.get(Pilot, seeded["contract-summarisation:pilot"]),
            kind="monitor",
            outcome="NO-GO",
            evidence={"guardrails": {"breached": ["error_rate"]}},
            explanation="Monitor: NO-GO. A rollback waits for a person's approval (rollback policy: manual).",
            data_fingerprint="m" * 64,
            awaiting="rollback_approval",
            actor="sparsepilot-monitor",
        )
        return alarm.id


def test_a_go_card_says_why_it_is_not_promotable_while_the_champions_alarm_waits(
    seeded: dict[str, Any],
) -> None:
    """While the monitor's alarm about the serving champion waits for a person, the GO's card offered
    "Approve promotion", and a click was refused (`approvals.refuse_promotion_while_rollback_waits`). The
    card now says why it cannot be approved now and what to do, by the same rule
    (`approvals.promotion_held_words`), its promote button disabled; the alarm's own card is approvable."""
    go = seeded["contract-summarisation:decision"]
    alarm = _champions_alarm(seeded)
    at = open_page(sign_in(new_app(), "alice"), "approvals")
    buttons = {b.key: b for b in at.button}
    assert buttons[f"approve_{go}"].disabled and not buttons[f"approve_{alarm}"].disabled
    assert f"reject_{go}" in buttons  # rejecting the GO is no promotion: still offered
    shown = "\n".join(w.value.replace("\\", "") for w in at.warning)  # as shown: markup escapes removed
    assert (
        "Not approvable now: the monitor's alarm about contract-summarisation's serving champion (decision "
        f"{alarm}) waits for a person. Decide the alarm first: roll the champion back (`sparsepilot approve "
        f"contract-summarisation --decision {alarm} --reason TEXT`) or keep it (`sparsepilot approve "
        f"contract-summarisation --decision {alarm} --reject --reason TEXT`), then approve the promotion."
    ) in shown
    # its header says what it waits for: the alarm first (it read "waiting for approval to promote")
    header = next(h.value for h in at.subheader if h.value.startswith(f"#{go} "))
    assert header == (
        f"#{go} contract-summarisation: GO, waiting for approval to roll back the champion (the monitor's "
        f"alarm, decision {alarm}: `sparsepilot approve contract-summarisation --decision {alarm} --reason "
        "TEXT` rolls it back, with `--reject` keeps it), before any promotion"
    )


def _stale_go(seeded: dict[str, Any], later: list[dict[str, Any]]) -> int:
    """A later look's GO of contract-summarisation waiting for approval, its plan calibrated under v1 and
    left uncalibrated by spec v2 (a tighter `quality_budget.kl`): `later`, the plan's steps after its own
    ([]: the last step's GO). Its stored explanation carries the skip note `decisions.gate_step` writes
    into a GO that asks for approval before the plan's last step. Its id."""
    from rollout.db.models import CalibrationRun, Pilot, SpecVersion, UseCase

    name = "contract-summarisation"
    with session_scope() as s:  # v1 calibrated the plan; v2 tightens the budget; a later look's GO
        uc = s.scalar(select(UseCase).where(UseCase.name == name))
        pilot = s.get(Pilot, seeded[f"{name}:pilot"])
        s.add(
            CalibrationRun(
                idempotency_key="cal:v1",
                use_case_id=uc.id,
                spec_version=1,
                model_version_id=pilot.model_version_id,
                status="succeeded",
            )
        )
        v1 = s.scalar(select(SpecVersion).where(SpecVersion.use_case_id == uc.id))
        tighter = {**v1.spec, "quality_budget": {**v1.spec["quality_budget"], "kl": 0.01}}
        s.add(SpecVersion(use_case_id=uc.id, version=2, spec=tighter, spec_hash="h-v2", created_by="tests"))
        uc.current_spec_version = 2
        return _go_look(s, seeded, later)


def _go_look(s: Any, seeded: dict[str, Any], later: list[dict[str, Any]]) -> int:
    """A later look's GO of contract-summarisation waiting for approval, recorded as `decisions.gate_step`
    records it (its skip note, offering the continuing, in the stored explanation where `later` names
    the plan's steps after its own). Its id."""
    evidence = {"later_steps": later}
    offered = f"Decision: GO. {approvals.skip_note(evidence, waits_for_approval=True)}".rstrip()
    return later_look_awaiting_approval(
        s, seeded["contract-summarisation:decision"], outcome="GO", evidence=evidence, explanation=offered
    )


def test_a_stale_go_card_says_why_its_ramp_does_not_continue_while_the_champions_alarm_waits(
    seeded: dict[str, Any],
) -> None:
    """A GO before the plan's last step, its plan left uncalibrated by spec v2 (a tighter
    `quality_budget.kl`), while the monitor's alarm about the serving champion waits: the card said only
    the alarm's words ("... then approve the promotion", which the calibration rule then refuses) while its
    continue button was disabled for the calibration reason, said nowhere. It says both now, the
    calibration's first (`approvals.promotion_held_words`); and its skip note, caption and info box (the
    stored explanation, shown without it) no longer offer the disabled continuing ("One approver may
    instead continue the ramp ...")."""
    name = "contract-summarisation"
    go = _stale_go(seeded, [{"index": 2, "traffic_pct": 50.0}])
    alarm = _champions_alarm(seeded)
    at = open_page(sign_in(new_app(), "alice"), "approvals")
    buttons = {b.key: b for b in at.button}
    assert buttons[f"approve_{go}"].disabled and buttons[f"continue_{go}"].disabled
    shown = "\n".join(w.value.replace("\\", "") for w in at.warning)  # as shown: markup escapes removed
    assert (
        "Not approvable, and its ramp does not continue: spec v2 changed quality_budget.kl after the plan "
        "pilot 1 runs was calibrated under v1: the plan has not been calibrated under v2. Reject it "
        f"(`sparsepilot approve {name} --decision {go} --reject --reason TEXT`) and run `sparsepilot "
        f"calibrate {name}`: a plan calibrated under v2 is piloted anew. Besides, the monitor's alarm about "
        f"{name}'s serving champion (decision {alarm}) waits for a person. Decide the alarm first: roll the "
        f"champion back (`sparsepilot approve {name} --decision {alarm} --reason TEXT`) or keep it "
        f"(`sparsepilot approve {name} --decision {alarm} --reject --reason TEXT`)."
    ) in shown, shown
    assert "Promoting on this decision skips ramp step 2 (50%) of the spec's plan" in shown, shown
    # the info box's stored explanation too (a record, never rewritten): it said "One approver may
    # instead continue the ramp to step 2 (50%) ..."; it leaves the note to the warning now
    # (`approvals.explanation_shown`)
    info = "\n".join(i.value.replace("\\", "") for i in at.info)
    assert "Decision: GO." in info and "Promoting on this decision skips" not in info, info
    said = shown + "\n".join(c.value for c in at.caption) + info
    assert "continue the ramp" not in said and "does what the plan would" not in said, said


def test_a_go_no_signature_can_promote_says_its_way_on_in_the_cards_header(seeded: dict[str, Any]) -> None:
    """Fix-s S1: the last step's GO, its plan left uncalibrated by spec v2, is promoted by no signature
    (the card's "Not approvable" warning, its button disabled), yet the card's header read "GO, waiting
    for approval to promote". It says the portfolio's way on now (`approvals.promotion_refused_waits`,
    `queries.pending_decisions`), in the portfolio's words."""
    name = "contract-summarisation"
    go = _stale_go(seeded, [])
    at = open_page(sign_in(new_app(), "alice"), "approvals")
    header = next(h.value for h in at.subheader if h.value.startswith(f"#{go} "))
    assert header == (
        f"#{go} {name}: GO, waiting for a rejection, then a calibration under spec v2 (v2 changed "
        "quality_budget.kl after the plan was calibrated under v1; no promotion of it is signed): "
        f"`sparsepilot approve {name} --decision {go} --reject --reason TEXT`, then `sparsepilot calibrate "
        f"{name}`"
    ), header
    row = next(r for r in queries.read(queries.portfolio) if r["name"] == name)
    assert header.endswith(f"waiting for {row['waits_for']}")  # one wording: the portfolio's


def test_a_go_cards_skip_note_is_said_once(seeded: dict[str, Any]) -> None:
    """Fix-s S2: a GO before the plan's last step that waits for approval said its skip note twice: in
    the card's warning and in its info box, the stored explanation carrying it (`decisions.gate_step`).
    The info box shows the explanation without it (`approvals.explanation_shown`; the row is a record,
    never rewritten); the warning says it, offering the continuing, its button enabled."""
    with session_scope() as s:
        go = _go_look(s, seeded, [{"index": 2, "traffic_pct": 50.0}])
    at = open_page(sign_in(new_app(), "alice"), "approvals")
    assert not {b.key: b for b in at.button}[f"continue_{go}"].disabled
    said = texts(at).replace("\\", "")
    assert said.count("Promoting on this decision skips ramp step 2 (50%)") == 1, said
    assert said.count("One approver may instead continue the ramp to step 2 (50%)") == 1, said
    assert "Decision: GO." in "\n".join(i.value for i in at.info)
