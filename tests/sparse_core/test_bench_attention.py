"""The attention benchmark's rows carry the host's load (timings are printed, never asserted)."""

from __future__ import annotations

from sparse_core.bench import attention


def test_every_attention_row_records_the_hosts_load() -> None:
    """Review M, M3: a row's speed-up divides by the dense timings before and after its sparse one, so
    its `overloaded` and `others_busy_cores` cover all three."""
    result = attention.run(
        lengths=(512,), dtypes=("fp32",), kernels=("gather",), densities=(0.25,), repeats=1
    )
    (row,) = result["rows"]
    assert isinstance(row["overloaded"], bool)
    assert row["others_busy_cores"] is None or row["others_busy_cores"] >= 0
    assert "overloaded" in attention.TABLE_COLUMNS and "others_busy_cores" in attention.TABLE_COLUMNS
