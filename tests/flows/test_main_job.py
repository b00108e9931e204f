"""The main job on a tiny model: sample specs added once, each use case taken through calibrate ->
evaluate -> pilot (shadow + first split step) -> gate without blocking on approval, and a summary."""

from __future__ import annotations

from pathlib import Path

import yaml
from rich.console import Console

from tests.fixtures.flows import tiny_spec


def test_main_job_runs_the_short_pilot_and_leaves_go_waiting(
    mlflow_home, prefect_harness, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from flows.main_job import MainJobSettings, render_table, run_main_job
    from rollout.usecases import list_usecases

    examples = tmp_path / "examples"
    examples.mkdir()
    (examples / "tiny-chat.yaml").write_text(yaml.safe_dump(tiny_spec(tiny_model_dir, "tiny-chat")))
    console = Console(record=True, width=200)
    settings = MainJobSettings(examples_dir=examples, pilot_max_new_tokens=4, split_seconds=30)
    result = run_main_job(settings, console=console)

    assert result["ok"], result["outcomes"]
    assert [a["name"] for a in result["added"]] == ["tiny-chat"]
    (row,) = result["rows"]
    outcome = result["outcomes"]["tiny-chat"]
    kinds = [d["step_kind"] for d in outcome["decisions"]]
    assert kinds[0] == "shadow"
    if outcome["decisions"][0]["outcome"] == "GO":
        assert kinds == ["shadow", "split"]
        if row["decision"].startswith("GO"):  # promotion waits for a person; the job did not block
            assert row["awaiting"] == "approval" and row["decision"] == "GO (step 1)"
    assert row["speedup_low"] <= row["speedup"] <= row["speedup_high"]
    assert row["quality_low"] <= row["quality_delta"] <= row["quality_high"]
    console.print(render_table(result["rows"], result["outcomes"]))
    text = console.export_text()
    assert "tiny-chat" in text and "quality delta" in text and "$/month saved" in text

    settings.split_seconds = 0  # the re-run: one more split batch at most
    again = run_main_job(settings, console=console)
    assert again["added"] == []  # existing use cases are left alone
    assert again["outcomes"]["tiny-chat"]["calibration"]["reused"] is True
    assert [u["name"] for u in list_usecases()] == ["tiny-chat"]
