"""The audit log nobody can rewrite (issue 15, item 3): the hash chain and `sparsepilot audit verify`,
SQLite's triggers (UPDATE, DELETE, INSERT OR REPLACE), and on PostgreSQL an app role that owns nothing
(UPDATE, DELETE, TRUNCATE, DISABLE TRIGGER, DROP TRIGGER all refused), with `sparsepilot init` run as
the owner role granting exactly the app's privileges."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, pool, text
from sqlalchemy.exc import DBAPIError
from typer.testing import CliRunner

from sparsepilot.cli import app

runner = CliRunner()


def _seed(url: str | None = None) -> dict[str, int]:
    """A use case, a decision with an approval and an alias move, each with audit rows (raw inserts of
    the rows the product writes; the audit rows through rollout.audit)."""
    from rollout import audit
    from rollout.db.models import (
        AliasMove,
        Approval,
        GateDecision,
        ModelVersion,
        Observation,
        ObservationBatch,
        Pilot,
        PilotStep,
        SpecVersion,
        UseCase,
    )
    from rollout.db.session import session_scope

    with session_scope(url) as s:
        uc = UseCase(name="audited", owner="o", criticality="low")
        s.add(uc)
        s.flush()
        mv = ModelVersion(use_case_id=uc.id, base_model_ref="m", plan={}, plan_hash="p" * 64)
        sv = SpecVersion(use_case_id=uc.id, version=1, spec={"gate": {"alpha": 0.05}}, spec_hash="h" * 64,
                         created_by="o")  # fmt: skip
        s.add_all([mv, sv])
        s.flush()
        pilot = Pilot(use_case_id=uc.id, model_version_id=mv.id, salt="s")
        s.add(pilot)
        s.flush()
        step = PilotStep(pilot_id=pilot.id, index=0, kind="shadow", traffic_pct=0.0, min_samples=8)
        s.add(step)
        s.flush()
        obs = Observation(pilot_step_id=step.id, use_case_id=uc.id, batch_id="b", request_id="r",
                          arm="control", quality=0.9, latency_ms=10.0)  # fmt: skip
        batch = ObservationBatch(pilot_step_id=step.id, batch_id="b", source="pilot-flow", rows=1,
                                 inserted=1, mlflow_run_id="run-1")  # fmt: skip
        d = GateDecision(idempotency_key="k", use_case_id=uc.id, outcome="GO", awaiting="approval",
                         evidence={"x": 1}, explanation="GO", data_fingerprint="f" * 64)  # fmt: skip
        s.add_all([obs, batch, d])
        s.flush()
        a = Approval(decision_id=d.id, actor="alice", role="approver", action="approve", reason="ok")
        m = AliasMove(idempotency_key="m", use_case_id=uc.id, alias="champion", to_version="1", actor="alice",
                      reason="r", status="committed")  # fmt: skip
        s.add_all([a, m])
        d.resolution = "approved"
        d.mlflow_run_id = "run-1"  # its MLflow run, recorded once (migration 0010)
        for i in range(3):
            audit.record(s, "alice", f"test.{i}", use_case_id=uc.id, details={"i": i, "nested": {"k": [i]}})
        return {"decision": d.id, "approval": a.id, "move": m.id, "use_case": uc.id, "batch": batch.id,
                "observation": obs.id, "spec_version": sv.id}  # fmt: skip


def _run_link_rewrites(ids: dict[str, int]) -> dict[str, str]:
    """Rewrites of the MLflow run links of migration 0009, refused by 0010's guards."""
    d, b = ids["decision"], ids["batch"]
    return {
        "decision-run-relink": f"UPDATE gate_decisions SET mlflow_run_id = 'run-2' WHERE id = {d}",
        "decision-run-clear": f"UPDATE gate_decisions SET mlflow_run_id = NULL WHERE id = {d}",
        "batch-run-relink": f"UPDATE observation_batches SET mlflow_run_id = 'run-2' WHERE id = {b}",
        "batch-rows": f"UPDATE observation_batches SET rows = 99 WHERE id = {b}",
        "batch-delete": f"DELETE FROM observation_batches WHERE id = {b}",
    }


def _refused(url: str, sql: str) -> str:
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(text(sql))
    except DBAPIError as exc:
        return str(exc.orig)
    finally:
        engine.dispose()
    raise AssertionError(f"not refused: {sql}")


