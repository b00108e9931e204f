"""The embedded MLflow store (a SQLite file) brought to MLflow's head before any flow works with it.

MLflow creates and upgrades its SQLite store itself on first use, inside whichever call opens it first:
for SparsePilot that was the first calibration's log, ~70 s into a first `calibrate` or `run`. The
migrations (~15 s on a busy host: 65 tables) copy tables through `_alembic_tmp_<table>` (Alembic's
batch mode) and are not atomic, so a process killed in that window left the store half-migrated, and
every later open died on `table _alembic_tmp_... already exists` after the whole calibration was redone.

`ensure_store` creates or upgrades the store up front (`sparsepilot init`, the main job's setup, and each
flow's preflight: cheap, ~40 ms, when it is already at head), under the lock MLflow's own guarded
initialisation takes for the same URL, so two processes never migrate it at once. A store left
half-migrated (an `_alembic_tmp_` table, tables but no revision) that holds nothing yet (no run, model,
trace or dataset, in its tables or in an `_alembic_tmp_` copy of one: at most experiments without runs)
is rebuilt from scratch in place: a kill may land after a batch copy dropped the original table and
before it renamed the copy, so dropping only the leftover and upgrading again is not always enough,
while a rebuild is; SQLite rolls back a killed writer's hot journal when the file is opened, so the file
itself is never moved. A half-migrated store that holds anything is refused (`StoreError`), before any
heavy work, with what to do about it.

An upgrade of a store that holds anything (runs, models: what a killed or failed migration could lose)
is preceded by a copy of it, `<file>.pre-<revision>-<UTC time>.bak` beside it, made with SQLite's backup
API (consistent while another process has the store open), said in the log and kept: the operator's to
delete. A copy that cannot be written refuses the upgrade (`StoreError`), the store untouched. A store
that holds nothing is upgraded (or created) without one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rollout.settings import Settings, get_settings
from sparse_core.errors import SparsePilotError

TMP_PREFIX = "_alembic_tmp_"
# tables a store may hold rows in and still hold nothing of the user's: Alembic's bookkeeping, the
# default workspace a migration seeds, and experiments (an experiment without runs is recreated by the
# next run: rollout.tracking.experiment_for)
_NOT_CONTENT = {"alembic_version", "workspaces", "experiments", "experiment_tags"}


log = logging.getLogger("sparsepilot.mlflow_store")  # under `sparsepilot`: a command's log file has it


class StoreError(SparsePilotError, RuntimeError):
    """The MLflow store cannot be used as it is; the message names the file and what to do."""


@dataclass(frozen=True)
class StoreState:
    """What `ensure_store` found and did: `action` is one of skipped (not a local SQLite store), ok,
    created, upgraded, repaired."""

    uri: str
    action: str
    revision: str | None
    before: str | None = None
    detail: str = ""
    backup: Path | None = None  # the copy made before an upgrade of a store that held anything


@dataclass(frozen=True)
class _Look:
    tables: list[str]
    revision: str | None
    content: dict[str, int]

    @property
    def leftovers(self) -> list[str]:
        return sorted(t for t in self.tables if t.startswith(TMP_PREFIX))


def sqlite_path(uri: str) -> Path | None:
    """The file of a `sqlite:///` tracking URI (the embedded default is `sqlite:////abs/mlflow.db`),
    or None for any other store (a tracking server migrates its own)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path)


def _look(engine: object) -> _Look:
    import sqlalchemy
    from mlflow.store.db.utils import _get_schema_version

    tables = sorted(sqlalchemy.inspect(engine).get_table_names())
    revision = _get_schema_version(engine) if "alembic_version" in tables else None
    content: dict[str, int] = {}
    with engine.connect() as conn:  # type: ignore[attr-defined]
        for t in tables:
            # a leftover `_alembic_tmp_X` is content like X itself: a kill after the batch copy dropped X
            # and before it renamed the copy leaves X's rows only there (review s46 T3-3)
            if t.removeprefix(TMP_PREFIX) in _NOT_CONTENT:
                continue
            n = conn.exec_driver_sql(f'SELECT COUNT(*) FROM "{t}"').scalar_one()
            if n:
                content[t] = int(n)
    return _Look(tables, revision, content)


def _half_migrated(look: _Look, head: str, engine: object) -> str | None:
    """Why the store is half-migrated, or None when it is not."""
    from mlflow.store.db.utils import _all_tables_exist

    if look.leftovers:
        return f"leftover table {', '.join(look.leftovers)} of a migration that did not finish"
    if look.revision is None and any(t != "alembic_version" for t in look.tables):
        return "tables but no schema revision: its creation did not finish"
    if look.revision == head and not _all_tables_exist(engine):
        return "tables missing at the head revision: a rebuild did not finish"
    return None


def _describe(look: _Look, head: str, why: str) -> str:
    import mlflow

    held = ", ".join(f"{t}: {n} rows" for t, n in sorted(look.content.items()))
    return (
        f"{why}; at revision {look.revision or 'none'}, MLflow {mlflow.__version__}'s head is {head}; "
        f"it holds {held}"
    )


def backup_path(path: Path, revision: str, now: dt.datetime) -> Path:
    """Where the copy of the store at `path` taken before upgrading it from `revision` goes: beside it,
    named by the revision it holds and the UTC time it was taken."""
    return path.with_name(f"{path.name}.pre-{revision}-{now.astimezone(dt.UTC):%Y%m%dT%H%M%SZ}.bak")


