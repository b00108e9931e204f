"""`sparsepilot init` and `sparsepilot usecase add | list | show`.

Bad input exits with code 2 and one line per problem naming the file, row and field; nothing is
written (the add is one transaction, after every check passed)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from sparsepilot.commands.auth import PasswordStdin, signed_in
from sparsepilot.console import console, emit_json, err_console, fail, print_table, say

usecase_app = typer.Typer(no_args_is_help=True, help="Register and inspect use cases (versioned specs).")


def _mask(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown as given minus nothing secret
        return url.split("@")[-1]


def require_schema() -> None:
    """Refuse to work on a DB that `sparsepilot init` has not brought to the head revision."""
    from alembic.script import ScriptDirectory

    from rollout.db import migrate
    from rollout.settings import get_settings

    settings = get_settings()
    url = settings.database_url
    if settings.is_sqlite and url.startswith("sqlite:///"):
        db_file = Path(url.removeprefix("sqlite:///"))
        if not db_file.is_file():
            fail(f"no state DB at {db_file}: run `sparsepilot init` first")
    head = ScriptDirectory.from_config(migrate.alembic_config(url)).get_current_head()
    try:
        current = migrate.current_revision(url)
    except Exception as exc:  # noqa: BLE001 - unreachable DB: say so plainly
        fail(f"cannot reach the state DB at {_mask(url)}: {exc}")
    if current != head:
        state = "not initialised" if current is None else f"at revision {current}, head is {head}"
        fail(f"the state DB at {_mask(url)} is {state}: run `sparsepilot init` first")


def init(json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Create or upgrade the state DB (Alembic migrations) under SPARSEPILOT_HOME or
    SPARSEPILOT_DATABASE_URL. With SPARSEPILOT_OWNER_DATABASE_URL (PostgreSQL) the migrations run as
    that owner role and the app role of SPARSEPILOT_DATABASE_URL gets only the app's privileges. On
    embedded defaults with no account configured, creates an approver account and prints its
    password once."""
    from rollout.auth import create_first_run_account
    from rollout.db import migrate
    from rollout.settings import configure_environment

    settings = configure_environment()
    owner_url = settings.owner_database_url
    before = None
    try:
        before = migrate.current_revision(owner_url)
    except Exception:  # noqa: BLE001 - a fresh SQLite file or empty DB has no revision yet
        before = None
    try:
        migrate.upgrade(owner_url)
        after = migrate.current_revision(owner_url)
        app_role = migrate.grant_app_role(owner_url, settings.database_url)
    except Exception as exc:  # noqa: BLE001
        fail(f"could not migrate the state DB at {_mask(owner_url)}: {exc}")
    first = create_first_run_account()
    payload = {
        "home": str(settings.home),
        "database_url": _mask(settings.database_url),
        "revision_before": before,
        "revision": after,
        "app_role": app_role,
        "mlflow_tracking_uri": _mask(settings.mlflow_tracking_uri),
        "first_run_account": first[0] if first else None,
    }
    if first:  # printed once, to the terminal only (never into JSON output or a log)
        err_console.print(
            f"Created the first approver account {first[0]!r} with password: {first[1]}\n"
            f"  (only its hash is kept, in {settings.home / 'accounts.toml'}; sign in with "
            f"`SPARSEPILOT_USER={first[0]} sparsepilot login`, or on the dashboard)",
            highlight=False,
            markup=False,
        )
    if json_out:
        emit_json(payload)
        return
    changed = (
        "created" if before is None else ("up to date" if before == after else f"upgraded from {before}")
    )
    console.print(f"State DB {payload['database_url']}: {changed} (revision {after})")
    console.print(f"SPARSEPILOT_HOME: {payload['home']}")


@usecase_app.command("add")
def add(
    file: Annotated[Path, typer.Argument(help="use-case spec (YAML); see docs/usecase-spec.md")],
    new_version: Annotated[
        bool,
        typer.Option("--new-version", help="store a changed spec of an existing use case as a new version"),
    ] = False,
    password_stdin: PasswordStdin = False,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Validate a spec, its model ref and its dataset, then register it (or a new version of it)."""
    from rollout.spec import SpecError
    from rollout.usecases import UseCaseError, add_usecase
    from rollout.validation import DataValidationError

    require_schema()
    actor = signed_in("operator", f"usecase add {file}", password_stdin).name
    try:
        with console.status(f"Validating {file} (spec, model ref, dataset)...", spinner="dots"):
            result = add_usecase(file, actor=actor, new_version=new_version)
    except DataValidationError as exc:
        fail(f"dataset failed validation:\n{exc}")
    except (SpecError, UseCaseError) as exc:
        fail(str(exc))
    if json_out:
        emit_json(result.to_dict())
        return
    stats = result.validation.get("stats", {})
    verb = {
        "created": "registered",
        "new_version": "stored as a new version",
        "reverted": "switched back to an earlier version",
        "unchanged": "unchanged (identical to the current version); nothing written",
    }[result.status]
    say(f"{result.name} v{result.version}: {verb}")
    console.print(
        f"  dataset: {stats.get('rows')} requests, prompt tokens {stats.get('prompt_tokens_min')}-"
        f"{stats.get('prompt_tokens_max')} (counted by {stats.get('token_count')})"
    )
    if result.changed_fields:
        say(f"  changed: {', '.join(result.changed_fields)}")
    for w in result.validation.get("warnings", []):
        say(f"  warning: {w}")


@usecase_app.command("list")
def list_(json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """All use cases with their current version and phase."""
    from rollout.usecases import list_usecases

    require_schema()
    rows = list_usecases()
    if json_out:
        emit_json(rows)
        return
    if not rows:
        console.print("No use cases yet: `sparsepilot usecase add examples/usecases/docs-qa.yaml`")
        return
    print_table(
        "Use cases",
        rows,
        ["name", "owner", "criticality", "phase", "version", "versions", "model", "task", "requests"],
    )


@usecase_app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="use-case name")],
    version: Annotated[
        int | None,
        typer.Option("--version", min=1, max=2**31 - 1, help="a spec version (default: current)"),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """One use case: its spec (current or a given version), all versions, recent audit entries."""
    from rollout.usecases import UseCaseError, show_usecase

    require_schema()
    try:
        info = show_usecase(name, version=version)
    except UseCaseError as exc:
        fail(str(exc))
    if json_out:
        emit_json(info)
        return
    _print_usecase(info)


def _print_usecase(info: dict[str, Any]) -> None:
    import yaml

    say(
        f"{info['name']}  owner {info['owner']}  criticality {info['criticality']}  "
        f"phase {info['phase']}  spec v{info['version']} (current v{info['current_version']})"
    )
    console.print(f"dataset: {info['dataset_rows']} requests, sha256 {str(info['dataset_sha256'])[:12]}")
    console.print(yaml.safe_dump(info["spec"], sort_keys=False).rstrip(), highlight=False, markup=False)
    print_table("Versions", info["versions"], ["version", "current", "spec_hash", "created_by", "created_at"])
    print_table("Recent audit entries", info["audit"], ["ts", "actor", "action"])


def register(app: typer.Typer) -> None:
    app.command("init")(init)
    app.add_typer(usecase_app, name="usecase")
