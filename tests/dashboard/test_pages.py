"""Every dashboard page under AppTest: seeded data shown, an empty install, roles."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from sqlalchemy import select
from streamlit.dataframe_util import convert_arrow_bytes_to_pandas_df

from rollout import approvals
from rollout.auth import Identity, PermissionDenied
from rollout.db.models import Approval, AuditEntry, GateDecision
from rollout.db.session import session_scope
from rollout.pilot_plan import plan_summary
from rollout.settings import Settings
from rollout.spec import UseCaseSpec
from tests.dashboard.apptest_helpers import button_labels, new_app, open_page, sign_in, texts
from tests.dashboard.test_void_shown import add_void_requests
from tests.fixtures.dashboard import seeded_spec

SEEDED = ["contract-summarisation", "document-qa", "support-chat"]


def test_schema_missing_says_how_to_create_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARSEPILOT_HOME", str(tmp_path / "fresh"))
    monkeypatch.delenv("SPARSEPILOT_DATABASE_URL", raising=False)
    at = new_app()
    assert not at.exception
    assert "has no SparsePilot schema yet" in at.error[0].value
    assert at.code[0].value.startswith("sparsepilot init\nsparsepilot usecase add examples/usecases/")
    assert not (tmp_path / "fresh" / "state.db").exists()  # the dashboard created nothing


def test_an_unreachable_database_is_to_be_checked_not_created(monkeypatch: pytest.MonkeyPatch) -> None:
    """Review U4: a production DB that is only down was answered with `sparsepilot init` and the demo
    use cases; those commands are for a DB without a schema (above), and this one is to be checked."""
    monkeypatch.setenv("SPARSEPILOT_DATABASE_URL", "postgresql+psycopg://sp:S3cretPw@127.0.0.1:1/sparsepilot")
    at = new_app()
    assert not at.exception
    assert "cannot be reached" in at.error[0].value and "S3cretPw" not in at.error[0].value
    assert not at.code, [c.value for c in at.code]  # no init, no sample use cases
    assert "check the server and `SPARSEPILOT_DATABASE_URL`" in texts(at)


def test_empty_install_shows_how_to_add_the_first_use_case(dash_env: Settings) -> None:
    at = new_app()
    assert not at.exception and not at.error
    assert "No use cases yet" in at.info[0].value
    cmds = at.code[0].value.splitlines()
    assert "sparsepilot usecase add examples/usecases/support-chat.yaml" in cmds
    assert cmds[-1] == "sparsepilot run"
    assert len(at.dataframe) == 0
    for page in ("use_case", "approvals", "audit"):
        open_page(at, page)
        assert not at.error
    assert "Nothing is waiting" in texts(open_page(at, "approvals"))


def test_portfolio_shows_seeded_use_cases(seeded: dict[str, Any]) -> None:
    at = new_app()
    assert not at.exception
    df = at.dataframe[0].value
    assert list(df["name"]) == SEEDED
    row = df.set_index("name").loc["contract-summarisation"]
    assert row["decision"] == "GO" and row["waits_for"] == "approval to promote"
    assert row["quality_delta"] == -0.005 and row["quality interval"] == "[-0.0110, +0.0010]"
    assert row["savings_month_usd"] == 1840 and row["savings interval"] == "[$1,500, $2,150]"
    support = df.set_index("name").loc["support-chat"]  # no gate decision: the evaluation's bounds
    assert support["quality interval"] == "[-0.0600, +0.0500]"
    assert (support["quality from"], row["quality from"]) == ("evaluation, 60 rows", "pilot gate")
    assert row["step"] == "1: split 10%" and row["payback_days"] == 12.0
    # review s48 B5/B6: a missing value read "None" (support-chat's payback), the dollars "$1,840.00"
    assert at.dataframe[0].proto.placeholder == "-"
    styled = at.dataframe[0].proto.arrow_data.styler.display_values
    shown = convert_arrow_bytes_to_pandas_df(styled).set_axis(df.columns, axis=1).set_index("name")
    assert list(shown["savings_month_usd"]) == ["$1,840", "$620", "-$35"]
    assert "format" not in json.loads(at.dataframe[0].proto.columns)["savings_month_usd"]  # it would win
    metrics = {m.label: m.value for m in at.metric}
    # support-chat's interval [-$80, $10] includes no saving: counted apart, not in the headline
    assert metrics["Use cases"] == "3" and metrics["$/month saved (established)"] == "$2,460"
    assert any("apart: 1 not established (-$35)" in c.value for c in at.caption)
    assert metrics["Waiting for approval"] == "1"
    assert len(at.get("vega_lite_chart")) == 1  # savings vs risk
    # filtering happens on the page: only the medium-criticality use case is left
    at.multiselect(key="f_crit").select("medium").run()
    assert list(at.dataframe[0].value["name"]) == ["document-qa"]
    # the name or owner as typed, case aside: the owner was matched as a regular expression, so "(" ended the
    # page in an error ("c++" too), and "." kept every use case
    for typed, left in (("(", []), (".", []), ("SEARCH-", ["document-qa"])):
        at.text_input(key="f_text").input(typed).run()
        assert not at.exception, (typed, [e.value for e in at.exception])
        assert list(at.dataframe[0].value["name"]) == left, typed


def test_use_case_page(seeded: dict[str, Any]) -> None:
    add_void_requests("contract-summarisation", 1, "ab")  # review s49 V1: said under the steps table
    at = new_app()
    at.query_params["name"] = "contract-summarisation"
    open_page(at, "use_case")
    body = texts(at)
    assert "contract-summarisation: treatment quality is within the margin; GO." in body
    assert "owner legal-ops" in body and "MLflow run" in body
    assert {m.label: m.value for m in at.metric}["Prefill speed-up"] == "2.40x [2.10x, 2.70x]"
    assert "**Decode:** no decode saving at this context length: 544 tokens < break-even 3,072" in body
    assert len(at.get("image")) == 2  # density heatmap + block mask PNGs from the evaluation's artifacts
    assert len(at.get("vega_lite_chart")) == 3  # quality-vs-density, latency, timeline
    # quality vs density: the means as lines, the evaluation's bounds as bars where it gives them
    layers = json.loads(at.get("vega_lite_chart")[0].proto.spec)["layer"]
    assert [x["mark"]["type"] for x in layers] == ["line", "rule"]
    assert (layers[1]["encoding"]["y"]["field"], layers[1]["encoding"]["y2"]["field"]) == ("low", "high")
    assert any(c.value.startswith("Bars: one-sided 95% bounds") for c in at.caption)
    void = "Pilot 1 step 1: 2 requests void: the dense answer failed; not evidence"
    assert void in [c.value for c in at.caption]
    # what each step's GO needs (the gate's planner) beside what the pilot collected: 120 shadow pairs,
    # 240 rows of the split step
    assert "What a decision takes" in [h.value for h in at.subheader]
    needs = next(d.value for d in at.dataframe if "collected (pilot 1)" in d.value.columns)
    assert list(needs["step"]) == ["shadow", "split 10%", "split 50%"]
    assert list(needs["collected (pilot 1)"]) == [120, 240, 0]
    planned = plan_summary(
        UseCaseSpec.model_validate(seeded_spec("contract-summarisation")), with_monitor=True
    )
    assert list(needs["requests to GO (80% power)"]) == [s["requests"] for s in planned["steps"]]
    # after promotion: how fast the monitor reacts (rollout.pilot_plan.plan_monitor)
    reacts = next(d.value for d in at.dataframe if "looks to alarm (90%)" in d.value.columns)
    assert list(reacts["check"]) == [m["check"] for m in planned["monitor"]]
    assert list(reacts["looks to alarm (90%)"]) == [m["looks_most"] for m in planned["monitor"]]
    spent = "for pilot 1 of this use case, whose GO is held to alpha 0.0304"  # rollout.gate.spending
    assert any(spent in c.value for c in at.caption)
    # its pilots and the alpha they spent: one pilot, awaiting approval after its GO
    pilots = next(d.value for d in at.dataframe if "GO level" in d.value.columns)
    assert pilots[["pilot_number", "mlflow_version", "looks", "last_outcome"]].to_dict("records") == [
        {"pilot_number": 1, "mlflow_version": "2", "looks": 1, "last_outcome": "GO"}
    ]
    assert list(pilots["GO level"].round(4)) == [0.0304]
    # the tables speak the reader's words: each column labelled and formatted (use_case.STEP_COLUMNS, ...)
    configs = [json.loads(d.proto.columns or "{}") for d in at.dataframe]
    shown = {c.get("label") for cfg in configs for c in cfg.values()}
    assert {"Mean latency (ms)", "Error rate", "Started (UTC)", "Challenger version", "When (UTC)"} <= shown
    assert not {"id", "idempotency_key", "go_alpha"} & {c for d in at.dataframe for c in d.value.columns}
    assert any(
        "The pilots share the use case's alpha 0.05 for a false GO: 0.0304 spent over 1 pilot; a next "
        "pilot's GO would be held to 0.0076." in c.value
        for c in at.caption
    )
    at.selectbox(key="uc_name").select("support-chat").run()
    assert "No gate decision yet." in texts(at) and "No pilot observations yet." in texts(at)
    assert "No plan: the stored spec v1 does not validate" in texts(at)
    assert "No pilot yet; the first pilot's GO will be held to 0.0304." in texts(at)
    # a link to another use case followed on this page opens it: the picker's earlier choice kept the
    # first one shown, and wrote its name back over the link's (fix-u U2)
    for link, shown in (("document-qa", "document-qa"), ("does-not-exist", None)):
        at.query_params["name"] = link
        at.run()
        assert at.selectbox(key="uc_name").value == shown and at.query_params["name"] == link
    assert [w.value for w in at.warning] == ["No use case is named 'does-not-exist': pick one below."]
    at.selectbox(key="uc_name").select("support-chat").run()  # and the picker still picks
    assert at.query_params["name"] == "support-chat" and not any("No use case" in w.value for w in at.warning)
    # review s48 B9: a link naming no use case opened the first one without a word
    at = new_app()
    at.query_params["name"] = "does-not-exist"
    open_page(at, "use_case")
    assert [w.value for w in at.warning] == ["No use case is named 'does-not-exist': pick one below."]
    assert at.selectbox(key="uc_name").value is None and not at.metric and not at.dataframe


def test_use_case_page_says_when_the_counts_are_an_ended_pilots(seeded: dict[str, Any]) -> None:
    """Once pilot 1 has ended the plan is for pilot 2, which starts from none of pilot 1's requests: the
    column names the pilot its counts are from and a caption says they are for comparison only (the
    column read "collected (latest pilot)" beside pilot 2's needs, as if they counted)."""
    from rollout.db.models import Pilot, UseCase

    with session_scope() as s:
        uc = s.scalar(select(UseCase).where(UseCase.name == "contract-summarisation"))
        for p in s.scalars(select(Pilot).where(Pilot.use_case_id == uc.id)):
            p.status = "rejected"
    at = new_app()
    at.query_params["name"] = "contract-summarisation"
    open_page(at, "use_case")
    needs = next(d.value for d in at.dataframe if "collected (pilot 1)" in d.value.columns)
    assert list(needs["collected (pilot 1)"]) == [120, 240, 0]
    captions = [c.value for c in at.caption]
    assert any("for pilot 2 of this use case" in c for c in captions)
    assert (
        "Pilot 1 has ended: its counts are shown for comparison only. Pilot 2 starts from none of them."
        in (captions)
    )
    steps = next(d.value for d in at.dataframe if "step_index" in d.value.columns)
    assert set(steps["pilot_number"]) == {1}


def test_the_latency_chart_shows_the_latencies_the_gate_judges(seeded: dict[str, Any]) -> None:
    """Rows timed while the host was overloaded are left out of the gate's p95s and latency guardrail
    (rollout.gate.decide); the use-case page's chart drew them among the rest (here at 5 s, stretching its
    axis twentyfold) and said nothing. It now bins the judged rows only and says how many it left out."""
    from rollout.db.models import Observation

    uc_id = seeded["contract-summarisation"]
    slowed = {("treatment", "r0"), ("treatment", "r1"), ("treatment", "r2"), ("control", "r3")}
    with session_scope() as s:
        for o in s.scalars(select(Observation).where(Observation.use_case_id == uc_id)):
            if (o.arm, o.request_id) in slowed:  # in both steps: 6 treatment rows, 2 control
                o.overloaded, o.latency_ms = True, 5000.0
    at = new_app()
    at.query_params["name"] = "contract-summarisation"
    open_page(at, "use_case")
    chart = at.get("vega_lite_chart")[1].proto
    assert json.loads(chart.spec)["encoding"]["x"]["field"] == "latency_ms"
    bins = pd.concat(convert_arrow_bytes_to_pandas_df(d.data.data) for d in chart.datasets)
    assert bins.groupby("arm")["count"].sum().to_dict() == {"control": 238, "treatment": 234}
    assert bins["latency_ms"].max() < 470
    assert (
        "Left out: 8 rows timed while the host was overloaded (control 2, treatment 6): their latency is the "
        "host's, not the model's, and the gate's p95s and latency guardrail leave them out too."
    ) in [c.value for c in at.caption]
    # the steps table beside it: the mean latency of the same rows, and the rows it left out
    steps = next(d.value for d in at.dataframe if "latency_left_out" in d.value.columns)
    assert steps.groupby("arm")["latency_left_out"].sum().to_dict() == {"control": 2, "treatment": 6}
    assert steps["latency_mean"].max() < 470


def test_audit_page_filters_and_exports_csv(seeded: dict[str, Any]) -> None:
    at = open_page(new_app(), "audit")
    assert len(at.dataframe[0].value) == 5
    # review s48 B5: raw column names, "None" for a row of no use case, a time without its zone
    labels = {c: cfg.get("label") for c, cfg in json.loads(at.dataframe[0].proto.columns).items()}
    assert labels["ts"] == "When (UTC)" and labels["use_case"] == "Use case"
    assert at.dataframe[0].proto.placeholder == "-"
    at.multiselect(key="a_action").select("gate.decide").run()
    df = at.dataframe[0].value
    assert set(df["action"]) == {"gate.decide"} and len(df) == 2
    assert len(at.get("download_button")) == 1
    with session_scope() as s:  # the export carries exactly the filtered rows
        n_gate = len(s.scalars(select(AuditEntry).where(AuditEntry.action == "gate.decide")).all())
    csv_rows = list(csv.DictReader(io.StringIO(df.to_csv(index=False))))
    assert len(csv_rows) == n_gate


def test_an_old_audit_row_holding_a_secret_is_shown_and_exported_redacted(dash_env: Settings) -> None:
    """A row written before details were stored redacted (fix-k) kept its secret, and the Audit page
    showed it and put it in the CSV (fix-n): now both redact the details; the stored row is unchanged, so
    the chain still verifies."""
    from typer.testing import CliRunner

    from dashboard.fmt import spreadsheet_csv
    from rollout import audit
    from sparsepilot.cli import app

    details = {"url": "postgresql://app:hunter2@db/sp", "tried": ["https://h/m?token%3Dhf_" + "Ab1" * 12]}
    with session_scope() as s:  # as the code before wrote it: details as given
        old_id = audit._append(s, AuditEntry(actor="alice", action="test.old", details=details)).id
    df = open_page(new_app(), "audit").dataframe[0].value
    shown = json.loads(df.loc[df["id"] == old_id, "details"].item())
    assert shown == {"url": "postgresql://app:***@db/sp", "tried": ["https://h/m?token%3Dhf_***"]}, shown
    exported = spreadsheet_csv(df).decode("utf-8")  # what "Download CSV" hands out
    assert "postgresql://app:***@db/sp" in exported and "hunter2" not in exported and "Ab1" not in exported
    with session_scope() as s:
        assert s.get(AuditEntry, old_id).details == details
    res = CliRunner().invoke(app, ["audit", "verify"])
    assert res.exit_code == 0 and "audit chain intact: 1 row(s)" in res.output, res.output


def test_sign_in_rejects_a_wrong_password(seeded: dict[str, Any]) -> None:
    at = sign_in(new_app(), "alice", "not-her-password")
    assert "Unknown user name or wrong password." in [e.value for e in at.error]
    assert "sp_identity" not in at.session_state


def test_a_password_typed_as_the_user_name_is_not_shown_on_the_audit_page(seeded: dict[str, Any]) -> None:
    """Review s46 A1: the unknown "name" (a password typed into the wrong field) was shown to every
    anonymous visitor on the Audit page and in its CSV. Now only a digest is kept."""
    at = sign_in(new_app(), "hunter2-S3cret!pw", "alice")
    assert "Unknown user name or wrong password." in [e.value for e in at.error]
    sign_in(at, "alice", "not-her-password")
    df = open_page(new_app(), "audit").dataframe[0].value
    failed = df[df["action"] == "auth.sign_in_failed"]
    assert len(failed) == 2 and "S3cret" not in failed.to_csv(index=False)
    assert "alice" in set(failed["entity_id"])  # a configured account is still named


def test_anonymous_and_viewer_never_see_an_approve_button(seeded: dict[str, Any]) -> None:
    at = open_page(new_app(), "approvals")
    assert "contract-summarisation" in texts(at)  # evidence is visible read-only
    assert "- quality interval [-0.011, 0.001] vs margin -0.02" in texts(at)  # the gate's reasons
    assert not [b for b in button_labels(at) if "Approve" in b or "Reject" in b]
    assert "sign in as an approver" in texts(at)
    sign_in(at, "bob")
    assert at.session_state["sp_identity"] == Identity("bob", "viewer", "local-account")
    open_page(at, "approvals")
    assert not [b for b in button_labels(at) if "Approve" in b or "Reject" in b or "rollback" in b]
    assert "only approvers can act" in texts(at)
    # and the server refuses a direct call with the viewer's identity: nothing is written
    decision_id = seeded["contract-summarisation:decision"]
    with pytest.raises(PermissionDenied, match="'bob' is a viewer"):
        approvals.approve(decision_id, Identity("bob", "viewer", "local-account"), "looks fine")
    with pytest.raises(PermissionDenied, match="nobody is signed in"):
        approvals.approve(decision_id, None, "looks fine")
    with session_scope() as s:
        assert s.scalars(select(Approval)).all() == []
        assert s.get(GateDecision, decision_id).resolution is None


def test_approver_sees_buttons_and_a_reason_is_required(seeded: dict[str, Any]) -> None:
    at = sign_in(new_app(), "alice")
    open_page(at, "approvals")
    assert {"Approve promotion", "Reject"} <= set(button_labels(at))
    decision_id = seeded["contract-summarisation:decision"]
    at.button(key=f"approve_{decision_id}").click().run()
    assert any("a reason is required" in e.value for e in at.error)
    with session_scope() as s:
        assert s.scalars(select(Approval)).all() == []


def test_oidc_user_role_comes_from_the_approver_list(seeded: dict[str, Any], monkeypatch: Any) -> None:
    from streamlit.testing.v1 import AppTest

    from tests.dashboard.apptest_helpers import APP

    monkeypatch.setenv("SPARSEPILOT_OIDC_APPROVERS", "ann@example.com")
    at = AppTest.from_file(str(APP), default_timeout=90)
    at.secrets["auth"] = {"redirect_uri": "http://127.0.0.1:8501/oauth2callback", "cookie_secret": "x"}
    at.user = {"is_logged_in": False}
    open_page(at.run(), "login")
    assert "Sign in with single sign-on" in button_labels(at)
    at.user = {
        "is_logged_in": True,
        "exp": 4102444800,
        "email": "ann@example.com",
        "email_verified": True,
        "sub": "ann",
    }
    open_page(at, "approvals")
    assert "**oidc:ann@example.com** · approver" in texts(at)
    assert "Approve promotion" in button_labels(at)
    at.user = {
        "is_logged_in": True,
        "exp": 4102444800,
        "email": "ann@example.com",
        "email_verified": False,
        "sub": "x",
    }
    open_page(at, "approvals")  # an email the provider does not vouch for
    assert "Approve promotion" not in button_labels(at)
    at.user = {
        "is_logged_in": True,
        "exp": 4102444800,
        "email": "dan@example.com",
        "email_verified": True,
        "sub": "dan",
    }
    open_page(at, "approvals")
    assert "**oidc:dan@example.com** · viewer" in texts(at)
    assert "Approve promotion" not in button_labels(at)
    token = "hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567"  # a subject that reads as a secret (review s48)
    at.user = {**at.user, "iss": "https://idp.example", "sub": token, "email": "ann@example.com"}
    open_page(at, "login")  # refused, not let in to have every signature refused by the audit log
    refused = " ".join(e.value for e in at.error)
    assert "Single sign-on did not sign you in" in refused and "hf_***" in refused, texts(at)
    assert token not in refused and "Sign out" not in button_labels(at)


def test_one_person_cannot_sign_both_halves_of_an_override_as_local_account_and_oidc(
    seeded: dict[str, Any], monkeypatch: pytest.MonkeyPatch, dashboard_accounts: str
) -> None:
    """Review J finding 3: local alice signed an override, then signed again through SSO as
    alice@corp.example, and the override was accepted. Her account now declares her email."""
    from rollout import auth

    monkeypatch.setenv(
        "SPARSEPILOT_ACCOUNTS",
        ";".join(
            e + (":alice@corp.example" if e.startswith("alice:") else "")
            for e in dashboard_accounts.split(";")
        ),
    )
    did = seeded["document-qa:decision"]  # EXTEND on a running pilot: promoting is an override
    local = auth.authenticate("alice", "alice-secret")
    claims = {"email": "alice@corp.example", "email_verified": True, "sub": "0a1b"}
    sso = auth.identity_from_oidc(claims, ["alice@corp.example"])
    assert sso is not None and sso.role == "approver"
    first = approvals.approve(did, local, "business needs it now")
    assert first.needs_second_approver and not first.took_effect
    with pytest.raises(
        approvals.ApprovalError, match=r"already signed .* \(as 'alice'\); a second, different"
    ):
        approvals.approve(did, sso, "agreed (second approver)")
    with session_scope() as s:
        assert [a.actor for a in s.scalars(select(Approval).where(Approval.decision_id == did))] == ["alice"]
        assert s.get(GateDecision, did).resolution is None


def test_removed_account_or_changed_role_takes_effect_at_once(
    seeded: dict[str, Any], monkeypatch: pytest.MonkeyPatch, dashboard_accounts: str
) -> None:
    at = sign_in(new_app(), "alice")
    assert "Approve promotion" in button_labels(open_page(at, "approvals"))
    demoted = dashboard_accounts.replace("alice:approver:", "alice:viewer:")
    monkeypatch.setenv("SPARSEPILOT_ACCOUNTS", demoted)
    open_page(at, "approvals")
    assert "Approve promotion" not in button_labels(at) and "**alice** · viewer" in texts(at)
    monkeypatch.setenv(
        "SPARSEPILOT_ACCOUNTS", ";".join(e for e in demoted.split(";") if not e.startswith("alice:"))
    )
    open_page(at, "approvals")
    assert "sign in as an approver" in texts(at) and "sp_identity" not in at.session_state


def test_a_password_reset_ends_the_accounts_dashboard_session(
    seeded: dict[str, Any], monkeypatch: pytest.MonkeyPatch, dashboard_accounts: str
) -> None:
    """Only the role was re-read: a session signed in with a leaked password outlived its reset."""
    from tests.fixtures.accounts import cheap_hash

    at = sign_in(new_app(), "alice")
    assert "Approve promotion" in button_labels(open_page(at, "approvals"))
    entries = [e for e in dashboard_accounts.split(";") if not e.startswith("alice:")]
    monkeypatch.setenv(
        "SPARSEPILOT_ACCOUNTS", ";".join([*entries, f"alice:approver:{cheap_hash('new-pw-123')}"])
    )
    open_page(at, "approvals")
    assert "sign in as an approver" in texts(at) and "sp_identity" not in at.session_state


def test_repeated_wrong_passwords_lock_the_form(seeded: dict[str, Any]) -> None:
    at = new_app()
    for _ in range(5):
        sign_in(at, "alice", "guess")
        assert "Unknown user name or wrong password." in [e.value for e in at.error]
    sign_in(at, "alice")  # even the right password is not checked now
    assert any("too many failed sign-ins" in e.value for e in at.error)
    assert "sp_identity" not in at.session_state


def test_a_locked_account_is_locked_for_every_session_and_the_cli(
    seeded: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Review J finding 5: a new browser session (no cookie needed) reset the lockout, the CLI had no
    limit, and failed sign-ins left no trace. The count is now per account, in the state DB."""
    from typer.testing import CliRunner

    from rollout import auth
    from sparsepilot.cli import app

    a = new_app()
    for i in range(5):
        sign_in(a, "alice", f"guess-{i}")
        assert "Unknown user name or wrong password." in [e.value for e in a.error]
    b = new_app()  # another browser session
    checks: list[str] = []
    real = auth.verify_password
    monkeypatch.setattr(auth, "verify_password", lambda pw, h: checks.append(pw) or real(pw, h))
    sign_in(b, "alice")  # the right password
    assert any(e.value.startswith("Not checked: too many failed sign-ins; try again in") for e in b.error)
    assert "sp_identity" not in b.session_state and checks == []  # refused before the scrypt work
    monkeypatch.setenv("SPARSEPILOT_USER", "alice")
    monkeypatch.setenv("SPARSEPILOT_TOKEN_FILE", str(tmp_path / "no-token"))
    r = CliRunner().invoke(app, ["whoami", "--password-stdin"], input="alice-secret\n")
    assert r.exit_code == 2 and "too many failed sign-ins" in r.output, r.output
    assert checks == []
    assert sign_in(new_app(), "bob").session_state["sp_identity"].name == "bob"  # bob is not locked
    with session_scope() as s:
        rows = s.scalars(select(AuditEntry).where(AuditEntry.action == "auth.sign_in_failed")).all()
        assert [(r.actor, r.entity, r.entity_id, r.details) for r in rows] == [
            ("anonymous", "account", "alice", {"account": "alice", "via": "dashboard"})
        ] * 5  # the name tried and where: never the password


def test_mlflow_link_points_at_the_run(seeded: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARSEPILOT_MLFLOW_UI_URL", "http://mlflow.internal:5000/")
    at = new_app()
    at.query_params["name"] = "document-qa"
    open_page(at, "use_case")
    run_id = f"{seeded['document-qa']:016x}{1:016x}"  # the latest evaluation's run
    assert f"MLflow run: [{run_id}](http://mlflow.internal:5000/#/runs/{run_id})" in texts(at)


def test_the_use_case_page_says_which_run_is_changing_it_now(seeded: dict[str, Any]) -> None:
    """A run holding the use case's lease (rollout.leases) is named on its page, and only while it does."""
    from rollout import leases

    at = new_app()
    at.query_params["name"] = "contract-summarisation"
    open_page(at, "use_case")
    assert not [i for i in at.info if i.value.startswith("Working now")]
    leases.acquire("contract-summarisation", "t-1", "pilot (flow run r-9) pid 4 on host-a", seconds=300)
    try:
        at.run()
        shown = [i.value for i in at.info if i.value.startswith("Working now")]
        assert len(shown) == 1
        assert shown[0].startswith("Working now: pilot (flow run r-9) pid 4 on host-a, since ")
    finally:
        leases.release("contract-summarisation", "t-1")
    at.run()
    assert not [i for i in at.info if i.value.startswith("Working now")]


def test_portfolio_of_only_registered_use_cases(dash_env: Settings) -> None:
    from rollout.db.models import UseCase

    with session_scope() as s:
        s.add(UseCase(name="just-registered", owner="ops", criticality="medium"))
    at = new_app()
    assert not at.exception and not at.error
    row = at.dataframe[0].value.iloc[0]
    assert row["name"] == "just-registered" and row["waits_for"] == "calibration"
    assert row["quality interval"] == "-" and row["savings interval"] == "-"
    assert {m.label: m.value for m in at.metric}["$/month saved (established)"] == "-"


def test_what_people_typed_is_shown_as_text_not_markup(dash_env: Settings) -> None:
    """An operator sets a use case's owner; a markdown link or a remote image in it rendered as one on a
    page approvers read. Reasons and explanations are shown the same way; "$" pairs in an ROI verdict
    are not a formula."""
    from dashboard.fmt import plain
    from rollout.db.models import UseCase

    bait = "[Approve here](https://evil.example) ![x](https://evil.example/pixel.png)"
    assert (
        plain(bait) == r"\[Approve here\]\(https://evil.example\) \!\[x\]\(https://evil.example/pixel.png\)"
    )
    assert plain("saves $1,200 ($900-$1,500)") == r"saves \$1,200 \(\$900-\$1,500\)"
    with session_scope() as s:
        s.add(UseCase(name="typed-owner", owner=bait, criticality="medium"))
    at = new_app()
    at.query_params["name"] = "typed-owner"
    open_page(at, "use_case")
    assert not at.exception
    assert f"owner {plain(bait)}" in texts(at)


def test_the_mlflow_link_never_shows_the_tracking_servers_password(
    seeded: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The use-case page is open to anyone signed in or not: a tracking URL with a password (the compose
    stack's MLflow behind basic auth) is shown with the password as ***."""
    monkeypatch.setenv("SPARSEPILOT_MLFLOW_UI_URL", "http://ml:s3cret@mlflow.internal:5000")
    at = new_app()
    at.query_params["name"] = "contract-summarisation"
    open_page(at, "use_case")
    body = texts(at)
    assert "MLflow run: [" in body and "http://ml:***@mlflow.internal:5000/#/runs/" in body
    assert "s3cret" not in body


def test_roi_without_a_measured_interval_is_shown_as_one(seeded: dict[str, Any]) -> None:
    """An evaluation timed with one pair measures no interval (docs/roi.md): the portfolio counts its
    saving apart as not established (it was in neither sum), and its page shows no speed-up or saving
    interval and no payback, in the breakdown table as in the figures above it, and under its $/month "no
    interval: one timing pair" (it said "interval - to -", review-a P1); a saving whose interval reaches a
    loss shows no payback there either, and dollars read as dollars."""
    from rollout import roi as roi_of
    from rollout import runs
    from rollout.db.models import ModelVersion, UseCase

    spec = UseCaseSpec.model_validate(seeded_spec("contract-summarisation"))
    cases = {
        "support-chat": roi_of.roi_for_spec(spec, dense_tps=1000.0, sparse_tps=2000.0),  # one timing pair
        "document-qa": roi_of.roi_for_spec(
            spec, dense_tps=1000.0, sparse_tps=1200.0, speedup_interval=(0.9, 1.5)
        ),
    }
    for name, result in cases.items():
        with session_scope() as s:
            uc = s.scalar(select(UseCase).where(UseCase.name == name))
            ids = uc.id, s.scalar(select(ModelVersion.id).where(ModelVersion.use_case_id == uc.id))
        run = runs.open_evaluation(*ids, f"one-pair-{name}", None)
        runs.evaluation_succeeded(
            name, run["id"], report={"device": "cpu"}, roi=result.to_dict(), mlflow_run_id="m", spec_version=1
        )
    one, loss = cases["support-chat"], cases["document-qa"]
    assert not one.inputs.interval_measured and one.payback_days is not None and loss.payback_days is not None
    at = new_app()
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["$/month saved (established)"] == "$1,840"  # contract-summarisation's alone
    apart = roi_of.usd(one.saved_usd_month + loss.saved_usd_month)
    assert any(f"apart: 2 not established ({apart})" in c.value for c in at.caption)
    for name, result in cases.items():
        at = new_app()
        at.query_params["name"] = name
        open_page(at, "use_case")
        shown = {m.label: m.value for m in at.metric}
        breakdown = next(d.value for d in at.dataframe if "item" in d.value.columns)
        items = dict(zip(breakdown["item"], breakdown["value"], strict=True))
        assert shown["Payback"] == "-" and not any(k.startswith("payback") for k in items)
        assert items["saved_usd_month"] == roi_of.usd(result.saved_usd_month) == shown["$/month saved"]
        captions = [c.value for c in at.caption]
        if name == "support-chat":
            assert shown["Prefill speed-up"] == "2.00x"  # no "[2.00x, 2.00x]" nobody measured
            # under the $/month, what is true, where the caption read "interval - to -" (review-a P1)
            assert "no interval: one timing pair" in captions and not any(" - to -" in c for c in captions)
            inputs = next(d.value for d in at.dataframe if "input" in d.value.columns)
            assert not any(k.endswith(("_low", "_high")) for k in [*items, *inputs["input"]])
        else:
            assert items["saved_usd_month_low"] == roi_of.usd(result.saved_usd_month_low)
            low, high = roi_of.usd(result.saved_usd_month_low), roi_of.usd(result.saved_usd_month_high)
            assert f"interval {low} to {high}" in captions


def test_a_dense_plans_timing_noise_is_no_saving_on_its_page(seeded: dict[str, Any]) -> None:
    """Review s50 B1: a plan that keeps every block and decodes densely, whose 3 noisy rounds timed
    1.03x [1.01, 1.05], stored a payback, and its page said "pays back the $3,000 pilot in 455 days"
    (Payback 455 d) while the portfolio and the Approvals card said it saves nothing. One rule now
    (`rollout.roi.plan_money`): no payback is stored, none shown of a run stored before the rule, and
    the page's verdict says the plan saves nothing."""
    from rollout import queries, runs
    from rollout import roi as roi_of
    from rollout.db.models import EvaluationRun, ModelVersion, UseCase

    spec = UseCaseSpec.model_validate(seeded_spec("contract-summarisation"))
    noise = roi_of.roi_for_spec(
        spec, dense_tps=1000.0, sparse_tps=1030.0, speedup_interval=(1.01, 1.05), decode_tps=50.0
    )
    assert noise.certain and noise.payback_days is not None  # what the timings alone would promise
    with session_scope() as s:
        uc = s.scalar(select(UseCase).where(UseCase.name == "support-chat"))
        ids = uc.id, s.scalar(select(ModelVersion.id).where(ModelVersion.use_case_id == uc.id))
    run = runs.open_evaluation(*ids, "dense-noise", None)
    stored = runs.evaluation_succeeded(
        "support-chat",
        run["id"],
        report={"device": "cpu", "density": 1.0},
        roi=noise.to_dict() | {"decode": {"status": "dense", "line": "decode: dense in both arms"}},
        mlflow_run_id="m",
        spec_version=1,
    )
    assert stored["payback_days"] is None and stored["saves_nothing"].startswith("saves nothing: the plan")
    with session_scope() as s:  # as the run was stored before the rule
        s.get(EvaluationRun, run["id"]).payback_days = noise.payback_days
    row = next(r for r in queries.read(queries.portfolio) if r["name"] == "support-chat")
    assert row["payback_days"] is None and queries.roi_summary(row)["payback_days"] is None
    at = new_app()
    at.query_params["name"] = "support-chat"
    open_page(at, "use_case")
    shown = {m.label: m.value for m in at.metric}
    assert shown["Payback"] == "-" and shown["$/month saved"] == roi_of.usd(noise.saved_usd_month)
    verdict = next(str(m.value) for m in at.markdown if "Verdict" in str(m.value))
    assert "saves nothing: the plan keeps 100.00% of blocks" in verdict and "pays back" not in verdict
    breakdown = next(d.value for d in at.dataframe if "item" in d.value.columns)
    assert not any(k.startswith("payback") for k in breakdown["item"])


def test_approving_never_holds_the_write_lock_while_prefect_stalls(seeded: dict[str, Any]) -> None:
    """A Prefect API that accepts connections and never answers (a hung server, a stalled proxy): the
    approval used to ask it about the paused run inside its write transaction, so every other writer of
    the state DB (gate looks, pilot batches, leases of other use cases) failed with "database is
    locked" for as long as Prefect's client retried. Now the lock is taken only after Prefect answered."""
    import socket
    import threading
    import time
    import uuid

    from prefect.settings import temporary_settings

    from rollout import leases

    stalled = socket.socket()
    stalled.bind(("127.0.0.1", 0))
    stalled.listen(64)
    held: list = []
    threading.Thread(target=lambda: [held.append(stalled.accept()) for _ in range(64)], daemon=True).start()
    did = seeded["contract-summarisation:decision"]
    with session_scope() as s:
        s.get(GateDecision, did).flow_run_id = str(uuid.uuid4())  # the approval run it waits on
    box: dict[str, Any] = {}
    url = f"http://127.0.0.1:{stalled.getsockname()[1]}/api"

    def approver() -> None:  # settings are per context: this thread's own
        with temporary_settings({"api.url": url, "api.request_timeout": 4, "client.max_retries": 0}):
            try:
                approvals.approve(did, Identity("alice", "approver", "local-account"), "ship it")
            except Exception as exc:  # noqa: BLE001 - what the approver is told
                box["error"] = exc

    t = threading.Thread(target=approver)
    t.start()
    time.sleep(1.0)  # the approver is waiting on Prefect now
    t0 = time.monotonic()
    with leases.holding("document-qa", "a gate look of another use case"):
        box["other_writer_s"] = time.monotonic() - t0
    t.join(timeout=120)
    stalled.close()
    # Prefect took 4 s to time out; the other writer used to wait for it (30 s and a failure at the
    # client's default 60 s timeout and 5 retries), now it writes at once
    assert held and box["other_writer_s"] < 1.0
    assert isinstance(box["error"], approvals.FlowNotWaiting) and "nothing was recorded" in str(box["error"])
    with session_scope() as s:
        assert s.get(GateDecision, did).resolution is None
        assert not s.scalars(select(Approval).where(Approval.decision_id == did)).all()


def test_roi_timed_under_overload_says_so_on_the_page_and_in_the_record(
    seeded: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """Review P finding 1: an evaluation whose timings were kept under overload (pairs_kept_under_overload
    in roi["timing_host"], as flows/evaluate.py stores it) carries the warning beside its speed-up and $:
    the recorded summary (what `evaluate NAME` and the main job get), `evaluate NAME`'s printed record,
    the flow's closing log line and the use-case page's ROI; a clean evaluation carries none."""
    from flows.evaluate import summary_line
    from rollout import roi as roi_of
    from rollout import runs
    from rollout.db.models import ModelVersion, UseCase
    from sparsepilot.commands.pipeline import print_evaluation

    spec = UseCaseSpec.model_validate(seeded_spec("contract-summarisation"))
    host = {"threads": 1, "others_busy_cores": 2.035, "pairs_timed": 3, "pairs_retimed_for_overload": 3}
    timing = {
        "support-chat": {"prefill": {**host, "pairs_kept_under_overload": 3}, "decode": None},
        "document-qa": {"prefill": {**host, "pairs_kept_under_overload": 0}, "decode": None},
    }
    summaries = {}
    for name, th in timing.items():
        result = roi_of.roi_for_spec(spec, dense_tps=1000.0, sparse_tps=1100.0, speedup_interval=(0.74, 1.64))
        with session_scope() as s:
            uc = s.scalar(select(UseCase).where(UseCase.name == name))
            ids = uc.id, s.scalar(select(ModelVersion.id).where(ModelVersion.use_case_id == uc.id))
        run = runs.open_evaluation(*ids, f"overload-{name}", None)
        roi = {**result.to_dict(), "timing_host": th}
        summaries[name] = runs.evaluation_succeeded(
            name, run["id"], report={"device": "cpu"}, roi=roi, mlflow_run_id="m", spec_version=1
        )
    warn = "measured under overload: 3 of 3 timed pairs (prefill 3 of 3)"
    busy, clean = summaries["support-chat"], summaries["document-qa"]
    assert busy["measured_under_overload"].startswith(warn) and clean["measured_under_overload"] is None
    assert busy["measured_under_overload"].endswith("rerun on a quieter host")
    line = summary_line("support-chat", busy)
    assert line.startswith("support-chat: speed-up 1.10x [0.74, 1.64] on cpu, $") and f"; {warn}" in line
    assert "overload" not in summary_line("document-qa", clean)
    capsys.readouterr()
    print_evaluation("support-chat", busy)
    assert f"warning: {warn}" in " ".join(capsys.readouterr().out.split())
    print_evaluation("document-qa", clean)
    assert "overload" not in capsys.readouterr().out
    for name in timing:
        at = new_app()
        at.query_params["name"] = name
        open_page(at, "use_case")
        warnings = [w.value.replace("\\", "") for w in at.warning]  # as shown: markup escapes removed
        if name == "support-chat":
            assert any(w.startswith(f"Speed-up and $/month {warn}") for w in warnings), warnings
        else:
            assert not any("overload" in w for w in warnings), warnings


def test_the_first_run_admin_signs_in_to_the_dashboard(sp_home: Settings, monkeypatch) -> None:  # noqa: ANN001
    """`make run` prints the first-run `admin` and tells the business owner to sign in with it; the
    sign-in page counted only SPARSEPILOT_ACCOUNTS / _FILE as accounts, so it showed "No accounts are
    configured" and no form: nobody could approve from the dashboard on embedded defaults."""
    from rollout import auth

    monkeypatch.delenv("SPARSEPILOT_ACCOUNTS", raising=False)
    monkeypatch.delenv("SPARSEPILOT_ACCOUNTS_FILE", raising=False)
    name, password = auth.create_first_run_account()
    at = sign_in(new_app(), name, password)
    assert at.session_state["sp_identity"].name == "admin"
    assert at.session_state["sp_identity"].role == "approver"
    assert "No accounts are configured" not in texts(at)


def test_roi_panel_prices_per_hour_with_cents_and_shows_no_raw_host_record(seeded: dict[str, Any]) -> None:
    """Review U3/U7: the spec's $2.50/h shows as "$2.50" (whole dollars made it "$2", and the inputs no
    longer gave the outputs), monthly dollars stay whole, and the Breakdown table shows no raw
    `timing_host` dict (the overload warning above it reads that record)."""
    from rollout import roi as roi_of
    from rollout import runs
    from rollout.db.models import ModelVersion, UseCase

    spec = UseCaseSpec.model_validate(seeded_spec("contract-summarisation"))
    assert spec.cost.gpu_usd_per_hour == 2.5
    result = roi_of.roi_for_spec(spec, dense_tps=1000.0, sparse_tps=1100.0, speedup_interval=(0.9, 1.3))
    with session_scope() as s:
        uc = s.scalar(select(UseCase).where(UseCase.name == "support-chat"))
        ids = uc.id, s.scalar(select(ModelVersion.id).where(ModelVersion.use_case_id == uc.id))
    run = runs.open_evaluation(*ids, "rate-support-chat", None)
    host = {"prefill": {"threads": 1, "others_busy_cores": 0.1, "pairs_timed": 3}, "decode": None}
    runs.evaluation_succeeded(
        "support-chat",
        run["id"],
        report={"device": "cpu"},
        roi={**result.to_dict(), "timing_host": host},
        mlflow_run_id="m",
        spec_version=1,
    )
    at = new_app()
    at.query_params["name"] = "support-chat"
    open_page(at, "use_case")
    inputs = next(d.value for d in at.dataframe if "input" in d.value.columns)
    given = dict(zip(inputs["input"], inputs["value"], strict=True))
    assert given["gpu_usd_per_hour"] == "$2.50"
    assert given["pilot_one_off_usd"] == roi_of.usd(spec.cost.pilot_one_off_usd)  # totals stay whole
    breakdown = next(d.value for d in at.dataframe if "item" in d.value.columns)
    assert "timing_host" not in list(breakdown["item"])
    assert not any("{" in str(v) for v in breakdown["value"])


def test_usecase_show_says_an_old_audit_rows_details_redacted(seeded: dict[str, Any]) -> None:
    """Review s47 T1: `usecase show --json` printed the audit rows' details as stored, and a row written
    before details were stored redacted held a URL's password; said redacted now, as the Audit page does."""
    from rollout import audit, usecases
    from rollout.db.models import UseCase

    with session_scope() as s:
        uc = s.scalars(select(UseCase).where(UseCase.name == "document-qa")).one()
        details = {"reason": "stopped: postgresql://app:hunter2@db/sp down"}
        audit._append(s, AuditEntry(actor="ops", action="test.old", use_case_id=uc.id, details=details))
    shown = [e for e in usecases.show_usecase("document-qa")["audit"] if e["action"] == "test.old"]
    assert [e["details"] for e in shown] == [{"reason": "stopped: postgresql://app:***@db/sp down"}]
