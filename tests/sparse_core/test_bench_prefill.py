"""The prefill benchmark on a tiny model: every row carries what the other processes did while it was
timed (timings are printed, never asserted)."""

from __future__ import annotations

from sparse_core.bench import prefill
from sparse_core.host import HostLoad


def test_every_prefill_row_records_the_hosts_load(tiny_llama_dir) -> None:
    # 4,096 tokens are over the tiny model's 2,048 positions: not timed, and said (review M, M4)
    result = prefill.run(model_ref=str(tiny_llama_dir), lengths=(512, 4096), taus=(0.9,), kernels=("gather",))
    rows = result["rows"]
    assert [r["plan"] for r in rows] == ["dense", "gather tau=0.9"]
    assert result["lengths_over_context"] == [4096] and result["context"] == 2048
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


def test_lengths_none_of_which_fit_the_model_are_an_error_line(tiny_llama_dir, tmp_path) -> None:
    """Review M, M4: an empty table and exit 0 was the answer to lengths over the model's positions."""
    from typer.testing import CliRunner

    from sparsepilot.cli import app

    out = tmp_path / "prefill.json"
    args = ["bench", "prefill", "--model", str(tiny_llama_dir), "--kernels", "gather", "--out", str(out)]
    res = CliRunner().invoke(app, [*args, "--lengths", "4096,8192"])
    assert res.exit_code == 2, res.output
    said = " ".join(res.output.split())
    assert "error: --lengths:" in said and "4,096, 8,192 tokens; the model has 2,048 positions" in said
    assert not out.exists()
    res = CliRunner().invoke(app, [*args, "--quick"])  # the quick mode's 8,192 tokens
    assert res.exit_code == 2 and "error: --quick:" in res.output and "8,192 tokens" in res.output
