"""Entry point. Each command group lives in its own module under sparsepilot/commands and imports
heavy libraries lazily, so `sparsepilot --help` stays fast."""

from __future__ import annotations

import typer

from sparsepilot.commands import audit, auth, bench, core, dashboard, pipeline, serving, usecase

app = typer.Typer(
    name="sparsepilot",
    help="Adopt block-sparse attention safely, one business use case at a time.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

usecase.register(app)
core.register(app)
pipeline.register(app)
dashboard.register(app)
auth.register(app)
audit.register(app)
serving.register(app)
app.add_typer(bench.app, name="bench", help="Benchmarks: print a table and write JSON.")


def main() -> None:
    from rollout.settings import configure_environment

    configure_environment()
    app()


if __name__ == "__main__":
    main()
