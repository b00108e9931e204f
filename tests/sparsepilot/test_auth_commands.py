"""`sparsepilot login | logout | whoami` against a real state DB: a bad token path is an `error:` line
with exit 2 and leaves no token behind; a password reset ends the tokens taken before it."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from rollout import auth
from sparsepilot.cli import app
from tests.fixtures.accounts import cheap_hash

runner = CliRunner()


@pytest.fixture
def alice(sp_home, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:  # noqa: ANN001
    """alice (approver) with password alice-pw-123, and where her token goes."""
    monkeypatch.setenv("SPARSEPILOT_ACCOUNTS", f"alice:approver:{cheap_hash('alice-pw-123')}")
    monkeypatch.setenv("SPARSEPILOT_USER", "alice")
    token = tmp_path / "cfg" / "token"
    monkeypatch.setenv("SPARSEPILOT_TOKEN_FILE", str(token))
    return token


def _login(*extra: str) -> object:
    return runner.invoke(app, ["login", "--password-stdin", *extra], input="alice-pw-123\n")


def test_a_token_path_that_cannot_hold_a_file_is_an_error_and_leaves_no_token(
    alice: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """These ended in IsADirectoryError/FileExistsError tracebacks, and the first left the valid token
    in a stray .token.<hex> file beside the directory."""
    alice.mkdir(parents=True)
    res = _login()
    assert res.exit_code == 2, res.output
    assert f"error: cannot write the login token to {alice}" in res.output and "Traceback" not in res.output
    assert sorted(p.name for p in alice.parent.iterdir()) == ["token"]  # no token left anywhere
    res = runner.invoke(app, ["logout"])
    assert res.exit_code == 2 and f"error: cannot remove the login token {alice}" in res.output
    under_a_file = tmp_path / "plain-file" / "token"
    (tmp_path / "plain-file").write_text("not a directory")
    monkeypatch.setenv("SPARSEPILOT_TOKEN_FILE", str(under_a_file))
    res = _login()
    assert res.exit_code == 2 and "error: cannot write the login token" in res.output, res.output
    res = runner.invoke(app, ["logout"])
    assert res.exit_code == 2 and "error: cannot remove the login token" in res.output, res.output


def test_a_password_reset_ends_a_token_taken_before_it(alice: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _login("--hours", "720").exit_code == 0
    copied = alice.read_text()
    assert runner.invoke(app, ["logout"]).exit_code == 0
    monkeypatch.setenv("SPARSEPILOT_ACCOUNTS", f"alice:approver:{cheap_hash('new-pw-4567')}")
    alice.write_text(copied)  # the token someone kept
    res = runner.invoke(app, ["whoami"])
    assert res.exit_code != 0 and "password of 'alice' changed after this login token" in res.output


def test_init_says_the_first_run_accounts_are_ignored_once_accounts_are_configured(
    sp_home,
    monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    assert runner.invoke(app, ["init"]).exit_code == 0  # embedded defaults: creates the first-run admin
    assert (sp_home.home / "accounts.toml").is_file()
    monkeypatch.setenv("SPARSEPILOT_ACCOUNTS", f"bob:viewer:{cheap_hash('bob-pw-1234')}")
    res = runner.invoke(app, ["init"])
    assert res.exit_code == 0 and "(the first-run accounts) is ignored now that" in res.output, res.output


def test_a_wrong_sign_in_does_not_echo_the_name_typed(alice: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review s47: "wrong account name or password for '<name>'" printed a password typed where the name
    goes to the terminal (and a CI log)."""
    monkeypatch.setenv("SPARSEPILOT_USER", "alice-pw-123-typed-as-name")
    res = runner.invoke(app, ["whoami", "--password-stdin"], input="alice-pw-123\n")
    assert res.exit_code == 2 and "wrong account name or password" in res.output, res.output
    assert "typed-as-name" not in res.output


def test_a_refused_login_says_why_not_that_the_signing_key_failed(alice: Path) -> None:
    """Review R3: a wrong password at `login` (PermissionDenied, a PermissionError) fell into the key
    file's OSError handler: "cannot create the token-signing key in SPARSEPILOT_HOME: wrong account name or
    password", sending a person who mistyped to the key whose removal ends every account's tokens."""
    res = runner.invoke(app, ["login", "--password-stdin"], input="not-alices-password\n")
    assert res.exit_code == 2 and "error: wrong account name or password" in res.output, res.output
    assert "token-signing key" not in res.output and not alice.exists()


@pytest.fixture
def fresh_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A SPARSEPILOT_HOME nothing has touched, on embedded defaults (no accounts configured); the MLflow
    store is a server's (left alone by init: the test is about the state DB and the first account)."""
    home = tmp_path / "fresh-home"
    monkeypatch.setenv("SPARSEPILOT_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    for name in ("SPARSEPILOT_DATABASE_URL", "SPARSEPILOT_OWNER_DATABASE_URL", "SPARSEPILOT_ACCOUNTS",
                 "SPARSEPILOT_ACCOUNTS_FILE"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    return home


def test_init_that_lost_the_race_to_another_init_says_so(
    fresh_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s47: of two `init`s at once on a fresh home, the one whose look found nothing but whose
    turn came after the other's said "created" and nothing of the first account (whose password only
    the other printed); now it says both were made by another init, and exits 0."""
    from rollout.db import migrate

    looked = migrate.current_revision
    calls = []

    def other_init_right_after_our_look(url: str | None = None) -> str | None:
        found = looked(url)
        if not calls:  # init's first look: the other init migrates and makes the account now
            calls.append(url)
            migrate.upgrade(url)
            assert auth.create_first_run_account() is not None
        return found

    monkeypatch.setattr(migrate, "current_revision", other_init_right_after_our_look)
    res = runner.invoke(app, ["init"])
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.split())
    assert "already created by another `sparsepilot init` running at the same time" in said, said
    assert "The first approver account was created by another `sparsepilot init`" in said, said
    assert "with password" not in said
