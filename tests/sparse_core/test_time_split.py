"""sparse_core.time_split: where a sparse prefill's time goes, and the speed-up its density allows."""

from __future__ import annotations

import pytest

from sparse_core.time_split import split_prefill


def test_split_of_a_known_prefill() -> None:
    # dense 60 s of which 36 s attention; sparse: 24 s rest + 2 s scoring + 20 s kernel, density 0.5
    t = split_prefill([59.0, 60.0, 61.0], [46.0, 46.5, 45.5], [2.0, 2.0, 2.0], [20.0, 20.5, 19.5], 0.5)
    assert t.dense_seconds == 60.0 and t.scoring_seconds == 2.0 and t.kernel_seconds == 20.0
    assert t.rest_seconds == pytest.approx(24.0)
    assert t.attention_share == pytest.approx(0.6)
    assert t.attention_speedup == pytest.approx(36.0 / 22.0)
    # a perfect kernel at density 0.5: 24 + 18 = 42 s
    assert t.ideal_speedup == pytest.approx(60.0 / 42.0)
    assert set(t.to_dict()) == {
        "dense_seconds",
        "scoring_seconds",
        "kernel_seconds",
        "rest_seconds",
        "attention_share",
        "attention_speedup",
        "ideal_speedup",
    }


def test_rest_is_the_median_of_each_runs_remainder() -> None:
    # the parts' medians need not add up; the rest is taken run by run, then its median
    t = split_prefill([10.0], [8.0, 9.0, 20.0], [1.0, 3.0, 1.0], [4.0, 1.0, 4.0], 0.4)
    assert t.rest_seconds == pytest.approx(5.0)  # runs' rests 3, 5, 15


def test_noise_that_hides_the_attention_time_gives_no_ratios() -> None:
    # the sparse run's rest exceeds the whole dense prefill: the inferred attention time is negative
    t = split_prefill([10.0, 10.0], [12.0, 12.0], [0.5, 0.5], [1.0, 1.0], 0.5)
    assert t.rest_seconds == pytest.approx(10.5)
    assert t.attention_share is None and t.attention_speedup is None and t.ideal_speedup is None


def test_unknown_density_leaves_only_the_ideal_out() -> None:
    t = split_prefill([10.0], [8.0], [0.5], [3.5], None)
    assert t.attention_share == pytest.approx(0.6) and t.attention_speedup == pytest.approx(1.5)
    assert t.ideal_speedup is None


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (([], [1.0], [0.1], [0.5], 0.5), "at least one dense and one sparse"),
        (([1.0], [1.0, 1.0], [0.1], [0.5, 0.5], 0.5), "one scoring and one kernel time per sparse prefill"),
        (([1.0, 0.0], [1.0], [0.1], [0.5], 0.5), "dense prefill times must be positive"),
        (([1.0], [float("nan")], [0.1], [0.5], 0.5), "sparse prefill times must be positive"),
    ],
)
def test_bad_timings_are_refused(args, match) -> None:
    with pytest.raises(ValueError, match=match):
        split_prefill(*args)
