"""Does prefill calibration's fidelity bound hold on a use case's unseen prompts? Its unit is a block
of 256 scored positions of the held-out windows; decode's unit turned out to need to be a prompt
(decode_bound_unit.py). Measured, not simulated (1 torch thread; SmolLM2; docs/sparse_core.md, "Does
the prefill margin hold on unseen prompts?"):

    python docs/sparse_core/prefill_bound_unit.py measure DATASET.jsonl SEQ_LEN OUT.json \
        [ESTIMATOR] [BUDGET] [CONFIDENCE] [BOUND_UNIT] [MAX_TEXTS]
    python docs/sparse_core/prefill_bound_unit.py analyse RESULT.json MEASURED.json [MEASURED.json ...]

`measure` (~17-23 min at 2k) calibrates a plan as the calibrate flow would on the dataset's prompts
(calibration's own split, MAX_TEXTS windows of SEQ_LEN, default 16, of which a quarter are held out;
judged on the means, or on bounds at CONFIDENCE by BOUND_UNIT, block or window), then runs it beside
dense on every window the held-out prompts pack into (calibration's held-out windows are the first
of them) and keeps each window's `Fidelity.blocks` and which prompts it holds. That pool stands for
the use case's prompts the plan has not seen.

`analyse` (about a minute a file) draws w windows from each pool 10,000 times and judges each draw with
`fidelity_bound` itself, as a calibration step is judged: how often KL's and delta NLL's upper bound
falls below the pool's mean, and agreement's lower bound above it. Two draws: "random" (windows with
replacement) and "packed" (the windows of prompts drawn with replacement, in packing order, as
calibration takes its held-out windows); two units: blocks of 256 positions (calibration's) and
whole windows. Also the share of the variance of the blocks' means that lies between windows
(one-way ANOVA). It prints a markdown table and writes RESULT.json (the analysis and the measured
pools; RESULT.json is also accepted as input, so the table can be redrawn from the committed file).
"""

from __future__ import annotations

import itertools
import json
import sys
import time

import numpy as np

from sparse_core.eps_search import step_alpha

# nominal 95%, and the level each step of a 95% search with the default 7 checks is judged at
BOUND_LEVELS = (0.95, 1 - step_alpha(0.05, 7))
DRAWS = 10_000


def measure(
    dataset: str,
    seq_len: str,
    out: str,
    estimator: str = "pooled",
    budget: str = "",
    confidence: str = "",
    bound_unit: str = "block",
    max_texts: str = "16",
) -> None:
    import torch

    from sparse_core import load_model
    from sparse_core.bench.common import environment
    from sparse_core.calibration import CalibrationLimits, calibrate, split_texts
    from sparse_core.corpus import pack_token_windows
    from sparse_core.fidelity import dense_reference, measure_fidelity
    from sparse_core.host import loadavg
    from sparse_core.retrofit import sparsified

    torch.set_num_threads(1)
    load_before, t0 = loadavg(), time.perf_counter()
    budget = budget or "kl=0.01,agree=0.98,nll=0.01"
    model, tok = load_model("smollm2-135m", progress=False)
    with open(dataset, encoding="utf-8") as fh:
        texts = [json.loads(line)["prompt"] for line in fh if line.strip()]
    lim = CalibrationLimits(
        max_texts=int(max_texts),
        max_seq_len=int(seq_len),
        confidence=float(confidence) if confidence else None,
        bound_unit=bound_unit,
    )

    def say(what: str, done: int, total: int) -> None:
        print(f"{time.strftime('%H:%M:%S')} calibrate {what} {done}/{total}", flush=True)

    plan, rep = calibrate(model, tok, texts, budget, estimator=estimator, limits=lim, progress=say)
    _, held = split_texts(texts, lim.holdout_fraction, 0)
    windows = pack_token_windows(tok, held, lim.max_seq_len, 10_000, seed=1, min_length=lim.max_seq_len)
    sources = window_sources(tok, held, windows, seed=1)
    rows = []
    for i, w in enumerate(windows):
        ref = dense_reference(model, [w], fraction=lim.fidelity_fraction)
        with sparsified(model, plan):
            fid = measure_fidelity(model, ref)
        rows.append({"blocks": fid.blocks, "kl": fid.kl, "agree": fid.agree, "texts": sources[i]})
        print(f"window {i + 1}/{len(windows)}: KL {fid.kl:.4f} agreement {fid.agree:.4f}", flush=True)
    result = {
        "dataset": dataset,
        "seq_len": int(seq_len),
        "estimator": estimator,
        "budget": budget,
        "confidence": lim.confidence,
        "bound_unit": lim.bound_unit,
        "calibration": {k: rep.to_dict()[k] for k in ("met_budget", "fidelity", "density", "eps")},
        "heldout_windows_in_calibration": lim.heldout_windows,
        "windows": rows,
        "seconds": time.perf_counter() - t0,
        "environment": environment(load_before),
    }
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)


