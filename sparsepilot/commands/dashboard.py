"""`sparsepilot dashboard` (serve the Streamlit app) and `sparsepilot hash-password`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import typer

import dashboard  # the package is only a docstring: a cheap import

APP_PATH = Path(dashboard.__file__).resolve().parent / "app.py"

app = typer.Typer()


def streamlit_command(port: int = 8501, address: str = "127.0.0.1") -> list[str]:
    """The `streamlit run` command line: headless, no usage statistics, no file watcher."""
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
    ]


def serve_dashboard(port: int = 8501, address: str = "127.0.0.1") -> int:
    """Check the accounts configuration, then run Streamlit in the foreground until it stops."""
    from rollout.auth import AccountsConfigError, load_accounts
    from sparsepilot.console import console, fail

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
    role: str = typer.Option("viewer", "--role", help="viewer, operator or approver (with --name)."),
    password_stdin: bool = typer.Option(
        False, "--password-stdin", help="Read the password from standard input (for scripts)."
    ),
) -> None:
    """Hash a password for a local account (scrypt, random per-user salt)."""
    from rollout.auth import MIN_PASSWORD_CHARS, ROLES, hash_password
    from sparsepilot.console import fail

    if role not in ROLES:
        fail(f"--role must be one of {', '.join(ROLES)}, not {role!r}")
    if name and (":" in name or ";" in name):
        fail("--name must not contain ':' or ';'")
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    if len(password) < MIN_PASSWORD_CHARS:
        fail(f"the password must have at least {MIN_PASSWORD_CHARS} characters")
    hashed = hash_password(password)
    typer.echo(f"{name}:{role}:{hashed}" if name else hashed)
