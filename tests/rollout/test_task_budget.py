"""What a spec's task bound needs from its dataset (rollout.task_budget): the rows the calibrate flow's task
bound can score, and the warning `usecase add` gives when they cannot certify `task_delta`. The flow test
(tests/flows/test_calibrate_task_bound.py) checks the count against the rows the flow really scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rollout.spec import parse_spec
from rollout.task_budget import task_bound_warnings, task_rows_at_most
from sparse_core.prefill_bound import heldout_texts
from tests.rollout.usecase_helpers import example_spec


def _spec(task_delta: float | None, **calibration: object):  # noqa: ANN202
    data = example_spec("docs-qa")
    data["quality_budget"]["task_delta"] = task_delta
    data["quality_budget"]["calibration"].update(calibration)
    return parse_spec(data)


def test_the_count_at_add_is_the_rows_calibration_scores_when_prompts_repeat(tmp_path: Path) -> None:
    """Calibration holds out whole distinct prompts with every copy (`split_texts`); `usecase add`
    estimated the held-out rows as a share of the rows, so for a support log whose common question is
    asked 31 times it said 30 rows where the flow scored 8 (that question held out) or 38 (kept). The
    dataset validator now counts the rows the calibrate flow's task bound scores, with its own split."""
    from flows.calibrate import task_rows_of
    from rollout.dataset_split import split_rows
    from rollout.validation import validate_dataset
    from sparse_core.calibration import split_texts

    common = "How do I reset my password? It says the link has expired."
    rows = [{"id": f"c{i}", "prompt": common, "reference": "Request a new link."} for i in range(31)]
    rows += [
        {"id": f"q{i}", "prompt": f"Question {i} about invoices and refunds.", "reference": "x"}
        for i in range(9)
    ]
    rows += [{"id": "n0", "prompt": "A question nobody answered.", "reference": None}]
    path = tmp_path / "support-log.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts = set()
    for seed in range(6):
        spec = _spec(0.02, seed=seed)
        stats = validate_dataset(path, spec, context_length=8192).stats
        calibration, _ = split_rows(rows)
        cal, held = split_texts([r["prompt"] for r in calibration], 0.25, seed)
        scored = task_rows_of(calibration, 0.25, seed)
        assert task_rows_at_most(spec, stats) == len(scored)  # what `calibrate` scores
        assert {r.prompt for r in scored}.isdisjoint(held) and all(r.reference for r in scored)
        assert len(scored) == sum(1 for r in calibration if r["prompt"] in set(cal) and r["reference"])
        counts.add(len(scored))
        assert task_rows_at_most(_spec(0.02, seed=seed, task_rows=5), stats) == min(5, len(scored))
    assert len(counts) > 1  # the common question held out under some seeds, kept under others


@pytest.mark.parametrize(
    ("task_delta", "rows", "cap", "says"),
    [
        (None, 54, None, None),
        (0.2, 54, None, None),  # 40 rows certify 0.13 and up
        (
            0.02,
            54,
            None,
            "at most 40 rows (the calibration split's rows with a reference), and a valid bound "
            "of 0.02 needs 277 even when no row drops (its 7-step search tests each plan at 0.05 / 7): every "
            "plan will stay dense; add rows (~493 in all), or raise task_delta to 0.13, the least these rows "
            "can certify",
        ),
        (
            0.02,
            540,
            20,
            "at most 20 rows (calibration.task_rows caps them), and a valid bound of 0.02 needs 277 "
            "even when no row drops (its 7-step search tests each plan at 0.05 / 7): every plan will "
            "stay dense; raise calibration.task_rows to 277 or more, or raise task_delta to 0.241",
        ),
        (0.02, 54, 20, "dense; add rows (~493 in all, and raise calibration.task_rows), or raise task_delta"),
        (1e-9, 54, None, "and not even 100,000 rows that drop nothing certify 1e-09 (its 7-step"),
    ],
)
def test_usecase_add_is_told_when_the_rows_cannot_certify_the_bound(task_delta, rows, cap, says) -> None:
    # calibration rows with a reference, every prompt distinct: the calibration part scores rows less
    # those held out (54: docs-qa's 72 rows less 18 kept apart, 14 of them held out)
    stats = {"calibration_task_rows": rows - heldout_texts(rows, 0.25)}
    spec = _spec(task_delta, **({"task_rows": cap} if cap else {}))
    warnings = task_bound_warnings(spec, stats)
    if says is None:
        assert warnings == []
        return
    ((field, message),) = warnings
    assert field == "quality_budget.task_delta" and says in message
    assert message.endswith("The flow's quick mode scores 4 rows and certifies no task bound")


def test_calibrate_says_what_its_task_bound_came_to() -> None:
    """`calibrate NAME` printed "budget NOT met" with no word of the task bound that could not be
    certified, and never the task drop or its bound when it was (review W6)."""
    from flows.calibrate import _flat_metrics
    from rollout.task_budget import task_verdict

    def verdict(**task: object) -> str | None:
        base = {"n_rows": 10, "rows_scored": None, "task_delta": None, "task_delta_upper": None}
        return task_verdict(_flat_metrics({"density": 1.0, "task": {"bound": 0.3, **base, **task}}))

    assert verdict(certifiable=False, rows_needed=12) == (
        "task bound 0.3 cannot be certified from 10 task rows (a valid 95% bound needs 12 even when no "
        "row drops): the plan stays dense"
    )
    assert verdict(
        certifiable=True, rows_needed=12, rows_scored=14, task_delta=-1.1e-5, task_delta_upper=0.2947
    ) == ("task drop -1.1e-05, 95% upper bound 0.2947 on 14 rows: task bound 0.3 certified")
    assert verdict(certifiable=True, rows_needed=12).startswith(
        "task bound 0.3 not certified on 10 task rows"
    )
    assert task_verdict(_flat_metrics({"density": 0.8})) is None  # no task bound: nothing to say
