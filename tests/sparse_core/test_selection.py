"""Selection invariants and estimator contracts."""

from __future__ import annotations

import math

import pytest
import torch

from sparse_core import PlanError, SparsePlan, sparse_attention
from sparse_core.estimators import (
    EstimatorContext,
    available_estimators,
    get_estimator,
    register_estimator,
    unregister_estimator,
)
from sparse_core.selection import select_blocks


def _random_scores(b=2, h=3, n=12, seed=0, peaky=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, h, n, n, generator=g) * peaky
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)


@pytest.mark.parametrize("tau", [0.3, 0.7, 0.9, 0.99])
@pytest.mark.parametrize(("sink", "local"), [(0, 1), (1, 1), (2, 3)])
def test_selection_invariants(tau, sink, local):
    scores = _random_scores()
    b, h, n, _ = scores.shape
    sel = select_blocks(
        scores, block_size=64, seq_len=n * 64 - 5, tau=tau, sink_blocks=sink, local_blocks=local
    )
    mask = sel.mask()
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    assert not (mask & (j > i)).any(), "a non-causal block was selected"
    forced = (j <= i) & ((j < sink) | (j > i - local))
    assert (mask | ~forced).all(), "a sink or local block was dropped"
    mass = (scores * mask).sum(-1)
    assert (mass >= tau - 1e-5).all(), "estimated mass below tau"
    # fewest blocks: dropping the least-scored non-forced kept block falls below tau
    for bb in range(b):
        for hh in range(h):
            for qi in range(n):
                optional = mask[bb, hh, qi] & ~forced[qi]
                if optional.any():
                    smallest = scores[bb, hh, qi][optional].min()
                    assert mass[bb, hh, qi] - smallest < tau + 1e-6
    # index structure: ascending, ends on the diagonal, counts consistent with the mask
    assert torch.equal(sel.kv_counts.long(), mask.sum(-1))
    for qi in range(n):
        c = int(sel.kv_counts[0, 0, qi])
        idx = sel.kv_indices[0, 0, qi, :c]
        assert torch.all(idx[1:] > idx[:-1]) and int(idx[-1]) == qi
    assert sel.density == pytest.approx(mask.sum().item() / (b * h * n * (n + 1) / 2))


def test_cap_min_density_and_full_tau():
    scores = _random_scores(peaky=0.1)  # flat: tau=0.95 wants most blocks
    n = scores.shape[-1]
    capped = select_blocks(
        scores, block_size=64, seq_len=n * 64, tau=0.95, sink_blocks=1, local_blocks=2, top_k=4
    )
    forced = torch.tensor([min(q + 1, 1 + 2) if q >= 2 else q + 1 for q in range(n)])
    assert (capped.kv_counts <= torch.clamp(forced, min=4)).all()
    assert capped.mask()[..., 0].all() and (capped.kv_counts[..., 5:] == 4).all()
    floor = select_blocks(_random_scores(peaky=8.0), block_size=64, seq_len=n * 64, tau=0.1, min_density=0.5)
    need = torch.ceil(torch.arange(1, n + 1) * 0.5)
    assert (floor.kv_counts >= need).all()
    full = select_blocks(scores, block_size=64, seq_len=n * 64, tau=1.0)
    assert full.density == 1.0


def test_per_head_tau():
    scores = _random_scores(b=1, h=2, peaky=1.0)
    sel = select_blocks(scores, block_size=64, seq_len=12 * 64, tau=torch.tensor([0.5, 1.0]))
    assert sel.head_density[1] == 1.0 and sel.head_density[0] < 1.0


@pytest.mark.parametrize("name", ["pooled", "antidiagonal", "sampled"])
@pytest.mark.parametrize(("hq", "hkv", "s"), [(4, 4, 256), (6, 2, 200)])
def test_estimator_contract(name, hq, hkv, s):
    torch.manual_seed(0)
    q, k = torch.randn(2, hq, s, 32), torch.randn(2, hkv, s, 32)
    valid = torch.ones(2, s, dtype=torch.bool)
    valid[1, :70] = False  # left padding in the second row
    out = get_estimator(name)(q, k, EstimatorContext(block_size=32, key_valid=valid))
    n = math.ceil(s / 32)
    assert out.shape == (2, hq, n, n) and out.dtype == torch.float32
    assert torch.all(out.triu(1) == 0), "non-causal mass"
    assert torch.allclose(out[0].sum(-1), torch.ones(hq, n), atol=1e-4)
    assert torch.all(out[1, :, :, :2] == 0), "fully padded key blocks got mass"
    assert torch.allclose(out[1, :, 3:].sum(-1), torch.ones(hq, n - 3), atol=1e-4)


