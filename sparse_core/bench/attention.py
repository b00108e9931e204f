"""One attention layer of SmolLM2's shape (9 query heads, 3 KV heads, head_dim 64), causal:
dense SDPA vs each sparse kernel at held densities, the estimator's time (a training-free one or the
oracle: learned ones need a plan's weights) included and shown apart as its share of dense.

Density is held with the top-k cap (tau = 1, so the cap decides): for a cap k over nb blocks the
kept share of causal blocks is (k*nb - k(k-1)/2) / (nb(nb+1)/2). The sink and local blocks are kept
whatever the cap, so a length of few blocks cannot go below their share (`density_floor`: 22.8% at 1,024
tokens of 64-token blocks): the targets under it run at that floor, one plan timed again, and the result's
`notes` say so beside the rows' `target_density`. Dense is timed (best of the same
repeats) before and after the sparse runs of each (length, dtype) and the faster of the two is used,
so a noisy neighbour on a shared machine penalises dense rather than flattering sparse. On CUDA every
timed call is bracketed by a device synchronisation.

The estimator's time is that of the sparse call kept (the fastest), so it is part of the row's `seconds`;
its share is over the dense time, timed apart: on a row timed under overload a busy spell in either moves
that ratio (2.23 of dense read for the pooled estimator), so `estimator_share`, and the `ideal_speedup` and
`fraction_of_ideal` it enters, are unknown (None) there."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from sparse_core.bench.common import (
    DTYPES,
    RunClock,
    bench_device,
    circle_overloaded,
    load_fields,
    note_overload,
    pyplot,
    save_figure,
    synchronize,
)
from sparse_core.host import HostLoad, HostLoadMeter
from sparse_core.kernels import compiles_selection, sparse_attention
from sparse_core.kernels.dense import dense_attention
from sparse_core.plan import SparsePlan

Q_HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
FULL_LENGTHS = (4096, 8192, 16384, 32768)
QUICK_LENGTHS = (4096, 16384)
DENSITIES = (0.05, 0.10, 0.25, 0.50)
# the sink and local blocks (one each): every query block keeps them, whatever the top-k cap
KEPT_ALWAYS = 2


@dataclass
class AttentionRow:
    seq_len: int
    dtype: str
    kernel: str
    selection: str  # eager | compiled: how the estimator and the selection rule ran
    block_size: int
    target_density: float
    density: float
    estimator_seconds: float  # of the sparse call kept (`seconds`)
    estimator_share: float | None  # estimator_seconds / dense_seconds; None where timed under overload
    seconds: float
    dense_seconds: float
    speedup: float
    ideal_speedup: float | None  # 1 / (density + estimator_share)
    fraction_of_ideal: float | None
    # the host during the sparse timing and the dense ones its speed-up divides by (`load_fields`)
    others_busy_cores: float | None = None
    overloaded: bool = False


def top_k_for_density(n_blocks: int, density: float) -> int:
    causal = n_blocks * (n_blocks + 1) / 2
    k = n_blocks + 0.5 - math.sqrt((n_blocks + 0.5) ** 2 - 2 * density * causal)
    return max(KEPT_ALWAYS, round(k))


def held_density(n_blocks: int, k: int) -> float:
    """The share of the causal blocks a cap of `k` key blocks per query block keeps over `n_blocks`."""
    k = min(k, n_blocks)
    return (k * n_blocks - k * (k - 1) / 2) / (n_blocks * (n_blocks + 1) / 2)


def density_floor(n_blocks: int) -> float:
    """The least density a plan holds over `n_blocks`: the sink and local blocks alone."""
    return held_density(n_blocks, KEPT_ALWAYS)


def floor_note(seq_len: int, block_size: int, targets: Iterable[float]) -> str | None:
    """What a length's rows say where some targets are under the density its blocks allow
    (`density_floor`): those cannot be reached and run at the floor, the plan of the smallest cap, which
    the targets just over it may round to as well (1,024 tokens of 64: 5%, 10% and 25% all read 22.8%);
    None where every target is over the floor."""
    n = math.ceil(seq_len / block_size)
    floor = density_floor(n)
    below = sorted({t for t in targets if t < floor})
    if not below:
        return None
    same = sorted({t for t in targets if top_k_for_density(n, t) == KEPT_ALWAYS})
    what = (
        f"the {_percents(same)} rows time that one plan" if len(same) > 1 else f"its row runs at {floor:.1%}"
    )
    return (
        f"{seq_len:,} tokens ({n} blocks of {block_size}): the sink and local blocks alone keep {floor:.1%} "
        f"of the causal blocks, so the {_percents(below)} target{'s' if len(below) > 1 else ''} cannot be "
        f"reached: {what}; a longer --lengths or a smaller --block-size reaches lower densities"
    )


def _percents(xs: list[float]) -> str:
    """0.05, 0.1, 0.25 -> "5%, 10% and 25%"."""
    words = [f"{x:.0%}" for x in xs]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def _time(fn: Callable[[], Any], repeats: int, device: torch.device) -> tuple[float, Any, HostLoad]:
    """(best of `repeats` timed calls, the result of that best call, the host's load while they ran)."""
    best, result = float("inf"), None
    with HostLoadMeter() as meter:
        for _ in range(repeats):
            synchronize(device)
            t0 = time.perf_counter()
            out = fn()
            synchronize(device)
            if (took := time.perf_counter() - t0) < best:
                best, result = took, out
    assert meter.load is not None
    return best, result, meter.load


def estimator_figures(
    density: float, estimator_s: float, sparse_s: float, dense_s: float, overloaded: bool
) -> dict[str, float | None]:
    """A row's estimator share of the dense time, the ideal speed-up (1 / (density + share)) and the
    fraction of it the kernel reached; all None where the row was timed under overload: the estimator's
    time (of the sparse call) and the dense time were timed apart, and a busy spell in either moves the
    ratio (2.23 of dense read for the pooled estimator)."""
    if overloaded:
        return {"estimator_share": None, "ideal_speedup": None, "fraction_of_ideal": None}
    share = estimator_s / dense_s
    return {
        "estimator_share": share,
        "ideal_speedup": 1.0 / (density + share),
        "fraction_of_ideal": dense_s / sparse_s * (density + share),
    }


def run(
    *,
    quick: bool = False,
    lengths: tuple[int, ...] | None = None,
    dtypes: tuple[str, ...] = ("fp32", "bf16"),
    kernels: tuple[str, ...] = ("gather", "flex"),
    densities: tuple[float, ...] = DENSITIES,
    block_size: int = 64,
    repeats: int = 2,
    estimator: str = "pooled",
    selections: tuple[str, ...] = ("auto",),
    device: str | torch.device = "cpu",
    progress: Callable[[str], None] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    dev = bench_device(device)
    lengths = lengths or (QUICK_LENGTHS if quick else FULL_LENGTHS)
    say = progress or (lambda _msg: None)
    rows: list[AttentionRow] = []
    compile_seconds: dict[str, float] = {}
    gen = torch.Generator().manual_seed(seed)
    clock = RunClock()
    for s in lengths:
        for dname in dtypes:
            dtype = DTYPES[dname]
            q = torch.randn(1, Q_HEADS, s, HEAD_DIM, generator=gen).to(dev, dtype)
            k = torch.randn(1, KV_HEADS, s, HEAD_DIM, generator=gen).to(dev, dtype)
            v = torch.randn(1, KV_HEADS, s, HEAD_DIM, generator=gen).to(dev, dtype)
            say(f"{s} tokens {dname}: dense SDPA")
            with torch.no_grad():
                dense_attention(q, k, v)  # warm-up
                d0, _, load0 = _time(lambda q=q, k=k, v=v: dense_attention(q, k, v), repeats, dev)
                pending: list[tuple[str, str, float, float, float, float, HostLoad]] = []
                n = math.ceil(s / block_size)
                for kern, how in ((kern, how) for kern in kernels for how in selections):
                    compiled = compiles_selection(dev, estimator) if how == "auto" else how == "compiled"
                    how = "compiled" if compiled else "eager"
                    for target in densities:
                        plan = SparsePlan(
                            block_size=block_size,
                            tau=1.0,
                            sink_blocks=1,
                            local_blocks=1,
                            top_k=top_k_for_density(n, target),
                            estimator=estimator,
                        )
                        say(f"{s} tokens {dname}: {kern} ({how} selection) at ~{target:.0%} density")

                        def call(plan=plan, kern=kern, compiled=compiled, q=q, k=k, v=v):
                            return sparse_attention(q, k, v, plan, kernel=kern, compiled_selection=compiled)

                        t0 = time.perf_counter()
                        call()  # warm-up (and compile, for flex)
                        synchronize(dev)
                        if kern == "flex":
                            key = f"{s}/{dname}"
                            compile_seconds.setdefault(key, time.perf_counter() - t0)
                        secs, (_, info), load = _time(call, repeats, dev)
                        pending.append((kern, how, target, info.density, info.estimator_seconds, secs, load))
                d1, _, load1 = _time(lambda q=q, k=k, v=v: dense_attention(q, k, v), repeats, dev)
            dense_s = min(d0, d1)
            for kern, how, target, dens, est, secs, load in pending:
                host = load_fields(load0, load, load1)
                rows.append(
                    AttentionRow(
                        seq_len=s,
                        dtype=dname,
                        kernel=kern,
                        selection=how,
                        block_size=block_size,
                        target_density=target,
                        density=round(dens, 4),
                        estimator_seconds=est,
                        seconds=secs,
                        dense_seconds=dense_s,
                        speedup=dense_s / secs,
                        **estimator_figures(dens, est, secs, dense_s, host["overloaded"]),
                        **host,
                    )
                )
    return {
        "benchmark": "attention",
        "shape": {"q_heads": Q_HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "batch": 1},
        "estimator": estimator,
        "device": str(dev),
        "rows": [asdict(r) for r in rows],
        # the targets a length's blocks cannot reach (`floor_note`), one line per length
        "notes": [x for s in lengths if (x := floor_note(s, block_size, densities))],
        "flex_compile_seconds": compile_seconds,
        **clock.summary(),
    }


TABLE_COLUMNS = [
    "seq_len",
    "dtype",
    "kernel",
    "selection",
    "target_density",
    "density",
    "estimator_share",
    "seconds",
    "dense_seconds",
    "speedup",
    "fraction_of_ideal",
    "others_busy_cores",
    "overloaded",
]


def plot(result: dict[str, Any], path: Path) -> Path:
    return save_figure(figure(result), path)


def figure(result: dict[str, Any]) -> Any:
    """Speed-up against density per length and dtype; the points timed under overload circled, and the
    caption of an overloaded run or of its overloaded points (`note_overload`)."""
    plt = pyplot()

    rows = result["rows"]
    combos = sorted({(r["seq_len"], r["dtype"]) for r in rows})
    fig, axes = plt.subplots(1, len(combos), figsize=(4.2 * len(combos), 3.6), squeeze=False)
    for ax, (s, dname) in zip(axes[0], combos, strict=True):
        sub = [r for r in rows if r["seq_len"] == s and r["dtype"] == dname]
        variants = sorted({(r["kernel"], r.get("selection", "eager")) for r in sub})
        for kern, how in variants:
            pts = sorted(
                (r["density"], r["speedup"])
                for r in sub
                if (r["kernel"], r.get("selection", "eager")) == (kern, how)
            )
            label = kern if len({v[1] for v in variants}) == 1 else f"{kern}, {how} selection"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        first = (sub[0]["kernel"], sub[0].get("selection", "eager"))
        ideal = sorted(
            (r["density"], r["ideal_speedup"])
            for r in sub
            if (r["kernel"], r.get("selection", "eager")) == first and r["ideal_speedup"] is not None
        )
        if ideal:  # none where every point was timed under overload (its estimator share unknown)
            ax.plot([p[0] for p in ideal], [p[1] for p in ideal], "k--", lw=1, label="1/(density+est.)")
        circle_overloaded(ax, [(r["density"], r["speedup"]) for r in sub if r.get("overloaded")])
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{s // 1024}k tokens, {dname}")
        ax.set_xlabel("density (share of causal blocks)")
        ax.set_ylabel("speed-up over dense SDPA")
        ax.legend(fontsize=7)
    note_overload(fig, result.get("environment") or {}, rows, "speed-ups")
    return fig
