"""Review M, M1: `bench gate` and `bench dashboard` printed `within_target: False` from timings the same
run measured as overloaded (1M-row decide(): 5.2-6.1 s wall for <= 1.55 s of CPU), with one meter over the
whole run and no flag per row. Each (mode, size) / page is now metered on its own, its row carries
`overloaded`, `wait_share` and `others_busy_cores`, and a row timed under overload that misses its target
is unknown (None; "unknown (host overloaded)" in the table), never a miss. Timings are never asserted."""

from __future__ import annotations

import pytest

from rollout.bench_verdict import within_target
from sparse_core.host import HostLoad


def _load(overloaded: bool, wait_share: float) -> HostLoad:
    """A host-load record as `HostLoadMeter` writes it (review M's loaded run: 1.87 of 2 CPUs busy)."""
    return HostLoad(2.0, 1, 12.4, 1.87, 1.0, (8.0, 8.0, 8.0), overloaded, wait_share)


@pytest.mark.parametrize(
    ("seconds", "target", "load", "verdict"),
    [
        (5.2, 1.0, _load(True, 0.875), None),  # over the target under overload: unknown, not a miss
        (5.2, 1.0, _load(False, 0.02), False),  # over it on a quiet host: a miss
        (0.8, 1.0, _load(True, 0.875), True),  # within it: within, whatever the load
        (0.8, None, _load(False, 0.02), None),  # no target
    ],
)
def test_a_time_over_its_target_under_overload_is_unknown(seconds, target, load, verdict) -> None:  # noqa: ANN001
    assert within_target(seconds, target, load.overloaded) is verdict


def check_gate_rows(rows: list[dict], output: str) -> None:
    """A real `bench gate` run's decide() rows and table (called by test_bench_preflight's gate run):
    each row metered on its own, with its flag, its wait share, the others' cores, the whole record and
    decide()'s CPU time, and its verdict the rule's."""
    for r in rows:
        assert isinstance(r["overloaded"], bool) and r["overloaded"] == r["host_load"]["overloaded"]
        assert r["wait_share"] == r["host_load"]["wait_share"] and "others_busy_cores" in r
        assert r["host_load"]["threads"] == 1 and r["best_cpu_s"] >= 0
        assert r["within_target"] is within_target(r["best_s"], r["target_s"], r["overloaded"])
    text = " ".join(output.split())
    assert "best_cpu_s" in text and "wait_share" in text and "overloaded" in text  # the table's columns


def test_an_overloaded_miss_reads_unknown_in_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    """A 1M-row miss timed under overload, as review M's run recorded it: None in the JSON, "unknown
    (host overloaded)" in the table; the other rows as they are."""
    from sparsepilot.commands.bench import UNKNOWN_OVERLOADED, _verdicts
    from sparsepilot.console import print_table

    load = _load(True, 0.875)
    miss = {"mode": "split", "rows": 1_000_000, "best_s": 5.226, "best_cpu_s": 0.52, "target_s": 1.0}
    miss |= {"within_target": within_target(5.226, 1.0, load.overloaded), "overloaded": load.overloaded}
    small = {"mode": "split", "rows": 10_000, "best_s": 0.05, "target_s": None, "within_target": None}
    shown = _verdicts([miss, small])
    assert miss["within_target"] is None and shown[0]["within_target"] == UNKNOWN_OVERLOADED
    assert shown[1] == small  # no target: nothing to say
    print_table("decide() time", shown, columns=["rows", "best_s", "within_target", "overloaded"])
    assert "unknown (host overloaded)" in " ".join(capsys.readouterr().out.split())
