"""`sparsepilot init`: create or upgrade the state DB and the embedded MLflow store; and `require_schema`,
the check the `usecase` and `audit` commands run before they touch the state DB."""

from __future__ import annotations

from pathlib import Path

import typer

from sparsepilot.console import console, emit_json, err_console, fail
from sparsepilot.options import JsonOpt

app = typer.Typer()


def _mask(url: str) -> str:
    from rollout.redact import mask_db_url

    return mask_db_url(url)


def _same_database(a: str, b: str) -> bool:
    """Do two URLs name the same database (backend, host, port, database; the user may differ)?"""
    from sqlalchemy.engine import make_url

    try:
        ua, ub = make_url(a), make_url(b)
    except Exception:  # noqa: BLE001 - an unparsable URL names nothing we can compare
        return False
    return (ua.get_backend_name(), ua.host, ua.port, ua.database) == (
        ub.get_backend_name(),
        ub.host,
        ub.port,
        ub.database,
    )


def _migrate_error(url: str, exc: Exception) -> str:
    """A failed migration in words: where the URL's user may not create tables (PostgreSQL's
    "permission denied for schema public", SQLSTATE 42501: init was run as the app role), what to do."""
    from sqlalchemy.engine import make_url

    if getattr(getattr(exc, "orig", None), "sqlstate", None) != "42501":
        return str(exc)
    first = str(getattr(exc, "orig", exc)).splitlines()[0]
    return (
        f"its user {make_url(url).username!r} may not create or alter the tables ({first}): run "
        "`sparsepilot init` with SPARSEPILOT_OWNER_DATABASE_URL set to the URL of the role that owns the "
        'database (docs/operations.md, "Database roles"); nothing was migrated'
    )


def _owner_as_app_note(app_url: str) -> str:
    from sqlalchemy.engine import make_url

    return (
        f"note: SPARSEPILOT_DATABASE_URL's user {make_url(app_url).username!r} owns the state DB's tables "
        "(or is a superuser): every process on it could disable the audit log's triggers and rewrite "
        "history. Give the processes an app role that owns nothing and run init with "
        'SPARSEPILOT_OWNER_DATABASE_URL as the owner (docs/operations.md, "Database roles")'
    )


def _cannot_connect_warning(app_url: str, exc: Exception) -> str:
    """Why the app role of ``app_url`` could not connect, after init granted its privileges, and the
    grant a person gives it (init-databases.sh gives it; a role made by hand may lack it); redacted."""
    from sqlalchemy.engine import make_url

    from rollout.redact import redact

    url = make_url(app_url)
    cause = str(getattr(exc, "orig", None) or exc).strip().rstrip(".")
    return redact(
        f"the app role {url.username!r} of SPARSEPILOT_DATABASE_URL ({_mask(app_url)}) cannot connect to "
        f"{url.database}: {cause}. Its privileges on the tables were granted; `run`, the flows and the "
        f"dashboard connect as it, so give it: GRANT CONNECT ON DATABASE {_pg_ident(url.database or '')} "
        f"TO {_pg_ident(url.username or '')}"
    )


def _pg_ident(name: str) -> str:
    """A PostgreSQL identifier as a person types it: as it is when plain, else double-quoted."""
    import re

    return name if re.fullmatch(r"[a-z_][a-z0-9_$]*", name) else '"' + name.replace('"', '""') + '"'


def require_schema() -> None:
    """Refuse to work on a DB that `sparsepilot init` has not brought to the head revision."""
    from rollout.db import migrate
    from rollout.settings import get_settings

    settings = get_settings()
    url = settings.database_url
    if settings.is_sqlite and url.startswith("sqlite:///"):
        db_file = Path(url.removeprefix("sqlite:///"))
        if not db_file.is_file():
            fail(f"no state DB at {db_file}: run `sparsepilot init` first")
    head = migrate.head_revision(url)
    try:
        current = migrate.current_revision(url)
    except Exception as exc:  # noqa: BLE001 - unreachable DB: say so plainly
        fail(f"cannot reach the state DB at {_mask(url)}: {exc}")
    if current != head:
        owner = not settings.is_sqlite and migrate.may_migrate(url)
        fail(
            migrate.behind_refusal(
                _mask(url), current, head, postgresql=not settings.is_sqlite, may_migrate=owner
            )
        )


