"""One run at a time works on a use case (rollout.leases), on SQLite and on PostgreSQL: a second run is
refused naming the holder, a lease that is renewed outlives its term, a holder that dies loses the use case
at once when it can be seen gone (its process on this host, its flow run ended) and otherwise when its lease
lapses, a release frees it however the work ends and leaves the row as it was, a run's own subflows go on
under its lease, and of runs that start at once exactly one gets it."""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select

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
    expired = leases._utc(_lease_row(use_case)[6])
    with caplog.at_level(logging.WARNING, logger="rollout.leases"):
        leases.acquire(use_case, "next", "cycle", seconds=30)
    # a plain sentence: whose lease, why it no longer holds, who takes over, and what happens to the holder
    said = (
        "leased: calibrate, pid 9 on gone held the use case, but its lease lapsed at {} without a release; "
    )
    said += "cycle takes the use case over now, and whatever that holder still writes is refused"
    assert said.format(expired.isoformat(timespec="seconds")) in caplog.text, caplog.text
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
    said = "leased: calibrate, a process that dies held the use case, but its process {} on {} is gone; gate "
    assert said.format(dead_pid, socket.gethostname()) + "takes the use case over now" in caplog.text

    leases.acquire(use_case, "next", "gate", flow_run_id="run-1", seconds=300)  # this process: alive
    with pytest.raises(leases.UseCaseBusy):
        leases.acquire(use_case, "other", "pilot", run_is_live=lambda run: True)
    asked: list[str] = []

    def ended(run: str) -> bool:
        asked.append(run)
        return False

    with caplog.at_level(logging.WARNING, logger="rollout.leases"):
        leases.acquire(use_case, "other", "pilot", run_is_live=ended)
    said = (
        "leased: gate held the use case, but its flow run run-1 has ended; pilot takes the use case over now"
    )
    assert asked == ["run-1"] and said in caplog.text, caplog.text
    assert _lease_row(use_case)[0] == "other"


