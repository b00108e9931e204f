"""A benchmark's PNG says what its table says of the host: the points timed under overload circled, and a
caption when the run or some of its rows were. The figure travels without the table and the warning (a
slide, a review): it drew a busy host's speed-ups exactly as a quiet host's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sparse_core.bench import attention, common, decode, prefill
from sparse_core.bench.common import pyplot


def _attention(over: list[bool]) -> dict[str, Any]:
    rows = [
        {"seq_len": 1024, "dtype": "fp32", "kernel": "gather", "selection": "eager", "density": d,
         "speedup": 1 / d / 2, "ideal_speedup": 1 / d, "overloaded": o}
        for d, o in zip((0.1, 0.25, 0.5), over, strict=False)
    ]  # fmt: skip
    return {"rows": rows}


def _prefill(over: list[bool]) -> dict[str, Any]:
    dense = {"seq_len": 1024, "tau": None, "density": 1.0, "top1_agreement": 1.0, "speedup": 1.0, "kl": 0.0}
    rows = [
        {"seq_len": 1024, "tau": t, "density": t - 0.5, "top1_agreement": t, "speedup": 2 - t, "kl": 1 - t,
         "overloaded": o}
        for t, o in zip((0.9, 0.95, 0.99), over, strict=False)
    ]  # fmt: skip
    return {"model": "tiny", "rows": [dense | {"overloaded": any(over)}, *rows]}


def _decode(over: list[bool]) -> dict[str, Any]:
    rows = [
        {"seq_len": s, "plan": "quest p16 budget 64, dynamic cache", "dense_cache": "dynamic",
         "ms_per_token": s / 1000, "dense_ms_per_token": s / 500, "overloaded": o}
        for s, o in zip((256, 512, 1024), over, strict=False)
    ]  # fmt: skip
    return {"model": "tiny", "model_rows": rows}


# each bench's result, and how many points an overloaded row circles (decode: the sparse and the dense)
BENCHES = [(attention, _attention, 1), (prefill, _prefill, 1), (decode, _decode, 2)]


def _said(fig: Any) -> list[str]:
    return [t.get_text() for t in fig.texts if t.get_gid() == common.OVERLOAD_NOTE]


def _red_pixels(png: Path) -> int:
    """Pixels of pure red (the circles and the caption) in a written PNG: what a reader of the file sees."""
    img = pyplot().imread(png)
    return int(((img[..., 0] > 0.9) & (img[..., 1] < 0.1) & (img[..., 2] < 0.1)).sum())


def _circled(fig: Any) -> int:
    return sum(
        len(c.get_offsets())
        for ax in fig.axes
        for c in ax.collections
        if c.get_label() == common.OVERLOAD_LABEL
    )


@pytest.mark.parametrize(("bench", "result", "per_row"), BENCHES, ids=["attention", "prefill", "decode"])
def test_a_figure_circles_the_points_timed_under_overload_and_says_so(
    bench: Any, result: Any, per_row: int, tmp_path: Path
) -> None:
    plt = pyplot()
    assert _red_pixels(bench.plot(result([False, True, False]), tmp_path / "over.png")) > 0
    assert _red_pixels(bench.plot(result([False, False, False]), tmp_path / "quiet.png")) == 0
    what = "times" if bench is decode else "speed-ups"
    fig = bench.figure(result([False, True, False]))
    assert _said(fig) == [
        f"1 of 3 points were timed while the host was overloaded (circled in red): their {what} measure the "
        "host as much as the code"
    ]
    assert _circled(fig) == per_row
    plt.close(fig)
    # the run as a whole overloaded (the command's first warning): said even where no row was flagged
    fig = bench.figure(result([False, False, False]) | {"environment": {"host_load": {"overloaded": True}}})
    assert _said(fig) == [
        f"the host was overloaded during this run: its {what} measure the host as much as the code"
    ]
    plt.close(fig)
    # a host that had room: nothing circled, no caption, as before
    fig = bench.figure(result([False, False, False]) | {"environment": {"host_load": {"overloaded": False}}})
    assert _said(fig) == [] and _circled(fig) == 0
    plt.close(fig)
