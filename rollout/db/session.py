"""Engines and transactional sessions."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from rollout.settings import get_settings
from sparse_core.errors import SparsePilotError

BUSY_TIMEOUT_S = 30  # how long an SQLite writer waits for another's write lock before it gives up


class StateDBBusy(SparsePilotError, RuntimeError):
    """SQLite: another run held the state DB's write lock for longer than this one waits (one writer at a
    time: a long observations import holds it for its length). PostgreSQL has no such lock."""


def _locked(exc: BaseException) -> bool:
    return isinstance(exc, OperationalError) and "database is locked" in str(exc.orig)


@lru_cache(maxsize=8)
def _engine_for(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


class StateSession(Session):
    """A session of the state DB (every `session_scope`): the class its rules hook into (e.g. the lease
    fence, `rollout.leases`), apart from other libraries' sessions in the process (MLflow's stores)."""


def get_engine(url: str | None = None) -> Engine:
    return _engine_for(url or get_settings().database_url)


@contextmanager
def session_scope(
    url: str | None = None, *, immediate: bool = False, lock_wait_s: float | None = None
) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any error, so nothing is half-written.

    ``immediate``: on SQLite take the write lock before the first read (``BEGIN IMMEDIATE``), so a
    read-check-write (e.g. "is this decision still open? then sign it") cannot interleave with another
    writer's; SQLite's default deferred transaction lets two writers read the same state first. On
    PostgreSQL callers lock the rows they check (``with_for_update``).

    ``lock_wait_s`` (SQLite): wait this long for another writer's lock, not ``BUSY_TIMEOUT_S``. A writer
    that waited in vain raises StateDBBusy (a SparsePilotError: `error: ...`, exit 2 on the CLI), not the
    driver's "database is locked"."""
    engine = get_engine(url)
    factory = sessionmaker(bind=engine, class_=StateSession, expire_on_commit=False)
    session = factory()
    sqlite = engine.dialect.name == "sqlite"
    waits = sqlite and lock_wait_s is not None
    try:
        if waits:
            session.execute(text(f"PRAGMA busy_timeout = {int(lock_wait_s * 1000)}"))
        if immediate and sqlite:
            session.execute(text("BEGIN IMMEDIATE"))
        yield session
        session.commit()
    except BaseException as exc:
        session.rollback()
        if sqlite and _locked(exc):
            raise StateDBBusy(
                "another run held the state DB's write lock longer than this one waits (SQLite takes one "
                "writer at a time: a long observations import holds it for its length; PostgreSQL is the "
                "store for concurrent operation, docs/operations.md); nothing was written, try again when "
                "it has finished"
            ) from exc
        raise
    finally:
        if waits:
            session.execute(text(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_S * 1000}"))
            session.commit()
        session.close()
