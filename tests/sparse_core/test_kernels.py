"""Every kernel equals SDPA at full density; sparse kernels equal SDPA restricted to the selected
blocks; MHA and GQA, padding, lengths not divisible by the block size, fp32 and bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparse_core import SparsePlan, sparse_attention
from sparse_core.estimators import available_estimators
from sparse_core.estimators.learned_gate import BlockGate, GateShape
from sparse_core.estimators.learned_gate_v2 import BlockGateV2
from sparse_core.kernels import available_kernels, key_valid_from_mask

FP32_TOL = 1e-4
BF16_TOL = 2e-2  # bf16 has an 8-bit mantissa; outputs are O(1)


def _qkv(b, hq, hkv, s, d=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=g).to(dtype) for h in (hq, hkv, hkv)]


def _reference(q, k, v, key_valid=None, block_mask=None, block_size=None):
    """SDPA in fp32 with causal (+ padding) (+ the selected blocks expanded to tokens)."""
    b, hq, s, _ = q.shape
    mask = torch.ones(s, s, dtype=torch.bool).tril()[None, None].expand(b, hq, s, s)
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]
    if block_mask is not None:
        bm = block_mask.repeat_interleave(hq // block_mask.shape[1], dim=1)
        tok = bm.repeat_interleave(block_size, -1).repeat_interleave(block_size, -2)[..., :s, :s]
        mask = mask & tok
    g = hq // k.shape[1]
    out = F.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1), attn_mask=mask
    )
    return torch.nan_to_num(out, nan=0.0)


def _padding(b, s):
    am = torch.ones(b, s, dtype=torch.long)
    am[0, :37] = 0  # left padding
    if b > 1:
        am[1, s - 50 :] = 0  # right padding
    return am


def _valid_rows(am):
    return am.bool()[:, None, :, None]


CASES = [  # (batch, q heads, kv heads, seq len, block)
    pytest.param(1, 4, 4, 256, 32, id="mha-divisible"),
    pytest.param(2, 6, 2, 300, 32, id="gqa-ragged"),
    pytest.param(1, 9, 3, 200, 64, id="smollm2-heads-ragged"),
]


@pytest.mark.parametrize("kernel", ["gather", "dense"])
@pytest.mark.parametrize(("b", "hq", "hkv", "s", "bs"), CASES)
@pytest.mark.parametrize("group_heads", [True, False])
def test_full_density_equals_sdpa_fp32(kernel, b, hq, hkv, s, bs, group_heads):
    q, k, v = _qkv(b, hq, hkv, s)
    plan = SparsePlan(block_size=bs, tau=1.0, group_heads=group_heads)
    out, info = sparse_attention(q, k, v, plan, kernel=kernel)
    assert info.density == 1.0
    assert (out - _reference(q, k, v)).abs().max().item() <= FP32_TOL
    am = _padding(b, s)
    out, _ = sparse_attention(q, k, v, plan, kernel=kernel, attention_mask=am)
    ref = _reference(q, k, v, key_valid=am.bool())
    assert not torch.isnan(out).any()
    assert ((out - ref).abs() * _valid_rows(am)).max().item() <= FP32_TOL


@pytest.mark.parametrize("kernel", ["gather", "dense"])
def test_full_density_equals_sdpa_bf16(kernel):
    q, k, v = _qkv(2, 6, 2, 300, dtype=torch.bfloat16)
    out, _ = sparse_attention(q, k, v, SparsePlan(block_size=32, tau=1.0), kernel=kernel)
    assert out.dtype == torch.bfloat16
    assert (out.float() - _reference(q, k, v)).abs().max().item() <= BF16_TOL


SPARSE_CASES = [*CASES, pytest.param(1, 9, 3, 1000, 32, id="smollm2-heads-32-blocks")]


@pytest.mark.parametrize(("b", "hq", "hkv", "s", "bs"), SPARSE_CASES)
@pytest.mark.parametrize("group_heads", [True, False])
@pytest.mark.parametrize("local_blocks", [1, 4])
def test_gather_sparse_equals_masked_sdpa(b, hq, hkv, s, bs, group_heads, local_blocks):
    """A 1-block and a 4-block local window (the default plans' window), on up to 32 blocks."""
    q, k, v = _qkv(b, hq, hkv, s, seed=3)
    plan = SparsePlan(block_size=bs, tau=0.6, top_k=3, local_blocks=local_blocks, group_heads=group_heads)
    am = _padding(b, s)
    for mask in (None, am):
        out, info = sparse_attention(q, k, v, plan, kernel="gather", attention_mask=mask, keep_selection=True)
        if -(-s // bs) > 2 * local_blocks:  # (a 4-block sequence under a 4-block window is dense)
            assert info.density < 1.0
        kv = None if mask is None else mask.bool()
        ref = _reference(q, k, v, key_valid=kv, block_mask=info.selection.mask(), block_size=bs)
        rows = torch.ones(b, 1, s, 1, dtype=torch.bool) if mask is None else _valid_rows(mask)
        assert ((out - ref).abs() * rows).max().item() <= FP32_TOL


def _four_d(am):
    """The 4D mask transformers builds for SDPA from a 2D one: causal & key padding, bool [B, 1, S, S]."""
    s = am.shape[1]
    return torch.ones(s, s, dtype=torch.bool).tril()[None, None] & am.bool()[:, None, None, :]


def _plan_with_gate_weights(**kw):
    """A plan carrying both learned gates' (perturbed initial) weights for 2 layers, 6/2 heads, dim 32."""
    torch.manual_seed(5)
    shape = GateShape(num_layers=2, num_heads=6, num_kv_heads=2, head_dim=32, gate_dim=32)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 32, 2).float() / 32))
    tensors = {}
    for gate in (BlockGate(shape, 32), BlockGateV2(shape, 32, inv_freq)):
        with torch.no_grad():
            for p in gate.parameters():
                p.add_(0.05 * torch.randn_like(p))
        tensors.update(gate.to_tensors())
    return SparsePlan(block_size=32, tensors=tensors, **kw)


