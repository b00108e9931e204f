"""`sparsepilot bench ...`: each benchmark prints a table and writes JSON (+ a PNG where useful).
Speed targets live here, never as timed assertions in tests."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True)