def _backup(path: Path, revision: str) -> Path:
    """Copy the store with SQLite's backup API (a consistent copy, another connection open or not) to its
    `backup_path`, written under a temporary name and renamed once whole, never over an existing file.
    StoreError, nothing left behind, when it cannot be written."""
    target = backup_path(path, revision, dt.datetime.now(dt.UTC))
    partial = target.with_name(target.name + ".partial")
    try:
        if target.exists():
            raise OSError(f"{target.name} exists already")
        src = sqlite3.connect(path)
        try:
            dst = sqlite3.connect(partial)
            try:
                src.backup(dst)
            finally:
                dst.close()
        finally:
            src.close()
        partial.rename(target)
    except (OSError, sqlite3.Error) as exc:
        partial.unlink(missing_ok=True)
        why = getattr(exc, "strerror", None) or str(exc)
        raise StoreError(
            f"the MLflow store at {path} holds runs or models and is at revision {revision}, behind this "
            f"MLflow's: its copy before the upgrade could not be written to {target} ({why}); nothing was "
            "upgraded: make room for it beside the store (or allow writing there) and rerun"
        ) from None
    return target


def _rebuild(engine: object) -> None:
    """Drop every table of a store that holds nothing and create it again with MLflow's own code."""
    from mlflow.store.db.utils import _initialize_tables

    with engine.begin() as conn:  # type: ignore[attr-defined]
        conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
        names = conn.exec_driver_sql(
            "SELECT type, name FROM sqlite_master WHERE type IN ('table', 'view', 'trigger') "
            "AND name NOT LIKE 'sqlite_%'"
        ).all()
        for kind, name in names:
            if kind != "table":
                conn.exec_driver_sql(f'DROP {kind.upper()} IF EXISTS "{name}"')
        # the revision first: SQLite commits each DROP on its own, and a store killed midway must read
        # as half-migrated (tables, no revision) to its next check, never as one at its old revision
        tables = sorted((n for k, n in names if k == "table"), key=lambda n: n != "alembic_version")
        for name in tables:
            conn.exec_driver_sql(f'DROP TABLE IF EXISTS "{name}"')
    _initialize_tables(engine)


def ensure_store(settings: Settings | None = None) -> StoreState:
    """Bring a local SQLite MLflow store to MLflow's head now (create it, upgrade it, or rebuild one a
    killed process left half-migrated while it held nothing); raise StoreError for a half-migrated store
    that holds runs or models, or one a newer MLflow wrote. Any other store is left to its server."""
    s = settings or get_settings()
    uri = s.mlflow_tracking_uri
    path = sqlite_path(uri)
    if path is None:
        return StoreState(uri, "skipped", None)
    import sqlalchemy
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import (
        _get_alembic_config,
        _get_latest_schema_revision,
        _initialize_tables,
        _upgrade_db,
    )
    from mlflow.utils.file_utils import ExclusiveFileLock

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(
            f"the MLflow store at {path}: cannot create its folder ({exc.strerror or exc})"
        ) from None
    engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool)
    # the lock MLflow's own guarded initialisation (_safe_initialize_tables) takes for this URL
    digest = hashlib.md5(str(engine.url).encode("utf-8"), usedforsecurity=False).hexdigest()
    head = _get_latest_schema_revision()
    try:
        with ExclusiveFileLock(f"{tempfile.gettempdir()}/db_init_lock-{digest}"):
            look = _look(engine)
            if not look.tables:
                _initialize_tables(engine)
                return StoreState(uri, "created", head)
            why = _half_migrated(look, head, engine)
            backup: Path | None = None
            if why is None and look.revision == head:
                return StoreState(uri, "ok", head)
            if why is None:
                script = ScriptDirectory.from_config(_get_alembic_config(db_url=""))
                try:
                    script.get_revision(look.revision)
                except Exception:  # noqa: BLE001 - alembic's own error names the unknown revision
                    import mlflow

                    raise StoreError(
                        f"the MLflow store at {path} is at revision {look.revision}, which MLflow "
                        f"{mlflow.__version__} does not know (a newer MLflow wrote it): upgrade MLflow, or "
                        "point MLFLOW_TRACKING_URI at another store"
                    ) from None
                if look.content:  # what a failed or killed migration could lose: copied first
                    backup = _backup(path, str(look.revision))
                    log.warning(
                        "the MLflow store at %s is at revision %s, behind MLflow's head %s: copied to %s "
                        "(kept) before upgrading it",
                        path,
                        look.revision,
                        head,
                        backup,
                    )
                try:
                    _upgrade_db(engine)
                    return StoreState(uri, "upgraded", head, before=look.revision, backup=backup)
                except Exception as exc:  # noqa: BLE001 - judged below on what the failure left
                    failed = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                look = _look(engine)
                why = _half_migrated(look, head, engine)
                why = why or f"its upgrade from {look.revision} failed ({failed})"
            if look.content:
                kept = f" (its copy from before this upgrade, with all it held: {backup})" if backup else ""
                raise StoreError(
                    f"the MLflow store at {path} is half-migrated ({_describe(look, head, why)}); "
                    f"move it away and rerun{kept}"
                )
            before = look.revision
            _rebuild(engine)
            return StoreState(uri, "repaired", head, before=before, detail=why)
    except sqlalchemy.exc.DatabaseError as exc:  # not a database, locked, unreadable
        raise StoreError(
            f"the MLflow store at {path} cannot be read ({str(exc.orig or exc).splitlines()[0]}); "
            "move it away and rerun"
        ) from None
    finally:
        engine.dispose()