def test_chain_verifies_and_records_where_the_command_ran(sp_home) -> None:  # noqa: ANN001
    from rollout.audit import GENESIS, origin, verify_chain
    from rollout.db.models import AuditEntry
    from rollout.db.session import session_scope

    _seed()
    with session_scope() as s:
        rows = s.query(AuditEntry).order_by(AuditEntry.id).all()
        assert rows[0].prev_hash == GENESIS
        assert all(b.prev_hash == a.row_hash for a, b in zip(rows, rows[1:], strict=False))
        assert {(r.os_user, r.host) for r in rows} == {origin()}
        report = verify_chain(s)
    assert report.ok and report.rows == 3
    res = runner.invoke(app, ["audit", "verify"])
    assert res.exit_code == 0 and "audit chain intact: 3 row(s)" in res.output


def test_the_os_user_is_the_processs_real_uid_not_the_environments_claim(
    sp_home,
    monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    """origin() took getpass.getuser(), i.e. $LOGNAME/$USER: anyone could write any name there."""
    import os
    import pwd

    from rollout import audit
    from rollout.db.session import session_scope

    for var in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        monkeypatch.setenv(var, "alice-from-finance")
    audit.origin.cache_clear()
    try:
        with session_scope() as s:
            row = audit.record(
                s, audit.ANONYMOUS_ACTOR, "auth.sign_in_failed", entity="account", entity_id="x"
            )
            assert row.os_user == pwd.getpwuid(os.getuid()).pw_name != "alice-from-finance"
        taken = {p.pw_uid for p in pwd.getpwall()}
        free_uid = next(u for u in range(54_321, 60_000) if u not in taken)
        assert audit.os_user_of(free_uid) == str(free_uid)  # no passwd entry: the number
    finally:
        audit.origin.cache_clear()


def test_sqlite_triggers_refuse_rewrites_and_verify_catches_a_dropped_trigger(sp_home) -> None:  # noqa: ANN001
    url = sp_home.database_url
    ids = _seed()
    a, d = ids["approval"], ids["decision"]
    refusals = {
        "update": "UPDATE audit_log SET actor = 'mallory' WHERE id = 1",
        "delete": "DELETE FROM audit_log WHERE id = 2",
        "replace-by-id": "INSERT OR REPLACE INTO audit_log (id, ts, actor, action, details) "
        "SELECT id, ts, 'mallory', action, details FROM audit_log WHERE id = 1",
        "replace-by-prev-hash": "INSERT OR REPLACE INTO audit_log (ts, actor, action, details, prev_hash) "
        "SELECT ts, 'mallory', action, details, prev_hash FROM audit_log WHERE id = 2",
        "approval-update": f"UPDATE approvals SET actor = 'mallory' WHERE id = {ids['approval']}",
        "approval-delete": f"DELETE FROM approvals WHERE id = {ids['approval']}",
        "approval-replace": f"INSERT OR REPLACE INTO approvals SELECT * FROM approvals WHERE id = {a}",
        "decision-outcome": f"UPDATE gate_decisions SET outcome = 'NO-GO' WHERE id = {d}",
        "decision-re-resolve": f"UPDATE gate_decisions SET resolution = 'rejected' WHERE id = {d}",
        "decision-delete": f"DELETE FROM gate_decisions WHERE id = {d}",
        "decision-replace": "INSERT OR REPLACE INTO gate_decisions (idempotency_key, use_case_id, kind, "
        "look_index, outcome, awaiting, evidence, explanation, data_fingerprint, created_at) SELECT "
        "idempotency_key, use_case_id, kind, look_index, 'NO-GO', awaiting, evidence, explanation, "
        "data_fingerprint, created_at FROM gate_decisions",
        "move-rewrite": f"UPDATE alias_history SET to_version = '9' WHERE id = {ids['move']}",
        "move-uncommit": f"UPDATE alias_history SET status = 'failed' WHERE id = {ids['move']}",
        "move-delete": f"DELETE FROM alias_history WHERE id = {ids['move']}",
        **_run_link_rewrites(ids),
    }
    for name, sql in refusals.items():
        msg = _refused(url, sql)
        assert any(
            w in msg for w in ("append-only", "cannot be replaced", "may change", "cannot be deleted", "once")
        ), (
            name,
            msg,
        )
    res = runner.invoke(app, ["audit", "verify"])
    assert res.exit_code == 0
    # SQLite has no roles: whoever can write the file can drop a trigger. The chain still tells.
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.begin() as conn:
        conn.execute(text("DROP TRIGGER audit_log_no_update"))
        conn.execute(text("UPDATE audit_log SET details = '{\"i\": 99}' WHERE id = 2"))
    engine.dispose()
    res = runner.invoke(app, ["audit", "verify"])
    assert res.exit_code == 1
    assert "audit row 2: its content was changed after it was written" in res.output


def test_verify_names_a_deleted_row(sp_home) -> None:  # noqa: ANN001
    _seed()
    engine = create_engine(sp_home.database_url, poolclass=pool.NullPool)
    with engine.begin() as conn:
        conn.execute(text("DROP TRIGGER audit_log_no_delete"))
        conn.execute(text("DELETE FROM audit_log WHERE id = 2"))
    engine.dispose()
    res = runner.invoke(app, ["audit", "verify", "--json"])
    assert res.exit_code == 1 and "audit row 3: prev_hash does not match" in res.output


def test_details_are_stored_redacted_and_old_rows_still_verify(sp_home) -> None:  # noqa: ANN001
    """A detail string (a reason, an error's text, a URL) carried its secret into the append-only log,
    where it can never be removed (fix-k): now every string in the details, nested ones too, is stored
    redacted, hashed as stored. A row written before keeps what it holds and still verifies."""
    from rollout import audit, queries
    from rollout.db.models import AuditEntry
    from rollout.db.session import session_scope

    url = "postgresql://app:hunter2@db/sp"
    with session_scope() as s:  # a row as the code before wrote it: details as given
        old = audit._append(s, AuditEntry(actor="alice", action="test.old", details={"url": url}))
        audit.record(
            s,
            "alice",
            "test.new",
            details={
                "reason": f"moved back: {url} refused",
                "error": {"text": "HF hub: hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567 invalid", "code": 401},
                "urls": ["https://b.s3.amazonaws.com/k?X-Amz-Signature=aeeed9bb", "https://h/ok"],
                "plan_hash": "3f9a" * 16,
                "n": 3,
            },
        )
        old_id = old.id
    with session_scope() as s:
        assert s.get(AuditEntry, old_id).details == {"url": url}  # existing entries are not changed
        new = s.query(AuditEntry).filter_by(action="test.new").one()
        assert new.details == {
            "reason": "moved back: postgresql://app:***@db/sp refused",
            "error": {"text": "HF hub: hf_*** invalid", "code": 401},
            "urls": ["https://b.s3.amazonaws.com/k?X-Amz-Signature=***", "https://h/ok"],
            "plan_hash": "3f9a" * 16,
            "n": 3,
        }
        assert new.row_hash == audit.row_hash_of(new)
        exported = queries.audit_entries(s, actions=["test.new"])  # what the dashboard shows and exports
    assert "hunter2" not in str(exported) and "hf_AbCd" not in str(exported)
    res = runner.invoke(app, ["audit", "verify"])
    assert res.exit_code == 0 and "audit chain intact: 2 row(s)" in res.output


_HF = "hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567"


_NAMED = [
    ("actor", {"actor": _HF}),  # a flow's `actor` parameter, a pasted name
    ("actor", {"actor": "oidc:https://idp.example#password=hunter2"}),  # an OIDC subject that is none
    ("entity_id", {"entity_id": "token=hunter2"}),
    ("details.subject", {"details": {"subject": f"https://idp.example#{_HF}"}}),
]


def test_a_secret_where_the_audit_log_keeps_a_name_is_refused(sp_home) -> None:  # noqa: ANN001
    """An audit row's actor, entity id and an OIDC signer's subject are stored as given (names: the
    two-person rule and the sign-in counts read them back), so a token in one was kept in clear, for good
    (fix-s). Refused, naming the field, nothing written; a real OIDC name that only looks like a URL's
    password is written as before."""
    from rollout import audit
    from rollout.db.models import AuditEntry
    from rollout.db.session import session_scope

    for field, given in _NAMED:
        row = {"actor": "alice", "entity": "account", "entity_id": "alice", "details": {}} | given
        with pytest.raises(audit.AuditRefused, match=rf"audit log: {field} '.*\*\*\*.*' holds") as refused:
            with session_scope() as s:
                audit.record(s, row.pop("actor"), "test.named", **row)
        assert _HF not in str(refused.value) and "hunter2" not in str(refused.value)
    subject = "https://idp.corp#ldap:jdoe@corp.com"  # issuer#subject: no URL's password
    with session_scope() as s:
        audit.record(s, f"oidc:{subject}", "test.named", details={"subject": subject})
    with session_scope() as s:
        assert [e.actor for e in s.query(AuditEntry)] == [f"oidc:{subject}"]


def test_old_rows_show_their_actor_and_entity_id_redacted_and_still_verify(sp_home) -> None:  # noqa: ANN001
    """A row written before names were checked keeps what it holds (append-only, its hash covers it) and
    still verifies; the Audit page, its filter and its CSV show its actor, entity id and subject redacted
    (they were shown in clear, fix-s), and a real OIDC name as it is."""
    from rollout import audit, queries
    from rollout.db.models import AuditEntry
    from rollout.db.session import session_scope

    oidc = "oidc:https://idp.corp#ldap:jdoe@corp.com"
    with session_scope() as s:  # as the code before wrote them
        details = {"subject": f"https://idp.example#{_HF}"}
        audit._append(s, AuditEntry(actor=_HF, action="test.old", entity="account",
                                    entity_id="password=hunter2", details=details))  # fmt: skip
        audit.record(s, oidc, "test.new")
    with session_scope() as s:
        facets = queries.audit_facets(s)
        shown = queries.audit_entries(s)
        picked = queries.audit_entries(s, actors=["hf_***"])
    assert facets["actors"] == ["hf_***", oidc]
    assert [(e["actor"], e["entity_id"], e["details"]) for e in shown] == [
        (oidc, None, {}),
        ("hf_***", "password=***", {"subject": "https://idp.example#hf_***"}),
    ]
    assert [e["action"] for e in picked] == ["test.old"]
    assert _HF not in repr(shown) + repr(facets) and "hunter2" not in repr(shown)
    res = runner.invoke(app, ["audit", "verify"])
    assert res.exit_code == 0 and "audit chain intact: 2 row(s)" in res.output


@pytest.mark.postgres
def test_postgres_app_role_cannot_rewrite_history(
    pg_cluster, sp_home, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    import psycopg

    with psycopg.connect(host=pg_cluster.host, port=pg_cluster.port, user="sparsepilot", dbname="postgres",
                         autocommit=True) as conn:  # fmt: skip
        for role in ("sp_owner", "sp_app"):
            conn.execute(f"DROP ROLE IF EXISTS {role}")
        conn.execute("CREATE ROLE sp_owner LOGIN")
        conn.execute("CREATE ROLE sp_app LOGIN")
        conn.execute("DROP DATABASE IF EXISTS sp_roles")
        conn.execute("CREATE DATABASE sp_roles OWNER sp_owner")
        conn.execute("REVOKE ALL ON DATABASE sp_roles FROM PUBLIC")
        conn.execute("GRANT CONNECT ON DATABASE sp_roles TO sp_app")
    owner = f"postgresql+psycopg://sp_owner@{pg_cluster.host}:{pg_cluster.port}/sp_roles"
    app_url = f"postgresql+psycopg://sp_app@{pg_cluster.host}:{pg_cluster.port}/sp_roles"
    monkeypatch.setenv("SPARSEPILOT_OWNER_DATABASE_URL", owner)
    monkeypatch.setenv("SPARSEPILOT_DATABASE_URL", app_url)
    res = runner.invoke(app, ["init", "--json"])
    assert res.exit_code == 0, res.output
    assert '"app_role": "sp_app"' in res.output
    ids = _seed(app_url)  # the app role can do its work: insert, resolve an open decision, audit
    attacks = {
        "update": "UPDATE audit_log SET actor = 'mallory'",
        "delete": "DELETE FROM audit_log",
        "truncate": "TRUNCATE audit_log",
        "disable-trigger": "ALTER TABLE audit_log DISABLE TRIGGER ALL",
        "drop-trigger": "DROP TRIGGER audit_log_no_update ON audit_log",
        "drop-table": "DROP TABLE audit_log",
        "approval-update": "UPDATE approvals SET actor = 'mallory'",
        "approval-delete": "DELETE FROM approvals",
        "decision-outcome": f"UPDATE gate_decisions SET outcome = 'NO-GO' WHERE id = {ids['decision']}",
        "decision-re-resolve": f"UPDATE gate_decisions SET resolution = 'no' WHERE id = {ids['decision']}",
        "decision-delete": "DELETE FROM gate_decisions",
        "decision-truncate": "TRUNCATE gate_decisions CASCADE",
        "move-rewrite": f"UPDATE alias_history SET to_version = '9' WHERE id = {ids['move']}",
        "drop-guard-function": "DROP FUNCTION gate_decisions_guard() CASCADE",
        "grant-self-then-delete": "GRANT DELETE ON audit_log TO sp_app; DELETE FROM audit_log",
        **_run_link_rewrites(ids),
        # only ever inserted: a pilot's evidence and the spec its gate applies cannot be rewritten
        "observation-rewrite": f"UPDATE observations SET quality = 0 WHERE id = {ids['observation']}",
        "spec-rewrite": f"UPDATE spec_versions SET spec = '{{}}' WHERE id = {ids['spec_version']}",
    }
    for name, sql in attacks.items():
        msg = _refused(app_url, sql)
        refusals = ("permission denied", "must be owner", "append-only", "may change", "once", "cannot be")
        assert any(w in msg for w in refusals), (
            name,
            msg,
        )
    res = runner.invoke(app, ["audit", "verify"])
    assert res.exit_code == 0 and "audit chain intact: 3 row(s)" in res.output
    from rollout.db.session import get_engine

    get_engine(app_url).dispose()


def test_sqlite_audit_writers_at_once_queue_for_the_chain_and_none_is_lost(sp_home) -> None:  # noqa: ANN001
    """Six processes, each in a transaction whose first statement is `audit.record`, released at one
    instant on one SQLite state DB: each waits its turn (the write lock, taken before the chain's last
    hash is read), so six rows and a chain that verifies; none fails on the prev_hash unique index
    (review s46 C4: 4 of 6 were lost)."""
    import multiprocessing as mp

    from rollout import audit
    from rollout.db.models import AuditEntry
    from rollout.db.session import session_scope
    from tests.trust.race_helpers import record_one_audit_event

    n = 6
    # Each writer its own process, engine and connection, forked from a fresh server process that imported
    # the writers' modules once (not from this one): six spawned interpreters each importing SQLAlchemy
    # and rollout took 15-45 s on the 2-core host before the barrier released them
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.trust.race_helpers", "rollout.audit", "rollout.db.session"])
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [
        ctx.Process(target=record_one_audit_event, args=(str(sp_home.home), i, barrier, results))
        for i in range(n)
    ]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert outcomes == [(i, "recorded") for i in range(n)]
    with session_scope() as s:
        rows = s.query(AuditEntry).filter(AuditEntry.action == "test.concurrent").count()
        report = audit.verify_chain(s)
    assert rows == n
    assert report.ok, report.problem


def test_an_oidc_signers_subject_is_stored_as_given_and_still_counts(sp_home) -> None:  # noqa: ANN001
    """Review s47 T2: the details were stored redacted whole, and an OIDC signer's issuer#subject, which
    `signer_subject` reads back for the two-person rule and the approver list, was read as a URL's
    password when the issuer has no path ("https://idp.corp#ldap:jdoe@corp.com" stored as
    "...#ldap:***@corp.com"): a listed approver's signature lapsed. Identity keys are kept as given."""
    from rollout import audit
    from rollout.auth import still_approver
    from rollout.db.models import AuditEntry
    from rollout.db.session import session_scope

    subject = "https://idp.corp#ldap:jdoe@corp.com"
    with session_scope() as s:
        details = {"reason": "ok, see https://u:pw@h/x", "subject": subject}
        audit.record(
            s, "oidc:" + subject, "approval.approve", entity="gate_decision", entity_id="1", details=details
        )
    with session_scope() as s:
        stored = s.query(AuditEntry).filter_by(action="approval.approve").one()
        assert stored.details == {"reason": "ok, see https://u:***@h/x", "subject": subject}
        assert stored.row_hash == audit.row_hash_of(stored)
    assert still_approver("oidc:" + subject, subject=stored.details["subject"], approvers=[subject])[0]
