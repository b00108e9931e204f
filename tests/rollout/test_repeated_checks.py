"""What a process computes once and reuses for every later check: the Great Expectations batch definition
each suite validates its dataframe through (rollout.validation), and the fewest rows any rate test needs
(rollout.gate.power.neyman_pearson_rows, asked at every spec read). Each reuse must still judge the data
and the settings in front of it."""

from __future__ import annotations

import pandas as pd

from rollout.gate.power import neyman_pearson_rows
from rollout.validation import _gx_context, validate_observations


def _batch(quality: float, request: str = "q1") -> pd.DataFrame:
    return pd.DataFrame(
        {
            "request_id": [request, request],
            "arm": ["control", "treatment"],
            "quality": [0.9, quality],
            "latency_ms": [120.0, 80.0],
        }
    )


def test_observation_batches_share_one_gx_data_source_and_each_is_judged_on_its_own_rows() -> None:
    first = validate_observations(_batch(0.8), ["q1"])
    sources = {s.name: s for s in _gx_context().data_sources.all().values()}
    # kept for the next batch, not added and deleted again (each saved the context's configuration)
    assert "sp-observation-batch" in sources
    bad = validate_observations(_batch(1.7, "q2"), ["q2"])
    good = validate_observations(_batch(0.8, "q3"), ["q3"])
    assert first.ok and good.ok, (first.messages(), good.messages())
    assert [f.field for f in bad.failures] == ["quality"], bad.messages()
    assert "got 1.7" in bad.messages()[0]
    assert _gx_context().data_sources.all()["sp-observation-batch"] is sources["sp-observation-batch"]


def test_the_fewest_rows_any_rate_test_needs_is_computed_once_per_setting() -> None:
    fresh = neyman_pearson_rows.__wrapped__(0.02, 2.5, 0.95, 0.05)
    before = neyman_pearson_rows.cache_info().hits
    assert neyman_pearson_rows(0.02, 2.5, 0.95, 0.05) == fresh
    assert neyman_pearson_rows(0.02, 2.5, 0.95, 0.05) == fresh
    assert neyman_pearson_rows.cache_info().hits >= before + 1
    assert neyman_pearson_rows(0.02, 2.5, 0.95, 0.01) > fresh  # another level, its own answer
