"""Identities and roles. Every approval, promotion and rollback carries an Identity; the role is
re-checked in rollout (rollout.approvals) on every action, never only in a UI. That binds in the
dashboard's server process; the CLI checks in the caller's own process, against the accounts and key of
the caller's environment, so whoever holds the state DB URL can act as any account (docs/operations.md,
"What the roles stop, and what they do not").

Where identities come from:
- local accounts: ``SPARSEPILOT_ACCOUNTS="alice:approver:<hash>;bob:viewer:<hash>"`` and/or a TOML file
  named by ``SPARSEPILOT_ACCOUNTS_FILE`` (``[accounts.alice] role = "approver"`` /
  ``password_hash = "..."``). Hashes are scrypt with a per-user salt (`hash_password`); the plain
  password is never stored anywhere.
- the CLI (`cli_authenticate`): every state-changing command proves who runs it, with the account's
  password (``--password-stdin``, or a prompt on a terminal; ``SPARSEPILOT_USER`` names the account) or
  with a token from ``sparsepilot login`` (HMAC-signed with the installation's key, stored 0600 in the
  user's config dir, expiring). The role always comes from the account.
- the sign-in limit (`sign_in`, `locked_until`): failed password checks are counted per account name in
  the state DB (``auth.sign_in_failed`` audit rows), shared by the dashboard and the CLI.
- OIDC (`identity_from_oidc`): the dashboard's ``st.login``; the approver role only on claims the
  provider vouches for (a verified email or issuer + subject on a configured approver list), under a
  name of its own (``oidc:...``) that no local account can have.
- anonymous: no identity at all (``None``), which every action refuses.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import threading
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

from rollout.redact import redacted_name
from sparse_core.errors import SparsePilotError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

Role = Literal["viewer", "operator", "approver"]
# Ordered: each role may do what the roles before it may. viewer reads; operator adds specs, runs and
# aborts pilots and imports observations; approver also promotes, rejects and rolls back.
ROLES: tuple[Role, ...] = ("viewer", "operator", "approver")

ACCOUNTS_ENV = "SPARSEPILOT_ACCOUNTS"
ACCOUNTS_FILE_ENV = "SPARSEPILOT_ACCOUNTS_FILE"
USER_ENV = "SPARSEPILOT_USER"
# OIDC identities live in a namespace of their own: a local account's name never starts with it, so an
# OIDC user can never be recorded under (or take the signatures of) a local account's name.
OIDC_PREFIX = "oidc:"
# A person the CLI did not sign in, where a command needs no sign-in (`calibrate NAME`, `evaluate NAME`):
# named after the OS account of the process and marked unproven (`unproven_os_name`). No local account's
# name starts with it either, so such a name never reads as an account's, nor takes its signatures.
OS_PREFIX = "os:"
# the OIDC approver list (email or ``<issuer>#<subject>``, comma-separated); the dashboard adds its
# secrets' ``[sparsepilot] approvers`` (`oidc_approvers_known`)
OIDC_APPROVERS_ENV = "SPARSEPILOT_OIDC_APPROVERS"

# scrypt cost: n=2**17, r=8, p=1 (the OWASP minimum) needs 128 MiB and ~0.3 s per check. Stored with
# the hash so it can be raised later without breaking old hashes; a stored hash may ask for at most
# _SCRYPT_MAXMEM (a hash with n=2**30 would otherwise exhaust memory at sign-in).
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P, _DKLEN = 2**17, 8, 1, 32
_SCRYPT_MAXMEM = 256 * 1024 * 1024
_HASH_PREFIX = "scrypt"
MIN_PASSWORD_CHARS = 10


class PermissionDenied(SparsePilotError, PermissionError):
    pass


class AccountsConfigError(SparsePilotError, ValueError):
    """The accounts configuration is malformed; the message names the entry or field."""


@dataclass(frozen=True)
class Identity:
    name: str
    role: Role
    source: str  # "cli-password", "cli-token", "local-account", "oidc", "flow"
    # for a local account: `password_fingerprint` of the hash the password was checked against, so a
    # token or a dashboard session proven with it ends when the password changes ("" otherwise)
    credential: str = field(default="", compare=False, repr=False)
    # for an OIDC user: ``<issuer>#<subject>``, who the person is whatever their email says now (a name
    # of ``oidc:<verified email>`` changes with the email); "" otherwise
    subject: str = field(default="", compare=False)

    @property
    def can_approve(self) -> bool:
        return self.role == "approver"

    def has_role(self, role: Role) -> bool:
        return self.role in ROLES and ROLES.index(self.role) >= ROLES.index(role)


@dataclass(frozen=True)
class Account:
    name: str
    role: Role
    password_hash: str = ""
    email: str = ""  # optional: the person's email, so the same person signing in by OIDC is known

    def __repr__(self) -> str:  # keep hashes out of logs and tracebacks
        return f"Account(name={self.name!r}, role={self.role!r})"


def password_fingerprint(account: Account) -> str:
    """A short digest of the account's stored hash: it changes whenever the password is reset (a new
    salt), and reveals nothing the hash does not."""
    return hashlib.sha256(account.password_hash.encode("utf-8")).hexdigest()[:16]


def require_approver(identity: Identity | None, action: str) -> Identity:
    return require_role(identity, "approver", action)


def require_role(identity: Identity | None, role: Role, action: str) -> Identity:
    if identity is None:
        raise PermissionDenied(f"{action} needs a signed-in {role}; nobody is signed in")
    if not identity.has_role(role):
        article = "an" if identity.role[:1] in "aeiou" else "a"  # an operator, an approver, a viewer
        raise PermissionDenied(
            f"{action} needs the {role} role; {identity.name!r} is {article} {identity.role}"
        )
    return identity


# --- password hashes ---------------------------------------------------------------------------


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, *, salt: bytes | None = None, n: int = _SCRYPT_N) -> str:
    """``scrypt$n$r$p$salt$hash`` (URL-safe base64, no ':' or ';' so it fits SPARSEPILOT_ACCOUNTS).

    ``n`` is scrypt's cost (a power of two), recorded in the hash, which `verify_password` reads back.
    Leave it at its default, OWASP's minimum; the tests pass a small one (2**10) for accounts whose
    sign-ins are not about the cost, so each of their checks is real scrypt without its 0.4 s."""
    if not password:
        raise ValueError("password must not be empty")
    return _scrypt_hash(
        password, salt if salt is not None else secrets.token_bytes(16), n, _SCRYPT_R, _SCRYPT_P
    )


def _scrypt_hash(password: str, salt: bytes, n: int, r: int, p: int, dklen: int = _DKLEN) -> str:
    digest = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=dklen, maxmem=_SCRYPT_MAXMEM
    )
    return f"{_HASH_PREFIX}${n}${r}${p}${_b64(salt)}${_b64(digest)}"


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
    if 128 * n * r + 128 * r * p > _SCRYPT_MAXMEM or p > 16 or len(digest) > 64:
        raise AccountsConfigError(
            f"password hash asks for more than {_SCRYPT_MAXMEM // 2**20} MiB of scrypt memory "
            "(n, r or p too large); hash it again with `sparsepilot hash-password`"
        )
    return n, r, p, salt, digest


def verify_password(password: str, stored: str) -> bool:
    """Constant-time comparison of the derived key; a malformed hash never verifies."""
    try:
        n, r, p, salt, digest = _parse_hash(stored)
    except AccountsConfigError:
        return False
    try:
        candidate = hashlib.scrypt(
            password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=len(digest), maxmem=_SCRYPT_MAXMEM
        )
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(candidate, digest)


ScryptCost = tuple[int, int, int, int]  # n, r, p, dklen: what one check of a stored hash costs


def usual_cost(hashes: Iterable[str]) -> ScryptCost:
    """The scrypt parameters most of ``hashes`` were made with (of two as common, the dearer), or the
    product's default where none parses: what a check of an unknown name must cost (`_dummy_hash`) so
    that it takes the time of a wrong password for an account (pure)."""
    costs: dict[ScryptCost, int] = {}
    for stored in hashes:
        try:
            n, r, p, _salt, digest = _parse_hash(stored)
        except AccountsConfigError:
            continue
        cost = (n, r, p, len(digest))
        costs[cost] = costs.get(cost, 0) + 1
    if not costs:
        return _SCRYPT_N, _SCRYPT_R, _SCRYPT_P, _DKLEN
    return max(costs, key=lambda c: (costs[c], c[0] * c[1] * c[2], c))


@lru_cache(maxsize=8)
def _dummy_hash(cost: ScryptCost = (_SCRYPT_N, _SCRYPT_R, _SCRYPT_P, _DKLEN)) -> str:
    """A real hash of a random password at ``cost`` (made once per cost): `authenticate` checks an
    unknown name against it at the accounts' `usual_cost`, so it takes the scrypt work of a wrong
    password for an account and the response time does not tell which accounts exist. Made at the
    product's default whatever the accounts' cost, an installation whose hashes were made at another n
    answered an unknown name in another time (review s48)."""
    n, r, p, dklen = cost
    return _scrypt_hash(secrets.token_urlsafe(16), secrets.token_bytes(16), n, r, p, dklen)


# --- local accounts ------------------------------------------------------------------------------


def _check_role(role: str, where: str) -> Role:
    if role not in ROLES:
        raise AccountsConfigError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
    return cast(Role, role)


def _check_name(name: str, where: str) -> str:
    name = name.strip()
    if not name:
        raise AccountsConfigError(f"{where}: account name is empty")
    if redacted_name(name) != name:  # the audit log keeps an account's name as given, for good
        raise AccountsConfigError(
            f"{where}: account name {redacted_name(name)!r} holds what reads as a secret (a token, a "
            "password); an account's name is kept in the audit log as given: choose a plain name"
        )
    if name.lower().startswith(OIDC_PREFIX):
        raise AccountsConfigError(
            f"{where}: account name {name!r} starts with {OIDC_PREFIX!r}, "
            "which is kept for single sign-on users"
        )
    if name.lower().startswith(OS_PREFIX):
        raise AccountsConfigError(
            f"{where}: account name {name!r} starts with {OS_PREFIX!r}, "
            "which is kept for people the CLI did not sign in"
        )
    return name


def unproven_os_name(os_user: str) -> str:
    """The actor of a command someone ran without signing in, where it needs no sign-in: their OS account
    (`rollout.audit.os_user_of`: the process's real uid, never $USER), marked as what it is, a name nobody
    proved: ``os:alice (not signed in)``."""
    return f"{OS_PREFIX}{os_user} (not signed in)"


def _check_email(email: object, where: str) -> str:
    if not isinstance(email, str) or not _is_email(email.strip()):
        raise AccountsConfigError(f"{where}: email {email!r} is not an email address")
    return email.strip()


def parse_accounts(text: str, *, where: str = ACCOUNTS_ENV) -> dict[str, Account]:
    """Parse ``name:role:hash;name:role:hash[:email]``. Errors name the entry (1-based) and the field."""
    accounts: dict[str, Account] = {}
    for i, entry in enumerate((e.strip() for e in text.split(";")), start=1):
        if not entry:
            continue
        parts = entry.split(":")
        if len(parts) not in (3, 4):
            raise AccountsConfigError(
                f"{where} entry {i}: expected name:role:password_hash[:email], got {len(parts)} field(s)"
            )
        name = _check_name(parts[0], f"{where} entry {i}")
        role = _check_role(parts[1].strip(), f"{where} entry {i} ({name})")
        pw_hash = parts[2].strip()
        _parse_hash_or_fail(pw_hash, f"{where} entry {i} ({name})")
        email = _check_email(parts[3], f"{where} entry {i} ({name})") if len(parts) == 4 else ""
        if name in accounts:
            raise AccountsConfigError(f"{where} entry {i}: account {name!r} is defined twice")
        accounts[name] = Account(name, role, pw_hash, email)
    return accounts


def _parse_hash_or_fail(pw_hash: str, where: str) -> None:
    try:
        _parse_hash(pw_hash)
    except AccountsConfigError as exc:
        raise AccountsConfigError(f"{where}: password_hash: {exc}") from None


def load_accounts_file(path: str | Path) -> dict[str, Account]:
    """TOML: ``[accounts.<name>]`` tables with ``role``, ``password_hash`` and optionally ``email``."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AccountsConfigError(f"{p}: accounts file does not exist") from None
    except OSError as exc:  # a directory, no permission, ...
        raise AccountsConfigError(f"{p}: cannot read the accounts file ({exc.strerror or exc})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise AccountsConfigError(f"{p}: not valid TOML: {exc}") from None
    table = data.get("accounts")
    if not isinstance(table, dict):
        raise AccountsConfigError(f"{p}: needs an [accounts.<name>] table per account")
    accounts: dict[str, Account] = {}
    for raw_name, fields in table.items():
        where = f"{p}: accounts.{redacted_name(str(raw_name))}"
        name = _check_name(str(raw_name), where)
        if not isinstance(fields, dict):
            raise AccountsConfigError(f"{where}: must be a table with role and password_hash")
        role = _check_role(str(fields.get("role", "")), where)
        pw_hash = fields.get("password_hash")
        if not isinstance(pw_hash, str):
            raise AccountsConfigError(f"{where}: password_hash is missing")
        _parse_hash_or_fail(pw_hash, where)
        email = _check_email(fields["email"], where) if "email" in fields else ""
        accounts[name] = Account(name, role, pw_hash, email)
    return accounts


def accounts_configured(env: Mapping[str, str] | None = None) -> bool:
    """Has the installation configured its accounts (``SPARSEPILOT_ACCOUNTS`` or
    ``SPARSEPILOT_ACCOUNTS_FILE``)? Then the first-run ``accounts.toml`` is neither created nor read."""
    env = os.environ if env is None else env
    return bool(env.get(ACCOUNTS_ENV) or env.get(ACCOUNTS_FILE_ENV))


def first_run_accounts_path(env: Mapping[str, str] | None = None) -> Path:
    """SPARSEPILOT_HOME/accounts.toml: the first-run ``admin`` (`create_first_run_account`)."""
    return _home(os.environ if env is None else env) / FIRST_RUN_FILE


def load_accounts(env: Mapping[str, str] | None = None) -> dict[str, Account]:
    """Accounts from ``SPARSEPILOT_ACCOUNTS_FILE`` then ``SPARSEPILOT_ACCOUNTS`` (the variable wins on
    a name defined in both); only when neither is set, the first-run ``accounts.toml``, so its
    generated ``admin`` stops signing in once the installation configures its own accounts. Read fresh
    every call so a changed environment takes effect."""
    env = os.environ if env is None else env
    accounts: dict[str, Account] = {}
    if not accounts_configured(env):
        first_run = first_run_accounts_path(env)
        return load_accounts_file(first_run) if first_run.is_file() else accounts
    if env.get(ACCOUNTS_FILE_ENV):
        accounts.update(load_accounts_file(env[ACCOUNTS_FILE_ENV]))
    if env.get(ACCOUNTS_ENV):
        accounts.update(parse_accounts(env[ACCOUNTS_ENV]))
    return accounts


def authenticate(name: str, password: str, accounts: Mapping[str, Account] | None = None) -> Identity | None:
    """The Identity for a correct name + password, else None (an unknown name checked against
    `_dummy_hash` at the accounts' `usual_cost`: the same scrypt work as a wrong password)."""
    accounts = load_accounts() if accounts is None else accounts
    account = accounts.get(name.strip())
    if account is None:
        verify_password(password, _dummy_hash(usual_cost(a.password_hash for a in accounts.values())))
        return None
    if not verify_password(password, account.password_hash):
        return None
    return Identity(account.name, account.role, "local-account", password_fingerprint(account))


# --- the sign-in limit, per account name, shared by every session and process ---------------------
#
# The rule is `locked_until` (pure). Its input, the account's recent failures, lives in the state DB
# as ``auth.sign_in_failed`` audit rows (the account and where, never the password; a name that is no
# account only as a keyed digest, `_account_key`), so the dashboard's sessions and the CLI (`login`,
# ``--password-stdin``, the prompt) in every process share one count. A successful sign-in writes nothing
# and erases nothing.

MAX_FAILURES, LOCKOUT_S = 5, 30.0
SIGN_IN_FAILED = "auth.sign_in_failed"
UNKNOWN_ACCOUNT_PREFIX = "unknown:"
_ACCOUNT_ENTITY = "account"


class TooManyAttempts(PermissionDenied):
    """Refused before any password work: too many recent failed sign-ins."""

    def __init__(self, wait_s: float) -> None:
        super().__init__(f"too many failed sign-ins; try again in {max(wait_s, 0.0):.0f} s")
        self.wait_s = wait_s


class SignInUnavailable(PermissionDenied):
    """The state DB, which keeps the failed sign-ins, cannot be read or written: nobody is signed in."""


def locked_until(
    failures: Iterable[float], now: float, *, max_failures: int = MAX_FAILURES, window_s: float = LOCKOUT_S
) -> float | None:
    """When sign-in opens again, or None when it is open now. ``failures`` are the times (seconds) of
    failed sign-ins: with ``max_failures`` of them less than ``window_s`` before ``now`` (or after it:
    another host's clock), it is locked until enough of them are ``window_s`` old."""
    recent = sorted(t for t in failures if now - t < window_s)
    if len(recent) < max_failures:
        return None
    return recent[len(recent) - max_failures] + window_s


def _account_key(name: str, accounts: Mapping[str, Account]) -> str:
    """What an ``auth.sign_in_failed`` row names: a configured account by its name; any other name by
    ``unknown:`` and a keyed digest, never in clear (a password typed into the name field, or the two
    fields swapped, would otherwise be kept for ever in the append-only log that anonymous visitors
    read). The key is the accounts' own password hashes (secret, salted, and the same in every process
    that checks these accounts), so the same unknown name has the same digest there and its failures
    are counted together; without accounts, a key of this process."""
    name = name.strip()
    if name in accounts:
        return name[:64]  # audit_log.entity_id is 64 characters
    hashes = "\n".join(sorted(a.password_hash for a in accounts.values()))
    key = hashlib.sha256(hashes.encode("utf-8")).digest() if hashes else _process_key()
    digest = hmac.new(key, b"sign-in-name\0" + name.encode("utf-8"), hashlib.sha256).hexdigest()
    return f"{UNKNOWN_ACCOUNT_PREFIX}{digest[:16]}"


@lru_cache(maxsize=1)
def _process_key() -> bytes:
    return secrets.token_bytes(32)


def recent_sign_in_failures(
    name: str,
    now: float,
    *,
    window_s: float = LOCKOUT_S,
    db_url: str | None = None,
    accounts: Mapping[str, Account] | None = None,
    session: Session | None = None,
) -> list[float]:
    """Times (seconds) of the failed sign-ins as ``name`` in the ``window_s`` before ``now`` (state DB);
    ``accounts`` (default `load_accounts`) tell a known name from an unknown one (`_account_key`). Read
    on ``session`` if given (the sign-in turn's), else in a transaction of its own."""
    import datetime as dt

    from sqlalchemy import select

    from rollout.db.models import AuditEntry

    key = _account_key(name, load_accounts() if accounts is None else accounts)
    since = dt.datetime.fromtimestamp(now - window_s, dt.UTC)
    query = select(AuditEntry.ts).where(
        AuditEntry.action == SIGN_IN_FAILED,
        AuditEntry.entity == _ACCOUNT_ENTITY,
        AuditEntry.entity_id == key,
        AuditEntry.ts >= since,
    )
    with _on(session, db_url) as s:
        stamps = s.scalars(query).all()
    # SQLite hands the timestamp back without its zone (UTC, as written)
    return [(ts if ts.tzinfo else ts.replace(tzinfo=dt.UTC)).timestamp() for ts in stamps]


def record_sign_in_failure(
    name: str,
    via: str,
    *,
    db_url: str | None = None,
    accounts: Mapping[str, Account] | None = None,
    session: Session | None = None,
) -> None:
    """An ``auth.sign_in_failed`` audit row: the name tried and where (``via``); never the password. A
    configured account is named; an unknown name is kept only as its digest (`_account_key`), with
    ``account_known: false``. Written in ``session`` if given (committed with it), else committed at
    once in a transaction of its own."""
    from rollout import audit

    accounts = load_accounts() if accounts is None else accounts
    key = _account_key(name, accounts)
    known = name.strip() in accounts
    details: dict[str, object] = {"account": name.strip()[:200]} if known else {"account_known": False}
    with _on(session, db_url) as s:
        audit.record(
            s,
            audit.ANONYMOUS_ACTOR,
            SIGN_IN_FAILED,
            entity=_ACCOUNT_ENTITY,
            entity_id=key,
            details={**details, "via": via},
        )


@contextmanager
def _on(session: Session | None, db_url: str | None) -> Iterator[Session]:
    """``session`` as it is, or a transaction of its own on ``db_url``."""
    if session is not None:
        yield session
        return
    from rollout.db.session import session_scope

    with session_scope(db_url) as own:
        yield own


def sign_in(
    name: str,
    password: str,
    *,
    via: str,
    accounts: Mapping[str, Account] | None = None,
    db_url: str | None = None,
    now: float | None = None,
) -> Identity | None:
    """`authenticate` behind the per-account limit: TooManyAttempts, before any password work, while
    `locked_until` says the name is locked; a wrong password (or unknown name) is recorded
    (`record_sign_in_failure`). SignInUnavailable when the state DB cannot give the count. Attempts on
    one name take turns (`_sign_in_turn`) from reading the count to recording the failure, so
    concurrent attempts cannot all pass one count: at most MAX_FAILURES checks per window. On
    PostgreSQL the count and the failure go through the turn's own session: an attempt holds one
    pooled connection, never two."""
    import logging
    import time

    from sqlalchemy.exc import SQLAlchemyError

    from rollout.db.session import StateDBBusy

    with _sign_in_turn(name, db_url) as session:
        t = time.time() if now is None else now
        try:
            failures = recent_sign_in_failures(name, t, db_url=db_url, accounts=accounts, session=session)
            until = locked_until(failures, t)
        except (SQLAlchemyError, StateDBBusy) as exc:
            raise SignInUnavailable(_db_trouble(exc)) from None
        if until is not None:
            raise TooManyAttempts(until - t)
        who = authenticate(name, password, accounts)
        if who is None:
            try:
                record_sign_in_failure(name, via, db_url=db_url, accounts=accounts, session=session)
            except (SQLAlchemyError, StateDBBusy) as exc:  # still a wrong password, said as such
                if session is not None:
                    session.rollback()  # the turn's transaction: ends it (and the turn) cleanly
                first = str(exc).splitlines()[0][:200] if str(exc) else ""
                logging.getLogger(__name__).warning(
                    "a failed sign-in as %s was not counted (%s: %s)",
                    _account_key(name, load_accounts() if accounts is None else accounts),  # never in clear
                    type(exc).__name__,
                    first,
                )
    return who


# How long an attempt waits for its turn (another check of the same name, on SQLite any name) before it
# gives up with SignInUnavailable: many checks' worth, so an honest sign-in behind an attacker's queue
# of refused tries still gets through.
SIGN_IN_TURN_WAIT_S = 60.0
# PostgreSQL: at most this many of a process's sign-ins hold a pooled connection at once (each for one
# turn: the count, the password check, the failure). The rest wait without one, so a crowd of sign-ins
# leaves the pool (SQLAlchemy's 5 + 10) to the process's other pages.
PG_SIGN_IN_CONNECTIONS = 4
_PG_SIGN_IN_LOCK_CLASS = 0x5350_5349  # "SPSI": the class of sign-in advisory locks (key: the account)
_sign_in_thread_lock = threading.Lock()
_pg_sign_in_slots = threading.BoundedSemaphore(PG_SIGN_IN_CONNECTIONS)


@contextmanager
def _sign_in_turn(name: str, db_url: str | None) -> Iterator[Session | None]:
    """One attempt at a time per account name, across every session, thread and process on this state
    DB, from reading the count of recent failures to recording this attempt's failure: so the count
    each attempt reads includes every earlier check, and at most MAX_FAILURES passwords are checked in
    a window whatever the concurrency. PostgreSQL: a transaction-scoped advisory lock on the account
    name, and the session that holds it is yielded: the turn's reads and its failure go through it (one
    connection per attempt, the failure committed as the lock is let go). A waiting attempt holds no
    connection: it tries the lock (``pg_try_advisory_xact_lock``) and hands the connection back between
    tries, and at most PG_SIGN_IN_CONNECTIONS attempts of a process hold one at a time. SQLite (one
    host by nature): an exclusive ``flock`` on ``<state DB file>.sign-in.lock`` (every name: sign-ins
    are rare and a check short), not the database's own write lock, so a sign-in never holds up the
    pipeline's writes while scrypt runs; yields None (the turn's reads open their own sessions)."""
    import time

    from sqlalchemy.engine import make_url

    from rollout.settings import get_settings

    url = db_url or get_settings().database_url
    parsed = make_url(url)
    deadline = time.monotonic() + SIGN_IN_TURN_WAIT_S
    if parsed.get_backend_name() == "postgresql":
        with _pg_sign_in_turn(name, url, deadline) as session:
            yield session
        return
    database = parsed.database or ""
    if not database or database == ":memory:" or database.startswith("file:"):
        with _sign_in_thread_lock:  # a private database: this process is its only user
            yield
        return
    import fcntl

    lock_path = Path(database).with_name(Path(database).name + ".sign-in.lock")
    try:
        fh = open(lock_path, "a+b")  # noqa: SIM115 - held for the whole attempt
    except OSError as exc:
        raise SignInUnavailable(
            f"sign-in is not possible now: cannot open {lock_path} ({exc.strerror or exc}), "
            "which keeps concurrent sign-ins in turn"
        ) from None
    with fh:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SignInUnavailable(
                        f"sign-in is not possible now: other sign-ins kept {lock_path} for over "
                        f"{SIGN_IN_TURN_WAIT_S:.0f} s; try again"
                    ) from None
                time.sleep(0.01)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextmanager
def _pg_sign_in_turn(name: str, url: str, deadline: float) -> Iterator[Session]:
    """`_sign_in_turn` on PostgreSQL: a slot of this process's PG_SIGN_IN_CONNECTIONS, then one pooled
    session that tries the name's advisory lock; if another attempt holds it, both go back and the
    attempt tries again shortly, until ``deadline`` (time.monotonic)."""
    import random
    import time

    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    from rollout.db.session import session_scope

    # the lock's key is a digest: a password typed as the name reaches no SQL log
    key = {"c": _PG_SIGN_IN_LOCK_CLASS, "k": hashlib.sha256(name.strip().encode()).hexdigest()}
    pause = 0.01
    while True:
        if not _pg_sign_in_slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
            break
        try:
            with session_scope(url) as session:
                got = session.scalar(text("SELECT pg_try_advisory_xact_lock(:c, hashtext(:k))"), key)
                if got:
                    yield session  # the turn; its failure row commits as the lock is let go
                    return
        except SQLAlchemyError as exc:
            raise SignInUnavailable(_db_trouble(exc)) from None
        finally:
            _pg_sign_in_slots.release()
        if time.monotonic() > deadline:
            break
        time.sleep(pause * (0.5 + random.random()))  # noqa: S311 - jitter, not a secret
        pause = min(pause * 2, 0.2)
    raise SignInUnavailable(
        f"sign-in is not possible now: other sign-ins (as this name, or this process's "
        f"{PG_SIGN_IN_CONNECTIONS} at a time) kept their turn for over {SIGN_IN_TURN_WAIT_S:.0f} s; try again"
    ) from None


def _db_trouble(exc: Exception) -> str:
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    return (
        "sign-in is not possible now: the state database, which counts failed sign-ins, "
        f"cannot be used ({type(exc).__name__}: {first}); run `sparsepilot init` or check the database"
    )


# --- the CLI: passwords and login tokens ----------------------------------------------------------

FIRST_RUN_FILE = "accounts.toml"
TOKEN_FILE_ENV = "SPARSEPILOT_TOKEN_FILE"
AUTH_KEY_ENV = "SPARSEPILOT_AUTH_KEY"
AUTH_KEY_FILE = "auth.key"
MIN_AUTH_KEY_BYTES = 32
_TOKEN_PREFIX = "sp1"
DEFAULT_TOKEN_TTL_S = 8 * 3600
MAX_TOKEN_TTL_S = 30 * 24 * 3600


def _home(env: Mapping[str, str]) -> Path:
    return Path(env.get("SPARSEPILOT_HOME", ".sparsepilot")).expanduser().resolve()


def token_path(env: Mapping[str, str] | None = None) -> Path:
    """Where `sparsepilot login` keeps the token: $SPARSEPILOT_TOKEN_FILE, else the user's config dir."""
    env = os.environ if env is None else env
    if env.get(TOKEN_FILE_ENV):
        return Path(env[TOKEN_FILE_ENV]).expanduser()
    base = Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "sparsepilot" / "token"


def _private_temporary(path: Path, data: bytes) -> Path:
    """A new file beside ``path`` holding ``data``, mode 0600 from the first byte."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    except BaseException:  # nothing half-written: never a secret left in a stray temporary file
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_private(path: Path, data: bytes) -> None:
    """Create/replace ``path`` with mode 0600 from the first byte (never world-readable, not even
    briefly)."""
    tmp = _private_temporary(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def create_private(path: Path, data: bytes) -> bool:
    """Create ``path`` (mode 0600, whole: written beside it, then linked in) unless it exists; never
    replaces it. False when it exists already, another process's perhaps, created a moment before: of
    processes that create the same file at once, exactly one wins and the others read its file."""
    tmp = _private_temporary(path, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: create the name itself, exclusively
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return False
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def auth_key(env: Mapping[str, str] | None = None, *, create: bool = False) -> bytes | None:
    """The installation's token-signing key: $SPARSEPILOT_AUTH_KEY, else SPARSEPILOT_HOME/auth.key
    (32 random bytes, created 0600 on first login; of first logins at once, every one gets the key the
    first created, never one another then replaces)."""
    env = os.environ if env is None else env
    if env.get(AUTH_KEY_ENV):
        key = env[AUTH_KEY_ENV].encode("utf-8")
        if len(key) < MIN_AUTH_KEY_BYTES:  # a short key lets anyone forge a token offline
            raise AccountsConfigError(
                f"{AUTH_KEY_ENV} is {len(key)} bytes; a token-signing key needs at least "
                f"{MIN_AUTH_KEY_BYTES} (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        return key
    path = _home(env) / AUTH_KEY_FILE
    if path.is_file():
        return _read_key_file(path)
    if not create:
        return None
    create_private(path, secrets.token_bytes(32))  # another login's key, created a moment before, stays
    return _read_key_file(path)


def _read_key_file(path: Path) -> bytes:
    """The key in ``path``, refused when shorter than MIN_AUTH_KEY_BYTES (an empty or truncated file
    would let anyone forge a token offline) or readable by the group or others."""
    try:
        mode, key = path.stat().st_mode, path.read_bytes()
    except OSError as exc:
        raise AccountsConfigError(
            f"{path}: cannot read the token-signing key ({exc.strerror or exc})"
        ) from None
    if mode & 0o077:
        raise AccountsConfigError(
            f"{path}: the token-signing key is readable by others (mode {mode & 0o777:o}); "
            f"run `chmod 600 {path}`, and replace the key if others may have read it"
        )
    if len(key) < MIN_AUTH_KEY_BYTES:
        raise AccountsConfigError(
            f"{path} is {len(key)} bytes; a token-signing key needs at least {MIN_AUTH_KEY_BYTES}: "
            "delete it and run `sparsepilot login` to create a new one (every login token ends)"
        )
    return key


def _mac(key: bytes, payload: str) -> str:
    return _b64(hmac.new(key, payload.encode("ascii"), hashlib.sha256).digest())


def issue_token(
    identity: Identity, key: bytes, *, ttl_s: int = DEFAULT_TOKEN_TTL_S, now: float | None = None
) -> str:
    """``sp1.<payload>.<mac>``: the account name, the fingerprint of the password it was proven with
    (``identity.credential``) and an expiry, signed with the installation's key."""
    import json
    import time

    if not 60 <= ttl_s <= MAX_TOKEN_TTL_S:
        raise ValueError(f"token lifetime must be between 60 s and {MAX_TOKEN_TTL_S // 86400} days")
    if not identity.credential:
        raise ValueError(f"a login token needs an identity proven by password; {identity.name!r} was not")
    t = time.time() if now is None else now
    body = {
        "u": identity.name,
        "pw": identity.credential,
        "iat": int(t),
        "exp": int(t) + int(ttl_s),
        "n": secrets.token_hex(8),
    }
    payload = _b64(json.dumps(body, separators=(",", ":")).encode("utf-8"))
    return f"{_TOKEN_PREFIX}.{payload}.{_mac(key, payload)}"


def verify_token(
    token: str, key: bytes, accounts: Mapping[str, Account], *, now: float | None = None
) -> Identity:
    """The Identity a token stands for; PermissionDenied when it is forged, expired, its account is
    gone or the account's password changed since it was issued (a reset ends every token of the
    account). The role is read from the account now, so a demoted user's token carries the new role."""
    import json
    import time

    parts = token.strip().split(".")
    if len(parts) != 3 or parts[0] != _TOKEN_PREFIX or not hmac.compare_digest(_mac(key, parts[1]), parts[2]):
        raise PermissionDenied("the login token is not valid for this installation; run `sparsepilot login`")
    try:
        body = json.loads(_unb64(parts[1]))
        name, exp, credential = str(body["u"]), int(body["exp"]), str(body.get("pw", ""))
    except (ValueError, KeyError, TypeError):
        raise PermissionDenied("the login token is malformed; run `sparsepilot login`") from None
    if (time.time() if now is None else now) >= exp:
        raise PermissionDenied("the login token has expired; run `sparsepilot login`")
    account = accounts.get(name)
    if account is None:
        raise PermissionDenied(f"the login token names account {name!r}, which no longer exists")
    fingerprint = password_fingerprint(account)
    if not credential:  # issued before tokens carried the password's fingerprint (an older build)
        raise PermissionDenied("the login token is from an older SparsePilot: run `sparsepilot login`")
    if not hmac.compare_digest(credential.encode("utf-8"), fingerprint.encode("ascii")):
        raise PermissionDenied(
            f"the password of {name!r} changed after this login token was issued; run `sparsepilot login`"
        )
    return Identity(account.name, account.role, "cli-token", fingerprint)


def cli_authenticate(
    *,
    password: str | None = None,
    prompt: Callable[[str], str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Identity:
    """Who runs this CLI command, proven: ``password`` (from --password-stdin) for the account named
    by SPARSEPILOT_USER; else the token of `sparsepilot login`; else ``prompt`` (a terminal's hidden
    password prompt) when given. A password goes through `sign_in`'s limit (this process's state DB).
    Raises PermissionDenied saying how to sign in."""
    env = os.environ if env is None else env
    accounts = load_accounts(env)
    name = (env.get(USER_ENV) or "").strip()
    if password is None:
        tok = token_path(env)
        if tok.is_file():
            key = auth_key(env)
            if key is None:
                raise PermissionDenied("no signing key for login tokens here; run `sparsepilot login`")
            who = verify_token(tok.read_text(encoding="utf-8", errors="replace"), key, accounts)
            if name and name != who.name:
                raise PermissionDenied(
                    f"{USER_ENV}={name!r} but the login token belongs to {who.name!r}; "
                    "run `sparsepilot logout` or unset the variable"
                )
            return who
        if prompt is None or not name:
            raise PermissionDenied(
                "nobody is signed in: run `sparsepilot login`, or set "
                f"{USER_ENV} and give the password (--password-stdin, or type it at the prompt)"
            )
        password = prompt(f"Password for {name}: ")
    if not name:
        raise PermissionDenied(f"set {USER_ENV} to the account whose password is given")
    if not accounts:
        raise PermissionDenied(
            f"no accounts are configured ({ACCOUNTS_ENV}, {ACCOUNTS_FILE_ENV}); see docs/operations.md"
        )
    who = sign_in(name, password, via="cli", accounts=accounts)
    if who is None:  # the name is not echoed: a password typed where the name goes would be printed
        raise PermissionDenied("wrong account name or password")
    return replace(who, source="cli-password")


def create_first_run_account(
    env: Mapping[str, str] | None = None, *, name: str = "admin"
) -> tuple[str, str] | None:
    """On embedded defaults (no database URL and no accounts configured), create one approver with a
    generated password in SPARSEPILOT_HOME/accounts.toml (only its hash is stored) and return
    (name, password) to print once. None when accounts exist or the installation is configured, and to
    all but one of several inits at once (the file is created, never replaced: `create_private`)."""
    env = os.environ if env is None else env
    if env.get("SPARSEPILOT_DATABASE_URL") or accounts_configured(env):
        return None
    path = first_run_accounts_path(env)
    if path.exists():
        return None
    password = secrets.token_urlsafe(15)
    text = (
        "# Created by `sparsepilot init` on first run; add accounts with `sparsepilot hash-password`.\n"
        f'[accounts.{name}]\nrole = "approver"\npassword_hash = "{hash_password(password)}"\n'
    )
    if not create_private(path, text.encode("utf-8")):
        return None  # another init created it a moment before: its password is the one that works
    return name, password


def _is_email(text: str) -> bool:
    """Shaped like an email address, and unambiguous inside an OIDC name (no ':' or '#', which the
    issuer#subject form uses)."""
    local, at, domain = text.partition("@")
    return bool(local and at and domain) and not any(c in text for c in ":#;, \t\r\n")


def verified_email(claims: Mapping[str, object]) -> str:
    """The ``email`` claim when the provider vouches for it (``email_verified`` true), else ""."""
    email = str(claims.get("email") or "").strip()
    verified = claims.get("email_verified")
    if isinstance(verified, str):  # some providers send the JSON string "true"
        verified = verified.strip().lower() == "true"
    return email if verified is True and _is_email(email) else ""


def oidc_listed(email: str, subject: str, approvers: Iterable[str]) -> bool:
    """Is an OIDC user on the approver list: their verified ``email`` listed (any case), or their
    ``<issuer>#<subject>`` (a bare subject in the list matches nobody: it is unique only within its
    issuer)."""
    listed = {a.strip() for a in approvers if a.strip()}
    listed_emails = {a.lower() for a in listed if "#" not in a}
    return bool(email and email.lower() in listed_emails) or bool(subject and subject in listed)


def _oidc_name_and_subject(claims: Mapping[str, object]) -> tuple[str, str] | None:
    """The name an OIDC user is recorded under (``oidc:<verified email>``, else
    ``oidc:<issuer>#<subject>``) and their ``<issuer>#<subject>`` ("" without an issuer); None with
    neither a verified email nor a subject."""
    email = verified_email(claims)
    iss = str(claims.get("iss") or "").strip()
    sub = str(claims.get("sub") or "").strip()
    if not email and not sub:
        return None
    return OIDC_PREFIX + (email or f"{iss}#{sub}"), f"{iss}#{sub}" if iss and sub else ""


def oidc_refusal(claims: Mapping[str, object]) -> str | None:
    """Why an OIDC sign-in with these claims is refused, or None (pure): the name or the
    ``<issuer>#<subject>`` it would be recorded under reads as a secret (`redacted_name` changes it: a
    token, a ``password=`` pair). The audit log keeps a signer's name and subject as given and refuses
    a secret there (`rollout.audit.checked_names`), so such a person was let in and then every action
    they signed failed with AuditRefused. The reason shows the subject redacted, never the secret."""
    named = _oidc_name_and_subject(claims)
    if named is None:
        return None
    name, subject = named
    for value in (subject, name.removeprefix(OIDC_PREFIX)):
        if redacted_name(value) != value:
            return (
                f"the identity provider's issuer and subject {redacted_name(value)!r} read as a secret (a "
                "token, a password), and the audit log keeps who signs as given: ask its administrator to "
                "send a plain subject (a user id), or sign in with a local account"
            )
    return None


def identity_from_oidc(claims: Mapping[str, object], approvers: Iterable[str] = ()) -> Identity | None:
    """An OIDC user (``st.user``) is an approver only on a claim the provider vouches for: an email
    listed in ``approvers`` with ``email_verified`` true, or a listed ``<issuer>#<subject>`` (the
    subject is unique only within its issuer; `oidc_listed`). ``preferred_username`` and an unverified
    email never count. Everyone else who signed in is a viewer. The name is ``oidc:<verified email>``,
    else ``oidc:<issuer>#<subject>``: never a local account's name. No verified email and no subject,
    or a name or subject that reads as a secret (`oidc_refusal`) -> no identity."""
    if not claims.get("is_logged_in", True) or oidc_refusal(claims) is not None:
        return None
    named = _oidc_name_and_subject(claims)
    if named is None:
        return None
    name, subject = named
    email = verified_email(claims)
    role: Role = "approver" if oidc_listed(email, subject, approvers) else "viewer"
    return Identity(name, role, "oidc", subject=subject)


_KNOWN_OIDC_APPROVERS: ContextVar[tuple[str, ...] | None] = ContextVar("oidc_approvers", default=None)


@contextmanager
def oidc_approvers_known(approvers: Iterable[str]) -> Iterator[None]:
    """Within: ``approvers`` is this process's OIDC approver list (`oidc_approvers`), the one its OIDC
    users were given their role by. The dashboard wraps each page and each action in it with its own
    list (its secrets' and ``SPARSEPILOT_OIDC_APPROVERS``), so an OIDC signer removed from it no longer
    counts (`still_approver`)."""
    token = _KNOWN_OIDC_APPROVERS.set(tuple(a.strip() for a in approvers if a.strip()))
    try:
        yield
    finally:
        _KNOWN_OIDC_APPROVERS.reset(token)


def oidc_approvers() -> tuple[str, ...] | None:
    """The OIDC approver list this process knows: the dashboard's (`oidc_approvers_known`), else
    ``SPARSEPILOT_OIDC_APPROVERS`` where it is set and names someone; None where neither is (a CLI not
    told the list cannot check an OIDC signer)."""
    known = _KNOWN_OIDC_APPROVERS.get()
    if known is not None:
        return known
    listed = tuple(a.strip() for a in os.environ.get(OIDC_APPROVERS_ENV, "").split(",") if a.strip())
    return listed or None


def person_key(actor: str, accounts: Mapping[str, Account]) -> str:
    """Who a recorded actor is as a person, for rules that need two different people: the email when
    one is known (an OIDC user's verified email; a local account's declared ``email``, or its name when
    the name is an email address), lower-cased; else the actor's own name (``oidc:<issuer>#<subject>``,
    or a local account's name, which can never start with ``oidc:``)."""
    if actor.startswith(OIDC_PREFIX):
        rest = actor[len(OIDC_PREFIX) :]
        return rest.lower() if _is_email(rest) else actor
    account = accounts.get(actor)
    if account is not None and account.email:
        return account.email.lower()
    return actor.lower() if _is_email(actor) else actor


def same_person(
    actor_a: str,
    actor_b: str,
    accounts: Mapping[str, Account] | None = None,
    *,
    subjects: tuple[str, str] = ("", ""),
) -> bool:
    """Are two recorded actors (a local account, an OIDC identity) the same person (`person_key`)?
    ``subjects``: the OIDC ``<issuer>#<subject>`` each signed in with (`Identity.subject`), when known:
    one subject is one person whatever email each sign-in was recorded under."""
    if actor_a == actor_b or (subjects[0] and subjects[0] == subjects[1]):
        return True
    accounts = load_accounts() if accounts is None else accounts
    keys_a = {person_key(actor_a, accounts)} | ({OIDC_PREFIX + subjects[0]} if subjects[0] else set())
    keys_b = {person_key(actor_b, accounts)} | ({OIDC_PREFIX + subjects[1]} if subjects[1] else set())
    return bool(keys_a & keys_b)


def still_approver(
    actor: str,
    accounts: Mapping[str, Account] | None = None,
    *,
    subject: str = "",
    approvers: Iterable[str] | None = None,
) -> tuple[bool, str]:
    """Is a recorded signer an approver now, and if not, what they are: a local account is looked up in
    the accounts as they are now (demoted, or deleted); an OIDC user on the OIDC approver list as it is
    now (`oidc_approvers` unless ``approvers`` is given; `oidc_listed`: the verified email they were
    recorded under, or their ``<issuer>#<subject>``, ``subject`` or the one in their name). A process
    that cannot know cannot check: one that knows no OIDC approver list lets OIDC signatures stand, one
    that knows no local account at all lets local signatures stand (nobody could sign in locally there:
    the accounts are configured elsewhere) (docs/operations.md, "Who may do what")."""
    if actor.startswith(OIDC_PREFIX):
        listed = oidc_approvers() if approvers is None else tuple(approvers)
        if listed is None:
            return True, "approver"
        rest = actor[len(OIDC_PREFIX) :]
        email = rest if _is_email(rest) else ""
        if oidc_listed(email, subject or ("" if email else rest), listed):
            return True, "approver"
        return False, "no longer on the OIDC approver list"
    accounts = load_accounts() if accounts is None else accounts
    if not accounts:
        return True, "approver"
    account = accounts.get(actor)
    if account is None:
        return False, "no longer an account"
    if account.role != "approver":
        return False, f"now a {account.role}"
    return True, "approver"
