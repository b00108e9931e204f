"""replaced pilots: mark "replaced" the promoted pilots of a state DB made before that status existed

Until a promotion marked "replaced" the earlier promoted pilots no rollback returns to any more
(`rollout.pilots.replaced_by_promotion`), every promoted pilot stayed "promoted" for good. In such a state
DB the newest "promoted" pilot (`pilots.promoted_pilot`: what the monitor samples, a rollback ends, the
use-case page's monitor line reads) may be one whose model no longer serves: promote pilot 1, pilot 2
over it, pilot 3 of pilot 1's plan, roll pilot 3 back, and pilot 2 read as the champion's while the dense
baseline served.

The rule is the one each promotion applies now, replayed over the state DB's own alias history
(`alias_history`, committed champion moves, oldest first; MLflow is not asked, the state DB keeps the
history MLflow forgets): the champions in force after each move (`registry.champion_lineage`: a move back
to the version under the top is a rollback, a pop; anything else a push); at each promotion (a committed
move `promote:<decision>`, its pilot the decision's) that left its pilot's version on top, each pilot
promoted before it whose version is not among the champions under the top is replaced. Only pilots still
"promoted" change; the newest promotion's own pilot never does (a rollback of it not yet recorded is
`rollout.unfinished`'s to finish). No audit entry is written (the audit log's hash chain is the app's;
this docstring is the record). Downgrade changes nothing back: "replaced" is also what the app writes.

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def lineage(stack: list[str], from_version: str | None, to_version: str | None) -> list[str]:
    """The champions in force after one committed move (as `rollout.registry.champion_lineage`)."""
    if to_version is None:
        return stack
    if len(stack) >= 2 and stack[-2] == to_version and stack[-1] == from_version:
        return stack[:-1]
    if not stack or stack[-1] != to_version:
        return [*stack, to_version]
    return stack


def replaced(
    moves: list[tuple[str, str | None, str | None]], pilot_of: dict[str, tuple[int, str]]
) -> set[int]:
    """The pilots each promotion replaced (pure): `moves` are a use case's committed champion moves, oldest
    first, (idempotency key, from, to); `pilot_of` maps a promotion's key to its (pilot id, version)."""
    stack: list[str] = []
    promoted: list[tuple[int, str]] = []  # promoted before, in promotion order, not replaced
    out: set[int] = set()
    for key, from_version, to_version in moves:
        stack = lineage(stack, from_version, to_version)
        if key not in pilot_of or stack[-1:] != [pilot_of[key][1]]:
            continue
        pilot_id, _ = pilot_of[key]
        under = set(stack[:-1])
        gone = {p for p, v in promoted if v not in under and p != pilot_id}
        out |= gone
        promoted = [(p, v) for p, v in promoted if p not in gone and p != pilot_id] + [pilot_of[key]]
    return out


def upgrade() -> None:
    conn = op.get_bind()
    use_cases = (
        conn.execute(
            sa.text(
                "SELECT use_case_id FROM pilots WHERE status = 'promoted'"
                " GROUP BY use_case_id HAVING COUNT(*) > 1"
            )
        )
        .scalars()
        .all()
    )
    for uc in use_cases:
        moves = [
            tuple(r)
            for r in conn.execute(
                sa.text(
                    "SELECT idempotency_key, from_version, to_version FROM alias_history"
                    " WHERE use_case_id = :uc AND alias = 'champion' AND status = 'committed' ORDER BY id"
                ),
                {"uc": uc},
            )
        ]
        pilot_of = {
            f"promote:{d}": (p, v)
            for d, p, v in conn.execute(
                sa.text(
                    "SELECT gate_decisions.id, pilots.id, model_versions.mlflow_version FROM gate_decisions"
                    " JOIN pilots ON pilots.id = gate_decisions.pilot_id"
                    " JOIN model_versions ON model_versions.id = pilots.model_version_id"
                    " WHERE gate_decisions.use_case_id = :uc AND gate_decisions.kind = 'gate'"
                ),
                {"uc": uc},
            )
        }
        gone = replaced(moves, pilot_of)
        for pilot_id in sorted(gone):
            conn.execute(
                sa.text("UPDATE pilots SET status = 'replaced' WHERE id = :id AND status = 'promoted'"),
                {"id": pilot_id},
            )


def downgrade() -> None:
    pass
