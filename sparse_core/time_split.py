"""Where a sparse prefill's time goes, and the speed-up its density allows (Amdahl's law).

A whole-model speed-up mixes two things: how much faster attention got, and how much of the prefill
attention was to begin with. The sparse arm's timings split themselves: the retrofit times every
attention call's scoring (estimator + selection) and its kernel, and the rest of the forward
(projections, MLP, norms, the LM head, the retrofit's own bookkeeping) is what is left. The dense arm
runs the same non-attention work, so its attention time is inferred as the dense prefill less the sparse
arm's rest; from that follow attention's share of the dense prefill, attention's own speed-up, and the
speed-up a perfect kernel would give at the plan's density (attention time proportional to the kept
blocks, scoring free): ``dense / (rest + density * (dense - rest))``. A measured speed-up well below that
is the kernel's or the scorer's cost; one close to it can grow only with a lower density.

The inference is as good as the two arms' rest agree: each is a median over the repeats of the same
timing window, so on a steady host they differ by the run-to-run noise (a few percent at 8k on this
CPU). When the noise makes the inferred dense attention time zero or negative, the split says nothing
(None) rather than print a meaningless ratio.

Pure functions; the evaluation (sparse_core.evaluation.measure_speed) feeds them its timings.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class TimeSplit:
    dense_seconds: float  # median dense prefill
    scoring_seconds: float  # median over the sparse runs: estimator + selection, every layer
    kernel_seconds: float  # median: the attention kernels (dense layers' attention included)
    rest_seconds: float  # median of sparse run - scoring - kernel: everything but attention
    attention_share: float | None  # inferred dense attention / dense prefill
    attention_speedup: float | None  # inferred dense attention / (scoring + kernel)
    ideal_speedup: float | None  # dense / (rest + density * dense attention): a perfect kernel, free scoring

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def split_prefill(
    dense_seconds: Sequence[float],
    sparse_seconds: Sequence[float],
    scoring_seconds: Sequence[float],
    kernel_seconds: Sequence[float],
    density: float | None,
) -> TimeSplit:
    """dense_seconds: the dense arm's prefills; sparse/scoring/kernel_seconds: per sparse prefill, its
    total and the retrofit's scoring and kernel time within it (equal lengths); density: the plan's
    density on the timed window (dense layers count 1.0), None when unknown."""
    n = len(sparse_seconds)
    if not dense_seconds or n == 0:
        raise ValueError("a time split needs at least one dense and one sparse prefill")
    if len(scoring_seconds) != n or len(kernel_seconds) != n:
        raise ValueError(
            f"one scoring and one kernel time per sparse prefill: got {n} prefills, "
            f"{len(scoring_seconds)} scoring and {len(kernel_seconds)} kernel times"
        )
    for name, xs in (("dense", dense_seconds), ("sparse", sparse_seconds)):
        if any(not x > 0 for x in xs):
            raise ValueError(f"{name} prefill times must be positive, got {list(xs)}")
    dense = statistics.median(dense_seconds)
    scoring = statistics.median(scoring_seconds)
    kernel = statistics.median(kernel_seconds)
    parts = zip(sparse_seconds, scoring_seconds, kernel_seconds, strict=True)
    rest = statistics.median(s - e - k for s, e, k in parts)
    attention = dense - rest
    share = speedup = ideal = None
    if attention > 0 and rest > 0:
        share = attention / dense
        if scoring + kernel > 0:
            speedup = attention / (scoring + kernel)
        if density is not None and 0 < density <= 1:
            ideal = dense / (rest + density * attention)
    return TimeSplit(
        dense_seconds=dense,
        scoring_seconds=scoring,
        kernel_seconds=kernel,
        rest_seconds=rest,
        attention_share=share,
        attention_speedup=speedup,
        ideal_speedup=ideal,
    )
