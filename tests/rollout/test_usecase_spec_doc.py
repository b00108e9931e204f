"""docs/usecase-spec.md's "complete example" is a spec `usecase add` takes without a warning that it
cannot work (review U3: its `task_delta: 0.02` on the docs-qa data made every plan stay dense)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _doc_example() -> dict:
    text = (ROOT / "docs" / "usecase-spec.md").read_text(encoding="utf-8")
    section = text.split("## A complete example", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block, "no yaml block under 'A complete example'"
    return yaml.safe_load(block.group(1))


def test_the_complete_example_is_added_with_the_sample_dataset_and_no_task_delta_warning(
    tmp_path: Path,
) -> None:
    from rollout.usecases import check_spec_file

    spec = _doc_example()
    spec["dataset"]["path"] = str(ROOT / "examples" / "usecases" / "docs_qa.jsonl")
    path = tmp_path / "docs-qa.yaml"
    path.write_text(yaml.safe_dump(spec))
    warnings = check_spec_file(path).validation.warnings
    assert not [w for w in warnings if w.startswith("quality_budget.task_delta")], warnings
