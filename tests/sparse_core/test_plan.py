"""SparsePlan: validation messages, JSON round trip, stable content hash, save/load with tensors."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from sparse_core.plan import PlanError, SparsePlan, load_plan, model_shape, save_plan

CONFIG = SimpleNamespace(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, hidden_size=256)


def test_defaults_and_layer_params():
    plan = SparsePlan(
        layer_overrides={2: {"tau": 0.7, "top_k": 5}}, head_overrides={2: {3: 0.99}}, dense_layers=[0]
    )
    assert plan.block_size == 64 and plan.estimator == "pooled"
    p2 = plan.layer_params(2)
    assert (p2.tau, p2.top_k, p2.head_tau, p2.dense) == (0.7, 5, {3: 0.99}, False)
    p1 = plan.layer_params(1)
    assert (p1.tau, p1.top_k, p1.head_tau) == (plan.tau, None, {})
    assert plan.layer_params(0).dense is True


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tau": 0.0}, "tau must be in (0, 1]"),
        ({"tau": 1.5}, "tau must be in (0, 1]"),
        ({"tau": float("nan")}, "tau must be in (0, 1]"),
        ({"block_size": 48}, "block_size must be a power of two"),
        ({"block_size": 8}, "block_size must be a power of two"),
        ({"local_blocks": 0}, "local_blocks must be an integer >= 1"),
        ({"sink_blocks": -1}, "sink_blocks must be an integer >= 0"),
        ({"top_k": 0}, "top_k must be None or an integer >= 1"),
        ({"min_density": 1.2}, "min_density must be None or in [0, 1]"),
        ({"estimator": ""}, "estimator must be a non-empty name"),
        ({"layer_overrides": {1: {"taux": 0.5}}}, "layer_overrides[1]: unknown key(s) ['taux']"),
        ({"layer_overrides": {1: {"tau": 2.0}}}, "layer_overrides[1].tau must be in (0, 1]"),
        ({"head_overrides": {0: {1: 0.0}}}, "head_overrides[0][1].tau must be in (0, 1]"),
        ({"dense_layers": [-1]}, "dense_layers"),
    ],
)
def test_invalid_plans_are_rejected_with_the_field_named(kwargs, message):
    with pytest.raises(PlanError) as exc:
        SparsePlan(**kwargs)
    assert message in str(exc.value)


def test_validate_for_rejects_layers_and_heads_the_model_lacks():
    SparsePlan(layer_overrides={3: {"tau": 0.8}}, head_overrides={3: {7: 0.9}}).validate_for(CONFIG)
    with pytest.raises(PlanError, match=r"layer_overrides names layer\(s\) \[4\].*has 4 layers"):
        SparsePlan(layer_overrides={4: {"tau": 0.8}}).validate_for(CONFIG)
    with pytest.raises(PlanError, match=r"dense_layers names layer\(s\) \[9\]"):
        SparsePlan(dense_layers=[9]).validate_for(CONFIG)
    with pytest.raises(PlanError, match=r"head_overrides\[1\] names head\(s\) \[8\]"):
        SparsePlan(head_overrides={1: {8: 0.9}}).validate_for(CONFIG)


def test_plan_for_another_model_shape_is_rejected():
    plan = SparsePlan(metadata={"model_shape": model_shape(CONFIG)})
    plan.validate_for(CONFIG)
    other = SimpleNamespace(
        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, hidden_size=256
    )
    with pytest.raises(PlanError, match="different model.*num_key_value_heads: plan 2 vs model 4"):
        plan.validate_for(other)


def test_json_round_trip_and_stable_hash():
    plan = SparsePlan(
        tau=0.85,
        top_k=12,
        layer_overrides={1: {"tau": 0.95}},
        head_overrides={0: {2: 0.99}},
        dense_layers=(3,),
        metadata={"budget": {"kl": 0.01}},
    )
    again = SparsePlan.from_json(plan.to_json())
    assert again == plan
    assert again.content_hash() == plan.content_hash()
    # provenance does not change behaviour, so not the hash; a selection field does
    assert SparsePlan(**{**plan.__dict__, "metadata": {"fidelity": 1}}).content_hash() == plan.content_hash()
    assert plan.with_(tau=0.86).content_hash() != plan.content_hash()
    assert plan.with_(metadata={"gate_weights": {"sha256": "x"}}).content_hash() != plan.content_hash()
    # JSON keys are strings; loading restores int layer/head keys
    data = json.loads(plan.to_json())
    assert data["layer_overrides"] == {"1": {"tau": 0.95}}
    assert SparsePlan.from_dict(data).layer_overrides == {1: {"tau": 0.95}}
    assert len(plan.content_hash()) == 64


def test_from_dict_errors_name_the_source():
    with pytest.raises(PlanError, match=r"my.json: unknown field\(s\) \['bogus'\]"):
        SparsePlan.from_dict({"bogus": 1}, source="my.json")
    with pytest.raises(PlanError, match="my.json: unsupported format_version 99"):
        SparsePlan.from_dict({"format_version": 99}, source="my.json")
    with pytest.raises(PlanError, match="my.json: not valid JSON"):
        SparsePlan.from_json("{nope", source="my.json")
    with pytest.raises(PlanError, match="my.json: plan.tau must be"):
        SparsePlan.from_dict({"tau": -1}, source="my.json")


def test_save_and_load_with_tensors(tmp_path):
    plan = SparsePlan(tau=0.8, tensors={"layer0.wq": torch.arange(6.0).view(2, 3)})
    save_plan(plan, tmp_path / "p")
    assert plan.metadata["gate_weights"]["keys"] == ["layer0.wq"]
    loaded = load_plan(tmp_path / "p", CONFIG)
    assert loaded == plan and loaded.content_hash() == plan.content_hash()
    assert torch.equal(loaded.tensors["layer0.wq"], plan.tensors["layer0.wq"])
    # replaced weights are detected
    (tmp_path / "p" / "plan_tensors.safetensors").write_bytes(b"garbage")
    with pytest.raises(PlanError, match="sha256 does not match"):
        load_plan(tmp_path / "p")
    with pytest.raises(PlanError, match="no sparse plan at"):
        load_plan(tmp_path / "missing")