def window_sources(tok, texts: list[str], windows: list[list[int]], *, seed: int) -> list[list[int]]:
    """Which texts (their indices) each of these full windows of `pack_token_windows(tok, texts, ...,
    seed=seed)` holds. The packing is replayed (the same shuffle, one EOS after each text) and checked
    against `windows`, so a change to the packing fails here instead of mislabelling windows."""
    import random

    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    sep = [tok.eos_token_id] if tok.eos_token_id is not None else []
    stream: list[int] = []
    owner: list[int] = []
    for i in order:
        ids = tok(texts[i], add_special_tokens=False)["input_ids"] + sep
        stream += ids
        owner += [i] * len(ids)
    length = len(windows[0])
    spans = [(j * length, (j + 1) * length) for j in range(len(windows))]
    if any(stream[a:b] != w for (a, b), w in zip(spans, windows, strict=True)):
        raise ValueError("window_sources: the replayed packing differs from pack_token_windows'")
    return [sorted(set(owner[a:b])) for a, b in spans]


def _draws(groups: list[list[int]], w: int, design: str, rng: np.random.Generator) -> np.ndarray:
    """[DRAWS, w] window indices. "random": w windows with replacement (the pool is the population);
    "packed": as calibration takes its held-out windows, the first w of the windows of texts drawn
    with replacement, in their packing order (`groups`: the pool's windows by their first text)."""
    n = sum(len(g) for g in groups)
    if design == "random":
        return rng.integers(0, n, size=(DRAWS, w))
    out = np.empty((DRAWS, w), dtype=int)
    for r in range(DRAWS):
        run: list[int] = []
        while len(run) < w:
            run += groups[rng.integers(len(groups))]
        out[r] = run[:w]
    return out


def _bounds(blocks: np.ndarray, confidence: float) -> np.ndarray:
    """[DRAWS, 3]: KL's upper, agreement's lower and delta NLL's upper bound of each draw's blocks
    ([DRAWS, B, 6], `Fidelity.blocks` rows), by `fidelity_bound` itself, as calibration judges them."""
    from sparse_core.fidelity import Fidelity
    from sparse_core.fidelity_bound import fidelity_bound

    out = []
    for draw in blocks:
        b = fidelity_bound(Fidelity.from_blocks([tuple(r) for r in draw]), confidence)
        out.append((b.kl, b.agree, b.nll_delta))
    return np.array(out)


