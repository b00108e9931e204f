"""The failed-sign-in limit holds under concurrency (review s46 A4/C3): N attempts on one account name
that start at the same instant, in threads (the dashboard's sessions) or in processes (the CLI and
other dashboards), check at most `auth.MAX_FAILURES` passwords in the window; the rest are refused
before any password work. Before, every attempt read the count before any failure was written, so all
N passwords were checked (12 of 12 on PostgreSQL), and on SQLite most failures were not even counted."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select

from rollout import auth
from rollout.db.models import AuditEntry
from rollout.db.session import session_scope

N = 10


@pytest.fixture(scope="module")
def trust_accounts() -> str:
    """At the product's scrypt cost, not the tests' cheap one (tests/fixtures/accounts.py): these races
    need each password check to take real time, so that the attempts overlap in it as real ones do, and
    a crowd is still at work when the other page's query runs (`_Crowd.running`)."""
    from tests.fixtures.trust import trust_accounts_value

    return trust_accounts_value(auth.hash_password)


def _failed_rows(name: str) -> int:
    with session_scope() as s:
        return len(
            s.scalars(
                select(AuditEntry.id).where(
                    AuditEntry.action == auth.SIGN_IN_FAILED, AuditEntry.entity_id == name
                )
            ).all()
        )


def _outcome(fn) -> str:  # noqa: ANN001
    try:
        return "checked: signed in" if fn() is not None else "checked: wrong"
    except auth.TooManyAttempts:
        return "refused"
    except Exception as exc:  # noqa: BLE001 - reported in the assertion
        return f"{type(exc).__name__}: {exc}"


