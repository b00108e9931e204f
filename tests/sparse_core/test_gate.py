"""The learned gate: distillation lowers its loss, training resumes from checkpoints, and the
registered `gate` estimator returns valid block-mass estimates that a sparsified model can use."""

from __future__ import annotations

import json

import pytest
import torch

from sparse_core.capture import block_attention_mass, capture_attention
from sparse_core.corpus import corpus_texts, pack_token_windows
from sparse_core.estimators import EstimatorContext, get_estimator
from sparse_core.estimators.learned_gate import BlockGate, GateShape, GateShapeError, pool_features
from sparse_core.scorer_training import GateTrainConfig, train_gate


@pytest.fixture(scope="module")
def windows(quality_tiny):
    _, tok = quality_tiny
    return pack_token_windows(tok, corpus_texts("calibration"), 512, 3)


def test_distillation_lowers_loss(quality_tiny, windows):
    model, _ = quality_tiny
    before = [p.detach().clone() for p in model.parameters()]
    gate, rep = train_gate(model, windows, GateTrainConfig(steps=60, seed=0))
    assert rep.n_sequences == 3 and rep.steps == 60 and rep.device == "cpu"
    assert rep.final_loss < 0.8 * rep.initial_loss
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)), (
        "base weights changed"
    )
    assert not any(p.requires_grad for p in gate.parameters())


def test_training_resumes_from_checkpoint(quality_tiny, windows, tmp_path):
    model, _ = quality_tiny
    ck = tmp_path / "ck"
    cfg = GateTrainConfig(steps=20, seed=1, checkpoint_dir=str(ck), checkpoint_every=10)
    g1, r1 = train_gate(model, windows[:2], cfg)
    assert (ck / "gate_checkpoint.pt").is_file()
    assert len(list(ck.glob("features_train_*.safetensors"))) == 2
    # the same run again starts from the saved step: nothing left to train, same weights
    g2, r2 = train_gate(model, windows[:2], cfg)
    assert r2.resumed_from_step == 20
    for a, b in zip(g1.parameters(), g2.parameters(), strict=True):
        assert torch.equal(a, b)
    # a longer run continues from step 20 rather than from scratch
    with pytest.raises(ValueError, match="different gate-training run"):
        train_gate(model, windows[1:], cfg)  # other data, same dir: refused
    meta = json.loads((ck / "run.json").read_text())
    assert meta["steps"] == 20


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["gate", "gate_v2"])
def test_training_runs_on_the_models_device(quality_tiny, windows, kind):
    """On a GPU (the device check; CI has none) a gate trains where the model is, from the same
    initial weights as on the CPU, to about the same loss; its plan tensors come back on the CPU."""
    import copy

    model, _ = quality_tiny
    cfg = GateTrainConfig(steps=30, seed=0, kind=kind)
    g_cpu, r_cpu = train_gate(model, windows, cfg)
    g_gpu, r_gpu = train_gate(copy.deepcopy(model).cuda(), windows, cfg)
    assert r_gpu.device.startswith("cuda") and r_cpu.device == "cpu"
    assert all(p.is_cuda for p in g_gpu.parameters())
    assert r_gpu.initial_loss == pytest.approx(r_cpu.initial_loss, rel=1e-3)
    assert r_gpu.final_loss < 0.5 * r_gpu.initial_loss
    assert r_gpu.final_loss == pytest.approx(r_cpu.final_loss, rel=0.05)
    tensors = g_gpu.to_tensors()
    assert tensors and all(t.device.type == "cpu" for t in tensors.values())


def test_gate_estimator_is_a_valid_block_distribution(quality_tiny, windows):
    from sparse_core import SparsePlan

    model, _ = quality_tiny
    gate, _ = train_gate(model, windows[:1], GateTrainConfig(steps=5))
    plan = SparsePlan(estimator="gate", block_size=64)
    plan.tensors = gate.to_tensors()
    grab = {}

    def on_layer(call):
        grab[call.layer_idx] = (call.query, call.key)

    with capture_attention(model, on_layer):
        model(input_ids=torch.tensor([windows[0][:300]]))
    q, k = grab[1]
    est = get_estimator("gate")
    scores = est(q, k, EstimatorContext(block_size=64, layer_idx=1, plan=plan))
    nb = 5
    assert scores.shape == (1, q.shape[1], nb, nb)
    assert torch.all(scores.triu(1) == 0)
    assert torch.allclose(scores.sum(-1), torch.ones(1, q.shape[1], nb), atol=1e-5)
    # block pooling of a partial last block uses only its real tokens
    qbar, kpool = pool_features(q, k, 64)
    assert torch.allclose(qbar[:, :, -1], q[:, :, 256:300].mean(2), atol=1e-5)
    assert torch.allclose(kpool[:, :, -1, : k.shape[-1]], k[:, :, 256:300].amax(2))
    # targets: rows of the dense block-mass map are distributions too
    tgt = block_attention_mass(q, k, 64)
    assert torch.allclose(tgt.sum(-1), torch.ones_like(tgt.sum(-1)), atol=1e-5)


def test_gate_tensors_for_another_model_are_refused(quality_tiny):
    model, _ = quality_tiny
    shape = GateShape.from_config(model.config)
    tensors = BlockGate(shape, 64).to_tensors()
    other = GateShape(
        shape.num_layers, shape.num_heads * 2, shape.num_kv_heads, shape.head_dim, shape.gate_dim
    )
    with pytest.raises(GateShapeError, match="different model"):
        BlockGate.from_tensors(tensors, other, 64)
    fewer = {k: v for k, v in tensors.items() if not k.startswith("gate.1.")}
    with pytest.raises(GateShapeError, match="missing"):
        BlockGate.from_tensors(fewer, shape, 64)
