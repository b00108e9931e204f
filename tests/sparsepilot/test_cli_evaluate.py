"""`sparsepilot evaluate --model --plan` (the standalone form) on the tiny model: the printed report says
what its means are worth — the task-score change with its bounds, the fidelity windows' true lengths and
whether they were enough for a bound."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sparsepilot.cli import app


@pytest.mark.parametrize("size", ["default", "quick"])  # --quick's 2 short windows: too few blocks to bound
def test_evaluate_prints_bounds_beside_the_means(sp_home, tiny_llama_dir, tmp_path: Path, size: str) -> None:  # noqa: ANN001
    from sparse_core import SparsePlan, load_model, plan_io

    model, _ = load_model(str(tiny_llama_dir))
    plan = tmp_path / "plan"
    plan_io.save(SparsePlan(tau=0.7), plan, config=model.config)
    ds = tmp_path / "rows.jsonl"
    rows = [{"prompt": f"Row {i} is about Python. " * 12, "reference": "Python"} for i in range(8)]
    ds.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "report.json"
    args = ["evaluate", "--model", str(tiny_llama_dir), "--plan", str(plan), "--dataset", str(ds)]
    args += ["--task", "loglik", "--probe-lengths", "0", "--speed-lengths", "0", "--out", str(out)]
    args += ["--quick"] if size == "quick" else []
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    report = json.loads(out.read_text())
    tasks, fid = report["tasks"], report["fidelity"]
    assert tasks["n_rows"] == (8 if size == "default" else 6)
    assert -1 < tasks["quality_low"] <= tasks["quality_high"] < 1
    assert f"[{tasks['quality_low']:+.4f}, {tasks['quality_high']:+.4f}]" in text  # the table's bounds
    windows = ", ".join(map(str, fid["windows"]))
    bounded = all(fid[k] is not None and math.isfinite(fid[k]) for k in ("agree_lower", "kl_upper"))
    assert bounded == (size == "default")
    if not bounded:  # never printed as "top1_agree >= -inf"
        units = f" ({fid['bound_units']})" if fid.get("bound_units") is not None else ""
        assert (
            f"window(s) of {windows} tokens: too few blocks of scored positions{units} for a 95% bound"
            in text
        )
        assert ">= -inf" not in text and "<= inf" not in text
    else:
        assert f"window(s) of {windows} tokens; one-sided 95% bounds over {fid['bound_units']} blocks" in text


def test_evaluate_prints_where_the_prefill_time_went(sp_home, tiny_llama_dir, tmp_path: Path) -> None:  # noqa: ANN001
    from sparse_core import SparsePlan, load_model, plan_io

    model, _ = load_model(str(tiny_llama_dir))
    plan = tmp_path / "plan"
    plan_io.save(SparsePlan(tau=0.7), plan, config=model.config)
    out = tmp_path / "report.json"
    args = ["evaluate", "--model", str(tiny_llama_dir), "--plan", str(plan), "--quick"]
    args += ["--probe-lengths", "0", "--speed-lengths", "512", "--repeats", "2", "--out", str(out)]
    res = CliRunner(env={"COLUMNS": "200"}).invoke(app, args)
    assert res.exit_code == 0, res.output
    (row,) = json.loads(out.read_text())["speed"]
    split = row["time_split"]
    assert split["scoring_seconds"] > 0 and split["kernel_seconds"] > 0
    text = " ".join(res.output.split())
    assert "attn_share" in text and "attn_x" in text and "ideal_x" in text
    assert "ideal_x: the speed-up of a perfect kernel at this density" in text
    for key in ("attention_share", "attention_speedup", "ideal_speedup"):  # each cell as the table formats it
        v = split[key]
        assert (f"{v:.4g}" if v is not None else "-") in text


def test_the_report_says_when_its_timings_were_kept_under_overload(
    tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # noqa: ANN001
    """Review P finding 1: the standalone report's speed figures carry the overload warning where pairs
    were kept under overload (the prefill pairs' or the decode runs' host record), as the benches' tables
    do; a run whose pairs were all timed with room for them prints none. The host is what it is when the
    test runs, so the real report's records are set to each case."""
    from sparse_core import SparsePlan, load_model
    from sparse_core.evaluation import EvalSuite, evaluate
    from sparsepilot.commands.core import _print_report

    model, tok = load_model(str(tiny_llama_dir))
    suite = EvalSuite.quick(probe_lengths=(), speed_lengths=(256,), speed_repeats=2, decode_new_tokens=2)
    report = evaluate(model, tok, SparsePlan(tau=0.7), suite)
    prefill, decode = report.speed_summary["host"], report.decode["summary"]["host"]
    (row,) = report.speed  # review s52: the row carries its own pairs' record, which its table cell says
    assert prefill["pairs_timed"] >= 2 and decode["pairs_timed"] >= 1
    assert row.host["pairs_timed"] == prefill["pairs_timed"]
    prefill["pairs_kept_under_overload"] = decode["pairs_kept_under_overload"] = 0
    row.host["pairs_kept_under_overload"] = 0
    for r in report.decode["rows"]:  # each decode row's note counts its own
        ((r.get("extra") or {}).get("host") or {})["pairs_kept_under_overload"] = 0
    _print_report(report)
    text = " ".join(capsys.readouterr().out.split())
    assert "under overload" not in text and f"of {prefill['pairs_timed']} pairs" not in text  # its cell: "no"
    prefill["pairs_kept_under_overload"] = row.host["pairs_kept_under_overload"] = prefill["pairs_timed"]
    _print_report(report)
    text = " ".join(capsys.readouterr().out.split())
    assert f"{prefill['pairs_timed']} of {prefill['pairs_timed']} pairs" in text  # the row's overloaded cell
    total = prefill["pairs_timed"] + decode["pairs_timed"]
    assert (
        f"warning: measured under overload: {prefill['pairs_timed']} of {total} timed pairs "
        f"(prefill {prefill['pairs_timed']} of {prefill['pairs_timed']})" in text
    )
    assert text.index("Prefill speed") < text.index("warning: measured under overload")
    assert "rerun on a quieter host" in text


