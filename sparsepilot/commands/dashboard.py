"""`sparsepilot dashboard` (serve the Streamlit app) and `sparsepilot hash-password`."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import typer

import dashboard  # the package is only a docstring: a cheap import

APP_PATH = Path(dashboard.__file__).resolve().parent / "app.py"

app = typer.Typer()


# the Host names the served dashboard answers besides the defaults (`allowed_hosts`), comma-separated: the
# public name a reverse proxy forwards, "*" for any
HOSTS_ENV = "SPARSEPILOT_DASHBOARD_HOSTS"
_WILDCARD_ADDRESSES = frozenset({"", "0.0.0.0", "::"})


def allowed_hosts(address: str, env: Mapping[str, str] | None = None) -> list[str]:
    """The Host names the dashboard accepts (Streamlit's `server.allowedHosts`; ports are ignored):
    localhost, the loopback addresses, the bound address unless it is every interface, and
    SPARSEPILOT_DASHBOARD_HOSTS. A page on any other name, e.g. one an attacker rebinds to this
    address (DNS rebinding), gets no websocket and so reads nothing."""
    env = os.environ if env is None else env
    hosts = ["localhost", "127.0.0.1", "::1"]
    if address.strip() not in _WILDCARD_ADDRESSES:
        hosts.append(address.strip().strip("[]"))
    hosts += [h.strip() for h in env.get(HOSTS_ENV, "").split(",") if h.strip()]
    return list(dict.fromkeys(hosts))


def streamlit_command(
    port: int = 8501, address: str = "127.0.0.1", hosts: list[str] | None = None
) -> list[str]:
    """The `streamlit run` command line: headless, no usage statistics, no file watcher, no error
    details shown to visitors (a traceback names the server's files; the log keeps it), only the Host
    names of `allowed_hosts` (``hosts``, by default those of ``address``)."""
    hosts = allowed_hosts(address) if hosts is None else hosts
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP_PATH),
        "--server.port",
        str(port),
        "--server.address",
        address,
        "--server.headless",
        "true",
        "--server.fileWatcherType",
        "none",
        "--browser.gatherUsageStats",
        "false",
        "--global.developmentMode",
        "false",
        "--client.toolbarMode",
        "viewer",
        "--client.showErrorDetails",
        "none",
        *(arg for host in hosts for arg in ("--server.allowedHosts", host)),
    ]


def serve_dashboard(port: int = 8501, address: str = "127.0.0.1") -> int:
    """Check the accounts configuration, then run Streamlit in the foreground until it stops."""
    from rollout.auth import AccountsConfigError, load_accounts
    from sparsepilot.console import console, fail

    refusal = oidc_refusal()
    if refusal:
        fail(refusal)
    try:
        accounts = load_accounts()
    except AccountsConfigError as exc:
        fail(f"accounts configuration: {exc}")
    approvers = sorted(a.name for a in accounts.values() if a.role == "approver")
    console.print(
        f"SparsePilot dashboard on http://{address}:{port} · {len(accounts)} local account(s)"
        + (f", approvers: {', '.join(approvers)}" if approvers else " (read-only: no approver configured)")
    )
    env = dict(os.environ, STREAMLIT_BROWSER_GATHER_USAGE_STATS="false")
    return run_forwarding_signals(streamlit_command(port, address), env)


# Streamlit's sign-in (st.login) needs Authlib at least this version (`streamlit[auth]`)
AUTHLIB_MIN = (1, 3, 2)


def oidc_refusal() -> str | None:
    """Why the dashboard must not start: an [auth] section in the secrets Streamlit reads (its
    `secrets.files`: ~/.streamlit and ./.streamlit) while Authlib, which Streamlit's OIDC sign-in needs,
    is missing or too old; every sign-in would fail. None when there is no [auth] or Authlib is fine."""
    from importlib import metadata

    import streamlit as st

    try:
        configured = "auth" in st.secrets
    except Exception:  # noqa: BLE001 - no secrets file at all: no OIDC
        return None
    if not configured:
        return None
    try:
        version = metadata.version("Authlib")
    except metadata.PackageNotFoundError:
        version = ""
    parts = tuple(int(p) for p in version.split(".")[:3] if p.isdigit())
    if version and parts >= AUTHLIB_MIN:
        return None
    need = ".".join(map(str, AUTHLIB_MIN))
    found = f"Authlib {version} is installed" if version else "Authlib is not installed"
    files = [f for f in st.get_option("secrets.files") if Path(f).exists()]
    return (
        f"single sign-on is configured (an [auth] section in Streamlit's secrets: {', '.join(files)}) but "
        f"{found}; Streamlit's sign-in needs Authlib>={need}: pip install 'streamlit[auth]'"
    )


def run_forwarding_signals(cmd: list[str], env: dict[str, str]) -> int:
    """Run ``cmd`` in the foreground; SIGTERM, SIGINT and SIGHUP sent to us (a supervisor, `docker
    stop`, Ctrl-C) go on to it, so stopping `sparsepilot dashboard` never leaves Streamlit serving."""
    import signal

    proc = subprocess.Popen(cmd, env=env)

    def forward(signum: int, _frame: object) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {s: signal.signal(s, forward) for s in handled}
    try:
        code = proc.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if proc.poll() is None:  # we are leaving for another reason: take the child with us
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0 if code in (0, -signal.SIGTERM, -signal.SIGINT) else code


@app.command("dashboard")
def dashboard_cmd(
    port: int = typer.Option(8501, "--port", help="TCP port to listen on."),
    address: str = typer.Option(
        "127.0.0.1", "--address", help="Interface to bind; 0.0.0.0 exposes it to the network."
    ),
) -> None:
    """Serve the ROI and go/no-go dashboard (Streamlit, headless, usage statistics off)."""
    raise typer.Exit(serve_dashboard(port, address))


@app.command("hash-password")
def hash_password_cmd(
    name: str = typer.Option("", "--name", help="Print a whole SPARSEPILOT_ACCOUNTS entry for this user."),
    role: str | None = typer.Option(
        None, "--role", help="viewer (the default), operator or approver; only with --name."
    ),
    password_stdin: bool = typer.Option(
        False, "--password-stdin", help="Read the password from standard input (for scripts)."
    ),
) -> None:
    """Hash a password for a local account (scrypt, random per-user salt)."""
    from rollout.auth import MIN_PASSWORD_CHARS, ROLES, hash_password
    from sparsepilot.console import fail

    if role is not None and role not in ROLES:
        fail(f"--role must be one of {', '.join(ROLES)}, not {role!r}")
    if role is not None and not name:  # a bare hash carries no role: it would be dropped unsaid
        fail(
            "--role needs --name: a bare hash carries no role (give --name NAME for a whole "
            "SPARSEPILOT_ACCOUNTS entry, or set the role beside the hash in the accounts file)"
        )
    if name and (":" in name or ";" in name):
        fail("--name must not contain ':' or ';'")
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    if len(password) < MIN_PASSWORD_CHARS:
        fail(f"the password must have at least {MIN_PASSWORD_CHARS} characters")
    hashed = hash_password(password)
    typer.echo(f"{name}:{role or 'viewer'}:{hashed}" if name else hashed)
