"""The CLI's tables never cut a value: a table wider than the console is printed as records."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from sparsepilot import console as cli_console


@pytest.fixture
def narrow(monkeypatch):
    """The CLI's console at 80 columns, as rich gives a log file or a pipe, recording what it prints."""
    c = Console(width=80, record=True, file=io.StringIO())
    monkeypatch.setattr(cli_console, "console", c)
    return c


def _cells(text: str) -> list[list[str]]:
    """Each table line's cells, stripped (box-drawing separators removed)."""
    lines = [re.split("[│┃]", line) for line in text.splitlines()]
    return [[c.strip() for c in parts[1:-1]] for parts in lines if len(parts) >= 3]


def test_wide_table_prints_every_value_whole(narrow):
    rows = [{f"column {i}": f"0.98-1.{i:02d}" for i in range(12)}]
    rows.append({f"column {i}": 1000.0 + i for i in range(12)})
    cli_console.print_table("Prefill speed", rows)
    out = narrow.export_text()
    assert "…" not in out
    cells = _cells(out)
    pairs = {(c[0], c[1]) for c in cells if len(c) == 2}
    for r in rows:
        for field, value in r.items():
            assert (field, cli_console._fmt(value)) in pairs, (field, value, out)
    assert "Prefill speed" in out


def test_table_that_fits_stays_a_table(narrow):
    rows = [{"seq_len": 4096, "speed-up": 1.013}, {"seq_len": 8192, "speed-up": 1.31}]
    cli_console.print_table("Prefill speed", rows)
    cells = _cells(narrow.export_text())
    assert ["seq_len", "speed-up"] in cells
    assert ["4096", "1.013"] in cells and ["8192", "1.31"] in cells


def test_a_value_wider_than_the_console_is_folded_not_cut(narrow):
    digest = "ab" * 70  # one 140-character word
    cli_console.print_record("plan", {"hash": digest, "estimator": "sampled"}, ["hash", "estimator"])
    out = narrow.export_text()
    assert "…" not in out
    assert "".join(c[1] for c in _cells(out) if len(c) == 2 and c[0] in ("hash", "")) == digest