def test_concurrent_threads_check_at_most_the_limit(trust_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    checks: list[str] = []
    real = auth.verify_password
    monkeypatch.setattr(auth, "verify_password", lambda pw, h: checks.append(pw) or real(pw, h))
    barrier = threading.Barrier(N)
    results: list[str] = []

    def attempt(i: int) -> None:
        barrier.wait()
        results.append(_outcome(lambda: auth.sign_in("alice", f"wrong-{i}", via="test")))

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(N)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    counts = Counter(results)
    assert counts == {"checked: wrong": auth.MAX_FAILURES, "refused": N - auth.MAX_FAILURES}, counts
    assert len(checks) == auth.MAX_FAILURES
    assert _failed_rows("alice") == auth.MAX_FAILURES  # every check that failed is counted
    assert _outcome(lambda: auth.sign_in("alice", "alice-password", via="test")) == "refused"


def test_a_success_in_the_crowd_is_not_a_failure(trust_db: str) -> None:
    """Turns do not change what counts: a right password among wrong ones signs in and writes no row."""
    barrier = threading.Barrier(4)
    results: dict[str, str] = {}

    def attempt(pw: str) -> None:
        barrier.wait()
        results[pw] = _outcome(lambda: auth.sign_in("bob", pw, via="test"))

    pws = ["bob-password", "wrong-1", "wrong-2", "wrong-3"]
    threads = [threading.Thread(target=attempt, args=(pw,)) for pw in pws]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert results == {"bob-password": "checked: signed in"} | {p: "checked: wrong" for p in pws[1:]}
    assert _failed_rows("bob") == 3


_ENV_PREFIXES = ("SPARSEPILOT_", "PYTHON", "HF_", "MLFLOW_")


def _attempt_in_process(env: dict[str, str], guess: str, barrier, queue) -> None:  # noqa: ANN001
    # forked from the forkserver, whose environment is the test process's when it started: this test's
    # settings replace whatever an earlier test's were, as a spawned process's own environment would
    for key in [k for k in os.environ if k.startswith(_ENV_PREFIXES) and k not in env]:
        del os.environ[key]
    os.environ.update(env)
    from rollout import auth as proc_auth
    from rollout.db.session import session_scope as scope

    with scope() as s:  # connected before the start, so the attempts really start together
        s.execute(__import__("sqlalchemy").text("SELECT 1"))
    barrier.wait()
    queue.put(_outcome(lambda: proc_auth.sign_in("alice", guess, via="test")))


@pytest.mark.parametrize("db", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_concurrent_processes_check_at_most_the_limit(db: str, trust_env, request, tmp_path: Path) -> None:  # noqa: ANN001
    url = trust_env.database_url
    if db == "postgres":
        url = request.getfixturevalue("pg_migrated_url")
    env = {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)} | {
        "SPARSEPILOT_DATABASE_URL": url
    }
    # separate processes, each its own engine and connections, forked from a server that imported this
    # module (SQLAlchemy, the models, rollout.auth) once: eight spawned interpreters each importing it
    # took ~2 s of CPU apiece, most of the test on a 2-core host; nothing of it is connected before the fork
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    n = 8
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    procs = [
        ctx.Process(target=_attempt_in_process, args=(env, f"wrong-{i}", barrier, queue)) for i in range(n)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    counts = Counter(results)
    assert counts == {"checked: wrong": auth.MAX_FAILURES, "refused": n - auth.MAX_FAILURES}, counts
    with session_scope(url) as s:
        rows = s.scalars(select(AuditEntry.id).where(AuditEntry.action == auth.SIGN_IN_FAILED)).all()
    assert len(rows) == auth.MAX_FAILURES


@pytest.fixture
def pg_trust_db(trust_env, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:  # noqa: ANN001
    url = request.getfixturevalue("pg_migrated_url")
    monkeypatch.setenv("SPARSEPILOT_DATABASE_URL", url)
    return url


@dataclass
class _Crowd:
    results: list[str]
    page_s: float  # how long the other page's `select 1` took
    running: int  # sign-ins still running when it returned
    most_per_attempt: int  # the most pooled connections one attempt held at once
    most_at_once: int  # the most the attempts held together


def _crowd_beside_a_page(url: str, names: list[str]) -> _Crowd:
    """Sign-ins as ``names`` at once (wrong passwords), and 0.3 s in another page's `select 1` on the
    same engine; the engine's real pool reports each checkout and checkin."""
    import time

    from sqlalchemy import event, text

    from rollout.db.session import get_engine

    held: Counter[int] = Counter()
    peaks = {"one": 0, "all": 0}
    crowd: set[int] = set()
    guard = threading.Lock()

    def out(*_: object) -> None:
        with guard:
            me = threading.get_ident()
            if me in crowd:
                held[me] += 1
                peaks["one"] = max(peaks["one"], held[me])
                peaks["all"] = max(peaks["all"], sum(held.values()))

    def back(*_: object) -> None:
        with guard:
            if threading.get_ident() in crowd:
                held[threading.get_ident()] -= 1

    pool = get_engine(url).pool
    event.listen(pool, "checkout", out)
    event.listen(pool, "checkin", back)
    barrier = threading.Barrier(len(names) + 1)
    results: list[str] = []

    def attempt(i: int, name: str) -> None:
        with guard:
            crowd.add(threading.get_ident())
        barrier.wait()
        results.append(_outcome(lambda: auth.sign_in(name, f"wrong-{i}", via="test")))

    threads = [threading.Thread(target=attempt, args=(i, n)) for i, n in enumerate(names)]
    for t in threads:
        t.start()
    barrier.wait()
    time.sleep(0.3)
    t0 = time.monotonic()
    with session_scope(url) as s:
        s.execute(text("SELECT 1"))
    page_s, running = time.monotonic() - t0, len(names) - len(results)
    for t in threads:
        t.join(timeout=300)
    event.remove(pool, "checkout", out)
    event.remove(pool, "checkin", back)
    return _Crowd(results, page_s, running, peaks["one"], peaks["all"])


def _more_than_the_pool(url: str) -> int:
    from rollout.db.session import get_engine

    pool = get_engine(url).pool
    return pool.size() + pool._max_overflow + 2  # type: ignore[attr-defined]


@pytest.mark.postgres
def test_a_crowd_on_one_name_needs_no_more_than_the_pool(pg_trust_db: str) -> None:
    """Review s46 T3-2: each attempt held its advisory lock's pooled connection (waiting for the lock
    too) and read/wrote the failures on a second one: with more attempts than the pool (5 + 10) every
    one waited 30 s for a connection and failed (SignInUnavailable), and so did every other page of the
    process. Now an attempt uses one connection, waiting attempts none, and the limit still holds."""
    n = _more_than_the_pool(pg_trust_db)
    crowd = _crowd_beside_a_page(pg_trust_db, ["alice"] * n)
    counts = Counter(crowd.results)
    assert counts == {"checked: wrong": auth.MAX_FAILURES, "refused": n - auth.MAX_FAILURES}, counts
    assert _failed_rows("alice") == auth.MAX_FAILURES
    _assert_the_pool_was_shared(crowd)


@pytest.mark.postgres
def test_a_crowd_on_many_names_needs_no_more_than_the_pool(pg_trust_db: str) -> None:
    """The same crowd with a name each: every attempt gets its turn, every failure is counted, and the
    process's other pages are not kept waiting meanwhile."""
    names = [f"guess-{i}" for i in range(_more_than_the_pool(pg_trust_db))]
    crowd = _crowd_beside_a_page(pg_trust_db, names)
    assert Counter(crowd.results) == {"checked: wrong": len(names)}, Counter(crowd.results)
    with session_scope() as s:
        rows = s.scalars(select(AuditEntry.id).where(AuditEntry.action == auth.SIGN_IN_FAILED)).all()
    assert len(rows) == len(names)
    _assert_the_pool_was_shared(crowd)


def _assert_the_pool_was_shared(crowd: _Crowd) -> None:
    assert crowd.most_per_attempt == 1, f"an attempt held {crowd.most_per_attempt} connections at once"
    assert crowd.most_at_once <= auth.PG_SIGN_IN_CONNECTIONS, crowd.most_at_once
    assert crowd.running > 0, "the page's query ran after the crowd; nothing was measured"
    assert crowd.page_s < 1.0, f"another page waited {crowd.page_s:.1f} s for a connection"