def analyse(out: str, paths: list[str]) -> None:
    rng = np.random.default_rng(0)
    lv = BOUND_LEVELS[1]
    print(
        "| data | windows (texts) | KL mean, between-window share | agreement mean, share | draw | w | unit "
        f"| KL upper < mean at 0.95 / {lv:.4g} | agreement lower > mean at 0.95 / {lv:.4g} "
        f"| delta NLL upper < mean at 0.95 / {lv:.4g} |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    summary = []
    measured = []
    for path in paths:  # `measure`'s JSON, or an earlier RESULT.json (its "measured")
        with open(path, encoding="utf-8") as fh:
            d = json.load(fh)
        measured += d.get("measured", [d])
    for d in measured:
        rows = d["windows"]
        nb = min(len(r["blocks"]) for r in rows)
        arr = np.array([r["blocks"][:nb] for r in rows], dtype=float)  # [windows, blocks, 6]
        pos, kl, agree, dnll, nll = arr[..., 0], arr[..., 1], arr[..., 2], arr[..., 4], arr[..., 5]
        mean = {
            "kl": kl.sum() / pos.sum(),
            "agree": agree.sum() / pos.sum(),
            "nll_delta": dnll.sum() / nll.sum(),
        }
        share = {}
        for key, x in (("kl", kl / pos), ("agree", agree / pos)):
            within = x.var(axis=1, ddof=1).mean()  # one-way ANOVA on the blocks' means
            between = max(x.mean(axis=1).var(ddof=1) - within / nb, 0.0)
            share[key] = between / (between + within)
        first = [r["texts"][0] for r in rows]
        groups = [[i for i, t in enumerate(first) if t == u] for u in dict.fromkeys(first)]
        judged = f"bounds at {d['confidence']}" if d.get("confidence") else "means"
        name = f"{d['dataset'].rsplit('/', 1)[-1]} {d['seq_len']} {d['estimator']} on {judged}"
        for design, w, unit in itertools.product(
            ("packed", "random"), (2, 4, 8, 16), ("256 positions", "window")
        ):
            idx = _draws(groups, w, design, rng)
            # one block a window (its sums), or the window's blocks of 256 positions
            drawn = arr[idx].sum(2, keepdims=True) if unit == "window" else arr[idx]
            drawn = drawn.reshape(len(idx), -1, arr.shape[-1])
            keys = ("kl", "agree", "nll_delta")
            miss, finite = {}, {}
            for lvl in BOUND_LEVELS:
                bound = _bounds(drawn, lvl)
                # too few units for the level: the bound is infinite and can never miss, nor say anything
                finite[f"{lvl:.4g}"] = float(np.mean(np.isfinite(bound[:, 0])))
                for j, key in enumerate(keys):
                    wrong = bound[:, j] > mean[key] if key == "agree" else bound[:, j] < mean[key]
                    miss[f"{key}@{lvl:.4g}"] = float(np.mean(wrong))
            cells = [
                f"{100 * miss[f'{m}@{lvl:.4g}']:.1f}%" if finite[f"{lvl:.4g}"] else "no bound"
                for m in keys
                for lvl in BOUND_LEVELS
            ]
            print(
                f"| {name} | {len(rows)} ({len(groups)}) | {mean['kl']:.4f}, {share['kl']:.2f} "
                f"| {mean['agree']:.4f}, {share['agree']:.2f} | {design} | {w} | {unit} "
                f"| {cells[0]} / {cells[1]} | {cells[2]} / {cells[3]} | {cells[4]} / {cells[5]} |"
            )
            summary.append(
                {
                    "data": name,
                    "windows": len(rows),
                    "texts": len(groups),
                    "design": design,
                    "w": w,
                    "unit": unit,
                    "draws": DRAWS,
                    "mean": mean,
                    "between_share": share,
                    "miss": miss,
                    "finite": finite,  # share of draws whose bound is finite, by level
                }
            )
    with open(out, "w", encoding="utf-8") as fh:
        json.dump({"analysis": summary, "measured": measured}, fh, indent=1)


if __name__ == "__main__":
    if sys.argv[1] == "measure":
        measure(*sys.argv[2:])
    elif sys.argv[1] == "analyse":
        analyse(sys.argv[2], sys.argv[3:])
    else:
        raise SystemExit(__doc__)
