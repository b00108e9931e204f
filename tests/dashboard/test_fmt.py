"""How the dashboard writes the gate's one-sided quality bounds."""

from __future__ import annotations

from dashboard import fmt


def test_quality_interval_leaves_out_a_bound_at_the_edge_of_the_scale() -> None:
    assert fmt.quality_interval(-0.011, 0.001) == "[-0.0110, +0.0010]"
    assert fmt.quality_interval(-0.027, 1.0) == ">= -0.0270"  # the usual GO: only the lower bound says much
    assert fmt.quality_interval(-1.0, -0.06) == "<= -0.0600"  # futility
    assert fmt.quality_interval(-1.0, 1.0) == "not bounded yet"
    assert fmt.quality_interval(None, 0.2) == "-"
