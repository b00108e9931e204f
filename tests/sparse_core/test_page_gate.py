"""The decode-trained page scorer (`page_gate`): its training rows are scored exactly as decode scores
pages, training lowers the loss on rows it did not see, and the weights travel with a saved plan."""

from __future__ import annotations

import pytest
import torch

from sparse_core import PlanError, SparsePlan, load_model, plan_io, sparsify, unsparsify
from sparse_core.capture import capture_attention
from sparse_core.decode.page_gate import (
    PageGate,
    page_gate_for_plan,
    page_rows,
    row_log_probs,
    row_loss,
    sample_rows,
    train_page_gate,
)
from sparse_core.decode.pages import summarize
from sparse_core.decode.plan import DecodePlan
from sparse_core.decode.scoring import gate_v2_page_logits
from sparse_core.estimators.learned_gate import GateShape
from sparse_core.estimators.learned_gate_v2 import model_rope
from sparse_core.testing import sample_text


def _windows(tok, n: int, length: int) -> list[list[int]]:
    ids = tok(sample_text(4 * n * length), add_special_tokens=False).input_ids
    return [ids[i * length : (i + 1) * length] for i in range(n)]


def _captured(model, ids) -> dict[int, tuple]:
    out: dict[int, tuple] = {}
    with (
        torch.no_grad(),
        capture_attention(model, lambda c: out.setdefault(c.layer_idx, (c.query[0], c.key[0], c.scaling))),
    ):
        model(input_ids=torch.tensor([ids]), logits_to_keep=1)
    return out


def test_training_rows_are_scored_as_decode_scores_pages(tiny_llama_dir):
    """For rows inside a page, on its last token and on the first token of a new page, the training
    log-probabilities equal the decode path's (gate_v2_page_logits on the cache up to the row), and
    the pages after a row's own get nothing."""
    model, tok = load_model(tiny_llama_dir)
    gate = PageGate(GateShape.from_config(model.config), 16, *model_rope(model))
    with torch.no_grad():
        for layer in gate.layers:  # away from the initialisation, so every feature counts
            layer.wk.add_(0.05 * torch.randn_like(layer.wk))
            layer.wq.add_(0.05 * torch.randn_like(layer.wq))
            layer.prior.add_(0.5)
    (ids,) = _windows(tok, 1, 500)
    q, k, scale = _captured(model, ids)[1]
    rows = torch.tensor([70, 255, 256, 400, 499])
    r = page_rows(q, k, rows, 16, scale, gate.inv_freq, gate.rope_scaling)
    assert torch.allclose(r.target.sum(-1), torch.ones(()), atol=1e-5)
    lp = row_log_probs(gate.layers[1], r, 16, gate.inv_freq)
    for i, t in enumerate(rows.tolist()):
        cache = k[None, :, : t + 1]
        ref = torch.log_softmax(gate_v2_page_logits(q[None, :, t], cache, summarize(cache, 16), gate, 1), -1)[
            0
        ]
        n = ref.shape[-1]
        assert torch.allclose(lp[:, i, :n], ref, atol=1e-5), t
        assert torch.isinf(lp[:, i, n:]).all() and (r.target[:, i, n:] == 0).all()


def test_training_lowers_the_loss_on_rows_it_did_not_see(tiny_llama_dir):
    model, tok = load_model(tiny_llama_dir)
    train, held = _windows(tok, 2, 600), _windows(tok, 3, 600)[2]
    gate, rep = train_page_gate(model, train, page_size=16, rows_per_window=256, steps=40, seed=3)
    assert rep.windows == 2 and rep.rows == 512 and rep.loss_after < rep.loss_before
    init = PageGate(GateShape.from_config(model.config), 16, *model_rope(model))
    caps = _captured(model, held)
    rows = sample_rows(len(held), 128, 16, torch.Generator().manual_seed(9))
    better = 0
    for li, (q, k, scale) in caps.items():
        r = page_rows(q, k, rows, 16, scale, gate.inv_freq, gate.rope_scaling)
        with torch.no_grad():
            before = float(row_loss(init.layers[li], [r], 16, init.inv_freq))
            after = float(row_loss(gate.layers[li], [r], 16, gate.inv_freq))
        better += after < before
    assert better == len(caps)  # every layer predicts held-out page masses better than mean pooling


def test_weights_round_trip_through_a_saved_plan_and_misfits_are_refused(tiny_llama_dir, tmp_path):
    model, tok = load_model(tiny_llama_dir)
    gate, _ = train_page_gate(model, _windows(tok, 1, 300), page_size=16, rows_per_window=32, steps=5)
    plan = SparsePlan(
        block_size=32, decode=DecodePlan(estimator="page_gate", page_size=16), tensors=gate.to_tensors()
    )
    plan_io.save(plan, tmp_path / "p", config=model.config)
    loaded = plan_io.load(tmp_path / "p")
    assert loaded.content_hash() == plan_io.load(tmp_path / "p").content_hash()
    back = page_gate_for_plan(loaded)
    assert back.page_size == 16
    for a, b in zip(gate.parameters(), back.parameters(), strict=True):
        assert torch.equal(a, b)
    retrained = PageGate(GateShape.from_config(model.config), 16, *model_rope(model))
    loaded.tensors.update(retrained.to_tensors())  # new weights in the same dict: not the cached gate
    for a, b in zip(retrained.parameters(), page_gate_for_plan(loaded).parameters(), strict=True):
        assert torch.equal(a, b)
    loaded = plan_io.load(tmp_path / "p")
    sparsify(model, loaded)  # fits: page size 16 as trained
    with pytest.raises(PlanError, match=r"pooled over the page size it was trained at \(16 tokens\)"):
        sparsify(model, loaded.with_(decode=DecodePlan(estimator="page_gate", page_size=32)))
    with pytest.raises(PlanError, match="carries no page_gate weights"):
        sparsify(model, SparsePlan(block_size=32, decode=DecodePlan(estimator="page_gate", page_size=16)))
    unsparsify(model)


@pytest.mark.parametrize("length", [61, 64, 65])
def test_unpadded_decode_scoring_equals_the_general_path_with_partial_rotary_and_scaling(length):
    """The fast path for a cache without padding (rotations from one table per gate) ranks pages as
    the general path does, with rotary on 8 of 16 channels and an attention scaling of 1.3."""
    gen = torch.Generator().manual_seed(length)
    gate = PageGate(GateShape(2, 4, 2, 16, 16), 8, torch.rand(4, generator=gen), rope_scaling=1.3)
    with torch.no_grad():
        for p in gate.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    k = torch.randn(1, 2, length, 16, generator=gen)
    q = torch.randn(1, 4, 16, generator=gen)
    s = summarize(k, 8)
    fast = gate_v2_page_logits(q, k, s, gate, 1)
    general = gate_v2_page_logits(q, k, summarize(k, 8), gate, 1, torch.ones(1, length, dtype=torch.bool))
    assert torch.allclose(torch.log_softmax(fast, -1), torch.log_softmax(general, -1), atol=1e-5)
