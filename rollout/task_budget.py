"""What a use case's task bound (`quality_budget.task_delta`) needs from its dataset, known at `usecase add`.

Calibration certifies `task_delta` with a valid upper confidence bound on the mean task-score drop over the
rows of its calibration split (sparse_core.task_bound): rows that all drop exactly 0 still certify a bound
only from `rows_to_certify` rows on (277 for 0.02 with the calibrate flow's 7-step search), and with fewer
rows calibration skips its search and returns the all-dense plan. A dataset too small for its spec's bound
used to be found out only after a calibration had run for minutes; `task_bound_warnings` says so when the
use case is added, with what would do: more rows, or the least bound the rows can certify.

The rows the calibrate flow scores (`task_rows`): the dataset's rows less those kept apart for the
evaluation and the pilot (rollout.dataset_split), less the texts calibration holds out (its
`holdout_fraction`: whole distinct prompts with every copy, `sparse_core.split_texts`), those with a
reference, at most `calibration.task_rows`. The dataset validator counts them with the same split
(`calibration_task_rows`); the rest are pure functions of the spec and that count.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from rollout.dataset_split import EVALUATION_SHARE
from sparse_core.prefill_bound import SEARCH_STEPS
from sparse_core.task_bound import ALPHA, certifiable_bound, rows_to_certify


def task_rows(
    rows: Sequence[Mapping[str, Any]], holdout_fraction: float, seed: int
) -> list[Mapping[str, Any]]:
    """The calibration split's rows a task bound is measured on: those whose prompt lands in the
    calibration part of calibration's own split of their prompts (`sparse_core.split_texts`: the held-out
    part, every copy of a held-out prompt, judges the fidelity of the eps search's candidates), with a
    reference (a non-blank string). Empty below 2 distinct prompts (calibration cannot split them)."""
    from sparse_core import split_texts

    try:
        cal_set = set(split_texts([r["prompt"] for r in rows], holdout_fraction, seed)[0])
    except ValueError:
        return []
    return [
        r
        for r in rows
        if r["prompt"] in cal_set and isinstance(r.get("reference"), str) and r["reference"].strip()
    ]


def task_rows_at_most(spec: Any, stats: dict[str, Any], *, capped: bool = True) -> int:
    """The most rows the calibrate flow's task bound can score: the dataset validator's count of
    `task_rows` at the spec's holdout_fraction and seed (`calibration_task_rows`, exact), capped by
    `quality_budget.calibration.task_rows` (unless `capped` is False)."""
    rows = int(stats.get("calibration_task_rows") or 0)
    cal = spec.quality_budget.calibration
    return min(rows, cal.task_rows) if cal.task_rows and capped else rows


def task_bound_warnings(spec: Any, stats: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, message) when the spec's `task_delta` cannot be certified from its dataset's rows by the
    calibrate flow's full search (7 steps, each plan tested at 0.05 / 7): the plan would stay dense."""
    delta = spec.quality_budget.task_delta
    if delta is None:
        return []
    alpha = ALPHA / SEARCH_STEPS
    have, need = task_rows_at_most(spec, stats), rows_to_certify(delta, alpha=alpha)
    if need is not None and have >= need:
        return []
    cal = spec.quality_budget.calibration
    in_data = task_rows_at_most(spec, stats, capped=False)
    capped = have < in_data
    if need is None:
        needs, fix = f"not even 100,000 rows that drop nothing certify {delta:g}", ""
    else:
        needs = f"a valid bound of {delta:g} needs {need:,} even when no row drops"
        if in_data >= need:
            fix = f"; raise calibration.task_rows to {need:,} or more"
        else:
            in_all = math.ceil(need / ((1 - EVALUATION_SHARE) * (1 - cal.holdout_fraction)))
            also = ", and raise calibration.task_rows" if cal.task_rows and cal.task_rows < need else ""
            fix = f"; add rows (~{in_all:,} in all{also})"
        least = certifiable_bound(have, alpha=alpha)
        if least is not None:
            fix += f", or raise task_delta to {least:g}, the least these rows can certify"
    source = "calibration.task_rows caps them" if capped else "the calibration split's rows with a reference"
    return [
        (
            "quality_budget.task_delta",
            f"{delta:g} cannot be certified from this dataset: the calibrate flow scores at most {have:,} "
            f"rows ({source}), and {needs} (its {SEARCH_STEPS}-step search tests each plan at "
            f"{ALPHA:g} / {SEARCH_STEPS}): every plan will stay dense{fix}. The flow's quick mode scores "
            "4 rows and certifies no task bound",
        )
    ]


def task_verdict(metrics: dict[str, Any]) -> str | None:
    """What a calibration's task bound came to, from its flat metrics (the calibrate flow's
    `task_*`): certified at its upper bound on N rows, not certifiable (too few rows: the plan stays
    dense), or not met; None when the spec sets no task bound (or the run predates these metrics)."""
    bound = metrics.get("task_bound")
    if bound is None:
        return None
    n_rows = int(metrics.get("task_n_rows") or 0)
    if metrics.get("task_certifiable") == 0.0:
        need = metrics.get("task_rows_needed")
        needs = f"{int(need):,}" if need is not None else "more than 100,000"
        return (
            f"task bound {bound:g} cannot be certified from {n_rows} task rows (a valid 95% bound needs "
            f"{needs} even when no row drops): the plan stays dense"
        )
    upper, scored = metrics.get("task_delta_upper"), int(metrics.get("task_rows_scored") or n_rows)
    if upper is None:
        return f"task bound {bound:g} not certified on {scored} task rows: the plan stays dense"
    drop = metrics.get("task_delta")
    shown = "" if drop is None else f"task drop {drop:+.4g}, "
    verdict = "certified" if upper <= bound else "NOT certified"
    return f"{shown}95% upper bound {upper:.4g} on {scored} rows: task bound {bound:g} {verdict}"
