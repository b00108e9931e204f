"""A rejection that took effect said "a new pilot starts with `sparsepilot pilot NAME`", which is refused:
a challenger whose pilot ended is never piloted again (`pilot_batches.ensure_pilot_in`), so the approver
was sent to a command that fails (review s46 T2-1). The message now says what does start a pilot again,
in the refusal's own words. Real state DB, a use case added through `add_usecase`."""

from __future__ import annotations

from pathlib import Path

import pytest

from .test_decision_money import _go_awaiting_approval
from .test_not_piloted import PAYS, _challenger


def test_a_rejection_says_what_pilots_again_and_the_pilot_command_is_refused(sp_home, tmp_path: Path) -> None:  # noqa: ANN001
    from rollout import approvals, pilot_batches, pilots
    from rollout.auth import Identity

    _challenger(tmp_path, "pays", **PAYS)
    did, _ = _go_awaiting_approval("pays")
    first = approvals.approve(did, Identity("alice", "approver", "cli-env"), "no", reject=True)
    assert first.needs_second_approver
    done = approvals.approve(did, Identity("bob", "approver", "cli-env"), "no indeed", reject=True)
    assert done.took_effect
    assert "pilot 1 of pays stopped" in done.message
    assert "sparsepilot pilot" not in done.message
    assert pilots.pilot_again("pays") in done.message and "`sparsepilot calibrate pays`" in done.message
    assert "--again" not in done.message  # a rejection judged the plan: only another plan pilots again
    for anyway in (False, True):  # what the old message advised: refused, with the same remedy
        with pytest.raises(pilots.PilotStateError) as refused:
            pilot_batches.ensure_pilot("pays", pilot_anyway=anyway)
        assert pilots.pilot_again("pays") in str(refused.value)
