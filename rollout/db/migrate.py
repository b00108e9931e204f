"""Apply Alembic migrations programmatically (`sparsepilot init`, tests, the stack's one-shot job)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

import migrations
from rollout.settings import get_settings

MIGRATIONS_DIR = Path(migrations.__file__).resolve().parent


def alembic_config(url: str | None = None) -> Config:
    cfg = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["url"] = url or get_settings().database_url
    return cfg


def upgrade(url: str | None = None, revision: str = "head") -> None:
    url = url or get_settings().database_url
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), revision)


def grant_app_role(owner_url: str, app_url: str) -> str | None:
    """PostgreSQL with an owner and an app role: give the app role its privileges (rollout.db.roles).
    Returns the app role's name, or None when there is nothing to grant (SQLite, or one role)."""
    from sqlalchemy import create_engine, pool
    from sqlalchemy.engine import make_url

    from rollout.db.roles import grant_app_role as grant

    owner, app = make_url(owner_url), make_url(app_url)
    if owner.get_backend_name() != "postgresql" or not app.username or owner.username == app.username:
        return None
    engine = create_engine(owner_url, poolclass=pool.NullPool)
    try:
        with engine.begin() as conn:
            grant(conn, app.username)
    finally:
        engine.dispose()
    return app.username


def downgrade(url: str | None = None, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


def current_revision(url: str | None = None) -> str | None:
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine

    engine = create_engine(url or get_settings().database_url)
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision(url: str | None = None) -> str | None:
    """The newest revision of this build's migrations: what its code reads and writes."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(url)).get_current_head()
