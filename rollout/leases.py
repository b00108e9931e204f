"""One run at a time works on a use case: a lease in the state DB.

A use case's cycle runs on a schedule, and a cycle can outlast its interval or meet a manual `sparsepilot
pilot`, `gate` or `calibrate` of the same use case. Two runs at once calibrated the same plan twice, drew
the same next requests (the second run's answers were lost to the observations' unique key and its flow
failed on it) and timed their measurements on a host the other run was loading. A flow that changes a use
case's state therefore holds its lease while it works (`holding`): the second run is refused at once,
told who holds the use case, doing what, where and since when (`UseCaseBusy`); a scheduled cycle that
finds its use case busy skips that tick instead (flows/cycle.py catches the refusal).

The lease is a row per use case (`use_case_leases`, made with the use case) with the holder's token, its
flow run, host and process, and an expiry. A thread of the holder renews it every `RENEW_SECONDS` while
the work goes on, so a lease outlives any long calibration. A holder that dies stops renewing, and the
next run takes its use case over at once when it can tell the holder is gone (a process of this host
that no longer exists; a flow run that Prefect has marked finished, crashed included, asked through the
`run_is_live` the flows pass in), else when its lease lapses, `LEASE_SECONDS` after the last renewal
(`SPARSEPILOT_LEASE_SECONDS` sets another length: `lease_seconds`). The run that takes over is told from
whom (`TakenOver`, `holding`'s `on_take_over`): the flows then mark Crashed what Prefect still shows
running of a dead holder's flow run (flows/crashed_holder.py).
Expiries are set and read on one clock, the state DB's (`_clock`): on PostgreSQL the server's, so hosts
whose own clocks disagree (by more than a lease, even) neither take over a live holder nor keep a dead
one's use case; on SQLite this host's, which every holder of its file shares.

A holder can lose its lease without dying: a state DB it cannot reach for longer than the lease, a process
stopped for that long. Its work goes on, but its writes may not: while a run holds leases, every flush of a
state-DB session in its context first checks that its token still holds each of them, and refuses the
transaction with `LeaseLost` when another run has taken one over or it was freed (`_fence`): the run that
holds the use case now owns its state, and the old holder's late writes (a step's observations, a
decision, marking a reopened run failed) never reach it. Long work also asks `check_held` between its
steps (what the renewer saw), so it stops computing what it could not write. A lease that lapsed but that
no one took over is still its holder's. MLflow is not fenced itself, but the registry writes its state-DB
row before each MLflow call, so a refused holder stops before it, or leaves what a crash between the two
stores leaves.

Re-entrant within one run: the subflows a cycle calls (calibrate, evaluate, pilot, gate, monitor) find the
use case held by their own run (a context variable carries the token) and go on under the same lease.
Acquiring is atomic: SQLite takes its write lock first (``BEGIN IMMEDIATE``), PostgreSQL locks the use
case's row, so of two runs that start at once exactly one gets the lease. A run that takes and releases
the lease leaves its row as it found it. Each function owns its transaction."""

from __future__ import annotations

import contextvars
import datetime as dt
import logging
import math
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event, func, select
from sqlalchemy.orm import object_session

from rollout.db.models import UseCase, UseCaseLease
from rollout.db.session import StateDBBusy, StateSession, session_scope
from rollout.redact import redact
from rollout.usecases import get_use_case
from sparse_core.errors import SparsePilotError

LEASE_SECONDS = 120.0  # a holder that stops renewing loses the use case after this long (default)
RENEW_SECONDS = 30.0  # how often a live holder renews, at most (a shorter lease: a quarter of it)
LEASE_ENV = "SPARSEPILOT_LEASE_SECONDS"  # the operator's lease length, read when a run takes its lease
MIN_LEASE_SECONDS = 20.0  # shorter, a renewal a loaded host delays by a few seconds would let it lapse

log = logging.getLogger(__name__)

# use case name -> the token of the lease this run (context) holds on it
_HELD: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("leases", default=None)
# token of a lease its renewer found taken over or freed -> who holds the use case now, as `_lost` says it
_LOST: dict[str, str] = {}


class LeaseSettingError(SparsePilotError, ValueError):
    """SPARSEPILOT_LEASE_SECONDS is not a lease length this module can keep."""


