"""What a file's row order does to the gate's false GO (docs/gate.md, "The order of the evidence"): an
imported export's, and a captured request log's.

A shadow export of N pairs at a true difference of exactly -margin (margin 0.03, alpha 0.05, the bets'
prior as `decide` sets it): every dense answer right; the sparse model loses a request (score 1 -> 0)
with a probability that depends on the request's prompt length (lognormal), scaled so that the mean loss
is the margin:
- `flat`: the same on every request;
- `grows with length`: in proportion to the length's rank;
- `long prompts only`: only on the longest fifth.
The GO test (`rollout.gate.sequences.rejects`, the test `decide` runs) is run on the pairs in four
orders: random (arrival), sorted by latency (= prompt length: the export's or the log's order, which both
kept until they were fixed), the order the import stores now (`rollout.pilots.stream_key`, a salted hash
of the request id) and the order a request log hands its requests out in now
(`rollout.traffic.traffic_order_key`, another salted hash); a fresh salt per replication. False GO with
the upper end of its 95% Clopper-Pearson interval, over REPLICATIONS files.

    python docs/gate/import_order.py OUT.json [REPLICATIONS]
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from rollout.gate.quality import prior
from rollout.gate.sequences import paired_stream, rejects
from rollout.gate.settings import GateSettings
from rollout.gate.simulation import clopper_pearson_upper
from rollout.pilots import stream_key
from rollout.traffic import traffic_order_key

PAIRS = 1000
MARGIN, ALPHA = 0.03, 0.05
PATTERNS = {
    "flat": lambda rank: np.ones_like(rank),
    "grows with length": lambda rank: rank,
    "long prompts only": lambda rank: (rank > 0.8).astype(float),
}


def main(out: str, replications: int = 2000) -> None:
    t0 = time.time()
    kw = prior(GateSettings(margin=MARGIN), "paired", 0.5)
    rng = np.random.default_rng(0)
    ids = [f"req-{i:05d}" for i in range(PAIRS)]
    stored, logged = (
        np.stack([np.argsort([key(rid, f"pilot-{r}") for rid in ids]) for r in range(replications)])
        for key in (stream_key, traffic_order_key)
    )
    length = rng.lognormal(7.5, 0.8, (replications, PAIRS))
    by_length = length.argsort(axis=1)
    rank = by_length.argsort(axis=1) / (PAIRS - 1)
    rows = []
    for name, pattern in PATTERNS.items():
        p = pattern(rank)
        p = p * MARGIN / p.mean(axis=1, keepdims=True)
        z = -(rng.random((replications, PAIRS)) < p).astype(float)  # q_sparse - q_dense
        for order, index in (
            ("random (arrival)", None),
            ("sorted by latency", by_length),
            ("as stored now", stored),
            ("a request log, handed out now", logged),
        ):
            zz = z if index is None else np.take_along_axis(z, index, axis=1)
            go, _ = rejects(paired_stream(zz), -MARGIN, "lower", ALPHA, **kw)
            k = int(go.sum())
            row = {"pattern": name, "order": order, "false_go": k / replications}
            row["upper95"] = clopper_pearson_upper(k, replications)
            rows.append(row)
            print(
                f"| {name} | {order} | {100 * row['false_go']:.1f}% ({100 * row['upper95']:.1f}%) |",
                flush=True,
            )
    meta = {"pairs": PAIRS, "replications": replications, "seconds": round(time.time() - t0, 1)}
    meta["load_average"] = os.getloadavg()
    with open(out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"{meta['seconds']} s, load {meta['load_average']}")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
