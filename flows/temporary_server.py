"""The temporary Prefect server a flow starts when no PREFECT_API_URL is set, bound to the process that
started it: it stops once that process is gone, a SIGKILL included (review W4: a `sparsepilot calibrate`
killed with -9 left `uvicorn prefect.server.api.server` running as an orphan, holding its port and the
Prefect DB).

Prefect starts that server itself (`SubprocessASGIServer`, one per process, on first use of its API) and
stops it at exit, which a killed process never reaches; it offers no hook on the child. So
`bind_to_this_process` puts in Prefect's place a server whose process is this module: it runs the same
uvicorn command, with a watchdog thread that ends it (SIGTERM, then exit) as soon as its parent changes.
A watchdog, not a parent-death signal (prctl(PR_SET_PDEATHSIG)): that signal follows the thread that
started the child, and Prefect may start it from a short-lived one."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

POLL_S = 0.25  # how often the server looks for its parent
GRACE_S = 5.0  # how long uvicorn is given to shut down after SIGTERM, before the process exits anyway


def bind_to_this_process() -> None:
    """Make the temporary server this process may start one that ends with this process (idempotent;
    a server already started is left as it is)."""
    from prefect.server.api.server import SubprocessASGIServer

    if not _hook_available(SubprocessASGIServer):
        return  # another Prefect 3.x: its own server, which a SIGKILL may orphan, rather than a broken one
    bound = _bound_server_class()
    current = SubprocessASGIServer._instances.get(None)
    if isinstance(current, bound) or (current is not None and current.running):
        return
    SubprocessASGIServer._instances.pop(None, None)
    bound()  # registered as the one Prefect's `SubprocessASGIServer()` returns


def _hook_available(server_class: Any) -> bool:
    """Does this Prefect start its temporary server the way this module replaces (checked with Prefect
    3.9.1: `SubprocessASGIServer._instances`, one per port, and `_run_uvicorn_command`)? These are
    Prefect's private names; pyproject allows any 3.x, so a Prefect that changed them keeps its own."""
    return isinstance(getattr(server_class, "_instances", None), dict) and callable(
        getattr(server_class, "_run_uvicorn_command", None)
    )


@functools.cache
def _bound_server_class() -> Any:
    """Prefect's server class with its child run under this module (made on first use: importing
    Prefect's server is slow)."""
    import prefect
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    class BoundServer(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            # Prefect's own command and environment (prefect.server.api.server), run under this module
            env = {
                **os.environ,
                "PREFECT_UI_ENABLED": "0",
                "PREFECT__SERVER_EPHEMERAL": "1",
                "PREFECT__SERVER_FINAL": "1",
                **get_current_settings().to_environment_variables(exclude_unset=True),
            }
            uvicorn_args = [
                "--app-dir",
                str(prefect.__module_path__.parent),
                "--factory",
                "prefect.server.api.server:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "error",
                "--lifespan",
                "on",
            ]
            cmd = [sys.executable, "-m", __name__, str(os.getpid()), *uvicorn_args]
            return subprocess.Popen(cmd, env=env)

    return BoundServer


def _end_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's own shutdown: the lifespan ends, the DB is closed
    time.sleep(GRACE_S)
    os._exit(1)


def main(argv: list[str]) -> None:
    """`python -m flows.temporary_server PARENT_PID UVICORN_ARGS...`: uvicorn, for as long as PARENT_PID
    is this process's parent."""
    import runpy

    parent = int(argv[0])
    threading.Thread(target=_end_when_orphaned, args=(parent,), daemon=True, name="parent-watch").start()
    sys.argv = ["uvicorn", *argv[1:]]
    runpy.run_module("uvicorn", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