def _antidiagonal_by_definition(q, k, block_size, stride, key_valid):
    """XAttention's score written out: the logit of strided query row i and key column j is the sum
    over the antidiagonal of their stride x stride tile, softmax over the causal valid columns, then
    each block's probabilities summed (divided by the rows per block)."""
    b, hq, s, d = q.shape
    g = hq // k.shape[1]
    m = s // stride
    k = k.repeat_interleave(g, dim=1)
    tile = torch.einsum("bhisd,bhjtd->bhijst", q.view(b, hq, m, stride, d), k.view(b, hq, m, stride, d))
    logits = tile.flip(-2).diagonal(dim1=-2, dim2=-1).sum(-1) / (stride * math.sqrt(d))
    ok = torch.ones(m, m, dtype=torch.bool).tril().view(1, 1, m, m)
    ok = ok & key_valid.view(b, m, stride).any(-1).view(b, 1, 1, m)
    probs = torch.softmax(logits.masked_fill(~ok, float("-inf")), -1).nan_to_num(0.0)
    per, n = block_size // stride, s // block_size
    return probs.view(b, hq, n, per, n, per).sum(dim=(3, 5)) / per


def test_pooled_matches_its_definition():
    """The pooled estimator written out: mean query and mean key of each block over its valid (unpadded)
    positions, their dot product at the softmax scale 1/sqrt(d), softmax over the causal key blocks that
    hold a valid key. Padding inside a block (left or right) must not move the means."""
    torch.manual_seed(3)
    b, hq, hkv, s, d, bs = 2, 4, 2, 160, 16, 32
    q, k = torch.randn(b, hq, s, d), torch.randn(b, hkv, s, d)
    valid = torch.ones(b, s, dtype=torch.bool)
    valid[1, :70] = False  # left padding: block 2 partly padded
    valid[0, 140:] = False  # right padding: the last query block's mean is over its 12 valid rows
    out = get_estimator("pooled")(q, k, EstimatorContext(block_size=bs, key_valid=valid))
    n = s // bs
    w = valid.float().view(b, 1, n, bs, 1)

    def pool(x):
        return (x.view(*x.shape[:2], n, bs, d) * w).sum(3) / w.sum(3).clamp_min(1.0)

    qp, kp = pool(q), pool(k).repeat_interleave(hq // hkv, dim=1)
    logits = qp @ kp.transpose(-1, -2) / math.sqrt(d)
    ok = torch.ones(n, n, dtype=torch.bool).tril().view(1, 1, n, n) & valid.view(b, n, bs).any(-1).view(
        b, 1, 1, n
    )
    want = torch.softmax(logits.masked_fill(~ok, float("-inf")), -1).nan_to_num(0.0)
    assert torch.allclose(out, want, atol=1e-5)


@pytest.mark.parametrize("s", [256, 2048])  # one row chunk; eight causal chunks
def test_antidiagonal_matches_its_definition(s):
    torch.manual_seed(2)
    q, k = torch.randn(2, 6, s, 16), torch.randn(2, 2, s, 16)
    valid = torch.ones(2, s, dtype=torch.bool)
    valid[1, :100] = False
    out = get_estimator("antidiagonal")(q, k, EstimatorContext(block_size=64, key_valid=valid))
    want = _antidiagonal_by_definition(q, k, 64, 16, valid)
    assert torch.allclose(out, want, atol=1e-5)


def _sampled_by_definition(q, k, block_size, stride, key_valid):
    """The dense causal attention of every query row written out, then only the rows `stride - 1,
    2 * stride - 1, ...` of each block kept (the short last block's last row for its short group), each
    row's probabilities summed per key block and averaged over the block's kept rows that see a key."""
    b, hq, s, d = q.shape
    k = k.repeat_interleave(hq // k.shape[1], dim=1)
    ok = torch.ones(s, s, dtype=torch.bool).tril().view(1, 1, s, s) & key_valid.view(b, 1, 1, s)
    probs = torch.softmax((q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~ok, float("-inf")), -1)
    probs = probs.nan_to_num(0.0)
    n = math.ceil(s / block_size)
    out = torch.zeros(b, hq, n, n)
    for i in range(n):
        rows = [
            min(r, s - 1)
            for r in range(i * block_size + stride - 1, (i + 1) * block_size, stride)
            if r - stride + 1 < s
        ]
        for r in rows:
            for j in range(i + 1):
                out[:, :, i, j] += probs[:, :, r, j * block_size : (j + 1) * block_size].sum(-1)
    return out / out.sum(-1, keepdim=True).clamp_min(1e-30)


@pytest.mark.parametrize("s", [200, 256, 1000])  # a short last block; one chunk; eight causal chunks
def test_sampled_matches_its_definition_and_is_the_oracle_at_stride_one(s):
    from sparse_core.estimators.sampled import sampled_scores

    torch.manual_seed(3)
    q, k = torch.randn(2, 6, s, 16), torch.randn(2, 2, s, 16)
    valid = torch.ones(2, s, dtype=torch.bool)
    valid[1, :100] = False  # left padding: the second row's first sampled rows see no key
    ctx = EstimatorContext(block_size=64, key_valid=valid)
    out = get_estimator("sampled")(q, k, ctx)
    assert torch.allclose(out, _sampled_by_definition(q, k, 64, 16, valid), atol=1e-5)
    assert torch.allclose(
        sampled_scores(q, k, ctx, stride=8), _sampled_by_definition(q, k, 64, 8, valid), atol=1e-5
    )
    # every row sampled: exactly the dense block mass the oracle computes
    assert torch.allclose(sampled_scores(q, k, ctx, stride=1), get_estimator("oracle")(q, k, ctx), atol=1e-5)
    with pytest.raises(ValueError, match="stride 24 must divide the block size 64"):
        sampled_scores(q, k, ctx, stride=24)


def test_antidiagonal_finds_a_planted_block():
    torch.manual_seed(1)
    s, d = 512, 32
    q, k = torch.randn(1, 1, s, d) * 0.1, torch.randn(1, 1, s, d) * 0.1
    direction = torch.randn(d)
    q[0, 0, 448:] += direction * 2  # the last query block ...
    k[0, 0, 128:192] += direction * 2  # ... attends strongly to key block 2
    for name in ("antidiagonal", "pooled", "sampled"):
        out = get_estimator(name)(q, k, EstimatorContext(block_size=64))
        assert int(out[0, 0, 7].argmax()) == 2, name


def test_registry_by_name_and_custom_estimator():
    assert {"pooled", "antidiagonal"} <= set(available_estimators())
    with pytest.raises(PlanError, match="unknown estimator 'nope'"):
        get_estimator("nope")

    def diagonal_only(q, k, ctx):  # all mass on block 0: selection keeps sink + diagonal only
        n = math.ceil(q.shape[2] / ctx.block_size)
        out = torch.zeros(q.shape[0], q.shape[1], n, n)
        out[..., 0] = 1.0
        return out

    register_estimator("test_block0", diagonal_only, overwrite=True)
    try:
        q = torch.randn(1, 2, 512, 16)
        k = torch.randn(1, 2, 512, 16)
        _, info = sparse_attention(
            q, k, k, SparsePlan(estimator="test_block0", tau=0.5, local_blocks=1), keep_selection=True
        )
        n = 8
        assert info.density == pytest.approx((1 + 2 * (n - 1)) / (n * (n + 1) / 2))
        assert info.estimator_seconds >= 0
        assert info.selection.mask()[0, 0].sum().item() == 1 + 2 * (n - 1)
        with pytest.raises(ValueError, match="already registered"):
            register_estimator("test_block0", lambda q, k, c: q)
    finally:  # the registry is process-wide: later tests list the built-ins only
        unregister_estimator("test_block0")


@pytest.mark.slow  # nine torch.compile variants
def test_the_compiled_selection_is_the_same_selection():
    """`estimate_and_select(compiled=True)` (the default on CUDA for training-free estimators) runs the
    same estimator and rule through torch.compile: on the CPU here, every training-free estimator at a
    plain and at a per-head-tau plan with padding and the gather kernel's count levels, and pooled at a
    second length (dynamic shapes) and with ungrouped heads and a top-k cap, keep the same blocks."""
    import torch._dynamo

    from sparse_core.estimators import available_estimators
    from sparse_core.kernels import compiles_selection, estimate_and_select

    g = torch.Generator().manual_seed(3)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    cases = [
        (name, 600, SparsePlan(block_size=32, tau=0.9, estimator=name), 0, None, False)
        for name in available_estimators("training-free")
    ]
    cases += [
        (
            name,
            600,
            SparsePlan(block_size=32, tau=0.95, estimator=name, head_overrides={1: {0: 0.6, 4: 0.99}}),
            1,
            8,
            True,
        )
        for name in available_estimators("training-free")
    ]
    cases += [("pooled", 384, SparsePlan(block_size=32, tau=0.8, group_heads=False, top_k=5), 0, None, True)]
    for name, s, plan, layer, levels, padded in cases:
        assert compiles_selection(torch.device("cuda"), name) and not compiles_selection(
            torch.device("cpu"), name
        )
        q = torch.randn(1, 6, s, 32, generator=g)
        k = torch.randn(1, 2, s, 32, generator=g)
        kv = torch.ones(1, s, dtype=torch.bool)
        kv[0, :21] = False
        kv = kv if padded else None
        params = plan.layer_params(layer)
        a = estimate_and_select(q, k, plan, params, key_valid=kv, count_levels=levels, compiled=False)
        b = estimate_and_select(q, k, plan, params, key_valid=kv, count_levels=levels, compiled=True)
        assert torch.equal(a.kv_counts, b.kv_counts) and torch.equal(a.kv_indices, b.kv_indices), (name, s)
        assert a.density == b.density and torch.equal(a.head_density, b.head_density)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # it did compile
    assert not compiles_selection(torch.device("cuda"), "oracle")


def test_tau_one_keeps_every_causal_block_even_of_zero_estimated_mass():
    """tau >= 1 is the dense plan: every causal block is kept, also those the estimator gives no mass
    (here all mass on the diagonal), which the cumulative sum alone would drop once it reaches the total."""
    n = 6
    diagonal = torch.eye(n).expand(1, 2, n, n).contiguous()
    full = select_blocks(diagonal, block_size=64, seq_len=n * 64, tau=1.0)
    assert torch.equal(full.kv_counts[0, 0].long(), torch.arange(1, n + 1))
    assert full.density == 1.0 and torch.equal(full.mask()[0, 0], torch.ones(n, n, dtype=torch.bool).tril())
    assert select_blocks(diagonal, block_size=64, seq_len=n * 64, tau=0.99).density < 1.0


def test_top_k_below_the_forced_count_never_cuts_sink_or_local_blocks():
    """top_k caps the blocks a row chooses by score; the sink and local blocks are kept on top of it: with
    2 sink and 2 local blocks and top_k = 1, every row keeps all four (where causal) and nothing else."""
    n = 8
    scores = _random_scores(b=1, h=2, n=n, peaky=0.1)
    sel = select_blocks(
        scores, block_size=64, seq_len=n * 64, tau=0.95, sink_blocks=2, local_blocks=2, top_k=1
    )
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    forced = (j <= i) & ((j < 2) | (j > i - 2))
    assert torch.equal(sel.mask(), forced.expand(1, 2, n, n))


def test_a_tie_at_tau_keeps_the_fewest_blocks_that_reach_it():
    """Blocks are kept until their mass reaches tau, and no further: four blocks of 0.25 and tau = 0.5
    keep two (the local diagonal block and one more), although the mass before a third equals tau."""
    n = 4
    row = torch.full((n,), 0.25)
    scores = torch.zeros(1, 1, n, n)
    scores[0, 0, n - 1] = row
    sel = select_blocks(scores, block_size=64, seq_len=n * 64, tau=0.5, sink_blocks=0, local_blocks=1)
    assert int(sel.kv_counts[0, 0, n - 1]) == 2
    assert float((scores * sel.mask()).sum(-1)[0, 0, n - 1]) == 0.5


def test_group_scores_average_each_kv_heads_query_heads():
    """Under grouped-query attention one selection serves every query head of a KV head: its scores are
    the mean of those heads' scores (heads 0-1 -> KV head 0, heads 2-3 -> KV head 1), not their maximum."""
    from sparse_core.selection import group_scores

    scores = torch.stack([torch.full((3, 3), float(v)) for v in (0.1, 0.5, 0.2, 0.9)])[None]
    grouped = group_scores(scores, num_kv_heads=2)
    assert grouped.shape == (1, 2, 3, 3)
    assert torch.allclose(grouped[0, 0], torch.full((3, 3), 0.3))
    assert torch.allclose(grouped[0, 1], torch.full((3, 3), 0.55))
