"""What a request log's repeated prompts do to a shadow step's false GO (docs/flows.md, "Traffic").

Greedy decoding answers a prompt the same way every time, in both arms, so a repeated prompt repeats its
paired difference. Simulated through the gate's own quality test (`rollout.gate.sequences`, the functions
`decide` runs): a shadow step at the true difference -margin (margin 0.03, alpha 0.05, the bets' prior as
`decide` sets it), its requests drawn from a log in which
- `zipf A`: each request is a prompt drawn from a catalogue of 100,000 with Zipf(A) popularity (FAQ-like
  traffic: the most popular prompts recur over and over);
- `retries P`: each request is, with probability P, a copy of one of the 50 requests before it (clients
  retrying, users asking again), else a new prompt;
and the GO test run on every request ("all": what the pilot did before) and on each prompt's first
request only ("once": what `rollout.traffic` hands out now). False GO after the step's last request, with
the upper end of its 95% Clopper-Pearson interval, over REPLICATIONS simulated steps.

    python docs/flows/repeated_prompts.py OUT.json [REPLICATIONS]
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np

from rollout.gate.quality import prior
from rollout.gate.sequences import paired_stream, rejects
from rollout.gate.settings import GateSettings
from rollout.gate.simulation import SCORE_MODELS, clopper_pearson_upper

CATALOGUE = 100_000
SETTINGS = GateSettings(margin=0.03, alpha=0.05)


def prompt_ids(rng: np.random.Generator, log: str, reps: int, units: int) -> np.ndarray:
    """Which prompt each request of each simulated log carries (reps, units)."""
    kind, value = log.split()
    if kind == "zipf":
        return np.minimum(rng.zipf(float(value), (reps, units)), CATALOGUE) - 1
    ids = np.tile(np.arange(units), (reps, 1))  # every request a new prompt ...
    for t in range(1, units):  # ... or, with probability p, a copy of one of the 50 before it
        copy = rng.random(reps) < float(value)
        back = rng.integers(1, min(50, t) + 1, reps)
        ids[copy, t] = ids[copy, t - back[copy]]
    return ids


def go(z: np.ndarray) -> np.ndarray:
    kw = prior(SETTINGS, "paired", 0.5)
    _, logk = rejects(paired_stream(z), -SETTINGS.margin, "lower", SETTINGS.alpha, **kw)
    return np.maximum.accumulate(logk, axis=-1)[..., -1] >= math.log(1 / SETTINGS.alpha)


def cell(rng: np.random.Generator, scores: str, log: str, units: int, reps: int) -> dict:
    model = SCORE_MODELS[scores]
    ids = prompt_ids(rng, log, reps, units)
    # each (log, prompt) once: its dense score and its sparse one, drawn for the prompts that occur
    keys, where = np.unique(ids + np.arange(reps)[:, None] * (int(ids.max()) + 1), return_inverse=True)
    q = model.control(rng, keys.shape)
    diff = model.degrade(rng, q, -SETTINGS.margin) - q
    z = diff[where.reshape(reps, units)]
    go_all = go(z)
    go_once = np.zeros(reps, dtype=bool)
    repeats = np.zeros(reps)
    for i in range(reps):
        _, first = np.unique(ids[i], return_index=True)
        first.sort()
        repeats[i] = 1 - first.size / units
        go_once[i] = go(z[i, first][None])[0]
    return {
        "scores": scores,
        "log": log,
        "requests": units,
        "repeats": float(repeats.mean()),
        "false_go_all": float(go_all.mean()),
        "false_go_all_upper": clopper_pearson_upper(int(go_all.sum()), reps),
        "false_go_once": float(go_once.mean()),
        "false_go_once_upper": clopper_pearson_upper(int(go_once.sum()), reps),
    }


def main(out: str, reps: int = 4000) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for scores in ("losses", "binary95", "beta8_2"):
        for log in ("retries 0.1", "retries 0.25", "zipf 1.5", "zipf 1.2", "zipf 1.1"):
            for units in (200, 1000):
                r = cell(rng, scores, log, units, reps)
                rows.append(r)
                print(
                    f"{scores:9s} {log:12s} {units:5d} requests: {r['repeats']:.0%} repeats; false GO "
                    f"all {r['false_go_all']:.1%} (<= {r['false_go_all_upper']:.1%}), "
                    f"once {r['false_go_once']:.1%} (<= {r['false_go_once_upper']:.1%})",
                    flush=True,
                )
    with open(out, "w") as f:
        json.dump(
            {"replications": reps, "margin": SETTINGS.margin, "alpha": SETTINGS.alpha, "rows": rows},
            f,
            indent=1,
        )


if __name__ == "__main__":
    main(sys.argv[1], *(int(x) for x in sys.argv[2:3]))
