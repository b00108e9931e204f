"""The use-case page's pilot timeline (dashboard.timeline): an axis that spans its events, in UTC, dated.
Drawn in Chromium it read ".952" under a lone event (a zero-width axis showing milliseconds)."""

from __future__ import annotations

import pandas as pd

from dashboard.timeline import timeline_chart


def _x_and_data(events: list[dict]) -> tuple[dict, pd.DataFrame]:
    chart = timeline_chart(pd.DataFrame(events))
    return chart.to_dict()["encoding"], chart.data


def test_a_lone_event_gets_an_hour_each_side_and_a_dated_utc_axis() -> None:
    enc, data = _x_and_data(
        [{"time": "2026-12-06 01:30:00.952", "lane": "alias moves", "event": "@challenger"}]
    )
    x = enc["x"]
    assert x["scale"]["type"] == "utc"
    assert [pd.Timestamp(t) for t in x["scale"]["domain"]] == [
        pd.Timestamp("2026-12-06 00:30:00.952", tz="UTC"),
        pd.Timestamp("2026-12-06 02:30:00.952", tz="UTC"),
    ]
    assert x["axis"]["format"] == "%b %d %H:%M" and x["title"] == "UTC"
    assert enc["tooltip"][0] == {"field": "when", "title": "time", "type": "nominal"}
    assert list(data["when"]) == ["2026-12-06 01:30:00 UTC"]


def test_a_long_pilot_gets_five_percent_of_its_span_and_its_lanes_in_order() -> None:
    events = [
        {"time": "2026-12-01T00:00:00+00:00", "lane": "alias moves", "event": "@challenger: - → 1"},
        {"time": "2026-12-01T09:00:00+01:00", "lane": "steps", "event": "step 0 shadow 0%"},
        {"time": "2026-12-11T00:00:00+00:00", "lane": "decisions", "event": "#4 GO"},
    ]
    enc, data = _x_and_data(events)
    start, end = (pd.Timestamp(t) for t in enc["x"]["scale"]["domain"])
    assert (start, end) == (pd.Timestamp("2026-11-30T12:00:00Z"), pd.Timestamp("2026-12-11T12:00:00Z"))
    assert enc["y"]["sort"] == ["steps", "decisions", "alias moves"]
    assert data["when"][1] == "2026-12-01 08:00:00 UTC"  # an offset is converted, not dropped
