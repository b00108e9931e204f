"""Plan artifacts: round-trip with a stable content hash, edits and corrupt weights detected, plans
made for another model refused with a clear error."""

from __future__ import annotations

import json

import pytest
import torch

from sparse_core import PlanError, SparsePlan, plan_io
from sparse_core.estimators.learned_gate import BlockGate, GateShape
from sparse_core.testing import tiny_config


def _gate_plan(config) -> SparsePlan:
    plan = SparsePlan(
        estimator="gate", tau=0.9, layer_overrides={1: {"tau": 0.8}}, head_overrides={0: {2: 0.95}}
    )
    gate = BlockGate(GateShape.from_config(config), 64)
    with torch.no_grad():
        for p in gate.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.01)
    plan.tensors = gate.to_tensors()
    plan.metadata["fidelity"] = {"kl": 0.004}
    return plan


def test_round_trip_and_stable_hash(tmp_path):
    cfg = tiny_config("llama")
    plan = _gate_plan(cfg)
    h_mem = plan_io.stamp_tensors_digest(plan).content_hash()
    _, h_saved = plan_io.save(plan, tmp_path / "p", config=cfg)
    assert h_saved == h_mem
    loaded = plan_io.load(tmp_path / "p", config=cfg)
    assert loaded.content_hash() == h_saved
    assert loaded.to_dict() == plan.to_dict()
    assert set(loaded.tensors) == set(plan.tensors)
    for k in plan.tensors:
        assert torch.equal(loaded.tensors[k], plan.tensors[k])
    # saving again writes identical bytes (deterministic JSON and safetensors)
    plan_io.save(loaded, tmp_path / "q", config=cfg)
    for name in ("plan.json", "plan_tensors.safetensors", "plan.sha256"):
        assert (tmp_path / "p" / name).read_bytes() == (tmp_path / "q" / name).read_bytes()
    # provenance metadata does not change the hash; a selection field does
    assert loaded.with_(metadata={**loaded.metadata, "note": "x"}).content_hash() == h_saved
    assert loaded.with_(tau=0.5).content_hash() != h_saved


def test_plan_for_another_model_is_rejected(tmp_path):
    cfg = tiny_config("llama", layers=2, heads=4, kv_heads=2)
    plan_io.save(_gate_plan(cfg), tmp_path / "p", config=cfg)
    other = tiny_config("llama", layers=3, heads=4, kv_heads=2)
    with pytest.raises(PlanError, match="different model"):
        plan_io.load(tmp_path / "p", config=other)
    wider = tiny_config("llama", layers=2, heads=8, kv_heads=2, hidden=128)
    with pytest.raises(PlanError, match="different model"):
        plan_io.load(tmp_path / "p", config=wider)


def test_gate_weights_of_another_model_are_rejected_without_a_stamp(tmp_path):
    cfg = tiny_config("llama", layers=2, heads=4, kv_heads=2)
    plan = _gate_plan(cfg)
    plan_io.save(plan, tmp_path / "p")  # no config: no model stamp, only the gate tensors tell
    with pytest.raises(PlanError, match="different model"):
        plan_io.load(tmp_path / "p", config=tiny_config("llama", layers=2, heads=4, kv_heads=4))


def test_edited_plan_and_corrupt_weights_are_detected(tmp_path):
    cfg = tiny_config("llama")
    plan_io.save(_gate_plan(cfg), tmp_path / "p", config=cfg)
    pj = tmp_path / "p" / "plan.json"
    data = json.loads(pj.read_text())
    data["tau"] = 0.5
    pj.write_text(json.dumps(data))
    with pytest.raises(PlanError, match="content hash"):
        plan_io.load(tmp_path / "p")

    plan_io.save(_gate_plan(cfg), tmp_path / "r", config=cfg)
    tf = tmp_path / "r" / "plan_tensors.safetensors"
    blob = bytearray(tf.read_bytes())
    blob[-1] ^= 0xFF
    tf.write_bytes(bytes(blob))
    with pytest.raises(PlanError, match="sha256"):
        plan_io.load(tmp_path / "r")
    with pytest.raises(PlanError, match="no sparse plan"):
        plan_io.load(tmp_path / "missing")
