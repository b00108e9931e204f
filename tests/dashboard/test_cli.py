"""`sparsepilot hash-password` and `sparsepilot dashboard` argument handling."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from rollout import auth
from sparsepilot.cli import app
from sparsepilot.commands.dashboard import streamlit_command


def test_hash_password_prints_a_usable_account_entry() -> None:
    result = CliRunner().invoke(
        app,
        ["hash-password", "--password-stdin", "--name", "alice", "--role", "approver"],
        input="s3cret-long\n",
    )
    assert result.exit_code == 0, result.output
    entry = result.output.strip()
    assert "s3cret" not in entry
    accounts = auth.parse_accounts(entry)
    assert auth.authenticate("alice", "s3cret-long", accounts) == auth.Identity(
        "alice", "approver", "local-account"
    )


def test_hash_password_refuses_bad_input() -> None:
    r = CliRunner().invoke(app, ["hash-password", "--password-stdin", "--role", "admin"], input="x\n")
    assert r.exit_code == 2 and "--role must be one of viewer, operator, approver" in r.output
    r = CliRunner().invoke(app, ["hash-password", "--password-stdin"], input="\n")
    assert r.exit_code == 2 and "at least 10 characters" in r.output
    r = CliRunner().invoke(app, ["hash-password", "--password-stdin"], input="short-pw\n")
    assert r.exit_code == 2 and "at least 10 characters" in r.output


def test_dashboard_refuses_a_malformed_accounts_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARSEPILOT_ACCOUNTS", "alice:admin:scrypt$16384$8$1$AAAA$BBBB")
    r = CliRunner().invoke(app, ["dashboard", "--port", "1"])
    assert r.exit_code == 2
    assert "SPARSEPILOT_ACCOUNTS entry 1 (alice): role 'admin'" in r.output


def test_streamlit_command_is_headless_and_private() -> None:
    cmd = streamlit_command(9999, "127.0.0.1")
    opts = dict(zip(cmd[5::2], cmd[6::2], strict=True))
    assert cmd[2:4] == ["streamlit", "run"] and cmd[4].endswith("dashboard/app.py")
    assert opts["--server.port"] == "9999" and opts["--server.address"] == "127.0.0.1"
    assert opts["--server.headless"] == "true" and opts["--browser.gatherUsageStats"] == "false"
