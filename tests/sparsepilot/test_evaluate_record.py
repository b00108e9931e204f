"""`sparsepilot evaluate NAME`'s record says the money as the dashboard does (review s50 B2): it printed
1.235e+04 (`console._fmt`'s %.4g), no interval of the saving, and a payback for a plan that keeps every
block, which the portfolio and the Approvals card say saves nothing (`rollout.roi.plan_money`)."""

from __future__ import annotations

import pytest

from sparsepilot.commands.pipeline import print_evaluation

ROW = {  # an evaluation of the size the samples produce, as `runs.evaluation_summary` gives it
    "evaluation_run_id": 7, "device": "cpu", "density": 0.41, "quality_delta": -0.01, "quality_low": -0.2,
    "quality_high": 0.1, "speedup": 1.21, "speedup_low": 1.11, "speedup_high": 1.31, "decode_status": "dense",
    "savings_month_usd": 12345.67, "savings_month_low": 7012.4, "savings_month_high": 17020.9,
    "payback_days": 7.397, "reused": False, "measured_under_overload": None,
}  # fmt: skip


def _printed(row: dict, capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    capsys.readouterr()
    print_evaluation("longdoc-summaries", row)
    out: dict[str, str] = {}
    for line in capsys.readouterr().out.splitlines():
        cells = line.split("│")  # "│ field │ value │"
        if len(cells) != 4:
            continue
        field, value = (" ".join(c.split()) for c in cells[1:3])
        if field:
            out[last := field] = value
        else:  # a long value folds onto the next lines
            out[last] += " " + value
    return out


def test_the_saving_is_printed_in_dollars_with_its_interval(capsys: pytest.CaptureFixture[str]) -> None:
    out = _printed(ROW, capsys)
    assert out["savings_month_usd"] == "$12,346"
    assert (out["savings_month_low"], out["savings_month_high"]) == ("$7,012", "$17,021")
    assert out["payback_days"] == "7 days" and "verdict" not in out


def test_a_plan_that_keeps_every_block_prints_no_payback(capsys: pytest.CaptureFixture[str]) -> None:
    dense = ROW | {
        "density": 1.0,
        "savings_month_usd": 200.6,
        "savings_month_low": 68.0,
        "payback_days": 455.2,
    }
    out = _printed(dense, capsys)
    assert out["savings_month_usd"] == "$201" and out["payback_days"] == "-"
    assert out["verdict"].startswith("saves nothing: the plan keeps 100.00% of blocks and decodes densely")


def test_a_reused_run_says_why_its_saving_is_not_established(capsys: pytest.CaptureFixture[str]) -> None:
    """Review s50 V6: a reused run (no verdict of the flow's) whose interval reaches below zero printed
    payback "-" and never said why; the Approvals card said "saving not established"."""
    reused = ROW | {"reused": True, "savings_month_usd": 150.0, "savings_month_low": -40.0}
    reused |= {"savings_month_high": 340.0, "payback_days": 600.0}
    out = _printed(reused, capsys)
    assert out["payback_days"] == "-"
    assert out["verdict"] == "saving not established ($150/month, interval -$40, $340)"
    fresh = _printed(reused | {"verdict": "saves $150/month at the estimate, but ..."}, capsys)
    assert fresh["verdict"] == "saves $150/month at the estimate, but ..."  # the flow's own stays