def _check_padded_batch(estimator, kernel, s):
    """A left- and a right-padded row under a sparse selection, the padding given as the 2D mask, the 4D
    bool mask transformers builds and its additive form: the output equals SDPA restricted to the kept
    blocks (dense: to causal + padding)."""
    q, k, v = _qkv(2, 6, 2, s, seed=11)
    plan = _plan_with_gate_weights(estimator=estimator, tau=0.6, local_blocks=1)
    am = _padding(2, s)
    four_d = _four_d(am)
    additive = torch.zeros(four_d.shape).masked_fill(~four_d, torch.finfo(torch.float32).min)
    for mask in (am, four_d, additive):
        out, info = sparse_attention(
            q, k, v, plan, kernel=kernel, layer_idx=1, attention_mask=mask, keep_selection=True
        )
        blocks = None if kernel == "dense" else info.selection.mask()
        if blocks is not None:
            assert info.density < 1.0, (estimator, kernel, s)
        ref = _reference(q, k, v, key_valid=am.bool(), block_mask=blocks, block_size=32)
        assert not torch.isnan(out).any()
        assert ((out - ref).abs() * _valid_rows(am)).max().item() <= FP32_TOL, (estimator, kernel, s)


PADDED_LENGTHS = [pytest.param(256, id="whole-blocks"), pytest.param(200, id="ragged")]


@pytest.mark.parametrize("estimator", available_estimators())
@pytest.mark.parametrize("s", PADDED_LENGTHS)
def test_padded_batch_at_tau_below_one_every_estimator(estimator, s):
    """Every registered estimator on every uncompiled CPU kernel. A 4D mask over whole blocks used to
    crash the gather kernel (its key row was a strided view of the mask)."""
    for kernel in available_kernels("cpu"):
        if kernel != "flex":
            _check_padded_batch(estimator, kernel, s)


def test_padded_batch_at_tau_below_one_flex():
    """The same on the compiled flex kernel, in one test so the compile (about a minute on a CPU) is paid
    once: a new selection of the same shape reuses it."""
    if "flex" not in available_kernels("cpu"):
        pytest.skip("no FlexAttention in this torch")
    for s in (256, 200):
        for estimator in available_estimators():
            _check_padded_batch(estimator, "flex", s)


