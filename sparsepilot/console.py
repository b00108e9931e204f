"""Shared CLI plumbing: one way to print tables/JSON and to fail with a clear message."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import typer
from rich.console import Console, Group
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from rollout.redact import redact

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` (secrets redacted, never read as markup) and exit with ``code``."""
    err_console.print(
        Text("error: ", style="bold red") + Text(redact(message)), highlight=False, soft_wrap=True
    )
    raise typer.Exit(code)


def say(message: object) -> None:
    """Print text that may hold user input (names, reasons, file contents): plain, secrets redacted."""
    console.print(Text(redact(message)), highlight=False, soft_wrap=True)


def emit_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")


def emit_or_say(payload: Any, json_out: bool, message: object) -> None:
    """A command's answer: the payload as JSON with --json, else the one-line message (`say`)."""
    if json_out:
        emit_json(payload)
    else:
        say(message)


def print_table(title: str, rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
    """Rows as a table; where the table is wider than the console (an 80-column terminal, or a log, which
    rich gives 80 columns), each row as a record instead, so that no value is ever cut to "0.9…"."""
    cols = columns or (list(rows[0].keys()) if rows else [])
    table = Table(title=Text(title))
    for c in cols:
        table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(*(Text(redact(_fmt(r.get(c)))) for c in cols))
    natural = Measurement.get(console, console.options.update_width(_UNBOUNDED), table).maximum
    console.print(table if natural <= console.width else _records(title, rows, cols))


def print_record(title: str, row: dict[str, Any], fields: list[str]) -> None:
    """One result as a two-column table, a field a line: readable in an 80-column terminal or log
    where a one-row table of a dozen columns is cut to three letters a cell."""
    console.print(_records(title, [row], fields))


_UNBOUNDED = 1_000_000  # a width no table reaches: measures a table's natural width


def _records(title: str, rows: list[dict[str, Any]], fields: list[str]) -> Group:
    """Rows as field / value pairs, a section per row, under the title on a line of its own (a table's
    title wraps at the table's width, a narrow one here)."""
    table = Table()
    table.add_column("field", overflow="fold")
    table.add_column("value", overflow="fold")
    for i, row in enumerate(rows):
        if i:
            table.add_section()
        for f in fields:
            table.add_row(Text(f), Text(redact(_fmt(row.get(f)))))
    return Group(Text(title, style="italic", justify="left"), table)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
