"""`capture.selection_drop`: the dropped mass and output error of block selections, against the
attention computed with the element mask itself."""

import math

import pytest
import torch

from sparse_core.capture import block_attention_mass, repeat_kv, selection_drop


def _masked_attention(q, k, v, keep, block_size):
    """Softmax over the kept causal keys only, [Hq, S, D]."""
    hq, s, d = q.shape[1], q.shape[2], q.shape[3]
    kk = repeat_kv(k, hq // k.shape[1])[0]
    vv = repeat_kv(v, hq // v.shape[1])[0]
    scores = q[0] @ kk.transpose(-1, -2) / math.sqrt(d)
    blk = torch.arange(s) // block_size
    elem = keep[:, blk][:, :, blk] & (torch.arange(s)[:, None] >= torch.arange(s)[None, :])
    return torch.softmax(scores.masked_fill(~elem, float("-inf")), -1) @ vv


@pytest.mark.parametrize("s", [96, 128])  # a partial last block, and whole blocks
def test_selection_drop_matches_the_masked_attention(s):
    torch.manual_seed(0)
    hq, hkv, d, bs = 4, 2, 16, 32
    q, k, v = torch.randn(1, hq, s, d), torch.randn(1, hkv, s, d), torch.randn(1, hkv, s, d)
    nb = math.ceil(s / bs)
    causal = torch.tril(torch.ones(nb, nb, dtype=torch.bool))
    eye = torch.eye(nb, dtype=torch.bool)
    keeps = [causal.expand(hq, nb, nb), eye.expand(hq, nb, nb).clone()]
    rand = (torch.rand(hq, nb, nb) < 0.5) & causal | eye
    keeps.append(rand)
    dropped, err = selection_drop(q, k, v, bs, keeps, chunk_blocks=2)
    assert dropped.shape == err.shape == (3, hq, nb)
    dense = _masked_attention(q, k, v, causal.expand(hq, nb, nb), bs)
    rms = dense.pow(2).sum(-1).mean(-1).sqrt()  # [Hq]
    mass = block_attention_mass(q, k, bs)[0]  # [Hq, nb, nb]
    rows = torch.arange(s) // bs
    for m, keep in enumerate(keeps):
        sparse = _masked_attention(q, k, v, keep, bs)
        e = (sparse - dense).norm(dim=-1) / rms[:, None]  # [Hq, S]
        want_err = torch.stack([e[:, rows == i].mean(-1) for i in range(nb)], -1)
        torch.testing.assert_close(err[m], want_err, atol=1e-5, rtol=1e-4)
        # the row-mean dropped mass of a block: its block mass summed over the dropped key blocks
        want_drop = (mass * ~keep).sum(-1)
        torch.testing.assert_close(dropped[m], want_drop, atol=1e-5, rtol=1e-4)
    assert float(err[0].abs().max()) < 1e-5 and float(dropped[0].abs().max()) < 1e-5  # all kept: exact
    assert float(err[1].mean()) > float(err[2].mean()) > 0  # fewer blocks, more error
