"""A timed row of `bench gate` / `bench dashboard` against its target, judged with the host's load while
that row ran: each row metered on its own (`metered`), and a row timed under overload that misses its
target is "unknown" (None), not a miss: a busy host only ever lengthens a wall time, so such a time says
the host was busy as much as that the code is slow (review M, M1: 1M-row decide() read 5.2-6.1 s wall for
<= 1.55 s of CPU, `within_target` False). A row within its target is within it whatever the load."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rollout.bench_home import host_fields


def within_target(seconds: float, target_s: float | None, overloaded: bool) -> bool | None:
    """True within the target, False over it on a host that was not overloaded, None where there is no
    target or the time is over it and was taken under overload (unknown: the host's time as much as the
    code's)."""
    if target_s is None:
        return None
    if seconds <= target_s:
        return True
    return None if overloaded else False


@contextmanager
def metered() -> Iterator[dict[str, Any]]:
    """`with metered() as host: <one row's timed work>`; afterwards `host` holds the row's host record
    (`bench_home.host_fields`: `others_busy_cores`, `overloaded`, `wait_share`, the whole `host_load`),
    measured over the block alone (one thread of this process, as the benches time)."""
    from sparse_core.host import HostLoadMeter

    host: dict[str, Any] = {}
    with HostLoadMeter(threads=1) as meter:
        yield host
    host.update(host_fields(meter.load))
