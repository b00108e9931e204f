"""Plot equal_eps.py's JSON: density each estimator needs at a dropped-mass eps (solid: tau-mass,
dashed: threshold rule). Usage: python docs/calibration/plot_equal_eps.py IN.json [IN2.json ...] OUT.png"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

*inputs, out = sys.argv[1:]
results = [json.load(open(p)) for p in inputs]
fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 3.8), squeeze=False)
for ax, res in zip(axes[0], results, strict=True):
    for ci, (name, rules) in enumerate(res["density"].items()):
        for rule, style in (("tau", "-"), ("threshold", "--")):
            if rule in rules:
                label = name if rule == "tau" else None
                ax.plot(res["eps"], rules[rule], style, color=f"C{ci}", marker=".", label=label)
    ax.set_xscale("log")
    ax.set_xticks(res["eps"], [f"{e:g}" for e in res["eps"]], fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel("dense attention mass dropped per head (eps)")
    ax.set_ylabel("density (share of causal blocks)")
    ax.set_title(f"{res['seq_len']} tokens (solid: tau-mass, dashed: threshold)", fontsize=9)
    ax.grid(alpha=0.3)
axes[0][0].legend(fontsize=7)
fig.tight_layout()
fig.savefig(out, dpi=110)