def lease_seconds() -> float:
    """The lease length a run takes: SPARSEPILOT_LEASE_SECONDS when set, else `LEASE_SECONDS`. A longer
    lease keeps a holder that stalls (a loaded host, a long pause) from being taken over, and keeps a dead
    holder's use case (on another host, its flow run not yet marked ended) that much longer."""
    raw = os.environ.get(LEASE_ENV, "").strip()
    if not raw:
        return LEASE_SECONDS
    try:
        value = float(raw)
    except ValueError:
        raise LeaseSettingError(f"{LEASE_ENV}={raw!r} is not a number of seconds") from None
    if not value >= MIN_LEASE_SECONDS or math.isinf(value):
        raise LeaseSettingError(
            f"{LEASE_ENV}={raw!r}: a lease lasts {MIN_LEASE_SECONDS:g} s at least (it is renewed every "
            "quarter of it, at most every 30 s) and is finite"
        )
    return value


class UseCaseBusy(SparsePilotError, RuntimeError):
    """Another run holds the use case."""


class WriteLockBusy(UseCaseBusy, StateDBBusy):
    """SQLite: the lease could not be taken within `LOCK_WAIT_SECONDS` because another run holds the state
    DB's write lock (a scheduled cycle skips its tick, as for UseCaseBusy)."""


LOCK_WAIT_SECONDS = 5.0  # how long taking a lease waits for SQLite's write lock


class LeaseLost(SparsePilotError, RuntimeError):
    """This run's lease was taken over (or freed) while it worked: its writes to the use case's state are
    refused."""


@dataclass(frozen=True)
class TakenOver:
    """The holder a run took its use case over from, for the caller to tidy after it (the flows mark the
    dead holder's flow runs that Prefect still shows running Crashed: flows.crashed_holder)."""

    use_case: str
    flow_run_id: str | None  # the holder's flow run, where it had one
    work: str  # the holder, as the refusal named it
    why: str  # why its lease no longer held, as the take-over's warning says
    dead: bool  # known to have stopped: its process (this host's) is gone, or Prefect ended its flow run


@dataclass(frozen=True)
class Holder:
    """Who holds a use case's lease, as the refusal names it."""

    work: str  # what and where: "pilot (flow run 3f2a...) pid 123 on host-a"
    acquired_at: dt.datetime  # UTC
    expires_at: dt.datetime  # UTC

    def describe(self, now: dt.datetime) -> str:
        since = self.acquired_at.strftime("%Y-%m-%d %H:%M:%S UTC")
        left = max((self.expires_at - now).total_seconds(), 0.0)
        return f"{self.work}, since {since} (its lease lapses in {left:.0f} s unless renewed)"


def _utc(t: dt.datetime) -> dt.datetime:
    """SQLite returns naive datetimes: they were written in UTC."""
    return t.replace(tzinfo=dt.UTC) if t.tzinfo is None else t.astimezone(dt.UTC)


def _now() -> dt.datetime:
    """This host's clock (UTC)."""
    return dt.datetime.now(dt.UTC)


def _clock(session: Any) -> dt.datetime:
    """Now by the clock every holder of the state DB shares: the PostgreSQL server's (the hosts that
    share it may disagree with each other), this host's for SQLite (its file is on this host)."""
    if session.get_bind().dialect.name == "postgresql":
        return _utc(session.execute(select(func.clock_timestamp())).scalar_one())
    return _now()


def work_description(what: str, flow_run_id: str | None = None) -> str:
    """What the holder does and where, for the refusal another run gets."""
    where = f"pid {os.getpid()} on {socket.gethostname()}"
    return f"{what} (flow run {flow_run_id}) {where}" if flow_run_id else f"{what}, {where}"


def _held_by(lease: Any) -> Holder:
    """`lease`: the ORM row or a row of its columns."""
    return Holder(lease.work or "another run", _utc(lease.acquired_at), _utc(lease.expires_at))


def held_in(session: Any, use_case_id: int, now: dt.datetime | None = None) -> Holder | None:
    """Inside the caller's transaction: who holds the use case now, or None when it is free (released,
    or lapsed)."""
    lease = session.get(UseCaseLease, use_case_id)
    if lease is None or lease.holder is None or _utc(lease.expires_at) <= (now or _clock(session)):
        return None
    return _held_by(lease)


def working_now(session: Any, use_case_id: int) -> str | None:
    """Inside the caller's transaction: the run that holds the use case, as a refusal names it, or None
    when it is free (what `usecase show` and the dashboard's use-case page show)."""
    now = _clock(session)
    held = held_in(session, use_case_id, now)
    return held.describe(now) if held else None


