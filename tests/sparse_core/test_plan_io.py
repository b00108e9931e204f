"""Plan artifacts: round-trip with a stable content hash, edits and corrupt weights detected, plans
made for another model refused with a clear error."""

from __future__ import annotations

import json

import pytest
import torch

from sparse_core import PlanError, SparsePlan, load_plan, plan_io
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


def test_a_plan_for_another_architecture_of_the_same_shape_is_refused(tmp_path):
    """model_shape alone let a Llama plan run on a Qwen2 of the same geometry; the type is stamped and
    compared too. A plan saved before the type was stamped is not asked."""
    cfg = tiny_config("llama", layers=2, heads=4, kv_heads=2)
    plan_io.save(SparsePlan(tau=0.9), tmp_path / "p", config=cfg)
    qwen = tiny_config("qwen2", layers=2, heads=4, kv_heads=2)
    with pytest.raises(PlanError, match=r"made for a 'llama' model \(metadata.model_type\), not 'qwen2'"):
        plan_io.load(tmp_path / "p", config=qwen)
    assert plan_io.load(tmp_path / "p", config=tiny_config("llama", layers=2, heads=4, kv_heads=2))
    old = SparsePlan(tau=0.9, metadata={"model_shape": plan_io.load(tmp_path / "p").metadata["model_shape"]})
    plan_io.save(old, tmp_path / "old")
    assert plan_io.load(tmp_path / "old", config=qwen).tau == 0.9


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


# -- damaged or mistaken plan files: a PlanError naming the file and the field, never a traceback -----------


def _saved(tmp_path, name: str = "p"):
    cfg = tiny_config("llama")
    plan_io.save(_gate_plan(cfg), tmp_path / name, config=cfg)
    return cfg, tmp_path / name


def _edit(directory, change, *, rehash: bool = True) -> None:
    """Edit plan.json with `change(data)`; with `rehash`, record the edited plan's hash as if saved so."""
    pj = directory / "plan.json"
    data = json.loads(pj.read_text())
    change(data)
    pj.write_text(json.dumps(data))
    if rehash:  # a plan this build refuses to read keeps the old record: it is refused before the hash
        try:
            digest = SparsePlan.from_dict(data).content_hash()
        except PlanError:
            return
        (directory / "plan.sha256").write_text(json.dumps({"content_hash": digest, "format_version": 1}))


def test_a_plan_json_that_is_not_utf8_or_not_json_text_names_the_file(tmp_path):
    cfg, d = _saved(tmp_path)
    with pytest.raises(PlanError, match=r"plan_tensors\.safetensors: not a plan\.json \(not UTF-8 text\)"):
        plan_io.load(d / "plan_tensors.safetensors", config=cfg)  # --plan at the wrong file of the directory
    pj = d / "plan.json"
    pj.write_bytes(pj.read_bytes()[:40] + b"\xff\xfe" + pj.read_bytes()[40:])
    with pytest.raises(PlanError, match=r"plan\.json: not a plan\.json \(not UTF-8 text\)"):
        plan_io.load(d, config=cfg)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (
            lambda m: m.update(gate_weights="plan_tensors.safetensors"),
            "metadata.gate_weights must be an object",
        ),
        (lambda m: m.update(model_shape=[2, 4, 2, 16]), "metadata.model_shape must be an object"),
        (
            lambda m: m["gate_weights"].update(file="/etc/hostname"),
            "metadata.gate_weights.file must be a file name",
        ),
        (
            lambda m: m["gate_weights"].update(file="../p2/x"),
            "metadata.gate_weights.file must be a file name",
        ),
    ],
)
def test_metadata_of_the_wrong_type_or_a_file_outside_the_plan_is_refused(tmp_path, change, field):
    cfg, d = _saved(tmp_path)
    _edit(d, lambda data: change(data["metadata"]))
    with pytest.raises(PlanError, match=rf"plan\.json: plan\.{field}"):
        plan_io.load(d, config=cfg)
    with pytest.raises(PlanError, match=rf"plan\.json: plan\.{field}"):
        load_plan(d, config=cfg)


