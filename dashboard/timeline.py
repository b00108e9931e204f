"""The use-case page's pilot timeline: events (steps started, gate decisions, alias moves) on a time axis.

Pure: a frame of events in, an Altair chart out. The time axis spans the events with a margin of 5% of
their span, at least an hour each side, and its labels carry the date, in UTC (a browser would otherwise
show its own zone): a use case with one event (a calibration's alias move, before any pilot) used to get
a zero-width axis whose only tick read ".952", the event's milliseconds."""

from __future__ import annotations

import datetime as dt

import altair as alt
import pandas as pd

MIN_MARGIN = dt.timedelta(hours=1)
LANES = ("steps", "decisions", "alias moves")


def time_domain(times: pd.Series) -> tuple[pd.Timestamp, pd.Timestamp]:
    """The axis's ends: the first and last event, each moved out by 5% of the span or an hour."""
    first, last = times.min(), times.max()
    margin = max((last - first) * 0.05, MIN_MARGIN)
    return first - margin, last + margin


def timeline_chart(events: pd.DataFrame) -> alt.Chart:
    """`events`: columns time (datetime, UTC), lane (one of LANES) and event (its text, in the tooltip)."""
    ev = events.assign(time=pd.to_datetime(events["time"], utc=True))
    ev = ev.assign(when=ev["time"].dt.strftime("%Y-%m-%d %H:%M:%S UTC"))
    start, end = time_domain(ev["time"])
    x = alt.X(
        "time:T",
        title="UTC",
        # a UTC scale formats its ticks in UTC; its domain as ISO strings (epoch milliseconds, and an axis
        # formatType of "utc", left the axis blank or unformatted as Streamlit renders it, seen in Chromium)
        scale=alt.Scale(type="utc", domain=[start.isoformat(), end.isoformat()]),
        axis=alt.Axis(format="%b %d %H:%M", labelAngle=0),
    )
    lanes = [lane for lane in LANES if lane in set(ev["lane"])]
    return (
        alt.Chart(ev)
        .mark_circle(size=120)
        .encode(
            x=x,
            y=alt.Y("lane:N", title=None, sort=lanes),
            tooltip=[alt.Tooltip("when:N", title="time"), "event"],
        )
        .properties(height=150)
    )
