"""A split step's import whose arm counts contradict the step's share is refused
(`rollout.pilots.ImportCheck.share_problem`, level `IMPORT_SHARE_LEVEL`): rarely an honest time slice, always
a one-arm file large enough to move the GO capital (docs/gate.md "The order of the evidence")."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom

from rollout.gate.inputs import srm_test
from rollout.pilots import IMPORT_SHARE_LEVEL, ImportCheck, assign_arm


def _check(
    rows: list[dict], pct: float, *, salt: str = "pilot-salt-7f3a", external: bool = False
) -> ImportCheck:
    check = ImportCheck([], kind="split", salt=salt, traffic_pct=pct, external_assignment=external)
    check.add(rows)
    return check


def _row(rid: str, arm: str) -> dict:
    return {"request_id": rid, "arm": arm, "quality": 0.9, "latency_ms": 10.0}


def test_an_honest_time_slice_is_accepted() -> None:
    """Review W1: an hourly slice of 100 requests at 10%, every row in the arm the pilot's hash gives it,
    held 22 sparse rows (p 0.0003) and was refused at level 0.001, again on every retry (the hash gives the
    same counts), with a message saying one arm's log was imported after the other's; 27% of pilots fed
    504 such slices met one. Now the level keeps 1,000 honest files' false refusal at or below 0.1%."""
    salt, pct, n = "pilot-salt-7f3a", 10, 100
    ids = [f"req-01114-{i:03d}" for i in range(n)]
    check = _check([_row(rid, assign_arm(rid, salt, pct)) for rid in ids], pct, salt=salt)
    assert check.new_per_arm == {"control": 78, "treatment": 22}
    assert check.problems() == []
    k = np.arange(n + 1)
    refused = np.array([srm_test(n - i, i, pct / 100)[1] < IMPORT_SHARE_LEVEL for i in k])
    size = binom.pmf(k[refused], n, pct / 100).sum()  # one honest file's refusal, exactly
    assert 1 - (1 - size) ** 1000 <= 0.001


@pytest.mark.parametrize(
    ("pct", "arm", "smallest"),
    [
        (5, "control", 282),
        (10, "control", 139),
        (50, "control", 21),
        (5, "treatment", 5),
        (10, "treatment", 7),
    ],
)
def test_a_one_arm_file_is_refused_from_the_documented_size(pct: int, arm: str, smallest: int) -> None:
    """The sizes docs/gate.md states: one row fewer is taken, `smallest` rows of one arm are refused, and the
    refusal says what was seen and the two honest causes, each with its way on."""

    def one_arm(n: int) -> ImportCheck:
        return _check([_row(f"r{i}", arm) for i in range(n)], pct, external=True)

    assert one_arm(smallest - 1).share_problem() == ""
    said = one_arm(smallest).share_problem()
    n_t, n_c = (smallest, 0) if arm == "treatment" else (0, smallest)
    assert f"its new rows hold {n_t} sparse and {n_c} dense" in said
    assert "import the step's rows of both arms together" in said
    assert "import it together with the next slice" in said
