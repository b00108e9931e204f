"""The valid upper bound on a mean task-score drop (sparse_core.task_bound)."""

from __future__ import annotations

import random

import pytest

from sparse_core.task_bound import drop_upper_bound, rejects, rows_to_certify


def _heavy_tail(rng: random.Random, n: int) -> list[float]:
    """docs-qa's shape: most rows lose ~nothing, one in eight loses 0.34 (mean drop 0.0425)."""
    return [0.34 if rng.random() < 0.125 else rng.uniform(-0.005, 0.005) for _ in range(n)]


@pytest.mark.parametrize("n", [4, 60, 240])
def test_the_bound_covers_the_true_mean_of_a_heavy_tailed_drop(n):
    rng = random.Random(n)
    reps = 400
    misses = sum(drop_upper_bound(_heavy_tail(rng, n), m0=0.02) < 0.0425 for _ in range(reps))
    assert misses / reps <= 0.05, f"{misses}/{reps} bounds fell below the true mean"


def test_the_bound_tightens_with_rows_and_rejects_agrees_with_it():
    rng = random.Random(1)
    quiet = [rng.uniform(-0.005, 0.005) for _ in range(400)]
    b4, b60, b400 = (drop_upper_bound(quiet[:n], m0=0.02) for n in (4, 60, 400))
    assert b4 == 1.0, "4 rows can rule nothing out"
    assert 0.02 < b60 < 0.1 and b400 < 0.02 and b400 > max(0.0, sum(quiet) / 400)
    assert rejects(quiet, 0.02) and not rejects(quiet[:60], 0.02)


def test_rows_to_certify_is_the_fewest_zero_rows_that_reject():
    n = rows_to_certify(0.02)
    assert 150 <= n <= 200
    assert rejects([0.0] * n, 0.02) and not rejects([0.0] * (n - 1), 0.02)
    assert rows_to_certify(0.1) < rows_to_certify(0.03) < n
    assert rows_to_certify(0.0) is None and rows_to_certify(1e-6) is None


def test_bad_input_names_the_row():
    with pytest.raises(ValueError, match="row 1: drop 1.5"):
        drop_upper_bound([0.0, 1.5])
    with pytest.raises(ValueError, match="alpha"):
        rejects([0.0], 0.1, alpha=1.0)
    assert drop_upper_bound([]) == 1.0
