"""`rollout.unfinished.run_at_work`: the one rule of whether a decision's approval run is carrying it out
now, which a person's `promote --decision` / `rollback` and the cycle's and the monitor's finishing all ask
(the cycle used to ask Prefect for the run's state, a person's command read the take-up entry)."""

from __future__ import annotations

import datetime as dt
import os

import pytest

from rollout.approvals.waiter import Claim, effect_refusal
from rollout.audit import origin
from rollout.unfinished import APPLY_GRACE, STALLED_AFTER, run_at_work

NOW = dt.datetime(2026, 12, 7, 14, 0, tzinfo=dt.UTC)
SECOND = dt.timedelta(seconds=1)


@pytest.mark.parametrize(
    ("taken_up_ago", "signed_ago", "failed_move", "gone", "at_work"),
    [
        (None, APPLY_GRACE - SECOND, False, False, True),  # resumed a moment ago: waking to take it up
        (None, APPLY_GRACE, False, False, False),  # never took it up: the finisher claims it
        (STALLED_AFTER - SECOND, STALLED_AFTER, False, False, True),  # took it up, still within its time
        (STALLED_AFTER, STALLED_AFTER, False, False, False),  # took it up and stalled
        (SECOND, SECOND, True, False, False),  # a move failed: its effect has ended
        (SECOND, SECOND, False, True, False),  # its process is gone
        (None, SECOND, False, True, False),
    ],
)
def test_a_run_is_at_work_by_its_take_up_or_the_grace_after_the_signature(
    taken_up_ago: dt.timedelta | None, signed_ago: dt.timedelta, failed_move: bool, gone: bool, at_work: bool
) -> None:
    taken_up_at = None if taken_up_ago is None else NOW - taken_up_ago
    signed_at = (NOW - signed_ago).replace(tzinfo=None)  # the state DB's naive UTC reads alike
    assert (
        run_at_work(taken_up_at=taken_up_at, signed_at=signed_at, now=NOW, failed_move=failed_move, gone=gone)
        is at_work
    )


def _claim(actor: str, *, here: bool = True) -> Claim:
    return Claim(actor, NOW, origin()[1] if here else "host-b", os.getpid() if here else 4242)


@pytest.mark.parametrize(
    ("claim", "finished_by", "refused"),
    [
        (None, None, None),  # the signer's own effect, nobody claimed it
        (_claim("bob"), None, "being finished by bob, who claimed it at 14:00:00 UTC (process "),
        (None, "carol", "carol finishes decision 7 without having claimed it"),
        (_claim("bob"), "carol", "being finished by bob, who claimed it at 14:00:00 UTC"),  # not hers
        (_claim("bob", here=False), "bob", "(process 4242 on host-b); bob gives way"),  # another process's
        (_claim("bob"), "bob", None),  # the holder of the newest claim
    ],
)
def test_an_effect_is_carried_out_by_the_holder_of_the_newest_claim_alone(
    claim: Claim | None, finished_by: str | None, refused: str | None
) -> None:
    """`waiter.effect_refusal`, which the effects ask under the decision's lock (review s50 A1)."""
    why = effect_refusal(claim, 7, finished_by)
    assert why is None if refused is None else refused in why
