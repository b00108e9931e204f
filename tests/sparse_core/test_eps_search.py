"""The eps search's rule: binary search for the largest passing candidate, and the per-step level that
makes the plan it returns hold its bound (simulated through the real fidelity bound)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from sparse_core.eps_search import largest_passing, search_steps, step_alpha
from sparse_core.fidelity_bound import block_mean_bound


@pytest.mark.parametrize("boundary", [-1, 0, 1, 40, 63, 125, 126])
def test_finds_the_last_passing_candidate_of_a_prefix(boundary):
    seen = []

    def passes(i):
        seen.append(i)
        return i <= boundary

    assert largest_passing(127, passes, max_checks=7) == boundary
    assert len(seen) <= 7 and len(set(seen)) == len(seen)


def test_stops_at_max_checks_and_when_out_of_time():
    calls = []
    assert largest_passing(127, lambda i: calls.append(i) or True, max_checks=3) == 111
    assert calls == [63, 95, 111]
    assert largest_passing(127, lambda i: True, max_checks=7, out_of_time=lambda: True) == -1
    ticks = iter([False, False, True])
    assert largest_passing(127, lambda i: True, max_checks=7, out_of_time=lambda: next(ticks)) == 95
    assert largest_passing(0, lambda i: True, max_checks=7) == -1


def test_steps_and_level():
    assert [search_steps(n, 7) for n in (0, 1, 2, 3, 4, 127, 1000)] == [0, 1, 2, 2, 3, 7, 7]
    assert search_steps(1000, 4) == 4
    assert step_alpha(0.05, 7) == pytest.approx(0.05 / 7) and step_alpha(0.05, 0) == 0.05
    with pytest.raises(ValueError, match="alpha"):
        step_alpha(0.0, 3)


def _false_pass_rate(hits, truth, budget, confidence, reps):
    """Share of searches whose returned candidate truly misses the agreement budget, each step
    judged on block_mean_bound's lower bound at `confidence`."""
    n_cand, per_block = hits.shape[1], 256
    bad = 0
    for r in range(reps):

        def passes(j, r=r):
            blocks = [(per_block, float(h)) for h in hits[r, j]]
            return block_mean_bound(blocks, confidence, upper=False) >= budget

        j = largest_passing(n_cand, passes, max_checks=7)
        bad += j >= 0 and truth[j] < budget
    return bad


@pytest.mark.parametrize("boundary", [40, -1])
def test_the_returned_plan_holds_its_bound_only_with_the_per_step_level(boundary):
    """The worst case for picking the largest passing plan: candidates past the boundary sit just
    below the budget (true agreement 0.9799 < 0.98), so every step there passes by chance with
    probability ~alpha; with boundary -1 every plan just misses and all 7 steps are such steps.
    Judged at 95% per step, the returned plan misses its budget in well over 5% of searches (16-25%);
    judged at step_alpha's level, in at most 5% (2.3-3.7%; Clopper-Pearson bounds decide)."""
    rng = np.random.default_rng(7)
    reps, n_cand, n_blocks, per_block, budget = 4000, 127, 32, 256, 0.98
    truth = np.where(np.arange(n_cand) <= boundary, 0.99, 0.9799)
    passage = rng.uniform(-0.01, 0.01, (reps, 1, n_blocks))  # block-level effect shared by the plans
    hits = rng.binomial(per_block, np.clip(truth[None, :, None] + passage, 0, 1))
    naive = _false_pass_rate(hits, truth, budget, 0.95, reps)
    level = 1 - step_alpha(0.05, search_steps(n_cand, 7))
    corrected = _false_pass_rate(hits, truth, budget, level, reps)
    lo = stats.binomtest(naive, reps).proportion_ci(0.95, method="exact").low
    hi = stats.binomtest(corrected, reps).proportion_ci(0.95, method="exact").high
    assert lo > 0.05, f"per-step 95%: {naive / reps:.3f} of plans miss the budget"
    assert hi <= 0.05, f"per-step {level:.4f}: {corrected / reps:.3f} of plans miss the budget"
