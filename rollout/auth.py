"""Identities and roles. Every approval, promotion and rollback carries an Identity; the role is
re-checked on the server side of every action (rollout.approvals), never only in a UI.

Where identities come from:
- local accounts: ``SPARSEPILOT_ACCOUNTS="alice:approver:<hash>;bob:viewer:<hash>"`` and/or a TOML file
  named by ``SPARSEPILOT_ACCOUNTS_FILE`` (``[accounts.alice] role = "approver"`` /
  ``password_hash = "..."``). Hashes are scrypt with a per-user salt (`hash_password`); the plain
  password is never stored anywhere.
- the CLI: ``SPARSEPILOT_USER`` names one of those accounts; the role comes from the account, so setting
  the variable cannot grant more than the account has.
- OIDC (`identity_from_oidc`): the dashboard's ``st.login``; roles from a configured approver list.
- anonymous: no identity at all (``None``), which every action refuses.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

Role = Literal["viewer", "approver"]
ROLES: tuple[Role, ...] = ("viewer", "approver")

ACCOUNTS_ENV = "SPARSEPILOT_ACCOUNTS"
ACCOUNTS_FILE_ENV = "SPARSEPILOT_ACCOUNTS_FILE"
USER_ENV = "SPARSEPILOT_USER"

# scrypt cost: n=2**14, r=8 needs 16 MiB and ~50 ms per check; slow enough to hurt guessing, fast
# enough for a login form. Stored with the hash so it can be raised later without breaking old hashes.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P, _DKLEN = 2**14, 8, 1, 32
_HASH_PREFIX = "scrypt"


class PermissionDenied(PermissionError):
    pass


class AccountsConfigError(ValueError):
    """The accounts configuration is malformed; the message names the entry or field."""


@dataclass(frozen=True)
class Identity:
    name: str
    role: Role
    source: str  # "cli-env", "local-account", "oidc", "flow"

    @property
    def can_approve(self) -> bool:
        return self.role == "approver"


@dataclass(frozen=True)
class Account:
    name: str
    role: Role
    password_hash: str = ""

    def __repr__(self) -> str:  # keep hashes out of logs and tracebacks
        return f"Account(name={self.name!r}, role={self.role!r})"


def require_approver(identity: Identity | None, action: str) -> Identity:
    if identity is None:
        raise PermissionDenied(f"{action} needs a signed-in approver; nobody is signed in")
    if not identity.can_approve:
        raise PermissionDenied(f"{action} needs the approver role; {identity.name!r} is a {identity.role}")
    return identity


# --- password hashes ---------------------------------------------------------------------------


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """``scrypt$n$r$p$salt$hash`` (URL-safe base64, no ':' or ';' so it fits SPARSEPILOT_ACCOUNTS)."""
    if not password:
        raise ValueError("password must not be empty")
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=_DKLEN
    )
    return f"{_HASH_PREFIX}${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def _parse_hash(stored: str) -> tuple[int, int, int, bytes, bytes]:
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != _HASH_PREFIX:
        raise AccountsConfigError("password hash must look like scrypt$n$r$p$salt$hash")
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, digest = _unb64(parts[4]), _unb64(parts[5])
    except (ValueError, TypeError) as exc:
        raise AccountsConfigError(f"password hash is malformed: {exc}") from None
    if n < 2 or n & (n - 1) or r < 1 or p < 1 or not salt or not digest:
        raise AccountsConfigError("password hash has invalid scrypt parameters")
    return n, r, p, salt, digest


def verify_password(password: str, stored: str) -> bool:
    """Constant-time comparison of the derived key; a malformed hash never verifies."""
    try:
        n, r, p, salt, digest = _parse_hash(stored)
    except AccountsConfigError:
        return False
    candidate = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=len(digest), maxmem=256 * 1024 * 1024
    )
    return hmac.compare_digest(candidate, digest)


# A real hash of a random password: unknown user names cost the same scrypt work as known ones, so
# response time does not reveal which accounts exist.
_DUMMY_HASH = hash_password(secrets.token_urlsafe(16))


# --- local accounts ------------------------------------------------------------------------------


def _check_role(role: str, where: str) -> Role:
    if role not in ROLES:
        raise AccountsConfigError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
    return cast(Role, role)


def _check_name(name: str, where: str) -> str:
    name = name.strip()
    if not name:
        raise AccountsConfigError(f"{where}: account name is empty")
    return name


def parse_accounts(text: str, *, where: str = ACCOUNTS_ENV) -> dict[str, Account]:
    """Parse ``name:role:hash;name:role:hash``. Errors name the entry (1-based) and the field."""
    accounts: dict[str, Account] = {}
    for i, entry in enumerate((e.strip() for e in text.split(";")), start=1):
        if not entry:
            continue
        parts = entry.split(":")
        if len(parts) != 3:
            raise AccountsConfigError(
                f"{where} entry {i}: expected name:role:password_hash, got {len(parts)} field(s)"
            )
        name = _check_name(parts[0], f"{where} entry {i}")
        role = _check_role(parts[1].strip(), f"{where} entry {i} ({name})")
        pw_hash = parts[2].strip()
        _parse_hash_or_fail(pw_hash, f"{where} entry {i} ({name})")
        if name in accounts:
            raise AccountsConfigError(f"{where} entry {i}: account {name!r} is defined twice")
        accounts[name] = Account(name, role, pw_hash)
    return accounts


def _parse_hash_or_fail(pw_hash: str, where: str) -> None:
    try:
        _parse_hash(pw_hash)
    except AccountsConfigError as exc:
        raise AccountsConfigError(f"{where}: password_hash: {exc}") from None


def load_accounts_file(path: str | Path) -> dict[str, Account]:
    """TOML: ``[accounts.<name>]`` tables with ``role`` and ``password_hash``."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AccountsConfigError(f"{p}: accounts file does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise AccountsConfigError(f"{p}: not valid TOML: {exc}") from None
    table = data.get("accounts")
    if not isinstance(table, dict):
        raise AccountsConfigError(f"{p}: needs an [accounts.<name>] table per account")
    accounts: dict[str, Account] = {}
    for raw_name, fields in table.items():
        where = f"{p}: accounts.{raw_name}"
        name = _check_name(str(raw_name), where)
        if not isinstance(fields, dict):
            raise AccountsConfigError(f"{where}: must be a table with role and password_hash")
        role = _check_role(str(fields.get("role", "")), where)
        pw_hash = fields.get("password_hash")
        if not isinstance(pw_hash, str):
            raise AccountsConfigError(f"{where}: password_hash is missing")
        _parse_hash_or_fail(pw_hash, where)
        accounts[name] = Account(name, role, pw_hash)
    return accounts