def _lost(use_case: str, now_held: str) -> LeaseLost:
    return LeaseLost(
        f"{use_case}: this run lost its lease while it worked ({now_held}); its writes are refused, "
        "the run that holds the use case owns its state"
    )


def _now_held(held: str | None) -> str:
    """Who holds the use case now, as LeaseLost says it: `held` is the holder's description, None if free."""
    return f"{held} holds it now" if held is not None else "it was freed"


def _who_holds(use_case: str) -> str:
    """`_now_held`, looked up in its own transaction."""
    held = busy_with(use_case)
    return _now_held(None if held == "free" else held)


def check_held() -> None:
    """Raise LeaseLost when the renewer of a lease this run holds found it taken over or freed (no DB
    call: what the renewer saw). Long work calls it between its steps, so a run that lost its use case
    stops computing results it could not write anyway, and leaves the host to the run that holds it."""
    for use_case, token in (_HELD.get() or {}).items():
        if token in _LOST:
            raise _lost(use_case, _LOST[token])


@event.listens_for(StateSession, "before_flush")
def _fence(session: StateSession, _flush_context: Any, _instances: Any) -> None:
    """Before a session in a leased context writes: the run must still hold every lease it entered with.
    Checked once per transaction, at its first flush with changes, inside the transaction that writes:
    on PostgreSQL the check takes a share lock on the lease row (a takeover, a renewal or a release
    updates that row, so each waits for this transaction to end; nothing else is locked, so ordinary
    writers never wait on it); on SQLite it takes the write lock first. So no takeover slips in between
    the check and the commit. Raises LeaseLost, naming the holder now; the session's transaction then
    rolls back."""
    held = _HELD.get()
    if not held or not (session.new or session.dirty or session.deleted):
        return
    tx = session.get_transaction()
    if session.info.get("lease_fenced") is tx:
        return
    conn = session.connection()
    if conn.dialect.name == "sqlite" and not conn.connection.dbapi_connection.in_transaction:
        # the driver begins a transaction only at the first write, so this check would read outside it
        # and a takeover could commit between the check and the write: take the write lock first
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    with session.no_autoflush:
        for use_case, token in held.items():
            # columns, not the ORM row: a pending change of this session to the lease must stay pending
            lease = UseCaseLease
            row = session.execute(
                select(lease.holder, lease.work, lease.acquired_at, lease.expires_at)
                .join(UseCase, UseCase.id == lease.use_case_id)
                .where(UseCase.name == use_case)
                .with_for_update(read=True, of=lease)
            ).one_or_none()
            if row is None or row.holder != token:
                now_held = _held_by(row) if row is not None and row.holder else None
                raise _lost(use_case, _now_held(now_held and now_held.describe(_clock(session))))
    session.info["lease_fenced"] = tx


def holder(use_case: str, *, now: dt.datetime | None = None) -> Holder | None:
    """`held_in` in its own transaction, by the use case's name."""
    with session_scope() as session:
        return held_in(session, get_use_case(session, use_case).id, now)


def busy_with(use_case: str) -> str:
    """`working_now` in its own transaction, by the use case's name ("free" when nobody holds it)."""
    with session_scope() as session:
        return working_now(session, get_use_case(session, use_case).id) or "free"


def process_gone(host: str | None, pid: int | None) -> bool:
    """True only for a process of this host that no longer exists (another host's cannot be seen)."""
    if pid is None or host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, as another user
        return False
    return False


def _ended_run(use_case: str, token: str, run_is_live: Callable[[str], bool] | None) -> str | None:
    """The flow run of another holder whose run has ended (asked outside any lock: it may be an HTTP
    call), or None."""
    if run_is_live is None:
        return None
    with session_scope() as session:
        lease = session.get(UseCaseLease, get_use_case(session, use_case).id)
        run = None if lease is None or lease.holder in (None, token) else lease.flow_run_id
    return run if run and not run_is_live(run) else None


def ended_holder_run(use_case: str, run_is_live: Callable[[str], bool] | None) -> str | None:
    """The flow run of the use case's lease holder, where `run_is_live` says it has ended (asked outside
    any lock: it may be an HTTP call), for `live_holder`; None otherwise."""
    return _ended_run(use_case, "", run_is_live)


