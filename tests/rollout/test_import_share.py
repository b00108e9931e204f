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


def _imports(files: list[list[dict]], pct: float) -> list[str]:
    """Each file imported in turn into one split step (an `ImportCheck` over the step's rows stored so far,
    as `pilot_batches.import_file` builds it); an accepted file's rows are stored. Returns each file's
    refusal ('' for accepted)."""
    stored: list[dict] = []
    said = []
    for rows in files:
        check = ImportCheck(stored, kind="split", salt="s", traffic_pct=pct, external_assignment=True)
        check.add(rows)
        said.append(check.share_problem())
        if not said[-1]:
            stored += rows
    return said


def test_one_arm_files_below_the_files_refusal_size_are_refused_by_the_steps_counts() -> None:
    """Dense-only files of 100 rows at 10% (each below the 139 a file is refused from), a gate look between
    each, fed the stream dense rows look after look; then sparse-only files of 6 rows (below 7) brought the
    other arm. Ten files and a sparse arm exactly at -margin (0.03, GO level 0.0304): a GO in 34 of 40 pilots
    (docs/gate.md "The order of the evidence"). The step's rows so far with the file's are tested too, and
    the refusal names the step's counts and the file's; honest slices stay accepted."""
    dense = [[_row(f"d{f}-{i}", "control") for i in range(100)] for f in range(10)]
    sparse = [[_row(f"s{f}-{i}", "treatment") for i in range(6)] for f in range(20)]
    said = _imports(dense + sparse, 10)
    assert said[0] == ""  # a file alone is not refused below its size
    assert all(said[1:10]) and "the step's rows so far hold 0 sparse and 100 dense (0.0% sparse)" in said[1]
    assert "this file's new rows (0 sparse and 100 dense (0.0% sparse)) 0 sparse and 200 dense" in said[1]
    # the sparse files after the first dense one: taken while the step's counts fit (30 of 130 sparse)
    assert [bool(s) for s in said[10:]] == [False] * 5 + [True] * 15
    salt, pct = "pilot-salt-7f3a", 10
    honest = [
        [_row(rid, assign_arm(rid, salt, pct)) for rid in (f"req-{f:03d}-{i:03d}" for i in range(100))]
        for f in range(30)
    ]
    assert _imports(honest, pct) == [""] * 30
