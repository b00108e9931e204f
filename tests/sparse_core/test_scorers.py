"""The estimator set of issue 12: the contract over every registered estimator, the Quest bound, the
SeerAttention-style gate_v2 (exact pre-RoPE recovery, block-RoPE position invariance, max-pooled
target, plan round trip), and old gate plans loading and running unchanged."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sparse_core import SparsePlan, plan_io, sparsify, unsparsify
from sparse_core.capture import (
    block_attention_contribution,
    block_attention_mass,
    block_attention_maxpool,
    capture_attention,
)
from sparse_core.corpus import corpus_texts, pack_token_windows
from sparse_core.estimators import EstimatorContext, available_estimators, get_estimator
from sparse_core.estimators.learned_gate import BlockGate, GateShape
from sparse_core.estimators.learned_gate_v2 import (
    BlockGateV2,
    model_rope,
    rope_cos_sin,
    rotate,
    unrotate,
)
from sparse_core.estimators.quest import key_block_bounds, qk_upper_bound
from sparse_core.plan import PlanError
from sparse_core.scorer_training import GateTrainConfig, train_gate

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SHAPE = GateShape(num_layers=2, num_heads=6, num_kv_heads=2, head_dim=32, gate_dim=32)
INV_FREQ = 1.0 / (10000 ** (torch.arange(0, 32, 2).float() / 32))


def _plan_with_weights(block_size: int, perturb: float = 0.0) -> SparsePlan:
    """A plan carrying both learned gates for SHAPE (initial weights, optionally perturbed)."""
    torch.manual_seed(5)
    gates = [BlockGate(SHAPE, block_size), BlockGateV2(SHAPE, block_size, INV_FREQ)]
    tensors = {}
    for g in gates:
        with torch.no_grad():
            for p in g.parameters():
                p.add_(perturb * torch.randn_like(p))
        tensors.update(g.to_tensors())
    return SparsePlan(block_size=block_size, tensors=tensors)


@pytest.mark.parametrize("name", available_estimators())
@pytest.mark.parametrize("s", [256, 200])
def test_every_registered_estimator_keeps_the_contract(name, s):
    torch.manual_seed(0)
    hq, hkv, bs = SHAPE.num_heads, SHAPE.num_kv_heads, 32
    q, k = torch.randn(2, hq, s, 32), torch.randn(2, hkv, s, 32)
    valid = torch.ones(2, s, dtype=torch.bool)
    valid[1, :70] = False  # left padding in the second row
    plan = _plan_with_weights(bs, perturb=0.05)
    ctx = EstimatorContext(block_size=bs, layer_idx=1, plan=plan, key_valid=valid)
    out = get_estimator(name)(q, k, ctx)
    n = math.ceil(s / bs)
    assert out.shape == (2, hq, n, n) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert torch.all(out.triu(1) == 0), "non-causal mass"
    assert torch.allclose(out[0].sum(-1), torch.ones(hq, n), atol=1e-4)
    assert torch.all(out[1, :, :, :2] == 0), "fully padded key blocks got mass"
    assert torch.allclose(out[1, :, 3:].sum(-1), torch.ones(hq, n - 3), atol=1e-4)


def test_quest_bound_holds_for_every_key_and_is_tight_for_one_key_blocks():
    torch.manual_seed(2)
    q, k = torch.randn(1, 2, 50, 16), torch.randn(1, 2, 96, 16)
    valid = torch.ones(1, 96, dtype=torch.bool)
    valid[0, 40:48] = False
    kmin, kmax = key_block_bounds(k, 16, valid)
    ub = qk_upper_bound(q, kmin, kmax)  # [1, 2, 50, 6]
    dots = (q @ k.transpose(-1, -2)).masked_fill(~valid[:, None, None, :], float("-inf"))
    true = dots.view(1, 2, 50, 6, 16).amax(-1)
    assert torch.all(ub >= true - 1e-4)
    one = key_block_bounds(k, 1)  # blocks of one key: min = max = the key, the bound is q . k
    assert torch.allclose(qk_upper_bound(q, *one), q @ k.transpose(-1, -2), atol=1e-4)


def test_quest_finds_a_planted_block_mean_pooling_misses():
    torch.manual_seed(1)
    s, d = 512, 32
    q, k = torch.randn(1, 1, s, d) * 0.1, torch.randn(1, 1, s, d) * 0.1
    direction = torch.randn(d)
    q[0, 0, 448:] += direction * 2
    k[0, 0, 130] += direction * 6  # one key in block 2 matches the last query block
    k[0, 0, 131] -= direction * 6  # ... and its neighbour cancels it in the block mean
    quest = get_estimator("quest")(q, k, EstimatorContext(block_size=64))
    pooled = get_estimator("pooled")(q, k, EstimatorContext(block_size=64))
    oracle = get_estimator("oracle")(q, k, EstimatorContext(block_size=64))
    assert int(oracle[0, 0, 7, :7].argmax()) == 2
    assert int(quest[0, 0, 7, :7].argmax()) == 2
    assert int(pooled[0, 0, 7, :7].argmax()) != 2


def test_maxpool_target_matches_brute_force():
    torch.manual_seed(3)
    q, k = torch.randn(1, 2, 100, 8), torch.randn(1, 1, 100, 8)
    scores = (q @ k.expand(1, 2, 100, 8).transpose(-1, -2)) / math.sqrt(8)
    causal = torch.ones(100, 100, dtype=torch.bool).tril()
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
    pad = torch.nn.functional.pad(probs, (0, 28, 0, 28))  # 100 -> 4 blocks of 32
    peak = pad.view(1, 2, 4, 32, 4, 32).amax(dim=(3, 5))
    want = peak / peak.sum(-1, keepdim=True)
    got = block_attention_maxpool(q, k, 32, chunk_blocks=3)
    assert torch.allclose(got, want, atol=1e-6)
    mass = block_attention_mass(q, k, 32)
    assert torch.allclose(mass.sum(-1), torch.ones(1, 2, 4), atol=1e-5)


def test_output_contribution_target_matches_brute_force():
    """Per (query block, key block): mean over the block's queries of sum_k p_rk |v_k - o_r|, rows
    normalised; GQA values repeated per query head."""
    torch.manual_seed(4)
    q, k, v = torch.randn(1, 2, 100, 8), torch.randn(1, 1, 100, 8), torch.randn(1, 1, 100, 8)
    scores = (q @ k.expand(1, 2, 100, 8).transpose(-1, -2)) / math.sqrt(8)
    causal = torch.ones(100, 100, dtype=torch.bool).tril()
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)  # [1, 2, 100, 100]
    out = probs @ v.expand(1, 2, 100, 8)
    dist = (v.expand(1, 2, 100, 8)[:, :, None, :, :] - out[:, :, :, None, :]).norm(dim=-1)
    part = torch.nn.functional.pad(probs * dist, (0, 28))  # 100 -> 4 key blocks of 32
    tiles = part.view(1, 2, 100, 4, 32).sum(-1)  # [1, 2, rows, key blocks]
    rows = torch.arange(100) // 32
    want = torch.stack([tiles[:, :, rows == i].mean(2) for i in range(4)], 2)
    want = want / want.sum(-1, keepdim=True)
    got = block_attention_contribution(q, k, v, 32, chunk_blocks=3)
    assert torch.allclose(got, want, atol=1e-5)
    # values all equal: nothing to lose by dropping, every block contributes 0 (normalised rows of 0)
    flat = block_attention_contribution(q, k, torch.ones(1, 1, 100, 8), 32)
    assert float(flat.abs().max()) < 1e-3


def test_rotate_matches_transformers_and_unrotate_inverts_it():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    x = torch.randn(2, 3, 40, 32)
    pos = torch.arange(7, 47).expand(2, 40)
    cos, sin = rope_cos_sin(pos, INV_FREQ)
    emb = torch.cat([pos[..., None].float() * INV_FREQ] * 2, -1)
    want, _ = apply_rotary_pos_emb(x, x, emb.cos(), emb.sin())
    got = rotate(x, cos[:, None], sin[:, None])
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(unrotate(got, cos[:, None], sin[:, None]), x, atol=1e-5)
    c, s = cos[:, None], sin[:, None]
    assert torch.allclose(unrotate(rotate(x, c, s, 1.3), c, s, 1.3), x, atol=1e-5)


def test_gate_v2_recovers_the_pre_rope_queries_of_a_real_model(quality_tiny):
    model, tok = quality_tiny
    attn = model.model.layers[0].self_attn
    pre: dict[str, torch.Tensor] = {}
    hook = attn.q_proj.register_forward_hook(lambda m, i, o: pre.__setitem__("q", o.detach()))
    post: dict[str, torch.Tensor] = {}

    def on_layer(call):
        if call.layer_idx == 0:
            post["q"] = call.query.detach()

    ids = tok("def f(x):\n    return x * 2\n" * 8, return_tensors="pt")["input_ids"][:, :96]
    try:
        with torch.no_grad(), capture_attention(model, on_layer):
            model(input_ids=ids)
    finally:
        hook.remove()
    b, s, _ = pre["q"].shape
    q_pre = pre["q"].view(b, s, -1, attn.head_dim).transpose(1, 2)
    inv_freq, scaling = model_rope(model)
    cos, sin = rope_cos_sin(torch.arange(s)[None], inv_freq)
    assert torch.allclose(unrotate(post["q"], cos[:, None], sin[:, None], scaling), q_pre, atol=1e-4)


def test_block_rope_scores_do_not_move_when_the_sequence_shifts_by_whole_blocks():
    torch.manual_seed(4)
    bs, s = 32, 256
    plan = _plan_with_weights(bs, perturb=0.2)  # trained-like: projections far from identity
    q_pre, k_pre = torch.randn(1, 6, s, 32), torch.randn(1, 2, s, 32)

    def scores(name: str, offset: int) -> torch.Tensor:
        pos = torch.arange(offset, offset + s)[None]
        cos, sin = rope_cos_sin(pos, INV_FREQ)
        q, k = rotate(q_pre, cos[:, None], sin[:, None]), rotate(k_pre, cos[:, None], sin[:, None])
        ctx = EstimatorContext(block_size=bs, layer_idx=0, plan=plan, positions=pos)
        return get_estimator(name)(q, k, ctx)

    base = scores("gate_v2", 0)
    for blocks in (1, 3, 40):
        assert torch.allclose(scores("gate_v2", blocks * bs), base, atol=1e-4), blocks
    # the post-rotary gate pools rotated max/min features, so a shift changes its scores
    assert not torch.allclose(scores("gate", 3 * bs), scores("gate", 0), atol=1e-3)


@pytest.fixture(scope="module")
def windows(quality_tiny):
    _, tok = quality_tiny
    return pack_token_windows(tok, corpus_texts("calibration"), 512, 3)


def test_gate_v2_distils_the_output_contribution_target(quality_tiny, windows):
    model, _ = quality_tiny
    cfg = GateTrainConfig(kind="gate_v2", target="output", steps=40, seed=0)
    gate, rep = train_gate(model, windows[:2], cfg)
    assert 0 < rep.final_loss < 0.9 * rep.initial_loss
    assert all(torch.isfinite(t).all() for t in gate.to_tensors().values()), "training diverged"
    with pytest.raises(ValueError, match="target"):
        GateTrainConfig(kind="gate", target="output")  # the v1 gate distils mass or maxpool only


def test_gate_v2_distils_and_round_trips_through_a_plan(quality_tiny, windows, tmp_path):
    model, _ = quality_tiny
    gate, rep = train_gate(model, windows[:2], GateTrainConfig(kind="gate_v2", steps=40, seed=0))
    assert 0 < rep.final_loss < 0.9 * rep.initial_loss
    assert all(torch.isfinite(t).all() for t in gate.to_tensors().values()), "training diverged"
    q, k = torch.randn(1, SHAPE.num_heads, 256, 32), torch.randn(1, SHAPE.num_kv_heads, 256, 32)
    scores = gate.layer_log_probs(1, q[:, :4, :, :16], k[:, :2, :, :16]).exp()
    assert torch.allclose(scores.sum(-1), torch.ones(1, 4, 4), atol=1e-5)
    plan = SparsePlan(estimator="gate_v2", tau=0.9, tensors=gate.to_tensors())
    _, digest = plan_io.save(plan, tmp_path / "p", config=model.config)
    loaded = plan_io.load(tmp_path / "p", config=model.config)
    assert loaded.content_hash() == plan.content_hash() == digest
    assert set(loaded.tensors) == set(plan.tensors)
    ids = torch.tensor([windows[2]])
    outs = []
    for p in (plan, loaded):
        sparsify(model, p)
        try:
            with torch.no_grad():
                outs.append(model(input_ids=ids).logits)
        finally:
            unsparsify(model)
    assert torch.equal(outs[0], outs[1])
    # weights for another model are refused by name
    other = SparsePlan(estimator="gate_v2", tensors=BlockGateV2(SHAPE, 64, INV_FREQ).to_tensors())
    plan_io.save(other, tmp_path / "other")
    with pytest.raises(PlanError, match="gate_v2 weights are for a different model"):
        plan_io.load(tmp_path / "other", config=model.config)


# Written by the gate (v1) code of main before gate_v2 existed, for the quality_tiny model (script:
# train 30 steps on 2 windows, tau 0.6 / layer 1 tau 0.8, logits of the last 16 positions saved).
OLD_PLAN_HASH = "499e7bc7f54fbe82535b6a7711dfb78de03bfd7c2046e5448970d45e3d8d5449"


def test_old_gate_plan_loads_and_runs_unchanged(quality_tiny):
    import json

    model, _ = quality_tiny
    old = FIXTURES / "gate_v1_plan"
    plan = plan_io.load(old, config=model.config)
    assert plan.estimator == "gate"
    assert plan.content_hash() == json.loads((old / "plan.sha256").read_text())["content_hash"]
    assert plan.content_hash() == OLD_PLAN_HASH
    ref = torch.load(old / "expected.pt", weights_only=True)
    sparsify(model, plan)
    try:
        with torch.no_grad():
            logits = model(input_ids=ref["input_ids"], logits_to_keep=16).logits
    finally:
        unsparsify(model)
    assert torch.allclose(logits, ref["logits"], atol=1e-5), "the old plan behaves differently now"
    assert not torch.allclose(logits, ref["dense_logits"], atol=1e-3), "the old plan is sparse"


def test_chunked_pre_rope_pooling_equals_the_plain_path():
    from sparse_core.estimators.learned_gate_v2 import pool_features

    torch.manual_seed(6)
    q, k = torch.randn(1, 6, 640, 32), torch.randn(1, 2, 640, 32)
    fast = pool_features(q, k, 64, INV_FREQ, 1.1)  # whole blocks, no padding: chunked path
    plain = pool_features(q, k, 64, INV_FREQ, 1.1, key_valid=torch.ones(1, 640, dtype=torch.bool))
    for a, b in zip(fast, plain, strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_gate_v2_decode_page_scores_are_its_prefill_scores_of_a_one_token_block(padded):
    """A decode step's query opening a new page is a one-token query block: the pages' estimated
    masses must be gate_v2's prefill row for that block (pre-RoPE pooling, block RoPE, prior),
    including after more pages complete (the cached projected keys) and with whole padded pages."""
    from sparse_core.decode.pages import summarize, sync
    from sparse_core.decode.scoring import page_logits

    torch.manual_seed(3)
    bs, hq, hkv = 32, SHAPE.num_heads, SHAPE.num_kv_heads
    plan = _plan_with_weights(bs, perturb=0.05).with_(estimator="gate_v2")
    q, k = torch.randn(2, hq, 8 * bs + 1, 32), torch.randn(2, hkv, 8 * bs + 1, 32)
    valid = None
    if padded:
        valid = torch.ones(2, 8 * bs + 1, dtype=torch.bool)
        valid[1, : 2 * bs] = False  # two whole pages of left padding in the second row
    pages = None
    for length in (5 * bs + 1, 8 * bs + 1):  # the second call appends to the first's summary
        kv = None if valid is None else valid[:, :length]
        pages = summarize(k[:, :, :length], bs) if pages is None else sync(pages, k[:, :, :length], bs)
        logits = page_logits("gate_v2", plan, 1, q[:, :, length - 1], k[:, :, :length], pages, 0.0, kv)
        ctx = EstimatorContext(block_size=bs, layer_idx=1, plan=plan, key_valid=kv)
        want = get_estimator("gate_v2")(q[:, :, :length], k[:, :, :length], ctx)[:, :, -1]  # [B, Hq, P]
        got = torch.softmax(logits, -1)
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5), (length, padded)
    if padded:
        assert torch.all(got[1, :, :2] == 0)


def test_gate_v2_decode_rotates_a_mid_page_query_at_its_page_start():
    """A query inside a page: prefill pools its block's pre-RoPE queries and rotates the block at its
    first position. With every query of the last block sharing one pre-RoPE vector, the prefill row
    and the decode step must rank the complete pages alike (masses renormalised over them; the
    partial page's prior differs by design: decode counts the tokens this query sees)."""
    from sparse_core.decode.pages import summarize
    from sparse_core.decode.scoring import page_logits

    torch.manual_seed(4)
    bs, hq, hkv, length = 32, SHAPE.num_heads, SHAPE.num_kv_heads, 5 * 32 + 7
    plan = _plan_with_weights(bs, perturb=0.05).with_(estimator="gate_v2")
    q, k = torch.randn(1, hq, length, 32), torch.randn(1, hkv, length, 32)
    u = torch.randn(1, hq, 1, 32)
    pos = torch.arange(5 * bs, length)
    cos, sin = rope_cos_sin(pos, INV_FREQ)
    q[:, :, 5 * bs :] = rotate(u.expand(1, hq, len(pos), 32), cos, sin)
    logits = page_logits("gate_v2", plan, 0, q[:, :, -1], k, summarize(k, bs), 0.0)
    want = get_estimator("gate_v2")(q, k, EstimatorContext(block_size=bs, layer_idx=0, plan=plan))[:, :, -1]
    got = torch.softmax(logits, -1)[..., :5]
    want = want[..., :5]
    assert torch.allclose(got / got.sum(-1, keepdim=True), want / want.sum(-1, keepdim=True), atol=1e-5)
