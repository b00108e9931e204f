"""One-sided fidelity bounds by blocks of positions: the formula on a hand-worked case, the coverage
it claims on correlated data (where a bound that treats positions as independent falls short), and
that measure_fidelity's block sums add up to its point estimates on a real (tiny) model."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, stats

from sparse_core import sparsify, unsparsify
from sparse_core.corpus import pack_token_windows
from sparse_core.fidelity import BLOCK_POSITIONS, Fidelity, dense_reference, measure_fidelity
from sparse_core.fidelity_bound import agreement_lower_bound, block_mean_bound, fidelity_bound
from sparse_core.plan import SparsePlan


def _score_gap(blocks, m, confidence):
    """(mean - m) / se(m) - t: zero at the score bound (se from the residuals at m)."""
    b, total = len(blocks), sum(n for n, _ in blocks)
    mean = sum(s for _, s in blocks) / total
    se = math.sqrt(b / (b - 1) * sum((s - m * n) ** 2 for n, s in blocks) / total**2)
    return abs(mean - m) / se - stats.t.ppf(confidence, b - 1)


def test_bound_by_hand():
    blocks = [(4, 4.0), (4, 3.0), (2, 1.0), (4, 3.0), (6, 5.0)]  # overall 16 / 20 = 0.8
    lo = block_mean_bound(blocks, 0.9, upper=False)
    hi = block_mean_bound(blocks, 0.9, upper=True)
    assert lo < 0.8 < hi
    assert _score_gap(blocks, lo, 0.9) == pytest.approx(0.0, abs=1e-9)
    assert _score_gap(blocks, hi, 0.9) == pytest.approx(0.0, abs=1e-9)
    # the score bound is where the test at m stops rejecting: a root finder agrees
    assert lo == pytest.approx(optimize.brentq(lambda m: _score_gap(blocks, m, 0.9), 0.0, 0.8 - 1e-9))
    # wider than the plain (Wald) bound here: the blocks' spread is larger measured at lo than at the mean
    wald_se = math.sqrt(5 / 4 * sum((s - 0.8 * n) ** 2 for n, s in blocks) / 20**2)
    assert lo < 0.8 - stats.t.ppf(0.9, 4) * wald_se
    # more confidence, a wider bound; blocks with the same mean: no spread, the mean itself
    assert block_mean_bound(blocks, 0.99, upper=False) < lo
    assert block_mean_bound([(5, 4.0), (10, 8.0)] * 4, 0.95, upper=False) == pytest.approx(0.8)
    # too few blocks for the quantile (t^2 >= B - 1): nothing bounded
    assert block_mean_bound([(5, 4.0), (10, 8.0)], 0.95, upper=False) == -math.inf


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


def test_delta_nll_bound_covers_the_ratio():
    """delta NLL = sum(NLL sparse - NLL dense) / sum(NLL dense), both sums from the same text. A plan
    whose penalty per token does not scale with a passage's difficulty: an upper bound on the mean
    difference divided by the measured dense NLL (the bound until the ninth session) misses the true
    ratio whenever the text happens to be hard; the ratio's own score (Fieller) bound holds ~95%."""
    rng = np.random.default_rng(1)
    n_blocks, per_block, trials, true_ratio = 32, 256, 4000, 0.01
    ratio_cover = plug_in_cover = 0
    for _ in range(trials):
        nll_per_token = 3.0 * rng.uniform(0.4, 1.6, n_blocks)  # passages of unequal difficulty, mean 3
        dense = rng.gamma(per_block * 4, nll_per_token / 4)  # a block's dense NLL sum
        diff = rng.normal(per_block * 3.0 * true_ratio, math.sqrt(per_block) * 0.05, n_blocks)
        fid = Fidelity(0.0, 1.0, float(dense.sum() / (n_blocks * per_block)), 0.0, 0.0, 0)
        fid.blocks = [(per_block, 0.0, per_block, per_block, d, e) for d, e in zip(diff, dense, strict=True)]
        ratio_cover += fidelity_bound(fid, 0.95).nll_delta >= true_ratio
        plug_in = block_mean_bound([(per_block, d) for d in diff], 0.95, upper=True) / fid.nll_dense
        plug_in_cover += plug_in >= true_ratio
    # 4000 trials: the binomial sd of a 95% coverage is 0.0034
    assert 0.935 <= ratio_cover / trials <= 0.965
    assert plug_in_cover / trials < 0.8  # measured 0.69


def _markov_agreements(rng, p: float, rho: float, trials: int, n: int) -> np.ndarray:
    """[trials, n] agreements (0/1) of a stationary Markov chain with mean p and lag-1 correlation
    rho (SmolLM2's decode tokens: 0.12)."""
    x = np.empty((trials, n), dtype=bool)
    x[:, 0] = rng.random(trials) < p
    stay, enter = p + rho * (1 - p), p * (1 - rho)  # P(agree | agreed), P(agree | disagreed)
    for j in range(1, n):
        x[:, j] = rng.random(trials) < np.where(x[:, j - 1], stay, enter)
    return x


