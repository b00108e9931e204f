"""Page-side reads: one short transaction per call through rollout.queries; nothing here writes."""

from __future__ import annotations

from pathlib import Path

from alembic.runtime.migration import MigrationContext

from rollout.db import migrate
from rollout.db.session import get_engine
from rollout.queries import read  # noqa: F401 - the pages' reads: one short transaction each
from rollout.redact import mask_db_url
from rollout.settings import get_settings

REPO_ROOT = Path(__file__).resolve().parent.parent


def schema_ready() -> tuple[bool, str, str]:
    """(True, url, "") when the state DB is at this build's head revision, else (False, url, what is
    wrong); the dashboard never creates the schema. The url comes back with its password masked as
    SQLAlchemy reads it (`mask_db_url`, whatever characters it holds): the page shows it to anyone who
    opens it, before any sign-in."""
    url = get_settings().database_url
    shown = mask_db_url(url)
    missing = "has no SparsePilot schema yet"
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return False, shown, missing  # connecting would create an empty file
    try:
        with get_engine(url).connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
    except Exception:  # noqa: BLE001 - any connection problem is shown to the user as "not ready"
        return False, shown, "cannot be reached"
    head = migrate.head_revision(url)
    if current is None:
        return False, shown, missing
    if current != head:  # this build reads columns a DB one migration behind lacks
        return (
            False,
            shown,
            f"is at revision {current}; this SparsePilot needs {head} (`sparsepilot init` upgrades it)",
        )
    return True, shown, ""


def example_specs() -> list[str]:
    """The sample specs that ship with the project, as paths a user can paste."""
    folder = REPO_ROOT / "examples" / "usecases"
    return sorted(f"examples/usecases/{p.name}" for p in folder.glob("*.y*ml")) if folder.is_dir() else []
