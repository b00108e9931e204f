"""The prefill benchmark on a tiny model: every row carries what the other processes did while it was
timed (timings are printed, never asserted)."""

from __future__ import annotations

from sparse_core.bench import prefill


def test_every_prefill_row_records_the_hosts_load(tiny_llama_dir) -> None:
    result = prefill.run(model_ref=str(tiny_llama_dir), lengths=(512,), taus=(0.9,), kernels=("gather",))
    rows = result["rows"]
    assert [r["plan"] for r in rows] == ["dense", "gather tau=0.9"]
    for r in rows:  # the dense row: the worse of its two timings around the sparse ones
        assert isinstance(r["overloaded"], bool)
        assert r["others_busy_cores"] is None or r["others_busy_cores"] >= 0
        assert r["seconds"] > 0 and r["speedup"] > 0
    load = result["environment"]["host_load"]  # and the whole run's
    assert load["seconds"] > 0 and load["threads"] >= 1