def live_holder(session: Any, use_case_id: int, ended_run: str | None = None) -> Holder | None:
    """Inside the caller's transaction: the run that holds the use case and may still be working on it,
    or None where the use case is free, its lease lapsed, or its holder is gone (its process on this
    host, or its flow run `ended_run`, `ended_holder_run`): what another's work left half done is then
    no one's in flight."""
    lease = session.get(UseCaseLease, use_case_id)
    if lease is None or lease.holder is None or _gone(lease, _clock(session), ended_run) is not None:
        return None
    return _held_by(lease)


def _gone(lease: UseCaseLease, now: dt.datetime, ended_run: str | None) -> str | None:
    """Why another holder's lease no longer holds, or None while it does."""
    if _utc(lease.expires_at) <= now:
        return f"lapsed at {_utc(lease.expires_at).isoformat(timespec='seconds')} without a release"
    if process_gone(lease.host, lease.pid):
        return f"its process {lease.pid} on {lease.host} is gone"
    if ended_run is not None and lease.flow_run_id == ended_run:
        return f"its flow run {ended_run} has ended"
    return None


def acquire(
    use_case: str,
    token: str,
    work: str,
    *,
    seconds: float = LEASE_SECONDS,
    flow_run_id: str | None = None,
    run_is_live: Callable[[str], bool] | None = None,
) -> TakenOver | None:
    """Take the use case's lease for `token` (or extend it, when `token` holds it already). Raises
    UseCaseBusy, naming the holder, while another token holds it: until its lease lapses, unless its
    process (on this host) is gone or `run_is_live` says its flow run has ended. Returns the holder it
    took the use case over from, if any."""
    ended_run = _ended_run(use_case, token, run_is_live)
    # read first, without the write lock: a live holder is named at once (on SQLite a holder writing a
    # long import keeps the write lock, and waiting for it ended in "database is locked" after 30 s)
    with session_scope() as session:
        _refuse_live(
            use_case, session.get(UseCaseLease, get_use_case(session, use_case).id), token, ended_run
        )
    try:
        with session_scope(immediate=True, lock_wait_s=LOCK_WAIT_SECONDS) as session:
            uc = get_use_case(session, use_case)
            session.get(UseCase, uc.id, with_for_update=True)  # PostgreSQL: one acquirer at a time
            now = _clock(session)
            lease = session.get(UseCaseLease, uc.id)
            taken = None
            if lease is None:  # a use case row written without its lease row (not by `usecase add`)
                lease = UseCaseLease(use_case_id=uc.id)
                session.add(lease)
            elif lease.holder not in (None, token):
                why, was = (
                    str(_refuse_live(use_case, lease, token, ended_run, now)),
                    lease.work or "another run",
                )
                log.warning("%s", take_over_words(use_case, was, why, work, _utc(lease.expires_at) <= now))
                dead = process_gone(lease.host, lease.pid) or (
                    ended_run is not None and lease.flow_run_id == ended_run
                )
                taken = TakenOver(use_case, lease.flow_run_id, was, why, dead)
            if lease.holder != token:
                lease.acquired_at = now
            lease.holder, lease.work, lease.flow_run_id = token, work[:300], flow_run_id
            lease.host, lease.pid = socket.gethostname(), os.getpid()
            lease.expires_at = now + dt.timedelta(seconds=seconds)
    except StateDBBusy:
        raise WriteLockBusy(
            f"{use_case} is busy: {_writers(use_case)} holds the state DB's write lock (SQLite takes one "
            "writer at a time: a long observations import holds it for its length; PostgreSQL is the store "
            "for concurrent operation, docs/operations.md); try again when it has finished"
        ) from None
    return taken


def take_over_words(use_case: str, holder: str, why: str, by: str, lapsed: bool) -> str:
    """The warning of a run taking `use_case` over from `holder` (its work, host and pid or flow run, as
    the refusal named it) whose lease no longer holds for `why` (`_gone`'s words: its process gone, its
    flow run ended, or, `lapsed`, its lease lapsed), `by` being the run that takes it."""
    if lapsed:  # maybe only stalled (another host's, a long pause): it may still try to write
        return (
            f"{use_case}: {holder} held the use case, but its lease {why}; {by} takes the use case over "
            "now, and whatever that holder still writes is refused"
        )
    return f"{use_case}: {holder} held the use case, but {why}; {by} takes the use case over now"


