"""Apply Alembic migrations programmatically (`sparsepilot init`, tests, the stack's one-shot job)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config

import migrations
from rollout.settings import get_settings
from sparse_core.errors import SparsePilotError

MIGRATIONS_DIR = Path(migrations.__file__).resolve().parent


def alembic_config(url: str | None = None) -> Config:
    cfg = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["url"] = url or get_settings().database_url
    return cfg


class DatabaseEncodingError(RuntimeError):
    """A PostgreSQL state DB whose encoding is not UTF8 (specs, prompts and explanations are Unicode)."""


def check_encoding(url: str) -> None:
    """Refuse a PostgreSQL database that is not UTF8, naming it and the fix. A database created without
    ENCODING on a cluster initialised under LANG=C is SQL_ASCII: its text comes back as bytes, and
    Alembic would fail with an unrelated message (or store text no other client can read)."""
    from sqlalchemy import create_engine, pool, text
    from sqlalchemy.engine import make_url

    if make_url(url).get_backend_name() != "postgresql":
        return
    # client_encoding UTF8: on a SQL_ASCII server the driver would otherwise hand back bytes
    engine = create_engine(url, poolclass=pool.NullPool, connect_args={"client_encoding": "utf8"})
    try:
        with engine.connect() as conn:
            name, encoding = conn.execute(
                text("SELECT current_database(), current_setting('server_encoding')")
            ).one()
    finally:
        engine.dispose()
    if encoding != "UTF8":
        raise DatabaseEncodingError(
            f"database {name!r} uses encoding {encoding}; SparsePilot needs UTF8: create it anew with "
            f"CREATE DATABASE {name} OWNER <owner> ENCODING 'UTF8' TEMPLATE template0 "
            '(docs/operations.md, "Database roles"); nothing was migrated'
        )


# The PostgreSQL advisory lock migrations of one database take turns on ("SPMI"; per database).
_PG_MIGRATE_LOCK = 0x5350_4D49


@contextmanager
def one_at_a_time(url: str) -> Iterator[None]:
    """Migrations of one state DB take turns, across processes: SQLite, an exclusive ``flock`` on
    ``<state DB file>.migrate.lock``; PostgreSQL, a session advisory lock held on a connection of its
    own. Two `sparsepilot init`s at once on a fresh home both ran the first migration, and the second
    failed ("duplicate column name: os_user")."""
    from sqlalchemy import create_engine, pool, text
    from sqlalchemy.engine import make_url

    u = make_url(url)
    if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:":
        import fcntl

        lock_path = Path(u.database).with_name(Path(u.database).name + ".migrate.lock")
        with lock_path.open("a+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
    elif u.get_backend_name() == "postgresql":
        engine = create_engine(url, poolclass=pool.NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_MIGRATE_LOCK})
                conn.commit()
                try:
                    yield
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_MIGRATE_LOCK})
                    conn.commit()
        finally:
            engine.dispose()
    else:
        yield


def upgrade(url: str | None = None, revision: str = "head") -> str | None:
    """Migrate the state DB to ``revision``, one migration at a time per database (`one_at_a_time`).
    Returns the revision it was at when this upgrade's turn came (None: not initialised), which differs
    from what the caller read before where another process migrated it meanwhile."""
    url = url or get_settings().database_url
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    check_encoding(url)
    with one_at_a_time(url):
        found = current_revision(url)
        command.upgrade(alembic_config(url), revision)
    return found


def grant_app_role(owner_url: str, app_url: str) -> str | None:
    """PostgreSQL with an owner and an app role: give the app role its privileges (rollout.db.roles).
    Returns the app role's name, or None when there is nothing to grant (SQLite, or one role).

    Grants take turns with migrations and other grants of the database: the transaction first waits for
    the migrations' advisory lock (`pg_advisory_xact_lock`, released at its commit). Two `sparsepilot
    init`s whose REVOKE/GRANT met failed one with PostgreSQL's "tuple concurrently updated" (the lock of
    `one_at_a_time` was already released when `upgrade` returned). Do not call it inside
    `one_at_a_time` of the same database: that lock is held by another connection of this process."""
    from sqlalchemy import create_engine, pool, text
    from sqlalchemy.engine import make_url

    from rollout.db.roles import grant_app_role as grant

    owner, app = make_url(owner_url), make_url(app_url)
    if owner.get_backend_name() != "postgresql" or not app.username or owner.username == app.username:
        return None
    engine = create_engine(owner_url, poolclass=pool.NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATE_LOCK})
            grant(conn, app.username)
    finally:
        engine.dispose()
    return app.username


def may_migrate(url: str) -> bool:
    """PostgreSQL: whether the user of ``url`` may run the migrations itself (`rollout.db.roles.may_migrate`:
    a single-role install's URL); False on SQLite, and where it cannot be asked."""
    from rollout.db.roles import may_migrate as owns

    try:
        return bool(_ask_role(url, owns))
    except Exception:  # noqa: BLE001 - the refusal then names the owner's URL, as before
        return False


def may_rewrite_history(url: str) -> bool | None:
    """PostgreSQL: whether the user of ``url`` (the app's SPARSEPILOT_DATABASE_URL) owns the state DB's
    tables or is a superuser, and so could disable the audit log's triggers (rollout.db.roles). None on
    SQLite, which has no roles."""
    from rollout.db.roles import may_disable_triggers

    return _ask_role(url, may_disable_triggers)


def _ask_role(url: str, question: Callable[[Any], bool]) -> bool | None:
    """`question` (of rollout.db.roles) asked on a connection to PostgreSQL ``url``; None on SQLite."""
    from sqlalchemy import create_engine, pool
    from sqlalchemy.engine import make_url

    if make_url(url).get_backend_name() != "postgresql":
        return None
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            return question(conn)
    finally:
        engine.dispose()


def downgrade(url: str | None = None, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


def current_revision(url: str | None = None) -> str | None:
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine, pool

    engine = create_engine(url or get_settings().database_url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def head_revision(url: str | None = None) -> str | None:
    """The newest revision of this build's migrations: what its code reads and writes."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(url)).get_current_head()


class SchemaBehind(SparsePilotError, RuntimeError):
    """The state DB is not at this build's head revision; the message names the command that migrates it."""


def behind_refusal(
    masked_url: str, current: str | None, head: str | None, *, postgresql: bool, may_migrate: bool = False
) -> str:
    """Why a state DB at revision ``current`` cannot be used by a build at ``head``, and what migrates
    it (pure): `sparsepilot init`; on PostgreSQL as the role that owns the database, since every other
    process connects as the app role, which may not create or alter a table (docs/operations.md,
    "Database roles"). `may_migrate` (`may_migrate`): the URL's role is that owner (one role for every
    process), so plain `sparsepilot init` migrates it; it was told to set the owner's URL, which it is."""
    state = "not initialised" if current is None else f"at revision {current}, head is {head}"
    how = "run `sparsepilot init` first"
    if postgresql and may_migrate:
        how += " (SPARSEPILOT_DATABASE_URL's role owns the database, so init migrates it as that role)"
    elif postgresql:
        how = (
            "run `sparsepilot init` with SPARSEPILOT_OWNER_DATABASE_URL set to the URL of the role that owns "
            "the database (SPARSEPILOT_DATABASE_URL is the app role's, which may not migrate it; "
            'docs/operations.md, "Database roles")'
        )
    return f"the state DB at {masked_url} is {state}: {how}"


def require_head(url: str) -> None:
    """`SchemaBehind` (`behind_refusal`) unless the state DB at ``url`` is at this build's head."""
    from sqlalchemy.engine import make_url

    from rollout.redact import mask_db_url

    current, head = current_revision(url), head_revision(url)
    if current != head:
        postgresql = make_url(url).get_backend_name() == "postgresql"
        refusal = behind_refusal(
            mask_db_url(url), current, head, postgresql=postgresql, may_migrate=may_migrate(url)
        )
        raise SchemaBehind(refusal)


def prepare_for_run(url: str) -> None:
    """The state DB before `sparsepilot run`'s first flow (flows.main_job): a SQLite one (embedded, no
    roles) is migrated (`upgrade`), so a first run needs no init; a PostgreSQL one never is, since `run`
    connects as the app role (SPARSEPILOT_DATABASE_URL), which may not: one behind this build's head is
    `SchemaBehind`, naming `sparsepilot init` with the owner's URL. `run` migrated it with the app role's
    URL and stopped on PostgreSQL's raw "permission denied for schema public" (review s48)."""
    from sqlalchemy.engine import make_url

    if make_url(url).get_backend_name() == "postgresql":
        require_head(url)
    else:
        upgrade(url)
