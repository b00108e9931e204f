"""What prefill calibration's fidelity bound takes as its unit (`CalibrationLimits.bound_unit`) and how
many held-out units it needs (`CalibrationLimits.confidence`). Torch-free, so a spec can be checked
without a model.

The bound (`fidelity_bound`) treats its units as independent draws. Two units:

- "block" (the default): `BLOCK_POSITIONS` consecutive scored positions of one held-out window, so
  a 2k window scored on its last half gives 4. Cheap: the default geometry's 4 held-out 2k windows
  give 16. But blocks of one window share its text: where windows differ, the blocks of a few
  windows take those windows' luck for many draws. Measured on the sample use cases' unseen prompts
  (docs/sparse_core.md, "Does the prefill margin hold on unseen prompts?"): agreement's lower bound
  was on the wrong side of the prompts' mean in 0.1-1.8% of draws at the per-step level 0.99286
  where windows do not differ (nominal 0.71%), and in up to 4.0% where they do. A margin, then, that
  held the budget on those prompts (0.9850 and 0.9839 against 0.98), not an exact confidence level.
- "window": one held-out window, its blocks summed. What calibration samples (windows packed from
  prompts drawn at random), so the draws are independent where the prompts are. On the same prompts
  agreement's bound held wherever it was finite (0.0-0.3% at the step level with 16 windows). Still
  asymptotic (a t quantile over a few windows): simulated with window agreements spread around the
  budget (tests/sparse_core/test_prefill_bound.py), ~0.4% at the step level where blocks gave ~9%,
  but 6-10% at 95% itself, since window means bunched under 1 are skewed. It needs more held-out
  windows: `min_blocks` of the step level, 11 at 95% over the full search's 7 steps, against the
  default geometry's 4, so about 3x the held-out forwards of each search step. Its price on the
  samples (pooled, 2k, 95%, the same 11 held-out windows): density 0.860 / 0.850 against the block
  unit's 0.774 / 0.790; both held agreement 0.98 on unseen prompts (docs/sparse_core.md, "A window
  as the bound's unit, measured").

KL's and delta NLL's bounds are a margin under either unit: a few passages carry much of the KL, and
no finite sample bounds the mean of an unbounded quantity for every distribution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from sparse_core.eps_search import step_alpha
from sparse_core.fidelity_bound import min_blocks

BLOCK_POSITIONS = 256  # scored positions per block of `Fidelity.blocks` (neighbouring tokens correlate)
BOUND_UNITS = ("block", "window")
# the last half of each held-out window is scored (`CalibrationLimits.fidelity_fraction`'s default)
FIDELITY_FRACTION = 0.5
# the full eps search's checks (`CalibrationLimits.max_joint_checks`' default): the most steps a
# spec's bound is judged over
SEARCH_STEPS = 7


def scored_positions(window_len: int, fraction: float) -> int:
    """How many of a window's last positions the fidelity metrics score (`keep`)."""
    return max(2, int(math.ceil(window_len * fraction)))


def blocks_per_window(window_lens: Sequence[int], fraction: float) -> list[int]:
    """How many blocks of `BLOCK_POSITIONS` scored positions each window of these lengths gives, in
    the order `measure_fidelity` lists them."""
    return [math.ceil(scored_positions(n, fraction) / BLOCK_POSITIONS) for n in window_lens]


def bound_units(window_lens: Sequence[int], fraction: float, unit: str) -> int:
    """How many units of `unit` the bound has on held-out windows of these lengths."""
    check_unit(unit)
    return len(window_lens) if unit == "window" else sum(blocks_per_window(window_lens, fraction))


def check_unit(unit: str) -> None:
    if unit not in BOUND_UNITS:
        raise ValueError(f"bound_unit must be one of {BOUND_UNITS}, got {unit!r}")


def heldout_shortfall(
    confidence: float, window_lens: Sequence[int], fraction: float, unit: str, steps: int
) -> str | None:
    """Why held-out windows of these lengths are too few for the bound at `confidence` over a search of
    `steps` steps (every step would fail and the plan stay dense), with what would do; None if they
    suffice."""
    level = 1 - step_alpha(1 - confidence, steps)
    need, have = min_blocks(level), bound_units(window_lens, fraction, unit)
    if have >= need:
        return None
    if unit == "window":
        what = f"{need} held-out windows (its unit is a window), got {have}"
        fix = "Hold out more windows (max_texts, holdout_fraction), use bound_unit block, or no confidence"
    else:
        longest = max(window_lens, default=0)
        what = (
            f"{need} blocks of {BLOCK_POSITIONS} scored positions on the held-out windows; "
            f"{len(window_lens)} window(s) of up to {longest} tokens (the last {fraction:g} scored) "
            f"give {have}"
        )
        fix = (
            "Use more or longer held-out windows (max_texts, max_seq_len, holdout_fraction), or no confidence"
        )
    return (
        f"confidence {confidence}: judged at {level:.4g} on each of the search's {steps} step(s), "
        f"the bound needs at least {what}. {fix}"
    )


def heldout_texts(n_texts: int, holdout_fraction: float) -> int:
    """How many of n texts calibration holds out (`calibration.split_texts`; at least one, and one is
    left to calibrate on)."""
    return min(n_texts - 1, max(1, round(n_texts * holdout_fraction)))


def heldout_windows(max_texts: int, holdout_fraction: float) -> int:
    """How many of `max_texts` windows calibration holds out (the rest calibrate), when the texts suffice."""
    return max(1, round(max_texts * holdout_fraction))


__all__ = [
    "BLOCK_POSITIONS",
    "BOUND_UNITS",
    "FIDELITY_FRACTION",
    "SEARCH_STEPS",
    "blocks_per_window",
    "bound_units",
    "check_unit",
    "heldout_shortfall",
    "heldout_texts",
    "heldout_windows",
    "scored_positions",
]
