"""Engines and transactional sessions."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from rollout.settings import get_settings


@lru_cache(maxsize=8)
def _engine_for(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})

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
def session_scope(url: str | None = None, *, immediate: bool = False) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any error, so nothing is half-written.

    ``immediate``: on SQLite take the write lock before the first read (``BEGIN IMMEDIATE``), so a
    read-check-write (e.g. "is this decision still open? then sign it") cannot interleave with another
    writer's; SQLite's default deferred transaction lets two writers read the same state first. On
    PostgreSQL callers lock the rows they check (``with_for_update``)."""
    engine = get_engine(url)
    factory = sessionmaker(bind=engine, class_=StateSession, expire_on_commit=False)
    session = factory()
    try:
        if immediate and engine.dialect.name == "sqlite":
            session.execute(text("BEGIN IMMEDIATE"))
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
