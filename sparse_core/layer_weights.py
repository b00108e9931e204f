"""Per-layer weights on the allocation's error: how much a layer's attention error moves the output.

The allocation's `eps` bounds each head's own error (dropped mass, or the relative error of the
attention output), the same in every layer. Layers differ in what that error does to the next-token
distribution: on SmolLM2 at 8k (docs/calibration.md, "Layers differ in what their error costs"),
each layer of a calibrated gate_v2 plan sparsified alone caused between 4e-6 and 4.3e-4 of KL against
dense (layer 5: 24% of the whole plan's KL; layers 0, 3, 4, 6, 10, 11, 25, 27, 29: under 1% each),
and the layers' KLs added up to 96% of the whole plan's. A uniform `eps` spends the budget where it
buys least. Measured at the budget, this weighting bought no density at 8k and 2.5-5% at 4k, inside
the 4k search's own noise (the same section): weights from one window do not carry to other text
well. Off by default.

`CalibrationLimits.layer_weights="kl"`: before the eps search, calibration takes a reference plan
(`reference_eps`: the allocation whose predicted density is nearest `REFERENCE_DENSITY`),
sparsifies each of its sparse layers alone on one sensitivity window, and measures that layer's KL
against dense. Never the held-out windows: the candidate plans must stay fixed with respect to the
evidence that judges them (`eps_search`). For small errors the KL grows with the square of the
error (a second-order expansion around dense), KL_l ~ c_l e_l^2 with every head's e_l near the
reference eps, so each layer's errors are scaled by sqrt(KL_l) relative to the layers' geometric
mean (`layer_scales`). One eps then bounds every layer's estimated share of the output KL; with a
density that falls about logarithmically with the error, that is also where one more unit of KL buys
the same density in every layer (the Lagrange condition). Scales are clipped to [1/CLIP, CLIP] (one
window's KL of a quiet layer is noisy), and a layer that is dense at the reference keeps scale 1.

Pure functions here; calibration runs the forwards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

MODES = ("none", "kl")
REFERENCE_DENSITY = 0.5  # the reference plan: sparse enough that every layer errs, still small errors
CLIP = 4.0  # a layer's scale stays within [1/CLIP, CLIP] of the geometric mean


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"layer_weights must be one of {MODES}, got {mode!r}")
    return mode


def reference_eps(candidates: Sequence[float], predicted_density: Sequence[float]) -> float:
    """The candidate eps whose predicted plan density is nearest `REFERENCE_DENSITY` (ties: the
    smaller eps, the denser plan)."""
    if not candidates or len(candidates) != len(predicted_density):
        raise ValueError("reference_eps needs one predicted density per candidate eps")
    best = min(range(len(candidates)), key=lambda i: (abs(predicted_density[i] - REFERENCE_DENSITY), i))
    return float(candidates[best])


def layer_scales(layer_kl: Sequence[float | None], clip: float = CLIP) -> list[float]:
    """Per layer sqrt(KL_l) over the geometric mean of sqrt(KL) of the layers measured with KL > 0,
    clipped to [1/clip, clip]; 1.0 for a layer not measured (None: dense at the reference) or with
    KL 0 (its error moved nothing measurable)."""
    if clip < 1:
        raise ValueError(f"clip must be >= 1, got {clip}")
    logs = [0.5 * math.log(k) for k in layer_kl if k is not None and k > 0]
    if not logs:
        return [1.0] * len(layer_kl)
    mid = sum(logs) / len(logs)
    out = []
    for k in layer_kl:
        if k is None or k <= 0:
            out.append(1.0)
        else:
            out.append(min(clip, max(1.0 / clip, math.exp(0.5 * math.log(k) - mid))))
    return out


__all__ = ["CLIP", "MODES", "REFERENCE_DENSITY", "check_mode", "layer_scales", "reference_eps"]
