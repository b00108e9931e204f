"""The append-only audit log. Writes go through `record` inside the caller's transaction, so the audit
row and the change it describes commit or roll back together.

Every row carries who acted (``actor``: the authenticated account, a system identity, or, for a command
that needs no sign-in run by someone who did not sign in, their OS user marked unproven:
`rollout.auth.unproven_os_name`) and where the
command ran (``os_user``, ``host``), and a hash chain: ``prev_hash`` is the previous row's ``row_hash``
and ``row_hash`` = sha256 over ``prev_hash`` and the row's content. A unique index on ``prev_hash`` stops
two writers from extending the chain from the same row; writers also queue before they read the last
hash (PostgreSQL: a transaction advisory lock; SQLite: the write lock, `BEGIN IMMEDIATE`), so they wait
their turn instead of failing. `verify_chain` (``sparsepilot audit verify``)
recomputes every hash: a changed, deleted or inserted row breaks the chain at that row."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import pwd
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from rollout.db.models import AuditEntry, utcnow
from rollout.redact import redact, redacted_name
from sparse_core.errors import SparsePilotError

GENESIS = "0" * 64
# The automation's actor names: the pipeline (flows, the scheduled cycle, the main job) and the monitor
# (which alone may roll a champion back on its own). Rows written before the pipeline had one name say
# "sparsepilot-flow" or "sparsepilot-run"; they stay as written (the hash chain covers them) and read
# like any other actor.
SYSTEM_ACTOR = "sparsepilot-pipeline"
MONITOR_ACTOR = "sparsepilot-monitor"
# A monitor that could not look (traffic exhausted): at most one entry a day per use case and reason
# (rollout.pilot_batches.note_monitor_skip).
MONITOR_SKIPPED = "monitor.skipped"
# Who a failed sign-in is by: nobody proven (the account name tried is in the row's entity_id/details).
ANONYMOUS_ACTOR = "anonymous"
_PG_LOCK_KEY = 0x5350_4155_4449_54  # "SPAUDIT": serialises audit writers on PostgreSQL
_DEFERRED = "audit_deferred"  # session.info: the entries a `deferred` block holds back


def os_user_of(uid: int) -> str:
    """The account name of ``uid`` from the password database, else the number itself (a container
    with no passwd entry). Never $LOGNAME or $USER, which whoever runs the command sets at will."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


@lru_cache(maxsize=1)
def origin() -> tuple[str, str]:
    """(OS user, host name) of this process, recorded with every audit row: the user of the process's
    real uid (`os_user_of`)."""
    return os_user_of(os.getuid())[:100], socket.gethostname()[:255]


def canonical_ts(ts: dt.datetime) -> str:
    """UTC, microseconds: SQLite hands the timestamp back without its zone, PostgreSQL with it."""
    if ts.tzinfo is not None:
        ts = ts.astimezone(dt.UTC).replace(tzinfo=None)
    return ts.strftime("%Y-%m-%dT%H:%M:%S.%f")


def _plain(details: dict[str, Any] | None) -> dict[str, Any]:
    """Details as JSON gives them back (string keys, lists), so the hash of a re-read row matches."""
    return json.loads(json.dumps(details or {}, default=str))


# Details that name a person, read back as they were given (`rollout.approvals.signer_subject`: an OIDC
# signer's issuer#subject, the two-person rule's key): stored as given, so "https://idp#ldap:ann@corp.com"
# is not read as a URL's password and the approver it names does not lapse; one holding a secret is
# refused (`checked_names`), and shown as `rollout.redact.redacted_name` shows it.
IDENTITY_KEYS = frozenset({"subject"})


class AuditRefused(SparsePilotError, ValueError):
    """An audit row that would keep a secret where nothing is redacted on write: its actor, its entity id
    or an identity key of its details."""


