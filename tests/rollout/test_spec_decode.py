"""The spec's optional `quality_budget.decode` section (sparse decode calibration)."""

from __future__ import annotations

import pytest
import yaml

from rollout.spec import SpecError, load_spec

from .usecase_helpers import EXAMPLES


def _spec_with(tmp_path, decode):
    data = yaml.safe_load((EXAMPLES / "docs-qa.yaml").read_text())
    data["quality_budget"]["decode"] = decode
    for name in ("docs_qa.jsonl",):
        (tmp_path / name).write_bytes((EXAMPLES / name).read_bytes())
    path = tmp_path / "docs-qa.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_decode_section_defaults_and_absence(tmp_path):
    spec = load_spec(_spec_with(tmp_path, {"prompt_tokens": 4096}))
    d = spec.quality_budget.decode
    assert (d.estimator, d.prompt_tokens, d.new_tokens, d.n_prompts, d.page_size) == (
        "quest",
        4096,
        64,
        2,
        16,
    )
    assert load_spec(EXAMPLES / "support-chat.yaml").quality_budget.decode.prompt_tokens == 512
    data = yaml.safe_load((EXAMPLES / "docs-qa.yaml").read_text())
    del data["quality_budget"]["decode"]
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / "docs_qa.jsonl").write_bytes((EXAMPLES / "docs_qa.jsonl").read_bytes())
    assert load_spec(tmp_path / "plain.yaml").quality_budget.decode is None
    assert load_spec(EXAMPLES / "docs-qa.yaml").quality_budget.decode.prompt_tokens == 3072


@pytest.mark.parametrize(
    ("decode", "field"),
    [
        ({"estimator": "magic"}, "quality_budget.decode.estimator"),
        ({"new_tokens": 4}, "quality_budget.decode.new_tokens"),
        ({"budget": 3}, "quality_budget.decode.budget"),
    ],
)
def test_bad_decode_section_names_the_field(tmp_path, decode, field):
    with pytest.raises(SpecError) as err:
        load_spec(_spec_with(tmp_path, decode))
    assert field in str(err.value)


def test_decode_confidence_is_optional_and_keeps_old_hashes(tmp_path):
    plain = load_spec(EXAMPLES / "docs-qa.yaml")
    assert plain.quality_budget.decode.confidence is None
    # unset, it is left out of the stored dict: specs stored before the field keep their hash
    assert "confidence" not in plain.to_dict()["quality_budget"]["decode"]
    assert "sensitivity_prompts" not in plain.to_dict()["quality_budget"]["decode"]  # its default, 2
    data = yaml.safe_load((EXAMPLES / "docs-qa.yaml").read_text())
    decode = {**data["quality_budget"]["decode"], "confidence": 0.95, "n_prompts": 10, "new_tokens": 16}
    bounded = load_spec(_spec_with(tmp_path, decode))
    assert bounded.quality_budget.decode.confidence == 0.95
    assert bounded.content_hash() != plain.content_hash()
    assert bounded.to_dict()["quality_budget"]["decode"]["confidence"] == 0.95
    # the windows the bounded search's candidates come from (beyond the prompts): 2 unless set
    assert bounded.quality_budget.decode.sensitivity_prompts == 2
    one = load_spec(_spec_with(tmp_path, {**decode, "sensitivity_prompts": 1}))
    assert one.to_dict()["quality_budget"]["decode"]["sensitivity_prompts"] == 1
    assert one.content_hash() != bounded.content_hash()
    with pytest.raises(SpecError, match="quality_budget.decode.sensitivity_prompts"):
        load_spec(_spec_with(tmp_path, {**decode, "sensitivity_prompts": 0}))
    with pytest.raises(SpecError, match="quality_budget.decode.confidence"):
        load_spec(_spec_with(tmp_path, {"confidence": 1.5}))
    # the bound's unit is a prompt: too few prompts is refused when the spec is read, not minutes
    # into a calibration (the defaults' 2 prompts; 10 at 0.95 over the search's 5 steps)
    with pytest.raises(SpecError, match=r"quality_budget.decode.*needs decode.n_prompts >= 10, got 2"):
        load_spec(_spec_with(tmp_path, {**decode, "n_prompts": 2}))


def test_decode_sensitivity_apart_keeps_old_hashes_and_needs_a_bound_and_a_trained_scorer(tmp_path):
    """quality_budget.decode.sensitivity_apart: off, the stored spec (and its hash) is as before; on,
    it is stored; it needs decode.confidence (only a bound reads sensitivity windows) and a scorer decode
    calibration trains (page_gate), each refused naming the setting when the spec is read."""
    plain = load_spec(EXAMPLES / "docs-qa.yaml")
    assert plain.quality_budget.decode.sensitivity_apart is False
    assert "sensitivity_apart" not in plain.to_dict()["quality_budget"]["decode"]
    data = yaml.safe_load((EXAMPLES / "docs-qa.yaml").read_text())
    decode = {**data["quality_budget"]["decode"], "confidence": 0.95, "n_prompts": 10, "new_tokens": 16}
    decode["estimator"] = "page_gate"
    shared = load_spec(_spec_with(tmp_path, decode))
    assert load_spec(_spec_with(tmp_path, {**decode, "sensitivity_apart": False})).content_hash() == (
        shared.content_hash()
    )
    apart = load_spec(_spec_with(tmp_path, {**decode, "sensitivity_apart": True}))
    assert apart.to_dict()["quality_budget"]["decode"]["sensitivity_apart"] is True
    assert apart.content_hash() != shared.content_hash()
    with pytest.raises(SpecError, match=r"quality_budget.decode.*sensitivity_apart needs decode.confidence"):
        load_spec(_spec_with(tmp_path, {"estimator": "page_gate", "sensitivity_apart": True}))
    with pytest.raises(SpecError, match=r"quality_budget.decode.*'quest' trains on none"):
        load_spec(_spec_with(tmp_path, {**decode, "estimator": "quest", "sensitivity_apart": True}))
