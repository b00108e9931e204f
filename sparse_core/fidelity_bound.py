"""One-sided confidence bounds on a held-out fidelity measurement, by blocks of positions.

Calibration's eps search keeps the largest eps whose plan meets the budget on its held-out windows:
whatever noise lifts a plan over the line on those windows picks it, so the plan it returns sits at
the budget's edge on them and below it, on average, on text it never saw (at 8k: agreement 0.980 at
calibration, 0.978 on the bench's own window). Judging the budget on a bound instead of the point
estimate (the plan must meet it on the lower bound of agreement and the upper bounds of KL and
delta NLL) makes a plan pass only when the held-out text says it meets the budget with that
confidence.

Neighbouring next-token predictions are not independent (a passage the plan drops moves many of them
at once), so the unit of the bound is a block of consecutive scored positions of one window
(`prefill_bound.BLOCK_POSITIONS`), not a position. The mean over positions is a ratio of block totals;
its standard error is the cluster-robust one from the residuals of the B blocks (with the
B / (B - 1) correction). The bound is the score (Wilson-type) one: the value m at which
|mean - m| = t(confidence, B - 1) * se(m), with se(m) from the residuals S_b - m * n_b *at m*, not at
the mean. The plain (Wald) form mean -/+ t * se(mean) understates the spread exactly when the
held-out text happened to go well: agreement's disagreements and KL's rare large values are skewed,
so a sample with few of them has both a better mean and a smaller se. Judged at the search's
per-step level (1 - 0.05 / 7), the Wald lower bound on agreement passed a plan of true agreement
0.9799 against 0.98 in 1.0-1.3% of draws instead of 0.71%, the score bound in 0.52-0.65% (200,000
draws of 32 blocks of 256 positions, binomial counts around a block-level shift of up to +-0.01; at
95% the score bound 0.051-0.054, the Wald bound 0.059-0.062; an independent review with shifts of
+-0.01 and +-0.02 found 0.44-0.60% and 0.045-0.050). Delta NLL, a ratio of two sums over the same
positions, gets the same bound with the blocks' dense NLL in place of their counts (Fieller's bound),
so the dense NLL's own noise counts. That is an asymptotic bound (block means
are near normal at 256 positions), not a guarantee for any distribution like `task_bound`'s betting
bound; with few blocks the Student t quantile makes it wide, and with t^2 >= B - 1 it bounds nothing.

Agreement's bound is never above the exact (Clopper-Pearson) lower bound of the agreements counted
over all positions. The block bound estimates the spread from the blocks themselves, so blocks that
all agree fully (no spread seen) give a lower bound of 1.0: harmless at 256 positions a block, where
that is rare, but decode calibration's blocks are prompts of a few dozen generated tokens, which
often all agree (16 blocks of 8 tokens of true agreement 0.99: all 128 agree in 28% of draws).
Measured with 16 blocks of 8 tokens (4000 draws, agreements a Markov chain with lag-1 correlation
0.12, as SmolLM2's decode tokens show; tests/sparse_core/test_fidelity_bound.py): judged at 0.99
(95% over a 5-step search), the block bound alone passed a plan of true agreement p above p in
1.1% / 2.4% / 32% of draws at p = 0.9 / 0.95 / 0.99; with the floor 1.1% / 0.45% / 0. The floor is
exact for independent positions only: at 0.95 it missed 6.2% at p = 0.95, and with correlation 0.3
2.4% at 0.99 and 7-10% at 0.95; the block bound carries correlation only when the spread shows it.
It costs what it should: 128 tokens certify agreement >= 0.95 at 0.99 only with no disagreement
(0.9647; one gives 0.9493).

The unit must be what was sampled. Decode calibration's prompts differ from each other (a Quest
plan's mean KL on four 8k prompts: 0.015-0.036), so its unit is a prompt, one block its whole
continuation. Over 8-token blocks of 2-4 prompts the bound took those prompts' luck for 16-32 draws
and, in a simulation fitted to those four prompts (docs/sparse_core/decode_bound_unit.py, 10,000
draws a row), KL's upper bound fell below the prompts' mean in 25-27% of draws at 0.95 and 14-15% at
0.99. Over 10-16 prompts: KL 7-9% at 0.95 and 0-1.5% at 0.99, agreement (prompts' sd 0.012 as
measured, or 0.03) 2-8% at 0.95 and 0.3-1.7% at 0.99. KL is skewed (5% of the tokens carry 48% of
it) and unbounded, so no bound from a dozen prompts is exact for it: the score bound is asymptotic
and reported as one; judged on the mean instead, a plan whose true KL is at the budget passes about
half the time.

Prefill calibration takes blocks of 256 positions of its held-out windows as the unit by default, or
with `CalibrationLimits.bound_unit="window"` a whole window (`by_window`; `prefill_bound`). Measured on
the sample use cases' prompts the plan had not seen (docs/sparse_core/prefill_bound_unit.py; all 2k
windows of their held-out prompts as the population): agreement's bound missed at the per-step
0.99286 in 0.1-1.8% of draws where windows do not differ (docs-qa; nominal 0.71%) and up to 4.0%
where they do (longdoc-summaries, 11-25% of the variance between windows); with a window as the unit
it held (at most 0.3%), but that needs 11 held-out windows at 95% over 7 steps (the "window" unit).
KL's and delta NLL's bounds are no confidence statement whatever the unit: they missed those
prompts' mean in 11-54% and 8-30% of draws at 0.95, because a few passages carry much of it (one
block of 104 held 18-30% of a pooled plan's KL on docs-qa) and no finite sample bounds the mean of an
unbounded quantity for every distribution. For them the bound is a margin that grows with the spread seen.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from scipy import stats

if TYPE_CHECKING:  # torch-free at run time: a spec's decode bound is checked without a model
    from sparse_core.fidelity import Fidelity


@functools.lru_cache(maxsize=256)
def _t_quantile(confidence: float, dof: int) -> float:
    return float(stats.t.ppf(confidence, dof))


def block_mean_bound(blocks: Sequence[tuple[float, float]], confidence: float, *, upper: bool) -> float:
    """One-sided score bound on the mean sum S / sum n of (n, S) blocks at `confidence`: the upper
    bound if `upper`, else the lower. n is a block's count of positions for a per-position mean, or
    any positive per-block quantity for a ratio of two sums (then it is Fieller's bound). The bound m
    solves (sum S - m N)^2 = k * sum (S_b - m n_b)^2 with k = t^2 B / (B - 1), a quadratic in m; its
    root on the asked side of the mean. One block (or none), or blocks too few for the quantile (the
    quadratic opens downwards), bound nothing: +-inf."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    blocks = [(n, s) for n, s in blocks if n > 0 or s != 0]  # drop empty blocks only
    unbounded = math.inf if upper else -math.inf
    if len(blocks) < 2:
        return unbounded
    b = len(blocks)
    k = _t_quantile(confidence, b - 1) ** 2 * b / (b - 1)
    total = sum(n for n, _ in blocks)
    s_sum = sum(s for _, s in blocks)
    mean = s_sum / total
    # a m^2 - 2 h m + c = 0 (h the half linear coefficient)
    a = total**2 - k * sum(n * n for n, _ in blocks)
    h = total * s_sum - k * sum(n * s for n, s in blocks)
    c = s_sum**2 - k * sum(s * s for _, s in blocks)
    if a <= 0:
        return unbounded
    root = math.sqrt(max(h * h - a * c, 0.0))  # >= 0 here: the quadratic is <= 0 at the mean
    return max((h + root) / a, mean) if upper else min((h - root) / a, mean)


def agreement_lower_bound(agreements: float, positions: int, confidence: float) -> float:
    """Exact one-sided (Clopper-Pearson) lower bound at `confidence` on the agreement rate from
    `agreements` of `positions` (independent positions): the beta quantile; 0 with no agreement."""
    k = round(agreements)
    if positions <= 0 or k <= 0:
        return 0.0
    return float(stats.beta.ppf(1 - confidence, k, positions - k + 1))


def min_blocks(confidence: float) -> int:
    """The fewest blocks for which `block_mean_bound` at `confidence` is finite (t^2 < B - 1)."""
    b = 2
    while _t_quantile(confidence, b - 1) ** 2 * b / (b - 1) >= b:  # a <= 0 for equal blocks
        b += 1
    return b


def fidelity_bound(fid: Fidelity, confidence: float) -> Fidelity:
    """`fid` with kl and nll_delta at their upper bounds and agree at its lower bound (from
    `fid.blocks`), what a budget is judged on when it asks for `confidence`."""
    if not fid.blocks:
        raise ValueError("fidelity_bound needs the per-block sums of measure_fidelity (fid.blocks)")
    kl = block_mean_bound([(b[0], b[1]) for b in fid.blocks], confidence, upper=True)
    agree = block_mean_bound([(b[0], b[2]) for b in fid.blocks], confidence, upper=False)
    positions = sum(b[0] for b in fid.blocks)
    agree = min(agree, agreement_lower_bound(sum(b[2] for b in fid.blocks), positions, confidence))
    # delta NLL is a ratio, sum (NLL sparse - NLL dense) / sum NLL dense, and its denominator is
    # measured on the same text: the same score bound with the blocks' dense NLL as the weights
    # (Fieller's bound on a ratio of means) carries both sums' noise and their correlation
    nll_delta = (
        block_mean_bound([(b[5], b[4]) for b in fid.blocks], confidence, upper=True)
        if fid.nll_dense > 0
        else math.inf
    )
    return replace(fid, kl=max(kl, 0.0), agree=min(agree, 1.0), nll_delta=nll_delta)


def by_window(fid: Fidelity, blocks_per_window: Sequence[int]) -> Fidelity:
    """`fid` with each window's blocks summed into one block (`prefill_bound`'s "window" unit): the
    same means, the bound's draws now the windows. `blocks_per_window` lists each window's block count
    in `fid.blocks`' order (`prefill_bound.blocks_per_window`)."""
    if not fid.blocks:
        return fid
    if any(c < 1 for c in blocks_per_window) or sum(blocks_per_window) != len(fid.blocks):
        raise ValueError(
            f"blocks_per_window {list(blocks_per_window)} does not partition the {len(fid.blocks)} blocks"
        )
    merged, start = [], 0
    for count in blocks_per_window:
        part = fid.blocks[start : start + count]
        merged.append(tuple(sum(column) for column in zip(*part, strict=True)))
        start += count
    return replace(fid, blocks=merged)


def judged(fid: Fidelity, step_confidence: float | None) -> Fidelity:
    """What a calibration step's budget is judged on: `fid`'s means (no confidence asked, or no
    blocks: a plan identical to dense), or their bounds at the step's level."""
    return fid if step_confidence is None or not fid.blocks else fidelity_bound(fid, step_confidence)


def judged_dict(
    fid: Fidelity, confidence: float | None, step_confidence: float | None, unit: str | None = None
) -> dict:
    """`fid.to_dict()`, with the bounds the step was judged on beside the means when it asked for
    `confidence` (at `step_confidence`; `unit`, when given, names what `fid.blocks` are)."""
    d = fid.to_dict()
    if step_confidence is not None and fid.blocks:
        d.update(confidence=confidence, step_confidence=step_confidence)
        d.update(bound_fields(fid, step_confidence))
        if unit is not None:
            d["bound_unit"] = unit
    return d


def bound_fields(fid: Fidelity, confidence: float) -> dict:
    """The bounds at `confidence` as a report gives them beside the means: `kl_upper`, `agree_lower`,
    `nll_delta_upper` (infinite where the blocks are too few) and `bound_units` (how many blocks)."""
    b = fidelity_bound(fid, confidence)
    return {
        "kl_upper": b.kl,
        "agree_lower": b.agree,
        "nll_delta_upper": b.nll_delta,
        "bound_units": len(fid.blocks or ()),
    }


__all__ = [
    "agreement_lower_bound",
    "block_mean_bound",
    "bound_fields",
    "by_window",
    "fidelity_bound",
    "judged",
    "judged_dict",
    "min_blocks",
]
