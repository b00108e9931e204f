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


def test_sigterm_to_sparsepilot_dashboard_stops_streamlit_too(tmp_path) -> None:  # noqa: ANN001
    """A supervisor (or `docker stop`) sends SIGTERM to `sparsepilot dashboard`: its Streamlit child must
    stop with it, not keep serving (issue 15, item 9)."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    import psutil

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, SPARSEPILOT_HOME=str(tmp_path / "home"))
    env.pop("SPARSEPILOT_DATABASE_URL", None)
    argv = [sys.executable, "-m", "sparsepilot", "dashboard", "--port", str(port)]
    parent = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            raise AssertionError("the dashboard did not come up")
        children = psutil.Process(parent.pid).children(recursive=True)
        assert children, "no Streamlit child process"
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=30) == 0
        _gone, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, f"still serving: {alive}"
    finally:
        if parent.poll() is None:
            parent.kill()
        for child in children if "children" in locals() else []:  # what the old behaviour left serving
            if child.is_running():
                child.kill()
