"""Work that several processes start at the same instant in the race tests (spawned, or forked from a
fresh forkserver that preloaded this module: each its own process, engine and connection, as separate
commands are). Kept light to import: a spawned process imports this module to find its target."""

from __future__ import annotations

import os
from typing import Any


def record_one_audit_event(home: str, i: int, barrier: Any, results: Any) -> None:
    """Connect to the state DB in `home`, wait for the others, then record one audit event in a plain
    (deferred) transaction whose first statement is `audit.record` (as a failed sign-in's is)."""
    os.environ["SPARSEPILOT_HOME"] = home
    os.environ.pop("SPARSEPILOT_DATABASE_URL", None)
    from sqlalchemy import text

    from rollout import audit
    from rollout.db.session import session_scope

    with session_scope() as s:  # connected before the race starts
        s.execute(text("SELECT 1"))
    barrier.wait(timeout=120)
    try:
        with session_scope() as s:
            audit.record(s, audit.ANONYMOUS_ACTOR, "test.concurrent", entity="account", entity_id=f"user{i}")
        results.put((i, "recorded"))
    except Exception as exc:  # noqa: BLE001 - reported to the test, which names it
        results.put((i, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))


def first_run_files(homes: list[str], barrier: Any, results: Any) -> None:
    """For each fresh home in turn, released with the other process at one instant: create the first-run
    account (what `sparsepilot init` prints), then the token-signing key (a first `login`)."""
    from rollout import auth

    for home in homes:
        env = {"SPARSEPILOT_HOME": home}
        barrier.wait(timeout=120)
        results.put((home, "account", auth.create_first_run_account(env)))
        barrier.wait(timeout=120)
        results.put((home, "key", auth.auth_key(env, create=True)))
