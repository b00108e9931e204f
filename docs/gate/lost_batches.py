"""What dropping a batch that failed its data check did to the gate's false GO (docs/gate.md, "What is
checked"): a sparse arm that breaks numerically on a share f of the requests (NaN logits, so a NaN `loglik`
score) in a shadow step; otherwise it answers exactly as dense (every dense answer right: a broken request
is a loss of 1, so f = margin puts the true difference at exactly -margin).

- before: a NaN score failed the batch's data check and the pilot dropped the whole batch (an INVALID look);
  the kept batches are identical pairs, and the GO test rejects after n* of them. GO by look L is then
  exactly P(Binomial(L, (1 - f)^b) >= ceil(n* / b)) for batches of b requests, one look a batch.
- now: the broken answers are error observations with quality 0 (`rollout.arms.base.usable`), so every
  batch counts; GO by look L is simulated with the GO test `decide` runs (`rollout.gate.sequences.rejects`,
  its capital's running maximum read after the first L * b pairs), REPLICATIONS pilots per (share, batch):
  each pilot is drawn once for the most looks of the grid, and every look count is read from the same
  pilots (GO by look 20 can never be below GO by look 10). The error-rate guardrails would stop many of
  these pilots earlier still (NO-GO); the column is the quality test alone.

Margin 0.03; the GO level of a use case's first pilot, 0.0304 (alpha 0.05 spent over its pilots).

    python docs/gate/lost_batches.py OUT.json [REPLICATIONS]   (docs/gate/lost_batches.json: 40,000)
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np
from scipy.stats import binom

from rollout.gate.quality import prior
from rollout.gate.sequences import paired_stream, rejects
from rollout.gate.settings import GateSettings
from rollout.gate.simulation import clopper_pearson_upper
from rollout.gate.spending import pilot_alpha

MARGIN, ALPHA = 0.03, 0.05
SHARES, BATCHES, LOOKS = (0.03, 0.06), (8, 12, 50), (10, 20)


def main(out: str, replications: int = 40_000) -> None:
    t0 = time.time()
    go_alpha = pilot_alpha(ALPHA, 1)
    kw = prior(GateSettings(margin=MARGIN), "paired", 0.5)
    _, logk = rejects(paired_stream(np.zeros(2000)), -MARGIN, "lower", go_alpha, **kw)
    n_star = int(np.argmax(logk >= math.log(1 / go_alpha))) + 1  # identical pairs the GO test needs
    rng = np.random.default_rng(0)
    rows = []
    print(f"GO level {go_alpha:.4f}: {n_star} identical pairs to GO")
    print("| broken share | batch | looks | before (exact) | now (upper 95%) |")
    target = math.log(1 / go_alpha)
    for f in SHARES:
        for b in BATCHES:
            z = -(rng.random((replications, max(LOOKS) * b)) < f).astype(float)
            _, logk = rejects(paired_stream(z), -MARGIN, "lower", go_alpha, **kw)
            peak = np.maximum.accumulate(logk, axis=-1)
            for looks in LOOKS:
                before = float(binom.sf(math.ceil(n_star / b) - 1, looks, (1 - f) ** b))
                k = int((peak[:, looks * b - 1] >= target).sum())
                row = {
                    "broken_share": f,
                    "batch": b,
                    "looks": looks,
                    "before": before,
                    "now": k / replications,
                }
                row["now_upper95"] = clopper_pearson_upper(k, replications)
                rows.append(row)
                print(
                    f"| {f:g} | {b} | {looks} | {100 * before:.1f}% | {100 * row['now']:.1f}% "
                    f"({100 * row['now_upper95']:.1f}%) |",
                    flush=True,
                )
    meta = {"go_alpha": go_alpha, "identical_pairs_to_go": n_star, "replications": replications}
    meta.update(seconds=round(time.time() - t0, 1), load_average=os.getloadavg())
    with open(out, "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    print(f"{meta['seconds']} s, load {meta['load_average']}")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
