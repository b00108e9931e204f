"""`sparsepilot serve-model NAME [--alias challenger | --version N] [--port 5001] [--host 127.0.0.1]`: a
registered version behind MLflow's pyfunc scoring server (POST /invocations), for a `kind: mlflow` pilot arm
(docs/serving.md)."""

from __future__ import annotations

import subprocess
from typing import Annotated

import typer

from sparsepilot.console import console, fail
from sparsepilot.options import UseCaseArg

app = typer.Typer()


@app.command("serve-model")
def serve_model(
    name: UseCaseArg,
    alias: Annotated[
        str | None, typer.Option("--alias", help="champion or challenger (default: challenger)")
    ] = None,
    version: Annotated[
        str | None, typer.Option("--version", help="an MLflow version instead of an alias")
    ] = None,
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 5001,
    host: Annotated[
        str, typer.Option("--host", help="interface to bind; loopback unless you put auth in front")
    ] = "127.0.0.1",
    workers: Annotated[int, typer.Option("--workers", min=1, help="uvicorn worker processes")] = 1,
    timeout_s: Annotated[int, typer.Option("--timeout", min=1, help="seconds per request")] = 60,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the command, do not start it")] = False,
) -> None:
    """Serve a registered version of a use case with `mlflow models serve` (env manager: local)."""
    from rollout.arms.serve import resolve, serve_command, serve_environment, serve_variables, shell_line
    from rollout.settings import configure_environment
    from sparsepilot.commands.init import require_schema

    if alias is not None and version is not None:
        fail("give --alias or --version, not both")
    configure_environment()
    require_schema()  # the use case is looked up in the state DB
    target = resolve(name, alias=None if version else (alias or "challenger"), version=version)
    cmd = serve_command(target, host=host, port=port, workers=workers, timeout_s=timeout_s)
    what = f"alias {target.alias} = version {target.version}" if target.alias else f"version {target.version}"
    console.print(f"serving {target.model_uri} ({what}) at http://{host}:{port}/invocations", highlight=False)
    if dry_run:  # a line that works pasted into a shell (or a unit file's ExecStart through sh -c)
        console.print(shell_line(cmd, serve_variables()), highlight=False, soft_wrap=True, markup=False)
        return
    try:
        raise typer.Exit(subprocess.call(cmd, env=serve_environment()))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
