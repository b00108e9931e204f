"""The prefill benchmark on a tiny model: every row carries what the other processes did while it was
timed (timings are printed, never asserted)."""

from __future__ import annotations

from sparse_core.bench import prefill
from sparse_core.host import HostLoad


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


def _load(overloaded: bool, others: float) -> HostLoad:
    return HostLoad(
        cpus=2.0,
        threads=1,
        seconds=1.0,
        others_busy_cores=others,
        cpu_pressure=None,
        loadavg=None,
        overloaded=overloaded,
        wait_share=0.6 if overloaded else 0.01,
    )


def test_a_sparse_rows_host_record_covers_the_dense_timings_its_speedup_divides_by() -> None:
    """Review M, M2: a busy spell during the dense timings (not the sparse run between them) inflates the
    sparse row's speed-up, so that row is flagged too, with the most cores the others used in any of the
    three timings."""
    fid = {"kl": 0.01, "top1_agreement": 0.99, "delta_nll": 0.0}
    busy, quiet = _load(True, 1.5), _load(False, 0.1)
    rows = prefill.length_rows(1024, (1.3, busy), (1.4, quiet), [("gather", 0.9, 0.5, 0.3, 0.01, fid, quiet)])
    dense, sparse = rows
    assert dense["overloaded"] and dense["others_busy_cores"] == 1.5 and dense["seconds"] == 1.3
    assert sparse["speedup"] == 1.3 / 0.5 and sparse["overloaded"] is True
    assert sparse["others_busy_cores"] == 1.5
    calm = prefill.length_rows(
        1024, (1.3, quiet), (1.4, quiet), [("gather", 0.9, 0.5, 0.3, 0.01, fid, quiet)]
    )
    assert not any(r["overloaded"] for r in calm)
