"""`sparsepilot audit verify`: recompute the audit log's hash chain (rollout.audit.verify_chain)."""

from __future__ import annotations

import typer

from sparsepilot.console import emit_json, fail, say
from sparsepilot.options import JsonOpt

app = typer.Typer(no_args_is_help=True, help="The append-only audit log.")


@app.command("verify")
def verify(json_out: JsonOpt = False) -> None:
    """Check every audit row's hash link; exit 1 naming the first row that was changed, deleted or
    inserted out of order."""
    from rollout.audit import verify_chain
    from rollout.db.session import session_scope
    from rollout.settings import configure_environment
    from sparsepilot.commands.init import require_schema

    configure_environment()
    require_schema()
    with session_scope() as session:
        report = verify_chain(session)
    if json_out:
        emit_json(report.to_dict())
    if not report.ok:
        fail(f"audit chain broken after {report.rows - 1} good row(s): {report.problem}", code=1)
    if not json_out:
        say(f"audit chain intact: {report.rows} row(s), last hash {report.last_hash[:16]}")
