"""Probes: deterministic for a seed, exact lengths, the right answer among the candidates, and the
dense tiny model scored by log-likelihood rank (one prefill + cached candidates == full forwards)."""

from __future__ import annotations

import pytest
import torch

from sparse_core.probes import PROBE_KINDS, candidate_logprobs, generate_probes, score_probes


def test_deterministic_for_a_seed(quality_tiny):
    _, tok = quality_tiny
    a = generate_probes(tok, lengths=(512, 700), depths=(0.1, 0.9), seed=7)
    b = generate_probes(tok, lengths=(512, 700), depths=(0.1, 0.9), seed=7)
    c = generate_probes(tok, lengths=(512, 700), depths=(0.1, 0.9), seed=8)
    assert [p.digest() for p in a] == [p.digest() for p in b]
    assert [p.digest() for p in a] != [p.digest() for p in c]
    assert len(a) == len(PROBE_KINDS) * 2 * 2


def test_probe_shape(quality_tiny):
    _, tok = quality_tiny
    for p in generate_probes(tok, lengths=(600,), depths=(0.5,), seed=1):
        assert len(p.prompt_ids) == 600
        assert len(p.candidates) == 10
        assert len({tuple(c) for c in p.candidates}) == 10, "candidates are distinct"
        assert tok.decode(p.candidates[p.answer_index]).strip() == p.answer_text
        assert p.answer_text in tok.decode(p.prompt_ids), "the answer is in the context"


def test_passkey_depth_places_the_needle(quality_tiny):
    _, tok = quality_tiny
    early, late = generate_probes(tok, kinds=("passkey",), lengths=(1000,), depths=(0.1, 0.9), seed=2)
    pos = [
        tok.decode(p.prompt_ids).find("The pass key is") / len(tok.decode(p.prompt_ids))
        for p in (early, late)
    ]
    assert pos[0] < 0.3 < 0.7 < pos[1]


def test_cached_candidate_scoring_equals_full_forward(quality_tiny):
    model, tok = quality_tiny
    p = generate_probes(tok, kinds=("kv",), lengths=(300,), depths=(0.5,), seed=0)[0]
    fast = candidate_logprobs(model, p.prompt_ids, p.candidates)
    for c, got in zip(p.candidates, fast, strict=True):
        ids = torch.tensor([p.prompt_ids + c])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0, len(p.prompt_ids) - 1 : -1].float(), -1)
        want = float(lp.gather(1, torch.tensor(c)[:, None]).sum())
        assert got == pytest.approx(want, abs=1e-3)


def test_dense_tiny_model_is_scored(quality_tiny):
    model, tok = quality_tiny
    probes = generate_probes(tok, kinds=("passkey", "vartrack"), lengths=(400,), depths=(0.2, 0.8), seed=0)
    res = score_probes(model, probes)
    assert len(res.outcomes) == 4
    for o, p in zip(res.outcomes, probes, strict=True):
        assert 1 <= o.rank <= len(p.candidates)
        assert o.correct == (o.rank == 1) == (o.margin > 0)
    assert 0.0 <= res.accuracy <= 1.0
    assert set(res.accuracy_by()) == {"passkey@400", "vartrack@400"}


def test_bad_arguments():
    from sparse_core.testing import build_tokenizer

    tok = build_tokenizer()
    with pytest.raises(ValueError, match="unknown probe kind"):
        generate_probes(tok, kinds=("nope",))
    with pytest.raises(ValueError, match="too short"):
        generate_probes(tok, kinds=("passkey",), lengths=(20,), depths=(0.5,))
