"""The CLI arguments and options several commands share: one spelling and one help text each."""

from __future__ import annotations

from typing import Annotated

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]
UseCaseArg = Annotated[str, typer.Argument(help="use case NAME")]
ReasonOpt = Annotated[str, typer.Option("--reason", help="why (kept in the audit log)")]