@app.command("init")
def init(json_out: JsonOpt = False) -> None:
    """Create or upgrade the state DB (Alembic migrations) under SPARSEPILOT_HOME or
    SPARSEPILOT_DATABASE_URL, and the embedded MLflow store (a SQLite MLFLOW_TRACKING_URI) to MLflow's
    head, so no flow ever migrates it midway (rollout.mlflow_store). With SPARSEPILOT_OWNER_DATABASE_URL
    (PostgreSQL) the migrations run as that owner role and the app role of SPARSEPILOT_DATABASE_URL gets
    only the app's privileges. On embedded defaults with no account configured, creates an approver
    account and prints its password once."""
    from rollout.auth import accounts_configured, create_first_run_account, first_run_accounts_path
    from rollout.db import migrate
    from rollout.mlflow_store import StoreError, ensure_store
    from rollout.settings import configure_environment
    from sparsepilot.quiet import to_log_file

    settings = configure_environment()
    # The log file takes the library lines (MLflow's "Updating database tables") and SparsePilot's own log
    # records: with nothing handling logging here, Python printed the MLflow store's "copied to ...
    # before upgrading it" on stderr as a bare line, beside the summary below that says the same
    to_log_file(settings.home, "init", flows=False, models=False)
    owner_url = settings.owner_database_url
    if owner_url != settings.database_url and not _same_database(owner_url, settings.database_url):
        fail(
            f"SPARSEPILOT_OWNER_DATABASE_URL ({_mask(owner_url)}) and SPARSEPILOT_DATABASE_URL "
            f"({_mask(settings.database_url)}) name different databases: init migrates the owner's and "
            "grants the app role on it, so the app would use one init never touched; point both at the "
            "same database (set SPARSEPILOT_DATABASE_URL to the app role's URL of it)"
        )
    accounts_file_seen = first_run_accounts_path().is_file()  # looked at first: an init makes it last
    seen = None
    try:
        seen = migrate.current_revision(owner_url)
    except Exception:  # noqa: BLE001 - a fresh SQLite file or empty DB has no revision yet
        seen = None
    try:
        # where another init (or `run`) migrated it between our look and our turn, `before` says so
        before = migrate.upgrade(owner_url)
        after = migrate.current_revision(owner_url)
    except Exception as exc:  # noqa: BLE001
        fail(f"could not migrate the state DB at {_mask(owner_url)}: {_migrate_error(owner_url, exc)}")
    try:
        app_role = migrate.grant_app_role(owner_url, settings.database_url)
    except Exception as exc:  # noqa: BLE001
        fail(
            f"the state DB at {_mask(owner_url)} is migrated (revision {after}), but the app role of "
            f"SPARSEPILOT_DATABASE_URL ({_mask(settings.database_url)}) could not be granted its "
            f"privileges: {exc}"
        )
    # connects as the app: a role that may not connect (no CONNECT on the database) was reported as one
    # whose grants failed, though they went through, and init stopped before the MLflow store and the
    # first-run account for what only decides a note
    cannot_connect = None
    try:
        owner_as_app = migrate.may_rewrite_history(settings.database_url)
    except Exception as exc:  # noqa: BLE001
        owner_as_app, cannot_connect = None, _cannot_connect_warning(settings.database_url, exc)
    try:
        store = ensure_store(settings)
    except StoreError as exc:
        fail(str(exc))
    first = create_first_run_account()
    payload = {
        "home": str(settings.home),
        "database_url": _mask(settings.database_url),
        "revision_before": before,
        "revision": after,
        "app_role": app_role,
        "mlflow_tracking_uri": _mask(settings.mlflow_tracking_uri),
        "mlflow_store": store.action,
        "mlflow_revision": store.revision,
        "mlflow_backup": str(store.backup) if store.backup else None,
        "first_run_account": first[0] if first else None,
        "made_by_another_init": before != seen,
        # PostgreSQL: the app's user owns the tables (or is a superuser): it could switch the triggers off
        "app_may_rewrite_history": owner_as_app,  # None: SQLite, or the app role could not connect
        "app_role_cannot_connect": cannot_connect,
    }
    if first:  # printed once, to the terminal only (never into JSON output or a log)
        err_console.print(
            f"Created the first approver account {first[0]!r} with password: {first[1]}\n"
            f"  (only its hash is kept, in {settings.home / 'accounts.toml'}; sign in with "
            f"`SPARSEPILOT_USER={first[0]} sparsepilot login`, or on the dashboard)",
            highlight=False,
            markup=False,
        )
    if first is None and not accounts_file_seen and first_run_accounts_path().is_file():
        err_console.print(
            f"The first approver account was created by another `sparsepilot init` running at the same "
            f"time: its password was printed there, once (only its hash is kept, in "
            f"{first_run_accounts_path()})",
            highlight=False,
            markup=False,
        )
    if accounts_configured() and first_run_accounts_path().is_file():
        err_console.print(
            f"note: {first_run_accounts_path()} (the first-run accounts) is ignored now that "
            "SPARSEPILOT_ACCOUNTS or SPARSEPILOT_ACCOUNTS_FILE configures the accounts; delete it",
            highlight=False,
            markup=False,
        )
    if owner_as_app:
        err_console.print(_owner_as_app_note(settings.database_url), highlight=False, markup=False)
    if cannot_connect:
        err_console.print(f"warning: {cannot_connect}", style="yellow", highlight=False, markup=False)
    if json_out:
        emit_json(payload)
        return
    changed = (
        "created" if before is None else ("up to date" if before == after else f"upgraded from {before}")
    )
    if before != seen:  # our first look found it older: another init migrated it meanwhile
        made = "created" if seen is None else f"upgraded from {seen}"
        changed = f"already {made} by another `sparsepilot init` running at the same time"
    console.print(f"State DB {payload['database_url']}: {changed} (revision {after})")
    if store.action != "skipped":
        mlflow_changed = {"upgraded": f"upgraded from {store.before}", "ok": "up to date"}.get(
            store.action, store.action
        )
        if store.action == "repaired":
            mlflow_changed = f"rebuilt (it held nothing; {store.detail})"
        console.print(
            f"MLflow store {payload['mlflow_tracking_uri']}: {mlflow_changed} (revision {store.revision})",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
        if store.backup:  # what a failed migration could have lost: kept until a person deletes it
            console.print(
                f"  its copy from before the upgrade: {store.backup} (kept; delete it once the upgraded "
                "store has served you)",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
    console.print(f"SPARSEPILOT_HOME: {payload['home']}")
