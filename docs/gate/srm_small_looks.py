"""The sample-ratio check's false INVALID on healthy split steps (docs/gate.md, "What is checked"): Pearson's
chi-square (the check before review S4) against the exact binomial test (`rollout.gate.inputs.srm_test`
now), both at p < 0.001, at every look of a step judged cumulatively, at the sample specs' real look sizes
(a look = one pilot batch of `rollout.batch_size` requests, up to `gate.max_looks`) and at larger ones.
The sparse-arm count of each batch is drawn Binomial(batch, share); the exact p-values come from a table
per look size (the two-sided rule scipy's binomtest uses, spot-checked against `srm_test`). False INVALID
at some look, at look 1 and at the last look (where it is a NO-GO, `max-duration-invalid`), with the 95%
Clopper-Pearson interval of the first, over REPLICATIONS steps.

    python docs/gate/srm_small_looks.py OUT.json [REPLICATIONS]
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
from scipy import stats

from rollout.gate.inputs import srm_test
from rollout.gate.simulation import clopper_pearson_upper

LEVEL = 0.001
# (name, sparse share, requests a look, looks): the three sample specs' split steps, then smaller and larger
CELLS = [
    ("docs-qa step 1", 0.05, 12, 20),
    ("docs-qa step 2", 0.25, 12, 20),
    ("docs-qa step 3", 0.50, 12, 20),
    ("longdoc-summaries step 1", 0.10, 8, 10),
    ("longdoc-summaries step 2", 0.50, 8, 10),
    ("support-chat step 1", 0.10, 12, 10),
    ("support-chat step 2", 0.50, 12, 10),
    ("1% share, batch 12", 0.01, 12, 20),
    ("1% share, batch 50", 0.01, 50, 20),
    ("5% share, 8 sparse rows a look", 0.05, 160, 20),
    ("5% share, 200 sparse rows a look", 0.05, 4000, 20),
    ("50% share, 200 sparse rows a look", 0.50, 400, 20),
]


def exact_p_table(n: int, share: float) -> np.ndarray:
    """The exact two-sided binomial p-value of every sparse count 0..n: the probability of the counts no
    more likely than it (scipy's rule, relative tolerance 1e-7)."""
    pmf = stats.binom.pmf(np.arange(n + 1), n, share)
    ranked = np.sort(pmf)
    cum = np.cumsum(ranked)
    return np.minimum(1.0, cum[np.searchsorted(ranked, pmf * (1 + 1e-7), side="right") - 1])


def cell(share: float, batch: int, looks: int, replications: int, rng: np.random.Generator) -> dict:
    n = np.arange(1, looks + 1) * batch
    n_t = rng.binomial(batch, share, (replications, looks)).cumsum(axis=1)
    expected = n * share
    chi2 = (n_t - expected) ** 2 / expected + (n_t - expected) ** 2 / (n - expected)
    pearson = stats.chi2.sf(chi2, 1) < LEVEL
    tables = [exact_p_table(int(m), share) for m in n]
    exact = np.stack([tables[j][n_t[:, j]] for j in range(looks)], axis=1) < LEVEL
    for j in (0, looks - 1):  # the gate's own function says the same
        k = int(n_t[0, j])
        assert np.isclose(srm_test(int(n[j]) - k, k, share)[1], tables[j][k], rtol=1e-9, atol=1e-15)
    out = {}
    for name, bad in (("pearson", pearson), ("exact", exact)):
        k = int(bad.any(axis=1).sum())
        out[name] = {
            "some_look": k / replications,
            "some_look_upper": clopper_pearson_upper(k, replications),
            "look_1": float(bad[:, 0].mean()),
            "last_look": float(bad[:, -1].mean()),
            "largest_size_at_one_look": max(size(int(m), share, name) for m in n),  # exact, not simulated
        }
    return out


def size(n: int, share: float, test: str) -> float:
    """The probability that one look of n requests is called a mismatch on a healthy split, exactly."""
    k = np.arange(n + 1)
    if test == "exact":
        refused = exact_p_table(n, share) < LEVEL
    else:
        e = n * share
        refused = stats.chi2.sf((k - e) ** 2 / e + (k - e) ** 2 / (n - e), 1) < LEVEL
    return float(stats.binom.pmf(k[refused], n, share).sum())


def main(out: str, replications: int = 20_000) -> None:
    rng = np.random.default_rng(20261207)
    start = time.perf_counter()
    results = {}
    for name, share, batch, looks in CELLS:
        r = results[name] = {"share": share, "batch": batch, "looks": looks}
        r.update(cell(share, batch, looks, replications, rng))
        c, e = r["pearson"], r["exact"]
        print(
            f"{name:34s} pearson {100 * c['some_look']:.2f}% (one look up to "
            f"{100 * c['largest_size_at_one_look']:.3f}%)  exact {100 * e['some_look']:.2f}% (upper "
            f"{100 * e['some_look_upper']:.2f}%; one look up to {100 * e['largest_size_at_one_look']:.3f}%, "
            f"last look {100 * e['last_look']:.3f}%)"
        )
    seconds = time.perf_counter() - start
    json.dump({"replications": replications, "level": LEVEL, "seconds": seconds, "cells": results},
              open(out, "w"), indent=1)  # fmt: skip
    print(f"{seconds:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