def _agree_fid(hits: np.ndarray, per_block: int) -> Fidelity:
    fid = Fidelity(0.0, 1.0, 1.0, 1.0, 0.0, 0)
    fid.blocks = [(per_block, 0.0, float(h), per_block, 0.0, float(per_block)) for h in hits]
    return fid


def test_agreement_bound_on_decode_sized_samples_holds_when_no_disagreement_is_seen():
    """Blocks of a few generated tokens (decode calibration's prompts of 8-32; here 16 blocks of 8),
    judged at 0.99 (95% over a 5-step search). Blocks that all agree show no spread, so the block
    bound alone says 1.0 whatever the truth (a plan of true agreement 0.99 does so in 28% of
    samples); the exact floor keeps the level at the lag-1 correlation SmolLM2's decode tokens show
    (0.12). 4000 samples per case: the binomial sd of a 1% miss rate is 0.0016."""
    assert agreement_lower_bound(128, 128, 0.99) == pytest.approx(0.01 ** (1 / 128))
    assert agreement_lower_bound(127, 128, 0.99) == pytest.approx(stats.beta.ppf(0.01, 127, 2))
    assert agreement_lower_bound(0, 128, 0.99) == 0.0
    assert fidelity_bound(_agree_fid(np.full(16, 8), 8), 0.99).agree == pytest.approx(0.01 ** (1 / 128))
    assert block_mean_bound([(8, 8.0)] * 16, 0.99, upper=False) == 1.0  # the collapse the floor stops
    rng = np.random.default_rng(3)
    trials = 4000
    for p in (0.9, 0.95, 0.99):
        hits = _markov_agreements(rng, p, 0.12, trials, 128).reshape(trials, 16, 8).sum(-1)
        floored = sum(fidelity_bound(_agree_fid(h, 8), 0.99).agree > p for h in hits)
        alone = sum(block_mean_bound([(8, float(x)) for x in h], 0.99, upper=False) > p for h in hits)
        assert floored / trials <= 0.01 + 2 * 0.0016, (p, floored / trials)
        if p == 0.99:  # the block bound alone passes such a plan in about a third of the samples
            assert alone / trials > 0.2, alone / trials


def test_a_bound_over_prompts_covers_the_prompts_mean_where_one_over_token_blocks_does_not():
    """Decode calibration's unit is a prompt. Prompts differ: here each prompt's true agreement is
    drawn around 0.97 (Beta, sd 0.03; SmolLM2's Quest plan at 8k agreed 0.96-1.0 on four prompts) and
    the plan must be bounded below 0.97 at 95%. Over the 16 blocks of 8 tokens of 2 prompts of 128
    tokens (token blocks as the unit) the bound sees two prompts' luck as if it were 16 draws and
    passes above the truth in ~20% of samples; over 16 prompts of 16 tokens (one block a prompt) it
    stays under 5%. 2000 samples each: the binomial interval decides (sd of a 5% rate: 0.005)."""
    rng = np.random.default_rng(11)
    trials, mean, sd = 2000, 0.97, 0.03
    k = mean * (1 - mean) / sd**2 - 1

    def misses(prompts: int, tokens: int, per_block: int) -> float:
        p = rng.beta(mean * k, (1 - mean) * k, (trials, prompts, 1))
        hits = (rng.random((trials, prompts, tokens)) < p).reshape(trials, -1, per_block).sum(-1)
        return float(np.mean([fidelity_bound(_agree_fid(h, per_block), 0.95).agree > mean for h in hits]))

    by_prompt, by_token_block = misses(16, 16, 16), misses(2, 128, 8)
    assert stats.binomtest(round(by_prompt * trials), trials).proportion_ci(0.99).high <= 0.05, by_prompt
    token_block_ci = stats.binomtest(round(by_token_block * trials), trials).proportion_ci(0.99)
    assert token_block_ci.low > 0.10, by_token_block


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
    dense = sum(b[5] for b in fid.blocks)
    assert dense / sum(b[3] for b in fid.blocks) == pytest.approx(fid.nll_dense, rel=1e-5)
    assert sum(b[4] for b in fid.blocks) / dense == pytest.approx(fid.nll_delta, rel=1e-4, abs=1e-7)
    again = Fidelity.from_blocks(fid.blocks)  # what decode calibration builds its fidelity from
    for name in ("kl", "agree", "nll_sparse", "nll_delta"):
        assert getattr(again, name) == pytest.approx(getattr(fid, name), rel=1e-4, abs=1e-7), name
    assert again.nll_dense == pytest.approx(fid.nll_dense, rel=1e-5) and again.n_positions == n
    bound = fidelity_bound(fid, 0.95)
    assert bound.kl >= fid.kl and bound.agree <= fid.agree and bound.nll_delta >= fid.nll_delta
    assert bound.n_positions == fid.n_positions
