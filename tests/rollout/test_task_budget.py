"""What a spec's task bound needs from its dataset (rollout.task_budget): the rows the calibrate flow's task
bound can score, and the warning `usecase add` gives when they cannot certify `task_delta`. The flow test
(tests/flows/test_calibrate_task_bound.py) checks the count against the rows the flow really scores."""

from __future__ import annotations

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


def test_the_rows_are_the_calibration_split_with_a_reference_less_the_held_out_texts() -> None:
    assert heldout_texts(54, 0.25) == 14 and heldout_texts(2, 0.25) == 1
    docs_qa = {"calibration_rows": 54, "calibration_with_reference": 54}  # its 72 rows less 18 kept apart
    assert task_rows_at_most(_spec(0.02), docs_qa) == 40
    assert task_rows_at_most(_spec(0.02), {**docs_qa, "calibration_with_reference": 30}) == 30
    assert task_rows_at_most(_spec(0.02, task_rows=12), docs_qa) == 12
    assert task_rows_at_most(_spec(0.02), {"calibration_rows": 1, "calibration_with_reference": 1}) == 0


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
    stats = {"calibration_rows": rows, "calibration_with_reference": rows}
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
