"""The exact power of the guardrails' rate test (`rollout.gate.power`) agrees with scipy's binomial where
the answer is a plain binomial tail, and with a simulation through the check `decide` runs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from rollout.gate import GateSettings, guardrail_checks
from rollout.gate.guardrails import breach_log_capital
from rollout.gate.power import (
    neyman_pearson_power,
    neyman_pearson_rows,
    power_by,
    rows_to_detect,
    stop_boundary,
    stop_probability,
)
from rollout.gate.sequences import rate_count_log_capital, rate_stream

ALPHA = 0.05


@pytest.mark.parametrize("rate", [0.02, 0.1, 0.35, 0.9])
def test_one_row_is_a_binomial_tail(rate: float) -> None:
    """N = 1 against scipy.stats.binom: the test stops iff the one row is a 1 and a single 1 already
    lifts the capital to 1/alpha (mean likelihood ratio 0.2 x 1.5 + 0.1 x 2 + 0.7 x 2.25 = 2.075: yes at
    alpha 0.49, no at 0.4 or 0.05)."""
    for ceiling, alpha in [(0.1, 0.4), (0.1, 0.49), (0.2, 0.49), (0.05, 0.05)]:
        boundary = stop_boundary(ceiling, 1, alpha)
        can = rate_count_log_capital(1, 1, ceiling) >= np.log(1 / alpha)
        assert boundary[0] == (1 if can else 2)
        got = stop_probability(boundary, rate)[-1]
        assert got == pytest.approx(stats.binom.sf(boundary[0] - 1, 1, rate), abs=1e-15)


@pytest.mark.parametrize(("rows", "k", "rate"), [(1, 1, 0.3), (50, 4, 0.05), (400, 20, 0.04)])
def test_a_last_row_boundary_is_the_binomial_tail(rows: int, k: int, rate: float) -> None:
    """The dynamic programme against scipy.stats.binom: a boundary that can only be crossed at the last
    row stops exactly when the count there is >= k."""
    boundary = np.full(rows, rows + 1)
    boundary[-1] = k
    assert stop_probability(boundary, rate)[-1] == pytest.approx(stats.binom.sf(k - 1, rows, rate), rel=1e-10)


@pytest.mark.parametrize("ceiling", [0.02, 0.05, 0.1])
def test_the_boundary_is_the_capitals_first_rejecting_count(ceiling: float) -> None:
    b = stop_boundary(ceiling, 300, ALPHA)
    n = np.arange(1, 301)
    target = np.log(1 / ALPHA)
    ok = b <= n
    assert np.all(rate_count_log_capital(b[ok], n[ok], ceiling) >= target)
    assert np.all(rate_count_log_capital(b - 1, n, ceiling) < target)


@pytest.mark.parametrize(
    ("ceiling", "rate", "rows"), [(0.05, 0.125, 200), (0.02, 0.05, 200), (0.05, 0.05, 1000), (0.1, 0.15, 300)]
)
def test_exact_power_agrees_with_simulating_the_check_decide_runs(
    ceiling: float, rate: float, rows: int
) -> None:
    """Simulated arms judged by the guardrail's own breach test (`breach_log_capital`, as `decide` and the
    monitor judge): the share stopped lies within the 99.9% binomial interval around the exact value."""
    check = guardrail_checks(GateSettings(max_error_rate=ceiling), with_control=False)[0]
    reps = 4000
    rng = np.random.default_rng(int(1e6 * ceiling * rate) + rows)
    x = (rng.random((reps, rows)) < rate).astype(float)
    stopped = int((breach_log_capital(rate_stream(x), check).max(axis=-1) >= np.log(1 / ALPHA)).sum())
    exact = power_by(ceiling, rate, rows, ALPHA)
    low, high = stats.binom.interval(0.999, reps, exact)
    assert low <= stopped <= high, (stopped / reps, exact)


@pytest.mark.parametrize("ceiling", [0.01, 0.02, 0.05, 0.1])
def test_rows_to_detect_is_the_first_row_with_the_power(ceiling: float) -> None:
    rows = rows_to_detect(ceiling)
    assert power_by(ceiling, 2.5 * ceiling, rows) >= 0.95 > power_by(ceiling, 2.5 * ceiling, rows - 1)
    floor = neyman_pearson_rows(ceiling)
    assert neyman_pearson_power(ceiling, 2.5 * ceiling, floor) >= 0.95
    assert neyman_pearson_power(ceiling, 2.5 * ceiling, floor - 1) < 0.95
    # the sequential, time-uniform test pays for looking at every row: about 35-40% more rows
    assert floor < rows <= 1.4 * floor


@pytest.mark.parametrize("ceiling", [0.01, 0.02, 0.05, 0.1])
def test_neyman_pearson_bound_is_level_alpha_and_never_beaten(ceiling: float) -> None:
    assert neyman_pearson_power(ceiling, ceiling, 200) == pytest.approx(ALPHA, abs=1e-12)
    for factor in (1.5, 2.5, 4.0):
        assert power_by(ceiling, factor * ceiling, 200) <= neyman_pearson_power(
            ceiling, factor * ceiling, 200
        )
