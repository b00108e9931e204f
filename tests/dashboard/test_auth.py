"""Local accounts, password hashes, CLI and OIDC identities."""

from __future__ import annotations

from pathlib import Path

import pytest

from rollout import auth
from rollout.auth import AccountsConfigError, Identity, PermissionDenied


@pytest.fixture(scope="module")
def hashes() -> dict[str, str]:
    return {"alice": auth.hash_password("alice-pw"), "bob": auth.hash_password("bob-pw")}


def test_hash_is_salted_and_verifies(hashes: dict[str, str]) -> None:
    h1, h2 = auth.hash_password("same"), auth.hash_password("same")
    assert h1 != h2  # per-user random salt
    assert h1.startswith("scrypt$16384$8$1$")
    assert ":" not in h1 and ";" not in h1
    assert auth.verify_password("same", h1) and auth.verify_password("same", h2)
    assert not auth.verify_password("Same", h1)
    assert not auth.verify_password("same", "scrypt$garbage")
    assert "same" not in h1


def test_empty_password_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        auth.hash_password("")


def test_accounts_from_env_and_authenticate(hashes: dict[str, str]) -> None:
    env = {"SPARSEPILOT_ACCOUNTS": f"alice:approver:{hashes['alice']}; bob:viewer:{hashes['bob']};"}
    accounts = auth.load_accounts(env)
    assert {a.name: a.role for a in accounts.values()} == {"alice": "approver", "bob": "viewer"}
    assert hashes["alice"] not in repr(accounts["alice"])
    assert auth.authenticate("alice", "alice-pw", accounts) == Identity("alice", "approver", "local-account")
    assert auth.authenticate("bob", "bob-pw", accounts) == Identity("bob", "viewer", "local-account")
    assert auth.authenticate("alice", "bob-pw", accounts) is None
    assert auth.authenticate("mallory", "alice-pw", accounts) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("alice:approver", r"entry 1: expected name:role:password_hash"),
        ("alice:admin:scrypt$16384$8$1$AAAA$BBBB", r"entry 1 \(alice\): role 'admin'"),
        ("alice:viewer:plaintext", r"entry 1 \(alice\): password_hash"),
        (":viewer:scrypt$16384$8$1$AAAA$BBBB", r"entry 1: account name is empty"),
    ],
)
def test_malformed_accounts_name_the_entry(text: str, message: str) -> None:
    with pytest.raises(AccountsConfigError, match=message):
        auth.parse_accounts(text)


def test_duplicate_account_refused(hashes: dict[str, str]) -> None:
    with pytest.raises(AccountsConfigError, match="entry 2: account 'alice' is defined twice"):
        auth.parse_accounts(f"alice:viewer:{hashes['alice']};alice:approver:{hashes['alice']}")


def test_accounts_file(tmp_path: Path, hashes: dict[str, str]) -> None:
    f = tmp_path / "accounts.toml"
    f.write_text(f'[accounts.carol]\nrole = "approver"\npassword_hash = "{hashes["alice"]}"\n')
    accounts = auth.load_accounts({"SPARSEPILOT_ACCOUNTS_FILE": str(f)})
    assert accounts["carol"].role == "approver"
    f.write_text('[accounts.carol]\nrole = "approver"\n')
    with pytest.raises(AccountsConfigError, match=r"accounts\.carol: password_hash is missing"):
        auth.load_accounts({"SPARSEPILOT_ACCOUNTS_FILE": str(f)})
    with pytest.raises(AccountsConfigError, match="does not exist"):
        auth.load_accounts({"SPARSEPILOT_ACCOUNTS_FILE": str(tmp_path / "nope.toml")})


def test_cli_identity_role_comes_from_the_account(hashes: dict[str, str]) -> None:
    accounts = f"alice:approver:{hashes['alice']};bob:viewer:{hashes['bob']}"
    assert auth.cli_identity({"SPARSEPILOT_ACCOUNTS": accounts}) is None
    bob = auth.cli_identity({"SPARSEPILOT_ACCOUNTS": accounts, "SPARSEPILOT_USER": "bob"})
    assert bob == Identity("bob", "viewer", "cli-env")
    with pytest.raises(PermissionDenied, match="bob"):
        auth.require_approver(bob, "promote")
    with pytest.raises(PermissionDenied, match="'eve' is not a known account"):
        auth.cli_identity({"SPARSEPILOT_ACCOUNTS": accounts, "SPARSEPILOT_USER": "eve"})


def test_oidc_roles_from_the_approver_list() -> None:
    claims = {"is_logged_in": True, "email": "Ann@Example.com", "sub": "123"}
    assert auth.identity_from_oidc(claims, ["ann@example.com"]) == Identity(
        "Ann@Example.com", "approver", "oidc"
    )
    assert auth.identity_from_oidc(claims, []).role == "viewer"
    assert auth.identity_from_oidc({"is_logged_in": False}, ["x"]) is None


def test_anonymous_is_refused() -> None:
    with pytest.raises(PermissionDenied, match="nobody is signed in"):
        auth.require_approver(None, "approve")
