"""The eps search's rule: the largest candidate plan that passes, found by binary search, and the level
each step is judged at so that the plan the search returns holds its bound, not only each step.

The candidates are ordered from dense to sparse (ascending eps: every layer and head drops more
estimated mass). A step "passes" when the held-out evidence says the candidate meets the budget: a
one-sided bound at some level (the fidelity margin, `fidelity_bound`; the task bound, `task_bound`).
Each such test has a false pass (the candidate truly misses the budget, its bound says it meets it)
with probability at most alpha. The search picks the *largest* passing candidate, so a false pass
anywhere on its way can become the plan: judged at alpha per step, the plan returned misses its budget
with probability up to (number of steps) x alpha.

Why alpha / steps per step is enough (`step_alpha`): assume the truth is monotone, i.e. the
candidates that truly meet the budget are a prefix 0..i* (a sparser plan is not truly better). Had
every step decided correctly, the binary search would visit a fixed, data-free sequence of candidates
(its "truth path"). The actual search leaves that path at its first wrong decision. If that is a
false *fail* (at some i <= i*), every later candidate is below i and truly meets the budget: no harm.
So the returned plan can miss its budget only if the first wrong decision is a false pass at one of
the truth path's candidates above i*, a fixed set of at most `steps` candidates; by the union bound
that has probability at most steps x (alpha / steps) = alpha, whatever the dependence between the steps
(they share the held-out windows). Without monotonicity (e.g. a per-layer mix whose layers switch
estimator as eps grows) the argument needs the prefix property and is an approximation.

Two checks at one step (the fidelity check, then the task bound when fidelity passed): each bound's
claim ("fidelity at `confidence`", "task drop at 95%") follows from the same argument when the other
check, which then only steers the path, is independent of its data; calibration's held-out windows
and its task rows come from disjoint parts of the split, so that holds approximately. Without it the
argument still gives P(the returned plan misses any part of the budget) <= max of the two alphas.
The candidates themselves come from sensitivities measured on the calibration windows, which may be
packed from the same prompts as the task rows: the candidate set is fixed with respect to the
held-out windows, not to the task rows.

Pure functions, no model: `calibration._search_plan` runs them with its forwards as the check, and
`decode.calibration` runs `largest_passing` for the decode budget (on point estimates, or with
`DecodeLimits.confidence` on bounds at `step_alpha`'s level, as here).
"""

from __future__ import annotations

import math
from collections.abc import Callable


def search_steps(n_candidates: int, max_checks: int) -> int:
    """The most checks `largest_passing` can make over `n_candidates` with `max_checks` allowed."""
    if n_candidates <= 0:
        return 0
    return max(1, min(max_checks, math.ceil(math.log2(n_candidates + 1))))


def step_alpha(alpha: float, steps: int) -> float:
    """The per-step level at which the search's returned plan misses its budget with probability at
    most `alpha` (Bonferroni over the truth path's steps; see the module docstring)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return alpha / max(1, steps)


def largest_passing(
    n_candidates: int,
    passes: Callable[[int], bool],
    *,
    max_checks: int,
    out_of_time: Callable[[], bool] | None = None,
) -> int:
    """The largest index in 0..n_candidates-1 that `passes` by binary search, assuming passing is a
    prefix; -1 when none passed (the all-dense plan). At most `max_checks` calls of `passes`; stops
    early when `out_of_time()` says so, keeping the largest index that passed so far."""
    lo, hi = -1, n_candidates - 1  # invariant: lo passed (-1 = all dense), everything above hi failed
    checks = 0
    while lo < hi and checks < max_checks:
        if out_of_time is not None and out_of_time():
            break
        mid = (lo + hi + 1) // 2
        checks += 1
        if passes(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


__all__ = ["largest_passing", "search_steps", "step_alpha"]
