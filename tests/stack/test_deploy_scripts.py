"""The stack's entry scripts refuse bad configuration with a message naming the variable, before they
touch anything, and the harness stops what it starts by process group (even children that ignore
SIGTERM, like MLflow's job consumers). Fast: no servers are started here."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.stack import DEPLOY_BIN, REPO, clean_env, start_service

_MLFLOW = {"MLFLOW_BACKEND_STORE_URI": "postgresql+psycopg://x@h/db", "MLFLOW_ALLOWED_HOSTS": "h:5000"}
_PREFECT = {"PREFECT_API_DATABASE_CONNECTION_URL": "postgresql+asyncpg://x@h/db"}
SCRIPTS_NEEDING = [
    ("mlflow-server", {}, "MLFLOW_BACKEND_STORE_URI"),
    ("mlflow-server", {"MLFLOW_BACKEND_STORE_URI": "postgresql+psycopg://x@h/db"}, "MLFLOW_ALLOWED_HOSTS"),
    # a login secret that did not mount (empty or unset) would start the server open to anyone
    ("mlflow-server", _MLFLOW, "MLFLOW_AUTH_ADMIN_PASSWORD is required"),
    (
        "mlflow-server",
        {**_MLFLOW, "MLFLOW_AUTH_ADMIN_PASSWORD": ""},
        "MLFLOW_AUTH_ADMIN_PASSWORD is required",
    ),
    ("prefect-server", {}, "PREFECT_API_DATABASE_CONNECTION_URL"),
    ("prefect-server", _PREFECT, "PREFECT_SERVER_API_AUTH_STRING is required"),
    ("prefect-server", {**_PREFECT, "PREFECT_SERVER_API_AUTH_STRING": ""}, "PREFECT_SERVER_API_AUTH_STRING"),
    ("prefect-worker", {}, "PREFECT_API_URL"),
]


def _fake_servers(tmp_path: Path, env: dict[str, str]) -> dict[str, str]:
    """`mlflow` and `prefect` first on PATH that only exit 0: a script that goes past its checks starts
    nothing."""
    fake = tmp_path / "fake-bin"
    fake.mkdir(exist_ok=True)
    for name in ("mlflow", "prefect"):
        (fake / name).write_text("#!/bin/sh\nexit 0\n")
        (fake / name).chmod(0o755)
    env["PATH"] = f"{fake}{os.pathsep}{env['PATH']}"
    return env


@pytest.mark.parametrize(("script", "env", "missing"), SCRIPTS_NEEDING)
def test_service_scripts_name_the_missing_variable(
    script: str, env: dict[str, str], missing: str, tmp_path: Path
) -> None:
    res = subprocess.run(
        ["sh", str(DEPLOY_BIN / script)],
        env=_fake_servers(tmp_path, clean_env(**env)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode != 0
    assert missing in res.stderr, res.stderr


@pytest.mark.parametrize(("script", "env"), [("mlflow-server", _MLFLOW), ("prefect-server", _PREFECT)])
def test_a_server_runs_with_no_login_only_when_told_and_says_so(
    script: str, env: dict[str, str], tmp_path: Path
) -> None:
    res = subprocess.run(
        ["sh", str(DEPLOY_BIN / script)],
        env=_fake_servers(tmp_path, clean_env(**env, SPARSEPILOT_ALLOW_NO_LOGIN="1")),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 0, res.stderr
    assert "SPARSEPILOT_ALLOW_NO_LOGIN=1: no login" in res.stderr, res.stderr


@pytest.mark.parametrize("auth", [False, True])
def test_mlflow_server_keeps_the_database_password_off_the_command_line(tmp_path: Path, auth: bool) -> None:
    """`mlflow server` gets the backend store from MLFLOW_BACKEND_STORE_URI (its option's envvar), not
    `--backend-store-uri URL`: a command line is readable by every user of the host (ps, /proc/PID/cmdline).
    A fake `mlflow` first on PATH records what it was given."""
    fake = tmp_path / "bin"
    fake.mkdir()
    seen = tmp_path / "seen"
    (fake / "mlflow").write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$@" > {seen}.argv\n'
        f'printf "%s" "$MLFLOW_BACKEND_STORE_URI" > {seen}.env\n'
    )
    (fake / "mlflow").chmod(0o755)
    url = "postgresql+psycopg://mlflow:Top/Secret Pw@127.0.0.1:5432/mlflow"
    extra = (
        {"MLFLOW_AUTH_ADMIN_PASSWORD": "admin-pw", "MLFLOW_FLASK_SERVER_SECRET_KEY": "k"}
        if auth
        else {"SPARSEPILOT_ALLOW_NO_LOGIN": "1"}
    )
    env = clean_env(
        MLFLOW_BACKEND_STORE_URI=url, MLFLOW_ALLOWED_HOSTS="127.0.0.1:5000", TMPDIR=str(tmp_path), **extra
    )
    env["PATH"] = f"{fake}{os.pathsep}{env['PATH']}"
    res = subprocess.run(
        ["sh", str(DEPLOY_BIN / "mlflow-server")], env=env, capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 0, res.stderr
    argv = Path(f"{seen}.argv").read_text().splitlines()
    assert argv[0] == "server" and "--serve-artifacts" in argv, argv
    assert "--backend-store-uri" not in argv and not any("Secret" in a for a in argv), argv
    assert Path(f"{seen}.env").read_text() == url


def _init_databases_with_fake_psql(
    tmp_path: Path, **passwords: str
) -> tuple[subprocess.CompletedProcess, Path]:
    """init-databases.sh with a psql that records being called (the checks must stop the script first)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    marker = tmp_path / "psql-called"
    (fake / "psql").write_text(f"#!/bin/sh\ntouch {marker}\n")
    (fake / "psql").chmod(0o755)
    env = clean_env(POSTGRES_USER="postgres", **passwords)
    env["PATH"] = f"{fake}{os.pathsep}{env['PATH']}"
    res = subprocess.run(
        ["sh", str(REPO / "deploy" / "postgres" / "init-databases.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return res, marker


def test_init_databases_needs_every_password_and_runs_nothing_without_them(tmp_path: Path) -> None:
    res, psql_called = _init_databases_with_fake_psql(
        tmp_path, SPARSEPILOT_DB_PASSWORD="a", SPARSEPILOT_APP_DB_PASSWORD="c", MLFLOW_DB_PASSWORD="b"
    )
    assert res.returncode != 0
    assert "PREFECT_DB_PASSWORD is required" in res.stderr, res.stderr
    assert not psql_called.exists()


@pytest.mark.parametrize(
    ("var", "password"),
    [
        ("SPARSEPILOT_APP_DB_PASSWORD", "Kq7@tailsecret9"),  # the driver printed 'tailsecret9@postgres'
        ("MLFLOW_DB_PASSWORD", "Kq7%41tail"),  # read as 'Kq7Atail': sign-in failed, no hint
        ("PREFECT_DB_PASSWORD", "two words"),
    ],
)
def test_init_databases_refuses_a_password_a_database_url_cannot_hold(
    tmp_path: Path, var: str, password: str
) -> None:
    good = dict.fromkeys(
        (
            "SPARSEPILOT_DB_PASSWORD",
            "SPARSEPILOT_APP_DB_PASSWORD",
            "MLFLOW_DB_PASSWORD",
            "PREFECT_DB_PASSWORD",
        ),
        "0f3a9c_~.-Z",
    )
    res, psql_called = _init_databases_with_fake_psql(tmp_path, **{**good, var: password})
    assert res.returncode == 2, res.stderr
    assert f"{var} must be URL-safe" in res.stderr and "openssl rand -hex" in res.stderr, res.stderr
    assert "tail" not in res.stderr + res.stdout and not psql_called.exists()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "PREFECT_API_URL is not set"),
        (
            {"PREFECT_API_URL": "http://127.0.0.1:9/api", "SPARSEPILOT_CRASH_AFTER_S": "45"},
            "SPARSEPILOT_CRASH_AFTER_S=45 must be at least twice PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30",
        ),
        (
            {"PREFECT_API_URL": "http://127.0.0.1:9/api", "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "10"},
            "Prefect's minimum is 30 s",
        ),
        (
            {"PREFECT_API_URL": "http://127.0.0.1:9/api", "SPARSEPILOT_CRASH_AFTER_S": "two minutes"},
            "must be whole seconds",
        ),
    ],
)
def test_stack_setup_rejects_bad_configuration_before_calling_the_server(
    env: dict[str, str], message: str
) -> None:
    # port 9 (discard) on loopback: were the server contacted, the error would be a connection error
    res = subprocess.run(
        [sys.executable, str(REPO / "deploy" / "stack_setup.py")],
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode != 0
    assert message in res.stderr, res.stderr


def test_stop_ends_the_whole_process_group_including_children_that_ignore_sigterm(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = f"trap '' TERM; (trap '' TERM; sleep 300) & echo $! > {pids}; sleep 300"
    svc = start_service("stubborn", ["sh", "-c", script], clean_env(), tmp_path)
    deadline = time.monotonic() + 10
    while not (pids.exists() and pids.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(pids.read_text())
    svc.stop(grace_s=1)
    assert not svc.alive()
    assert _gone(child)


def _gone(pid: int) -> bool:
    """Dead: no such process, or a zombie waiting for whoever adopted it to reap it."""
    import psutil

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False