@pytest.mark.postgres
@pytest.mark.parametrize("trust_db", ["postgres"], indirect=True)
def test_on_postgresql_hosts_whose_clocks_disagree_share_the_servers_clock(
    use_case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hosts that share a PostgreSQL state DB may disagree about the time by more than a lease. A host
    whose clock runs 10 minutes fast must not take over a live holder (it would read the lease as long
    lapsed), and a holder whose clock runs 10 minutes slow must not renew its lease into the past (every
    other host would read it as lapsed): expiries are set and read on the server's clock."""
    from rollout import leases

    host_clock = leases._now

    def skewed(minutes: float) -> None:
        monkeypatch.setattr(leases, "_now", lambda: host_clock() + dt.timedelta(minutes=minutes))

    leases.acquire(use_case, "a" * 32, "pilot, pid 1 on host-a", seconds=120)
    skewed(+10)  # host b runs fast
    with pytest.raises(leases.UseCaseBusy, match=r"lapses in 1[12]\d s unless renewed"):
        leases.acquire(use_case, "b" * 32, "gate, pid 2 on host-b")
    assert leases.busy_with(use_case).startswith("pilot, pid 1 on host-a")

    skewed(-10)  # the holder runs slow: its renewal still reaches 120 s past the server's now
    assert leases.renew(use_case, "a" * 32, seconds=120)
    monkeypatch.setattr(leases, "_now", host_clock)
    with pytest.raises(leases.UseCaseBusy):
        leases.acquire(use_case, "b" * 32, "gate, pid 2 on host-b")
    expires = _lease_row(use_case)[6]
    expires = expires.replace(tzinfo=dt.UTC) if expires.tzinfo is None else expires
    assert 100 < (expires - dt.datetime.now(dt.UTC)).total_seconds() <= 120


def test_holding_renews_while_the_work_goes_on_and_releases_however_it_ends(use_case: str) -> None:
    from rollout import leases

    # a term of 2 s renewed every 0.1 s: a renewer starved by a loaded host for a whole term (seen with a
    # 0.6 s term beside two benchmarks) would lose it, which is the lease working, not this test's subject
    with leases.holding(use_case, "pilot", flow_run_id="r-7", seconds=2.0, renew_every=0.1) as token:
        assert token is not None
        time.sleep(5.0)  # 2.5 terms: only the renewals keep it
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


def test_the_operator_sets_the_lease_length_and_a_bad_one_is_refused_by_name(
    use_case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rollout import leases

    monkeypatch.setenv("SPARSEPILOT_LEASE_SECONDS", "600")
    with leases.holding(use_case, "calibrate"):
        _, _, _, _, _, acquired, expires = _lease_row(use_case)
        assert (expires - acquired).total_seconds() == pytest.approx(600, abs=1)
    monkeypatch.delenv("SPARSEPILOT_LEASE_SECONDS")
    with leases.holding(use_case, "calibrate"):
        _, _, _, _, _, acquired, expires = _lease_row(use_case)
        assert (expires - acquired).total_seconds() == pytest.approx(leases.LEASE_SECONDS, abs=1)
    bad_values = (("2m", "is not a number of seconds"), ("5", "lasts 20 s at least"), ("inf", "is finite"))
    for bad, why in bad_values:
        monkeypatch.setenv("SPARSEPILOT_LEASE_SECONDS", bad)
        with pytest.raises(leases.LeaseSettingError, match=f"SPARSEPILOT_LEASE_SECONDS='{bad}'.*{why}"):
            with leases.holding(use_case, "calibrate"):
                pytest.fail("worked without a valid lease length")
        assert _lease_row(use_case) == FREE  # refused before it took anything


def _audit(action: str) -> None:
    from rollout import audit
    from rollout.db.session import session_scope

    with session_scope() as s:
        audit.record(s, audit.SYSTEM_ACTOR, action, entity="use_case", entity_id=NAME, details={})


def test_a_holder_that_lost_its_lease_cannot_write_to_the_state_db(use_case: str, trust_db: str) -> None:
    from rollout import leases
    from rollout.db.models import UseCase
    from rollout.db.session import session_scope
    from tests.rollout.usecase_helpers import snapshot

    _audit("before any lease")  # outside a lease nothing is fenced
    with leases.holding(use_case, "pilot", flow_run_id="r-1", seconds=0.3, renew_every=3600):
        _audit("while held")
        time.sleep(0.5)  # lapsed (its renewer never came), but no one took it over: still this run's
        _audit("lapsed, not taken")
        with session_scope() as s:  # reads are never refused
            assert s.scalar(select(UseCase.owner).where(UseCase.name == use_case)) == "o"
        leases.acquire(use_case, "next", "gate (flow run r-2) pid 2 on host-b", seconds=60)
        before = snapshot(trust_db)
        with pytest.raises(leases.LeaseLost) as lost:
            _audit("after the takeover")
        text = str(lost.value)
        assert text.startswith(f"{use_case}: this run lost its lease while it worked (gate (flow run r-2)")
        assert "holds it now); its writes are refused" in text
        with pytest.raises(leases.LeaseLost):  # any write: a change to the use case row as well
            with session_scope() as s:
                s.scalar(select(UseCase).where(UseCase.name == use_case)).owner = "late"
        assert snapshot(trust_db) == before  # the refused transactions left nothing
    assert _lease_row(use_case)[0] == "next"  # its exit did not free the new holder's lease
    _audit("after the run")  # outside the lease again
    leases.release(use_case, "next")

    with leases.holding(use_case, "gate"):  # freed under it: refused as well
        leases.release(use_case, _lease_row(use_case)[0])
        with pytest.raises(leases.LeaseLost, match="it was freed"):
            _audit("after a release")


def test_a_holder_learns_from_its_renewer_that_it_lost_the_use_case(use_case: str) -> None:
    """`check_held`, which long work calls between its steps: silent while the lease holds, LeaseLost
    naming the new holder once the renewer has found it taken over."""
    from rollout import leases
    from rollout.db.models import UseCase, UseCaseLease, utcnow
    from rollout.db.session import session_scope

    def take_over() -> None:  # another run, in its own context (a thread starts with an empty one)
        with session_scope() as s:
            uc = s.scalar(select(UseCase).where(UseCase.name == use_case))
            lease = s.get(UseCaseLease, uc.id)
            lease.holder, lease.work = "next", "gate (flow run r-3) pid 3 on host-c"
            lease.acquired_at, lease.expires_at = utcnow(), utcnow() + dt.timedelta(seconds=60)

    with leases.holding(use_case, "calibrate", seconds=5, renew_every=0.05):
        time.sleep(0.2)
        leases.check_held()  # renewed several times: still held
        taker = threading.Thread(target=take_over)
        taker.start()
        taker.join()
        deadline = time.monotonic() + 10
        with pytest.raises(leases.LeaseLost, match=r"lost its lease while it worked \(gate \(flow run r-3\)"):
            while time.monotonic() < deadline:
                leases.check_held()
                time.sleep(0.02)
    leases.check_held()  # outside any lease: nothing to lose
    assert _lease_row(use_case)[0] == "next"


def test_a_takeover_cannot_slip_in_between_the_holders_check_and_its_write(use_case: str) -> None:
    """The check and the write are one: a takeover started the moment the holder's check has read its
    lease (hooked right after that statement) waits until the holder's transaction ends (PostgreSQL: the
    check's share lock on the lease row; SQLite: the write lock the check takes first), and the holder's
    next transaction is refused."""
    from sqlalchemy import event

    from rollout import audit, leases
    from rollout.db.session import get_engine, session_scope

    taken = threading.Event()
    slipped: list[bool] = []

    def take_over() -> None:
        leases.acquire(use_case, "next", "gate", seconds=60)
        taken.set()

    def after_check(_conn, _cursor, statement: str, *_rest) -> None:  # noqa: ANN001
        if "use_case_leases.holder" in statement and "JOIN use_cases" in statement and not slipped:
            threading.Thread(target=take_over).start()
            slipped.append(taken.wait(timeout=2.0))  # unblocked, a takeover commits well inside 2 s

    with leases.holding(use_case, "pilot", seconds=0.2, renew_every=3600):
        time.sleep(0.3)  # lapsed, not yet taken
        engine = get_engine()
        event.listen(engine, "after_cursor_execute", after_check)
        try:
            with session_scope() as s:
                audit.record(s, audit.SYSTEM_ACTOR, "checked write", entity="use_case", entity_id=NAME)
        finally:
            event.remove(engine, "after_cursor_execute", after_check)
        assert slipped == [False]  # the takeover waited for the holder's transaction to end
        assert taken.wait(timeout=30)  # and then went ahead
        with pytest.raises(leases.LeaseLost):
            _audit("too late")
    assert _lease_row(use_case)[0] == "next"


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


@pytest.mark.parametrize("trust_db", ["sqlite"], indirect=True)
def test_on_sqlite_a_writer_holding_the_write_lock_gets_a_busy_refusal_in_seconds(
    use_case: str, trust_db: str
) -> None:
    """Review Q, finding 2: an observations import holds SQLite's write lock for its length. Another run
    used to wait 30 s on it and fail with "database is locked" (a traceback; the cycle failed instead of
    skipping its tick). Now the same use case's run is refused at once, naming the holder (its lease is
    read before the write lock is asked for), and another use case's within a few seconds, with a busy
    refusal that is a UseCaseBusy (the cycle skips its tick, the CLI exits 2) naming who holds the lock."""
    from rollout import leases
    from rollout.db.models import UseCase, UseCaseLease
    from rollout.db.session import StateDBBusy, session_scope

    with session_scope() as s:
        other = UseCase(name="other", owner="o", criticality="low")
        s.add(other)
        s.flush()
        s.add(UseCaseLease(use_case_id=other.id))
    importer = "a" * 32
    leases.acquire(use_case, importer, "observations import, pid 7 on host-a")
    locked, done = threading.Event(), threading.Event()

    def long_import() -> None:  # the import's one write transaction
        with session_scope(immediate=True):
            locked.set()
            done.wait(60)

    t = threading.Thread(target=long_import)
    t.start()
    try:
        assert locked.wait(30)
        start = time.monotonic()
        with pytest.raises(leases.UseCaseBusy, match="observations import, pid 7"):
            leases.acquire(use_case, "b" * 32, "gate, pid 8 on host-b")
        assert time.monotonic() - start < 3
        start = time.monotonic()
        with pytest.raises(leases.UseCaseBusy) as busy:
            leases.acquire("other", "c" * 32, "pilot, pid 9 on host-b")
        waited = time.monotonic() - start
        assert leases.LOCK_WAIT_SECONDS - 1 < waited < leases.LOCK_WAIT_SECONDS + 5, waited
        assert isinstance(busy.value, StateDBBusy)
        text = str(busy.value)
        assert text.startswith("other is busy: leased's observations import, pid 7")
        assert "holds the state DB's write lock" in text and "PostgreSQL" in text
    finally:
        done.set()
        t.join(60)
    leases.acquire("other", "c" * 32, "pilot, pid 9 on host-b")  # the lock is free again: taken at once
    assert leases.holder("other") is not None
