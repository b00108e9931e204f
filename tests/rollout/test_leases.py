"""One run at a time works on a use case (rollout.leases), on SQLite and on PostgreSQL: a second run is
refused naming the holder, a lease that is renewed outlives its term, a holder that dies loses the use case
at once when it can be seen gone (its process on this host, its flow run ended) and otherwise when its lease
lapses, a release frees it however the work ends and leaves the row as it was, a run's own subflows go on
under its lease, and of runs that start at once exactly one gets it."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

NAME = "leased"


@pytest.fixture
def use_case(trust_db: str) -> str:
    from rollout.db.models import UseCase, UseCaseLease
    from rollout.db.session import session_scope

    with session_scope() as s:  # as `usecase add` makes one: with its free lease row
        uc = UseCase(name=NAME, owner="o", criticality="low")
        s.add(uc)
        s.flush()
        s.add(UseCaseLease(use_case_id=uc.id))
    return NAME


def _lease_row(name: str) -> tuple:
    from sqlalchemy import select

    from rollout.db.models import UseCase, UseCaseLease
    from rollout.db.session import session_scope

    with session_scope() as s:
        uc = s.scalar(select(UseCase).where(UseCase.name == name))
        row = s.get(UseCaseLease, uc.id)
        return (row.holder, row.work, row.flow_run_id, row.host, row.pid, row.acquired_at, row.expires_at)


FREE = (None,) * 7


def test_a_second_run_is_refused_naming_the_holder_until_the_first_releases(use_case: str) -> None:
    from rollout import leases

    assert leases.busy_with(use_case) == "free"
    leases.acquire(use_case, "a" * 32, "pilot (flow run r-1) pid 1 on host-a")
    with pytest.raises(leases.UseCaseBusy) as busy:
        leases.acquire(use_case, "b" * 32, "gate, pid 2 on host-b")
    text = str(busy.value)
    assert text.startswith(f"{use_case} is busy: pilot (flow run r-1) pid 1 on host-a, since ")
    assert "lapses in" in text and "try again when it has finished" in text
    assert leases.busy_with(use_case).startswith("pilot (flow run r-1) pid 1 on host-a")

    leases.acquire(use_case, "a" * 32, "pilot (flow run r-1) pid 1 on host-a")  # its holder may extend it
    leases.release(use_case, "b" * 32)  # not b's to release
    assert _lease_row(use_case)[0] == "a" * 32
    leases.release(use_case, "a" * 32)
    assert _lease_row(use_case) == FREE and leases.busy_with(use_case) == "free"  # as it was made
    leases.acquire(use_case, "b" * 32, "gate, pid 2 on host-b")
    assert _lease_row(use_case)[0] == "b" * 32


def test_a_lapsed_lease_is_taken_over_and_its_holder_cannot_renew_or_release_it(
    use_case: str, caplog: pytest.LogCaptureFixture
) -> None:
    from rollout import leases

    leases.acquire(use_case, "dead", "calibrate, pid 9 on gone", seconds=0.2)
    with pytest.raises(leases.UseCaseBusy):
        leases.acquire(use_case, "next", "cycle", seconds=30)
    time.sleep(0.4)
    assert leases.busy_with(use_case) == "free"
    with caplog.at_level(logging.WARNING, logger="rollout.leases"):
        leases.acquire(use_case, "next", "cycle", seconds=30)
    assert "the lease of calibrate, pid 9 on gone lapsed" in caplog.text
    assert leases.renew(use_case, "dead") is False
    leases.release(use_case, "dead")
    assert _lease_row(use_case)[0] == "next"


def test_a_holder_seen_gone_loses_the_use_case_at_once(
    use_case: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A process of this host that took the lease and died (killed before it could release), and a
    holder whose flow run has ended (Prefect marked it crashed, say): the next run need not wait for
    the lease to lapse."""
    from rollout import leases

    code = (
        "import os; from rollout import leases; "
        f"leases.acquire({use_case!r}, 'dead', 'calibrate, a process that dies', seconds=300); os._exit(0)"
    )
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=repo, timeout=120)
    dead_pid = _lease_row(use_case)[4]
    assert _lease_row(use_case)[0] == "dead" and dead_pid != os.getpid()
    assert leases.busy_with(use_case).startswith("calibrate, a process that dies")  # not lapsed
    with caplog.at_level(logging.WARNING, logger="rollout.leases"):
        leases.acquire(use_case, "next", "gate")
    assert f"its process {dead_pid} on {socket.gethostname()} is gone; taking it over" in caplog.text

    leases.acquire(use_case, "next", "gate", flow_run_id="run-1", seconds=300)  # this process: alive
    with pytest.raises(leases.UseCaseBusy):
        leases.acquire(use_case, "other", "pilot", run_is_live=lambda run: True)
    asked: list[str] = []

    def ended(run: str) -> bool:
        asked.append(run)
        return False

    with caplog.at_level(logging.WARNING, logger="rollout.leases"):
        leases.acquire(use_case, "other", "pilot", run_is_live=ended)
    assert asked == ["run-1"] and "its flow run run-1 has ended; taking it over" in caplog.text
    assert _lease_row(use_case)[0] == "other"


