"""`sparsepilot hash-password` and `sparsepilot dashboard` argument handling."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from rollout import auth
from sparsepilot.cli import app
from sparsepilot.commands.dashboard import allowed_hosts, streamlit_command


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
    r = CliRunner().invoke(
        app, ["hash-password", "--password-stdin", "--role", "approver"], input="s3cret-long\n"
    )
    assert r.exit_code == 2 and "--role needs --name: a bare hash carries no role" in r.output  # review R
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
    # an uncaught error shows visitors no traceback with the server's paths (the log keeps it)
    assert opts["--client.showErrorDetails"] == "none"
    hosts = [v for k, v in zip(cmd[5::2], cmd[6::2], strict=True) if k == "--server.allowedHosts"]
    assert hosts == ["localhost", "127.0.0.1", "::1"]


@pytest.mark.parametrize(
    ("address", "env", "hosts"),
    [
        ("127.0.0.1", {}, ["localhost", "127.0.0.1", "::1"]),
        ("0.0.0.0", {}, ["localhost", "127.0.0.1", "::1"]),  # every interface: no name of its own
        ("10.1.2.3", {}, ["localhost", "127.0.0.1", "::1", "10.1.2.3"]),
        (
            "0.0.0.0",
            {"SPARSEPILOT_DASHBOARD_HOSTS": " pilot.corp.example, *.corp.example ,"},
            ["localhost", "127.0.0.1", "::1", "pilot.corp.example", "*.corp.example"],
        ),
    ],
)
def test_the_dashboard_answers_its_own_host_names_only(address: str, env: dict, hosts: list[str]) -> None:
    assert allowed_hosts(address, env) == hosts


def test_dashboard_refuses_single_sign_on_without_authlib(tmp_path) -> None:  # noqa: ANN001
    """[auth] configured where Authlib is missing or too old: every sign-in would show a traceback, so
    `sparsepilot dashboard` does not start (a distribution of Authlib 1.0.0 first on the path stands
    for an install without `streamlit[auth]`)."""
    import os
    import subprocess
    import sys

    old = tmp_path / "site" / "Authlib-1.0.0.dist-info"
    old.mkdir(parents=True)
    (old / "METADATA").write_text("Metadata-Version: 2.1\nName: Authlib\nVersion: 1.0.0\n")
    (tmp_path / "app" / ".streamlit").mkdir(parents=True)
    (tmp_path / "app" / ".streamlit" / "secrets.toml").write_text('[auth]\nclient_id = "x"\n')
    path = os.pathsep.join([str(tmp_path / "site"), *sys.path])
    # malformed accounts: a build without this check stops on them (exit 2, another message), never serves
    env = dict(os.environ, PYTHONPATH=path, SPARSEPILOT_HOME=str(tmp_path / "home"), SPARSEPILOT_ACCOUNTS="x")
    argv = [sys.executable, "-m", "sparsepilot", "dashboard", "--port", "1"]
    r = subprocess.run(argv, env=env, cwd=tmp_path / "app", capture_output=True, text=True, timeout=60)
    said = " ".join(r.stderr.split())
    assert r.returncode == 2, r.stdout + r.stderr
    assert "error: single sign-on is configured (an [auth] section in Streamlit's secrets: " in said
    assert "Authlib 1.0.0 is installed; Streamlit's sign-in needs Authlib>=1.3.2: pip install" in said


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
