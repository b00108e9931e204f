"""The standalone `calibrate --out` / `evaluate --out` and `evaluate --probe-lengths`: checked before any
work, refused by name with exit 2, and nothing the user had is deleted or half-written (review X: X1, X4,
X5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sparsepilot.cli import app


def _calibrate(model_dir: Path) -> list[str]:
    args = ["calibrate", "--model", str(model_dir), "--texts", "stdlib", "--quick", "--seq-len", "256"]
    return [*args, "--max-texts", "6", "--estimator", "pooled", "--device", "cpu"]


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def test_calibrate_refuses_an_out_that_is_not_a_plan_directory(
    sp_home, tiny_llama_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    """X1: `--out victim` (notes.txt, sub/y) was renamed aside and deleted, as was `--out .`: the
    project's sources and the texts file with it, exit 0. Now each is a one-line error, nothing touched."""
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "src" / "main.py").write_text("print('mine')\n")
    (proj / "texts.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    victim = proj / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "notes.txt").write_text("notes")
    (victim / "sub" / "y").write_text("y")
    (victim / "plan.json").write_text("{}")  # plan files beside foreign ones do not make it a plan directory
    before = _tree(proj)
    monkeypatch.chdir(proj)
    runner = CliRunner()
    res = runner.invoke(app, [*_calibrate(tiny_llama_dir), "--out", "victim"])
    assert res.exit_code == 2, res.output
    said = " ".join(res.output.split())
    assert "error: --out victim: exists and is not a plan directory (it holds notes.txt, sub)" in said, said
    for out in (".", "..", str(tmp_path), "src/.."):
        res = runner.invoke(app, [*_calibrate(tiny_llama_dir), "--out", out])
        assert res.exit_code == 2, (out, res.output)
        assert f"error: --out {out}: is the current directory or one above it" in " ".join(res.output.split())
    res = runner.invoke(app, [*_calibrate(tiny_llama_dir), "--out", "texts.jsonl"])
    assert res.exit_code == 2 and "--out texts.jsonl: exists and is not a directory" in res.output
    assert _tree(proj) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proj", "sp-home"]  # no temporary sibling


def test_calibrate_writes_an_empty_directory_and_replaces_its_own_plan_directory(
    sp_home, tiny_llama_dir, tmp_path: Path
) -> None:  # noqa: ANN001
    """An empty --out, and a plan directory an earlier calibrate wrote, are (still) replaced whole."""
    out = tmp_path / "plans" / "plan"
    out.mkdir(parents=True)
    args = [*_calibrate(tiny_llama_dir), "--out", str(out)]
    runner = CliRunner()
    for seed in ("0", "1"):
        res = runner.invoke(app, [*args, "--seed", seed])
        assert res.exit_code == 0, res.output
        assert {"plan.json", "plan.sha256", "calibration_report.json"} <= {p.name for p in out.iterdir()}
        digest = json.loads((out / "calibration_report.json").read_text())["plan_hash"]
        # this run's plan and report; the console wraps a long path, so the words are compared unwrapped
        assert f"(hash {digest[:12]})" in " ".join(res.output.split()), res.output
    assert [p.name for p in out.parent.iterdir()] == ["plan"]  # no temporary or old sibling left


@pytest.fixture
def tiny_plan(tiny_llama_dir, tmp_path: Path) -> Path:  # noqa: ANN001
    from sparse_core import SparsePlan, load_model, plan_io

    model, _ = load_model(str(tiny_llama_dir))
    plan = tmp_path / "plan"
    plan_io.save(SparsePlan(tau=0.7), plan, config=model.config)
    return plan


def test_evaluate_refuses_a_directory_out_before_the_run(
    sp_home, tiny_llama_dir, tiny_plan, tmp_path
) -> None:  # noqa: ANN001
    """X4: the whole evaluation ran, then `IsADirectoryError: 'outdir.tmp' -> 'outdir'`, exit 1, with
    outdir.tmp left behind."""
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    args = ["evaluate", "--model", str(tiny_llama_dir), "--plan", str(tiny_plan), "--quick"]
    args += ["--speed-lengths", "0", "--probe-lengths", "0", "--device", "cpu"]
    res = CliRunner().invoke(app, [*args, "--out", str(outdir)])
    assert res.exit_code == 2, res.output
    assert f"error: --out {outdir}: is a directory" in " ".join(res.output.split())
    assert "fidelity" not in res.output and "Traceback" not in res.output  # refused before the work
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outdir", "plan", "sp-home"]
    assert not any(outdir.iterdir())
    report = tmp_path / "reports" / "r.json"  # a new folder is made; nothing but the report is left
    res = CliRunner().invoke(app, [*args, "--out", str(report)])
    assert res.exit_code == 0, res.output
    assert json.loads(report.read_text())["plan_hash"] and [p.name for p in report.parent.iterdir()] == [
        "r.json"
    ]


def test_evaluate_refuses_a_probe_length_too_short_for_its_kinds(
    sp_home, tiny_llama_dir, tiny_plan, tmp_path
) -> None:  # noqa: ANN001
    """X5: `--probe-lengths 256` ran the fidelity stage, then ended in a ValueError traceback, exit 1."""
    out = tmp_path / "r.json"
    args = [
        "evaluate",
        "--model",
        str(tiny_llama_dir),
        "--plan",
        str(tiny_plan),
        "--quick",
        "--device",
        "cpu",
    ]
    args += ["--speed-lengths", "0", "--probe-lengths", "256", "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert "error: --probe-lengths: probe length 256 is too short for a key-value probe" in text, text
    assert "--probe-kinds" in text and "fidelity" not in text and "Traceback" not in text
    assert not out.exists()