def test_evaluate_prints_the_plans_decode_figures(sp_home, tiny_llama_dir, tmp_path: Path) -> None:  # noqa: ANN001
    """Review S finding 3: a plan with a decode section is timed side by side in decode, and the standalone
    report prints it as it prints prefill: per length ms per token dense vs sparse, the speed-up with its
    interval, the share of the cache read, KL and agreement, then the length-mix figures, each equal to
    the report's JSON; the probes answered by generation too. A plan without one says decode ran dense."""
    from sparse_core import SparsePlan, load_model, plan_io
    from sparse_core.decode.plan import DecodePlan

    model, _ = load_model(str(tiny_llama_dir))
    plan = tmp_path / "plan"
    decode = DecodePlan(estimator="quest", page_size=16, budget_tokens=128)
    plan_io.save(SparsePlan(tau=0.7, decode=decode), plan, config=model.config)
    out = tmp_path / "report.json"
    args = ["evaluate", "--model", str(tiny_llama_dir), "--plan", str(plan), "--quick"]
    args += [
        "--probe-lengths",
        "512",
        "--probe-kinds",
        "passkey",
        "--speed-lengths",
        "512",
        "--out",
        str(out),
    ]
    res = CliRunner(env={"COLUMNS": "200"}).invoke(app, args)
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    (row,), s = report["decode"]["rows"], report["decode"]["summary"]
    assert s["sparse_decode"] and row["density"] < 1.0
    text = " ".join(res.output.split())
    assert "Decode speed (ms per generated token" in text
    lo, hi = row["speedup_interval"]
    for cell in (row["dense_ms_per_token"], row["sparse_ms_per_token"], row["speedup"], row["density"]):
        assert f"{cell:.4g}" in text  # each cell as the table formats it
    assert f"{lo:.2f}-{hi:.2f}" in text
    assert (
        f"decode length-mix weighted speed-up: {s['weighted_speedup']:.3f} "
        f"[{s['weighted_speedup_low']:.3f}, {s['weighted_speedup_high']:.3f}] at {s['density']:.1%} of the "
        f"cache read; kl {s['kl']:.4g}, top1_agree {s['agree']:.4f} over {s['new_tokens']} generated tokens"
    ) in text
    gen = report["probes"]["generated"]
    assert (
        f"probes answered by generation: dense {gen['dense_accuracy']:.4f}, "
        f"sparse {gen['sparse_accuracy']:.4f} ({gen['n']} probes)"
    ) in text
    assert text.index("Prefill speed") < text.index("Decode speed")

    plan_io.save(SparsePlan(tau=0.7), plan, config=model.config)
    args = [
        "evaluate",
        "--model",
        str(tiny_llama_dir),
        "--plan",
        str(plan),
        "--quick",
        "--probe-lengths",
        "0",
    ]
    res = CliRunner(env={"COLUMNS": "200"}).invoke(app, [*args, "--speed-lengths", "256", "--out", str(out)])
    assert res.exit_code == 0, res.output
    (row,) = json.loads(out.read_text())["decode"]["rows"]
    text = " ".join(res.output.split())
    assert "Decode speed" not in text
    assert (
        "decode: dense in both arms (no decode section in the plan); ms per generated token: "
        f"{row['dense_ms_per_token']:.4g} at {row['seq_len']:,} tokens"
    ) in text
