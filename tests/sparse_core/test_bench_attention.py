"""The attention benchmark's rows carry the host's load (timings are printed, never asserted)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from sparse_core.bench import attention
from sparse_core.host import snapshot


def test_every_attention_row_records_the_hosts_load() -> None:
    """Review M, M3: a row's speed-up divides by the dense timings before and after its sparse one, so
    its `overloaded` and `others_busy_cores` cover all three. Review s52: the row says the density it
    was asked for beside the one it held, and the result why they differ (512 tokens are 8 blocks: the
    sink and local blocks alone keep 41.7%)."""
    result = attention.run(
        lengths=(512,), dtypes=("fp32",), kernels=("gather",), densities=(0.25,), repeats=1
    )
    (row,) = result["rows"]
    assert isinstance(row["overloaded"], bool)
    assert row["others_busy_cores"] is None or row["others_busy_cores"] >= 0
    assert "overloaded" in attention.TABLE_COLUMNS and "others_busy_cores" in attention.TABLE_COLUMNS
    assert row["target_density"] == 0.25 and row["density"] == round(attention.density_floor(8), 4)
    assert "target_density" in attention.TABLE_COLUMNS
    assert result["notes"] == [attention.floor_note(512, 64, (0.25,))]
    assert row["estimator_seconds"] <= row["seconds"]  # of the sparse call kept, a part of it


def test_targets_under_the_floor_of_a_lengths_blocks_are_said() -> None:
    """Review s52: `--lengths 1024` read 0.2279 for the 5%, 10% and 25% targets, three rows that looked
    like three plans, with no target column."""
    assert attention.density_floor(16) == pytest.approx(31 / 136)
    assert attention.floor_note(1024, 64, attention.DENSITIES) == (
        "1,024 tokens (16 blocks of 64): the sink and local blocks alone keep 22.8% of the causal blocks, "
        "so the 5% and 10% targets cannot be reached: the 5%, 10% and 25% rows time that one plan; a longer "
        "--lengths or a smaller --block-size reaches lower densities"
    )
    assert "the 5% target cannot be reached: its row runs at 6.1%" in attention.floor_note(
        4096, 64, attention.DENSITIES
    )
    assert attention.floor_note(8192, 64, attention.DENSITIES) is None


@pytest.mark.parametrize("overloaded", [False, True])
def test_the_estimator_share_is_unknown_where_the_row_was_timed_under_overload(overloaded: bool) -> None:
    """Review s52: an overloaded row read `estimator_share` 2.23 (the pooled estimator's 0.177 s of a
    sparse call slowed to 0.747 s, over a dense 0.079 s timed at a quieter moment)."""
    figures = attention.estimator_figures(0.25, 0.177, 0.747, 0.0792, overloaded)
    if overloaded:
        assert figures == {"estimator_share": None, "ideal_speedup": None, "fraction_of_ideal": None}
    else:
        assert figures["estimator_share"] == pytest.approx(0.177 / 0.0792)
        assert figures["ideal_speedup"] == pytest.approx(1 / (0.25 + 0.177 / 0.0792))
        assert figures["fraction_of_ideal"] == pytest.approx(0.0792 / 0.747 * (0.25 + 0.177 / 0.0792))


def test_a_row_timed_beside_a_process_on_its_cpu_has_no_estimator_share() -> None:
    """A real overload: this process and a spinner pinned to one CPU, so our thread waits about half its
    runnable time (schedstat's measure): the row is flagged and its estimator share unknown."""
    if not hasattr(os, "sched_setaffinity") or snapshot().threads_ns is None:
        pytest.skip("needs sched_setaffinity and schedstat")
    mask, threads = os.sched_getaffinity(0), torch.get_num_threads()
    cpu = min(mask)
    spin = subprocess.Popen(
        [sys.executable, "-c", "import time\nt=time.time()\nprint(flush=True)\nwhile time.time()-t<20: pass"],
        preexec_fn=lambda: os.sched_setaffinity(0, {cpu}),
        stdout=subprocess.PIPE,
    )
    try:
        spin.stdout.readline()  # spinning from now on
        os.sched_setaffinity(0, {cpu})
        torch.set_num_threads(1)
        result = attention.run(
            lengths=(512,), dtypes=("fp32",), kernels=("gather",), densities=(0.5,), repeats=2
        )
    finally:
        os.sched_setaffinity(0, mask)
        torch.set_num_threads(threads)
        spin.kill()
        spin.wait()
    (row,) = result["rows"]
    assert row["overloaded"]
    assert row["estimator_share"] is None and row["fraction_of_ideal"] is None
    assert row["speedup"] > 0  # the speed-up is kept, flagged, as every bench's