def test_format_version_must_be_an_integer(tmp_path):
    cfg, d = _saved(tmp_path)
    _edit(d, lambda data: data.update(format_version=True))
    with pytest.raises(PlanError, match=r"plan\.json: format_version must be an integer, got True"):
        plan_io.load(d, config=cfg)


def test_truncated_tensors_are_refused_before_they_are_read(tmp_path):
    cfg, d = _saved(tmp_path)
    tf = d / "plan_tensors.safetensors"
    tf.write_bytes(tf.read_bytes()[:100])
    # the weights' sha256 dropped from plan.json: the plan's content hash no longer matches
    _edit(d, lambda data: data["metadata"]["gate_weights"].pop("sha256"), rehash=False)
    with pytest.raises(PlanError, match=r"plan\.json: content hash .* does not match"):
        plan_io.load(d, config=cfg)
    # and re-hashed to match: the bytes themselves are refused, naming the file
    _edit(d, lambda data: None)
    with pytest.raises(PlanError, match=r"plan_tensors\.safetensors: unreadable safetensors"):
        plan_io.load(d, config=cfg)


def test_a_plan_without_its_hash_record_is_refused(tmp_path):
    """plan_io.save writes plan.sha256 with every plan: deleting it must not turn the check off."""
    cfg, d = _saved(tmp_path)
    _edit(d, lambda data: data.update(tau=0.5), rehash=False)
    (d / "plan.sha256").unlink()
    with pytest.raises(PlanError, match=r"plan\.json: no plan\.sha256 beside it"):
        plan_io.load(d, config=cfg)


def test_the_old_gate_plan_fixture_still_loads():
    from pathlib import Path

    from sparse_core.plan_io import HASH_FILE

    old = Path(__file__).parents[1] / "fixtures" / "gate_v1_plan"
    assert (old / HASH_FILE).is_file()
    plan = plan_io.load(old, config=tiny_config("llama", layers=2, heads=4, kv_heads=2))
    assert plan.estimator == "gate" and plan.tensors


def test_errors_of_the_model_fit_name_the_plan_file(tmp_path):
    cfg, d = _saved(tmp_path)
    with pytest.raises(PlanError, match=r"p/plan\.json: plan was made for a different model"):
        plan_io.load(d, config=tiny_config("llama", layers=3, heads=4, kv_heads=2))
    _edit(d, lambda data: data.update(layer_overrides={"9": {"tau": 0.8}}))
    with pytest.raises(PlanError, match=r"p/plan\.json: plan\.layer_overrides names layer\(s\) \[9\]"):
        plan_io.load(d, config=cfg)
    cfg, e = _saved(tmp_path, "e")
    _edit(e, lambda data: data.update(estimator="nosuch"))
    with pytest.raises(PlanError, match=r"e/plan\.json: unknown estimator\(s\) \['nosuch'\]"):
        plan_io.load(e, config=cfg)
    (e / "plan.sha256").unlink()
    _edit(e, lambda data: data.update(estimator="gate"))
    _edit(
        e,
        lambda data: data["metadata"].update(model_shape={**data["metadata"]["model_shape"], "head_dim": 64}),
    )
    with pytest.raises(PlanError, match=r"e/plan\.json: plan was made for a different model \(head_dim"):
        plan_io.load(e, config=cfg)


def test_a_plan_saved_by_save_plan_as_the_registry_does_loads_checked(tmp_path):
    """The registry saves its artifacts with `save_plan`: that writes the hash record too, so a registered
    plan loads through the CLI's --plan (plan_io.load refuses a plan without one), and is checked."""
    from sparse_core.plan import save_plan

    cfg = tiny_config("llama")
    save_plan(_gate_plan(cfg), tmp_path / "registered")
    assert plan_io.load(tmp_path / "registered").estimator == "gate"
    _edit(tmp_path / "registered", lambda data: data.update(tau=0.5), rehash=False)
    with pytest.raises(PlanError, match="does not match the recorded"):
        plan_io.load(tmp_path / "registered")
