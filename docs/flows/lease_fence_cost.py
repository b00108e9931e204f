"""What the lease fence costs a write (docs/flows.md, "A holder that lost its lease writes nothing more").

A throwaway SQLite state DB (migrated), one use case; N write transactions (one audit row each) outside a
lease, then N inside one (each then also runs the fence's check, after taking SQLite's write lock), three
times. Prints milliseconds per transaction for each.

    PYTHONPATH=$PWD python docs/flows/lease_fence_cost.py [N]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time


def main(n: int) -> None:
    home = tempfile.mkdtemp()
    os.environ["SPARSEPILOT_HOME"] = home
    os.environ["SPARSEPILOT_DATABASE_URL"] = url = f"sqlite:///{home}/state.db"
    from rollout import audit, leases
    from rollout.db import migrate
    from rollout.db.models import UseCase, UseCaseLease
    from rollout.db.session import session_scope

    migrate.upgrade(url)
    with session_scope() as s:
        uc = UseCase(name="u", owner="o", criticality="low")
        s.add(uc)
        s.flush()
        s.add(UseCaseLease(use_case_id=uc.id))

    def ms_per_write() -> float:
        t = time.perf_counter()
        for _ in range(n):
            with session_scope() as s:
                audit.record(s, audit.SYSTEM_ACTOR, "x", entity="use_case", entity_id="u", details={})
        return (time.perf_counter() - t) / n * 1e3

    for _ in range(3):
        outside = ms_per_write()
        with leases.holding("u", "bench", renew_every=3600):
            inside = ms_per_write()
        print(f"outside a lease {outside:.2f} ms / write transaction, inside {inside:.2f} ms")
    print("load average", os.getloadavg())


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
