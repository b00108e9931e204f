"""`sparsepilot pilot NAME`'s console output: its table of batches said nothing of the rows timed while the
host was overloaded, whose latency the gate leaves out (only `--json` had each batch's `latency`), so an
operator read a batch of host-slowed rows as a normal one. A line under the table now counts them."""

from __future__ import annotations

from typing import Any

import pytest

from flows.pilot import latency_judged
from sparsepilot.commands.pipeline import monitor_said, say_pilot_result


def _result(flagged: list[int]) -> dict[str, Any]:
    """A pilot run's summary as `pilot_flow` returns it: a batch of 8 rows per entry, `flagged` of them
    timed under overload (`latency_judged`, the flow's own record of what the gate judges)."""
    batches = []
    for i, n in enumerate(flagged):
        rows = [{"arm": "treatment", "overloaded": j < n} for j in range(8)]
        batches.append(
            {"batch_id": f"b-1-{i}", "passed": True, "inserted": 8, "already_present": 0,
             "latency": latency_judged(rows, ["control", "treatment"])}
        )  # fmt: skip
    return {"pilot": "pilot 1", "step_index": 0, "step_kind": "shadow", "batches": batches}


@pytest.mark.parametrize(
    ("flagged", "line"),
    [
        (
            [3, 0, 2],
            "tiny-chat: 5 of 24 rows timed while the host was overloaded (3 in b-1-0, 2 in b-1-2): they "
            "count for quality, not for the gate's p95 latencies or latency guardrail",
        ),
        ([0, 0], None),
    ],
)
def test_the_pilot_table_says_how_many_rows_were_timed_under_overload(
    flagged: list[int], line: str | None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # one line each, as a wide terminal shows them
    say_pilot_result("tiny-chat", _result(flagged))
    out = capsys.readouterr().out
    assert "pilot 1 of tiny-chat" in out and "b-1-1" in out  # the table as before
    if line is None:
        assert "overloaded" not in out, out
    else:
        assert line in " ".join(out.split()), out
    # an import's batches carry no `latency`: nothing said
    say_pilot_result("tiny-chat", {**_result([]), "batches": [{"batch_id": "b-2", "inserted": 4}]})
    assert "overloaded" not in capsys.readouterr().out


LOOK = "Monitor: GO. no guardrail shown breached over 2 looks. The champion keeps serving."


@pytest.mark.parametrize(
    ("flagged", "tail"),
    [
        (3, "; 3 of the batch's 8 rows timed while the host was overloaded: they count for quality, not for "
            "the monitor's latency guardrail"),
        (0, ""),
        (None, ""),  # an imported file's look: no host load of ours
    ],
)  # fmt: skip
def test_the_monitor_line_says_how_many_rows_were_timed_under_overload(
    flagged: int | None, tail: str
) -> None:
    """Review s49 H2: `sparsepilot monitor`'s line said nothing of its batch's rows timed under overload,
    whose latency its guardrail leaves out, as `pilot`'s table did not before; it says them now."""
    result: dict[str, Any] = {"outcome": "GO", "explanation": LOOK}
    if flagged is not None:
        rows = [{"arm": "treatment", "overloaded": j < flagged} for j in range(8)]
        result["latency"] = latency_judged(rows, ["control", "treatment"])
    assert monitor_said("tiny-chat", result) == LOOK + tail