def redacted_details(value: Any) -> Any:
    """Plain details (`_plain`) with every string value redacted (`rollout.redact`), in nested dicts and
    lists too, the `IDENTITY_KEYS` part by part (`redacted_name`); keys, numbers and the rest as they are.
    A reason, an error's text or a URL could carry a secret into the log, where it can never be removed
    (append-only)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {
            k: redacted_name(v) if k in IDENTITY_KEYS and isinstance(v, str) else redacted_details(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redacted_details(v) for v in value]
    return value


def checked_names(actor: str, entity_id: str | None, details: Mapping[str, Any]) -> None:
    """Refuse (`AuditRefused`, naming the field) an actor, an entity id or a top-level identity key of the
    details that holds what reads as a secret (`redacted_name` changes it): these are names, kept as given
    for good (the two-person rule and the sign-in counts read them back), so a token pasted where a name
    goes (an account name, a flow's ``actor`` parameter, an OIDC subject that is really a token) is not
    written, rather than written in clear."""
    named = {"actor": actor, "entity_id": entity_id} | {
        f"details.{k}": v for k, v in details.items() if k in IDENTITY_KEYS
    }
    for field, value in named.items():
        if isinstance(value, str) and redacted_name(value) != value:
            raise AuditRefused(
                f"audit log: {field} {redacted_name(value)!r} holds what reads as a secret (a token, a "
                "password); it is a name the append-only log keeps as given, so nothing was written"
            )


# What a row's hash covers, in this order (rows chained by migration 0003 have no os_user or host).
HASHED_FIELDS = (
    "prev_hash", "ts", "actor", "action", "use_case_id", "entity", "entity_id", "details", "os_user", "host",
)  # fmt: skip


def entry_hash(fields: Mapping[str, Any]) -> str:
    """sha256 over an audit row's HASHED_FIELDS (a mapping of at least those names): ts canonical,
    details as JSON gives them back, a missing prev_hash, os_user or host as ""."""
    plain = dict(fields) | {
        "prev_hash": fields["prev_hash"] or "",
        "ts": canonical_ts(fields["ts"]),
        "details": _plain(fields["details"]),
        "os_user": fields["os_user"] or "",
        "host": fields["host"] or "",
    }
    body = json.dumps(
        [plain[f] for f in HASHED_FIELDS],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def row_hash_of(e: AuditEntry) -> str:
    return entry_hash({f: getattr(e, f) for f in HASHED_FIELDS})


# The entity an audit row names for a row of each table (`record(..., on=row)`).
ENTITIES = {
    "use_cases": "use_case",
    "spec_versions": "spec_version",
    "model_versions": "model_version",
    "calibration_runs": "calibration_run",
    "evaluation_runs": "evaluation_run",
    "pilots": "pilot",
    "gate_decisions": "gate_decision",
    "alias_history": "alias_move",
}


def _queue_for_the_chain(session: Session) -> None:
    """Wait for every other audit writer's transaction to end before reading the chain's last hash, and
    hold the writers behind this one until it ends, so two never extend the chain from the same row.
    PostgreSQL: a transaction advisory lock. SQLite: the database's write lock, taken now (``BEGIN
    IMMEDIATE``) when this transaction has not written yet: the driver begins a transaction only at the
    first write, so the read would run outside any transaction and two writers would read the same last
    hash (the second then fails on the prev_hash unique index). A transaction that has written already
    holds the write lock (as does `session_scope(immediate=True)`)."""
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
    elif conn.dialect.name == "sqlite" and not conn.connection.dbapi_connection.in_transaction:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def record(
    session: Session,
    actor: str,
    action: str,
    *,
    on: Any = None,
    use_case_id: int | None = None,
    entity: str | None = None,
    entity_id: str | int | None = None,
    details: dict[str, Any] | None = None,
) -> AuditEntry:
    """Append an entry in the caller's transaction. `on`: the row it is about (an ORM row of a table in
    ENTITIES), which sets entity, entity_id and use_case_id; or give those three yourself. The details'
    strings are stored redacted (`redacted_details`), and the row's hash covers them as stored; an actor,
    entity id or identity key holding a secret is refused (`checked_names`)."""
    if on is not None:
        entity, entity_id = ENTITIES[on.__tablename__], on.id
        use_case_id = on.id if entity == "use_case" else on.use_case_id
    entity_id = None if entity_id is None else str(entity_id)
    plain = _plain(details)
    checked_names(actor, entity_id, plain)
    os_user, host = origin()
    entry = AuditEntry(
        actor=actor,
        action=action,
        use_case_id=use_case_id,
        entity=entity,
        entity_id=entity_id,
        details=redacted_details(plain),  # hashed as stored: `audit verify` reads it so
        os_user=os_user,
        host=host,
    )
    pending = session.info.get(_DEFERRED)
    if pending is not None:
        pending.append(entry)
        return entry
    return _append(session, entry)


def _append(session: Session, entry: AuditEntry) -> AuditEntry:
    """Chain `entry` to the log's last row (stamped now) and write it."""
    _queue_for_the_chain(session)
    prev = session.scalar(select(AuditEntry.row_hash).order_by(AuditEntry.id.desc()).limit(1))
    entry.ts = utcnow()
    entry.prev_hash = prev or GENESIS
    entry.row_hash = row_hash_of(entry)
    session.add(entry)
    session.flush()
    return entry


@contextmanager
def deferred(session: Session) -> Iterator[None]:
    """Entries `record`ed inside the block are appended to the chain when it ends, in the order recorded
    (each stamped then), in the caller's transaction still: they commit or roll back with the change they
    describe. For a long transaction (a streaming import that starts its pilot), which would otherwise
    hold the chain's lock from its first entry to its end (on PostgreSQL every audit writer of every use
    case would wait for it); now it holds it for its last moment. An error inside the block appends none
    of them (the caller's transaction then rolls back). Not nested: an inner block is part of the outer."""
    if session.info.get(_DEFERRED) is not None:
        yield
        return
    pending: list[AuditEntry] = []
    session.info[_DEFERRED] = pending
    try:
        yield
    finally:
        session.info.pop(_DEFERRED, None)
    for entry in pending:
        _append(session, entry)


def record_new(session: Session, row: Any, actor: str, action: str, details: dict[str, Any]) -> AuditEntry:
    """A new row and its entry in one step: the row is added and flushed (so it has its id), then
    recorded with `on=row`."""
    session.add(row)
    session.flush()
    return record(session, actor, action, on=row, details=details)


def record_change(
    session: Session, actor: str, action: str, *, on: Any, before: str, after: str, reason: str
) -> AuditEntry:
    """A row's state change (a use case's phase, a pilot's status): details {from, to, reason}."""
    return record(session, actor, action, on=on, details={"from": before, "to": after, "reason": reason})


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    rows: int
    last_hash: str
    broken_at: int | None = None  # audit_log id of the first row that does not verify
    problem: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def verify_chain(session: Session) -> ChainReport:
    """Walk the log in id order and recompute every link; stops at the first broken row."""
    prev, n = GENESIS, 0
    for e in session.scalars(select(AuditEntry).order_by(AuditEntry.id).execution_options(yield_per=2000)):
        n += 1
        if e.prev_hash != prev:
            what = "a row before it was changed, deleted or inserted" if n > 1 else "it is not the first row"
            problem = f"audit row {e.id}: prev_hash does not match ({what})"
            return ChainReport(False, n, prev, e.id, problem)
        if e.row_hash != row_hash_of(e):
            problem = f"audit row {e.id}: its content was changed after it was written"
            return ChainReport(False, n, prev, e.id, problem)
        prev = e.row_hash
    return ChainReport(True, n, prev)
