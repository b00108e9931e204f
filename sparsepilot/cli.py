"""Entry point. Every module under sparsepilot/commands exposes one `typer.Typer` named `app`, added
here with `add_typer`: without a name for top-level commands (`sparsepilot init`, `calibrate`, ...),
with one for a command group (`sparsepilot usecase add`, `audit verify`, `bench quality`). The modules
import heavy libraries lazily, so `sparsepilot --help` stays fast.

Errors: any `SparsePilotError` (sparse_core/errors.py; rollout's and flows' errors subclass it) that
a command lets through becomes `error: <message>` and exit code 2 here, in one place; so does a usage
mistake Click finds (a bad option value, a missing option, an unknown option or command), with the
command's `--help` to see, instead of Click's boxed usage panel. Any other error is Python's traceback,
its causes with it, redacted (`rollout.redact`: an MLflow URL's password)."""

from __future__ import annotations

import sys
import traceback
from typing import Any

import typer
from typer.core import TyperGroup

from sparse_core.errors import SparsePilotError
from sparsepilot.commands import audit, auth, bench, core, dashboard, init, pipeline, serving, usecase
from sparsepilot.console import fail


class _Commands(TyperGroup):
    """The root command group: a SparsePilotError from any command is a clear message and exit 2."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except SparsePilotError as exc:
            fail(str(exc))
        except typer.TyperException as exc:  # Typer's own (vendored) Click: a usage error exits 2
            if getattr(exc, "exit_code", None) != 2 or type(exc).__name__ == "NoArgsIsHelpError":
                raise  # not a usage mistake, or a bare group (its help, as before)
            where = getattr(getattr(exc, "ctx", None), "command_path", None) or ctx.command_path
            fail(f"{exc.format_message()} (see `{where} --help`)")


app = typer.Typer(
    name="sparsepilot",
    help="Adopt block-sparse attention safely, one business use case at a time.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=_Commands,
)

for _top_level in (init, core, pipeline, dashboard, auth, serving):
    app.add_typer(_top_level.app)
app.add_typer(usecase.app, name="usecase")
app.add_typer(audit.app, name="audit")
app.add_typer(bench.app, name="bench")


def _print_redacted_traceback(exc: BaseException) -> None:
    """The traceback Python prints for an error no command handled, its causes with it, redacted."""
    from rollout.redact import redact

    sys.stderr.write(redact("".join(traceback.format_exception(exc))))
    sys.stderr.flush()


def main() -> None:
    from rollout.settings import SettingsError, configure_environment

    try:
        configure_environment()
    except SettingsError as exc:  # before any command runs: the one handler is not reached yet
        try:
            fail(str(exc))
        except typer.Exit as stop:
            raise SystemExit(stop.exit_code) from None
    try:
        app()
    except Exception as exc:  # what Python would do (traceback, exit 1), without a secret in it
        _print_redacted_traceback(exc)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
