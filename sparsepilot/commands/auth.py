"""`sparsepilot login | logout | whoami`, and `signed_in`: how every state-changing command proves who
runs it (rollout.auth.cli_authenticate) and checks the role it needs."""

from __future__ import annotations

import getpass
import sys
from typing import Annotated, Any

import typer

from sparsepilot.console import fail, say

PasswordStdin = Annotated[
    bool,
    typer.Option(
        "--password-stdin",
        help="read the password of the account named by SPARSEPILOT_USER from standard input",
    ),
]

app = typer.Typer()


def _read_password(password_stdin: bool) -> str | None:
    if not password_stdin:
        return None
    line = sys.stdin.readline()
    if len(line) > 4096:
        fail("--password-stdin: the first line is longer than 4096 characters")
    return line.rstrip("\r\n")


def signed_in(role: str, action: str, password_stdin: bool = False) -> Any:
    """The authenticated Identity with at least ``role``, or exit 2 saying why not."""
    from rollout.auth import AccountsConfigError, cli_authenticate, require_role

    password = _read_password(password_stdin)
    prompt = getpass.getpass if password is None and sys.stdin.isatty() else None
    try:
        who = cli_authenticate(password=password, prompt=prompt)
        return require_role(who, role, action)  # type: ignore[arg-type]
    except AccountsConfigError as exc:
        fail(f"accounts configuration: {exc}")


def acting_person() -> str:
    """Who runs a command that needs no sign-in but changes the state DB (`calibrate NAME`, `evaluate
    NAME`), as its audit rows name them: the account of a valid login token (`sparsepilot login`), else,
    nobody signed in (or a token that no longer holds), the OS account of this process marked unproven
    (`rollout.auth.unproven_os_name`: "os:alice (not signed in)"). Never prompts, never refuses."""
    from rollout.audit import origin
    from rollout.auth import AccountsConfigError, PermissionDenied, cli_authenticate, unproven_os_name

    try:
        return cli_authenticate().name
    except (PermissionDenied, AccountsConfigError):
        return unproven_os_name(origin()[0])


def _signing_key() -> bytes:
    """The token-signing key, created on the first login; exit 2 where it cannot be."""
    from rollout.auth import auth_key

    try:
        key = auth_key(create=True)
    except OSError as exc:
        fail(f"cannot create the token-signing key in SPARSEPILOT_HOME: {exc.strerror or exc}")
    assert key is not None  # created when missing
    return key


@app.command("login")
def login(
    password_stdin: PasswordStdin = False,
    hours: Annotated[float, typer.Option("--hours", min=0.1, max=720, help="token lifetime")] = 8.0,
) -> None:
    """Sign in as SPARSEPILOT_USER with the account's password; stores a signed, expiring token (mode
    0600) in your config dir so later commands need no password until it expires."""
    import os

    from rollout.auth import AccountsConfigError, cli_authenticate, issue_token, token_path, write_private
    from rollout.settings import configure_environment

    configure_environment()
    password = _read_password(password_stdin)
    prompt = getpass.getpass if password is None and sys.stdin.isatty() else None
    if password is None and prompt is None:
        fail("give the password with --password-stdin (standard input is not a terminal)")
    if not os.environ.get("SPARSEPILOT_USER"):
        fail("set SPARSEPILOT_USER to the account to sign in as")
    if password is None:
        password = prompt(f"Password for {os.environ['SPARSEPILOT_USER']}: ")  # type: ignore[misc]
    try:  # a refused sign-in (PermissionDenied, a PermissionError too) is the CLI's `error:` line as it is
        who = cli_authenticate(password=password)
        key = _signing_key()
    except AccountsConfigError as exc:
        fail(f"accounts configuration: {exc}")
    token = issue_token(who, key, ttl_s=int(hours * 3600))
    path = token_path()
    try:
        write_private(path, token.encode("ascii"))
    except OSError as exc:
        fail(
            f"cannot write the login token to {path} ({exc.strerror or exc}); "
            "set SPARSEPILOT_TOKEN_FILE to a file path"
        )
    say(f"signed in as {who.name} ({who.role}) for {hours:g} h; token in {path}")


@app.command("logout")
def logout() -> None:
    """Remove the login token."""
    from rollout.auth import token_path

    path = token_path()
    try:
        path.unlink()
    except FileNotFoundError:
        say("nobody was signed in")
        return
    except OSError as exc:  # a directory, a path under a file, no permission
        fail(f"cannot remove the login token {path} ({exc.strerror or exc}); remove it by hand")
    say(f"signed out (removed {path})")


@app.command("whoami")
def whoami(password_stdin: PasswordStdin = False) -> None:
    """Who the CLI acts as (checks the token or password) and with which role."""
    from rollout.settings import configure_environment

    configure_environment()
    who = signed_in("viewer", "whoami", password_stdin)
    say(f"{who.name} ({who.role}, via {who.source})")