def test_flex_kernel_compiled():
    """One compiled shape (GQA, ragged length padded to a bucket of blocks): full density == SDPA,
    a sparse selection == masked SDPA, a new selection of the same shape runs without recompiling,
    and padding is honoured."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    import torch._dynamo

    q, k, v = _qkv(1, 4, 2, 600, seed=5)  # 19 blocks of 32 -> compiled as 20
    out, _ = sparse_attention(q, k, v, SparsePlan(block_size=32, tau=1.0), kernel="flex")
    assert (out - _reference(q, k, v)).abs().max().item() <= FP32_TOL

    counters = torch._dynamo.utils.counters
    before = counters["stats"]["unique_graphs"]
    for top_k in (2, 4):
        plan = SparsePlan(block_size=32, tau=0.5, top_k=top_k, local_blocks=1)
        out, info = sparse_attention(q, k, v, plan, kernel="flex", keep_selection=True)
        ref = _reference(q, k, v, block_mask=info.selection.mask(), block_size=32)
        assert info.density < 1.0
        assert (out - ref).abs().max().item() <= FP32_TOL
    assert counters["stats"]["unique_graphs"] == before, "a new selection recompiled the kernel"

    am = _padding(1, 600)
    out, _ = sparse_attention(q, k, v, SparsePlan(block_size=32, tau=1.0), kernel="flex", attention_mask=am)
    ref = _reference(q, k, v, key_valid=am.bool())
    assert ((out - ref).abs() * _valid_rows(am)).max().item() <= FP32_TOL


@pytest.mark.parametrize("bs", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_tiles_divide_the_blocks(bs, dtype):
    """On CUDA, blocks under Inductor's 128-row default tile get tiles that divide them (Inductor
    refuses a BlockMask its tile does not divide); the CPU and big blocks keep the defaults."""
    from sparse_core.kernels.flex import triton_tiles

    tiles = triton_tiles(torch.device("cuda"), dtype, bs)
    if bs >= 128:
        assert tiles is None
    else:
        assert bs % tiles["BLOCK_M"] == 0 and bs % tiles["BLOCK_N"] == 0
        assert tiles["BLOCK_M"] >= 16 and tiles["BLOCK_N"] >= 16  # Triton's smallest dot
    assert triton_tiles(torch.device("cpu"), dtype, bs) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kernel", ["flex", "gather"])
@pytest.mark.parametrize("bs", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_kernels_on_cuda(kernel, bs, dtype):
    """On a GPU (the device check; CI has none): the SmolLM2 head layout at a ragged length, full
    density == SDPA and a sparse selection == masked SDPA, for the compiled Triton flex kernel and
    gather, with and without padding, against a float32 reference on the CPU."""
    tol = 2e-3 if dtype == torch.float32 else BF16_TOL  # fp32 dots may run as tf32 in Triton
    q, k, v = _qkv(1, 9, 3, 1000, d=64, dtype=dtype, seed=7)
    qc, kc, vc = (t.cuda() for t in (q, k, v))
    out, info = sparse_attention(qc, kc, vc, SparsePlan(block_size=bs, tau=1.0), kernel=kernel)
    assert info.kernel == kernel
    assert (out.float().cpu() - _reference(q, k, v)).abs().max().item() <= tol
    plan = SparsePlan(block_size=bs, tau=0.5, top_k=3, local_blocks=1)
    out, info = sparse_attention(qc, kc, vc, plan, kernel=kernel, keep_selection=True)
    assert info.density < 1.0
    ref = _reference(q, k, v, block_mask=info.selection.mask().cpu(), block_size=bs)
    assert (out.float().cpu() - ref).abs().max().item() <= tol
    am = _padding(1, 1000)
    out, info = sparse_attention(
        qc, kc, vc, plan, kernel=kernel, attention_mask=am.cuda(), keep_selection=True
    )
    ref = _reference(q, k, v, key_valid=am.bool(), block_mask=info.selection.mask().cpu(), block_size=bs)
    assert ((out.float().cpu() - ref).abs() * _valid_rows(am)).max().item() <= tol


def test_key_valid_from_masks():
    s = 6
    am = torch.tensor([[0, 0, 1, 1, 1, 1]])
    assert torch.equal(key_valid_from_mask(am, s), am.bool())
    assert key_valid_from_mask(torch.ones(1, s), s) is None
    four_d = torch.ones(s, s, dtype=torch.bool).tril()[None, None] & am.bool()[:, None, None, :]
    assert torch.equal(key_valid_from_mask(four_d, s), am.bool())
    additive = torch.zeros(1, 1, s, s).masked_fill(~four_d, torch.finfo(torch.float32).min)
    assert torch.equal(key_valid_from_mask(additive, s), am.bool())
    assert key_valid_from_mask(four_d.expand(2, 1, s, s), s).is_contiguous()  # not a view of the diagonal
    with pytest.raises(ValueError, match="covers 6 keys but the sequence has 7"):
        key_valid_from_mask(am, 7)


def test_bad_inputs():
    q, k, v = _qkv(1, 3, 2, 128)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        sparse_attention(q, k, v, SparsePlan())
    q, k, v = _qkv(1, 2, 2, 128)
    with pytest.raises(ValueError, match="unknown kernel"):
        sparse_attention(q, k, v, SparsePlan(), kernel="fast")
    with pytest.raises(ValueError, match="prefill"):
        sparse_attention(q[:, :, :1], k, v, SparsePlan())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("estimator", ["pooled", "antidiagonal", "quest", "sampled"])
def test_compiled_selection_on_cuda(estimator):
    """On a GPU the training-free estimators select through torch.compile by default: the same blocks
    as the eager path, at two lengths (the second compiled with dynamic shapes) and a per-head tau, up
    to rounding (fused reductions may flip a block at the tau boundary: at most 0.5% of them)."""
    from sparse_core.kernels import compiles_selection, estimate_and_select

    assert compiles_selection(torch.device("cuda"), estimator)
    plan = SparsePlan(block_size=64, tau=0.9, estimator=estimator, head_overrides={0: {1: 0.6}})
    for s in (4096, 3000):
        q, k, _ = (t.cuda() for t in _qkv(1, 9, 3, s, d=64, dtype=torch.bfloat16, seed=s))
        params = plan.layer_params(0)
        a = estimate_and_select(q, k, plan, params, compiled=False)
        b = estimate_and_select(q, k, plan, params)
        differ = (a.mask() != b.mask()).sum().item()
        assert differ <= 0.005 * a.mask().sum().item(), (estimator, s, differ)
        assert abs(a.density - b.density) <= 0.005 * a.density