def test_holding_renews_while_the_work_goes_on_and_releases_however_it_ends(use_case: str) -> None:
    from rollout import leases

    with leases.holding(use_case, "pilot", flow_run_id="r-7", seconds=0.6, renew_every=0.1) as token:
        assert token is not None
        time.sleep(1.5)  # 2.5 terms: only the renewals keep it
        with pytest.raises(leases.UseCaseBusy, match=r"pilot \(flow run r-7\) pid \d+ on "):
            leases.acquire(use_case, "other", "gate")
        with leases.holding(use_case, "gate") as inner:  # a subflow of the same run: the same lease
            assert inner == token
        assert _lease_row(use_case)[0] == token  # the subflow did not release its run's lease
        assert _lease_row(use_case)[2:5] == ("r-7", socket.gethostname(), os.getpid())
    assert _lease_row(use_case) == FREE

    with pytest.raises(RuntimeError, match="broke"), leases.holding(use_case, "evaluate"):
        raise RuntimeError("broke")
    assert _lease_row(use_case) == FREE


def test_of_runs_that_start_at_once_exactly_one_gets_the_use_case(use_case: str) -> None:
    from rollout import leases

    n = 6
    barrier = threading.Barrier(n)
    won: list[str] = []
    refused: list[str] = []
    errors: list[BaseException] = []

    def start(i: int) -> None:
        barrier.wait()
        try:
            leases.acquire(use_case, f"run-{i}", f"cycle {i}")
            won.append(f"run-{i}")
        except leases.UseCaseBusy:
            refused.append(f"run-{i}")
        except BaseException as exc:  # noqa: BLE001 - a lock error would be a failure of the test
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(won) == 1 and len(refused) == n - 1
    assert _lease_row(use_case)[0] == won[0]


def test_migration_0008_gives_every_existing_use_case_its_free_lease_row(tmp_path: Path) -> None:
    from sqlalchemy import text

    from rollout.db import migrate
    from rollout.db.session import get_engine

    url = f"sqlite:///{tmp_path / 'state.db'}"
    migrate.upgrade(url, revision="0007")
    insert = text(
        "INSERT INTO use_cases (name, owner, criticality, phase, current_spec_version, created_at,"
        " updated_at) VALUES (:n, 'o', 'low', 'registered', 1, '2026-01-01', '2026-01-01')"
    )
    with get_engine(url).begin() as conn:
        for name in ("a", "b"):
            conn.execute(insert, {"n": name})
    migrate.upgrade(url)
    with get_engine(url).connect() as conn:
        rows = conn.execute(text("SELECT use_case_id, holder, expires_at FROM use_case_leases")).all()
        ids = conn.execute(text("SELECT id FROM use_cases ORDER BY id")).scalars().all()
    assert sorted(rows) == [(i, None, None) for i in ids] and len(ids) == 2