def _refuse_live(
    use_case: str, lease: Any, token: str, ended_run: str | None, now: dt.datetime | None = None
) -> str | None:
    """UseCaseBusy, naming the holder, while another token's lease holds; else why it does not (None:
    free, or ours)."""
    if lease is None or lease.holder in (None, token):
        return None
    now = now or _clock(object_session(lease))
    why = _gone(lease, now, ended_run)
    if why is None:
        raise UseCaseBusy(
            f"{use_case} is busy: {_held_by(lease).describe(now)}; try again when it has finished"
        )
    return why


def _writers(use_case: str) -> str:
    """Who may hold SQLite's write lock, as far as the leases tell (a reader is not blocked by it)."""
    with session_scope() as session:
        now = _clock(session)
        live = [
            f"{name}'s {lease.work}"
            for lease, name in session.execute(
                select(UseCaseLease, UseCase.name)
                .join(UseCase, UseCase.id == UseCaseLease.use_case_id)
                .where(UseCaseLease.holder.is_not(None))
            )
            if _utc(lease.expires_at) > now
        ]
    return "; ".join(live) if live else "another writer (an approval, a rollback, an import outside a lease)"


def renew(use_case: str, token: str, *, seconds: float = LEASE_SECONDS) -> bool:
    """Push the lease's expiry `seconds` ahead; False when `token` no longer holds it (it lapsed and
    another run took it over, or it was released)."""
    with session_scope() as session:
        uc = get_use_case(session, use_case)
        lease = session.get(UseCaseLease, uc.id, with_for_update=True)
        if lease is None or lease.holder != token:
            return False
        lease.expires_at = _clock(session) + dt.timedelta(seconds=seconds)
        return True


def release(use_case: str, token: str) -> None:
    """Free the use case if `token` holds it (a lease another run took over stays theirs); the row is
    left as a free one is made."""
    with session_scope() as session:
        uc = get_use_case(session, use_case)
        lease = session.get(UseCaseLease, uc.id, with_for_update=True)
        if lease is not None and lease.holder == token:
            lease.holder = lease.work = lease.flow_run_id = lease.host = None
            lease.pid = lease.acquired_at = lease.expires_at = None


@contextmanager
def holding(
    use_case: str,
    what: str,
    *,
    flow_run_id: str | None = None,
    run_is_live: Callable[[str], bool] | None = None,
    seconds: float | None = None,
    renew_every: float | None = None,
    on_take_over: Callable[[TakenOver], None] | None = None,
) -> Iterator[str]:
    """Work on `use_case` under its lease: acquired on entry (UseCaseBusy, naming the holder, when
    another run holds it), renewed by a thread every `renew_every` seconds (default `RENEW_SECONDS` or a
    quarter of the lease, the shorter) for `seconds` more (default `lease_seconds()`: the operator's
    SPARSEPILOT_LEASE_SECONDS, else `LEASE_SECONDS`; all read when called), released on exit however the
    work ends. Within a run that holds the use case already (a cycle's subflow) it just goes on under that
    lease. `on_take_over` is called, under the lease, with the holder it took the use case over from.
    Yields the lease's token."""
    seconds = lease_seconds() if seconds is None else seconds
    renew_every = min(RENEW_SECONDS, seconds / 4) if renew_every is None else renew_every
    held = _HELD.get() or {}
    if use_case in held:
        yield held[use_case]
        return
    token = uuid.uuid4().hex
    work = work_description(what, flow_run_id)
    taken = acquire(use_case, token, work, seconds=seconds, flow_run_id=flow_run_id, run_is_live=run_is_live)
    stop = threading.Event()

    def keep_alive() -> None:
        while not stop.wait(renew_every):
            try:
                if not renew(use_case, token, seconds=seconds):
                    _LOST[token] = _who_holds(use_case)
                    log.warning("%s: this %s lost its lease (%s)", use_case, what, _LOST[token])
                    return
            except Exception as exc:  # a busy DB: try again at the next tick, well inside the lease
                log.warning("%s: could not renew its lease (%s); retrying", use_case, redact(exc))

    renewer = threading.Thread(target=keep_alive, name=f"lease-{use_case}", daemon=True)
    renewer.start()
    reset = _HELD.set({**held, use_case: token})
    try:
        if taken is not None and on_take_over is not None:
            on_take_over(taken)
        yield token
    finally:
        _HELD.reset(reset)
        stop.set()
        renewer.join()
        _LOST.pop(token, None)
        release(use_case, token)