def load_accounts(env: Mapping[str, str] | None = None) -> dict[str, Account]:
    """Accounts from ``SPARSEPILOT_ACCOUNTS_FILE`` then ``SPARSEPILOT_ACCOUNTS`` (the variable wins on
    a name defined in both). Read fresh every call so a changed environment takes effect."""
    env = os.environ if env is None else env
    accounts: dict[str, Account] = {}
    if env.get(ACCOUNTS_FILE_ENV):
        accounts.update(load_accounts_file(env[ACCOUNTS_FILE_ENV]))
    if env.get(ACCOUNTS_ENV):
        accounts.update(parse_accounts(env[ACCOUNTS_ENV]))
    return accounts


def authenticate(name: str, password: str, accounts: Mapping[str, Account] | None = None) -> Identity | None:
    """The Identity for a correct name + password, else None (same work for unknown names)."""
    accounts = load_accounts() if accounts is None else accounts
    account = accounts.get(name.strip())
    ok = verify_password(password, account.password_hash if account else _DUMMY_HASH)
    if account is None or not ok:
        return None
    return Identity(account.name, account.role, "local-account")


def cli_identity(env: Mapping[str, str] | None = None) -> Identity | None:
    """``SPARSEPILOT_USER`` looked up in the accounts; None when unset. The environment of the
    process is trusted (like a Unix login), the role is not: it always comes from the account."""
    env = os.environ if env is None else env
    name = (env.get(USER_ENV) or "").strip()
    if not name:
        return None
    accounts = load_accounts(env)
    account = accounts.get(name)
    if account is None:
        known = ", ".join(sorted(accounts)) or "none configured"
        raise PermissionDenied(
            f"{USER_ENV}={name!r} is not a known account (accounts: {known}); "
            f"set {ACCOUNTS_ENV} or {ACCOUNTS_FILE_ENV}"
        )
    return Identity(account.name, account.role, "cli-env")


def identity_from_oidc(claims: Mapping[str, object], approvers: Iterable[str] = ()) -> Identity | None:
    """An OIDC user (``st.user``) becomes an approver only when their email (or subject) is listed;
    everyone else who signed in is a viewer. No claims that identify the user -> no identity."""
    if not claims.get("is_logged_in", True):
        return None
    name = str(claims.get("email") or claims.get("preferred_username") or claims.get("sub") or "").strip()
    if not name:
        return None
    listed = {a.strip().lower() for a in approvers}
    keys = {name.lower(), str(claims.get("sub") or "").lower()}
    role: Role = "approver" if listed & keys else "viewer"
    return Identity(name, role, "oidc")
