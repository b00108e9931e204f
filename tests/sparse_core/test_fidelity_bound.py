"""One-sided fidelity bounds by blocks of positions: the formula on a hand-worked case, the coverage
it claims on correlated data (where a bound that treats positions as independent falls short), and
that measure_fidelity's block sums add up to its point estimates on a real (tiny) model."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from sparse_core import sparsify, unsparsify
from sparse_core.corpus import pack_token_windows
from sparse_core.fidelity import BLOCK_POSITIONS, dense_reference, measure_fidelity
from sparse_core.fidelity_bound import block_mean_bound, fidelity_bound
from sparse_core.plan import SparsePlan


def test_bound_by_hand():
    blocks = [(4, 4.0), (4, 3.0), (2, 1.0)]  # means 1.0, 0.75, 0.5; overall 8 / 10 = 0.8
    resid = [4 - 0.8 * 4, 3 - 0.8 * 4, 1 - 0.8 * 2]
    se = math.sqrt(3 / 2 * sum(r * r for r in resid) / 10**2)
    t = stats.t.ppf(0.9, 2)
    assert block_mean_bound(blocks, 0.9, upper=False) == pytest.approx(0.8 - t * se)
    assert block_mean_bound(blocks, 0.9, upper=True) == pytest.approx(0.8 + t * se)
    # more confidence, a wider bound; blocks with the same mean: no spread, the mean itself
    assert block_mean_bound(blocks, 0.99, upper=False) < block_mean_bound(blocks, 0.9, upper=False)
    assert block_mean_bound([(5, 4.0), (10, 8.0)], 0.95, upper=False) == pytest.approx(0.8)


def test_one_block_bounds_nothing_and_confidence_is_checked():
    assert block_mean_bound([(256, 250.0)], 0.95, upper=False) == -math.inf
    assert block_mean_bound([(256, 250.0), (0, 0.0)], 0.95, upper=True) == math.inf
    with pytest.raises(ValueError, match="confidence"):
        block_mean_bound([(1, 1.0), (1, 0.0)], 1.0, upper=False)


def test_coverage_on_correlated_positions():
    """Agreement that moves by passage (a block-level random effect, as when a plan drops a passage):
    the block bound's 95% lower limit stays below the true mean ~95% of the time; a bound that counts
    every position as independent covers far less often."""
    rng = np.random.default_rng(0)
    true_mean, n_blocks, per_block, trials = 0.95, 32, 256, 400
    block_cover = naive_cover = 0
    z = stats.norm.ppf(0.95)
    for _ in range(trials):
        p = true_mean + rng.uniform(-0.05, 0.05, n_blocks)  # per-passage agreement, mean true_mean
        hits = rng.binomial(per_block, p)
        blocks = [(per_block, float(h)) for h in hits]
        block_cover += block_mean_bound(blocks, 0.95, upper=False) <= true_mean
        m = hits.sum() / (n_blocks * per_block)
        naive_cover += m - z * math.sqrt(m * (1 - m) / (n_blocks * per_block)) <= true_mean
    assert 0.90 <= block_cover / trials <= 0.99
    assert naive_cover / trials < 0.85


def test_block_sums_match_the_point_estimates(quality_tiny, quality_texts):
    model, tok = quality_tiny
    windows = pack_token_windows(tok, quality_texts, 1024, 2, seed=5)
    ref = dense_reference(model, windows)
    sparsify(model, SparsePlan(block_size=64, tau=0.5))
    try:
        fid = measure_fidelity(model, ref)
    finally:
        unsparsify(model)
    assert "blocks" not in fid.to_dict()
    assert len(fid.blocks) == sum(math.ceil(k / BLOCK_POSITIONS) for k in ref.keep)
    n = sum(b[0] for b in fid.blocks)
    assert n == fid.n_positions
    assert sum(b[1] for b in fid.blocks) / n == pytest.approx(fid.kl, rel=1e-6)
    assert sum(b[2] for b in fid.blocks) / n == pytest.approx(fid.agree)
    diff = sum(b[4] for b in fid.blocks) / sum(b[3] for b in fid.blocks)
    assert diff / fid.nll_dense == pytest.approx(fid.nll_delta, rel=1e-4, abs=1e-7)
    bound = fidelity_bound(fid, 0.95)
    assert bound.kl >= fid.kl and bound.agree <= fid.agree and bound.nll_delta >= fid.nll_delta
    assert bound.n_positions == fid.n_positions
