"""The root of every error SparsePilot raises for bad input or a refused action.

It lives in sparse_core because sparse_core imports nothing of the project while every other layer
(rollout, flows, dashboard, the CLI) may import sparse_core: each layer's own errors subclass it, and
the CLI turns any of them into ``error: <message>`` and exit code 2 in one place (sparsepilot/cli.py).
Each subclass keeps its built-in base too (``ValueError``, ``RuntimeError``, ...), so existing
``except`` clauses still match."""

from __future__ import annotations


class SparsePilotError(Exception):
    """Bad input or a refused action, with a message that names what to fix (file, row, field)."""
