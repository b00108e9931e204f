"""Review W4: `sparsepilot calibrate NAME` with no PREFECT_API_URL starts Prefect's temporary server; killed
with SIGKILL, the command left that server (uvicorn prefect.server.api.server) running as an orphan,
holding its port and the Prefect DB. The server now watches the process that started it and ends with it
(flows.temporary_server). A real CLI process, a real server, a real kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.fixtures.env import fresh_cli_env
from tests.fixtures.flows import tiny_spec

SERVER = "prefect.server.api.server:create_app"


def _children(pid: int) -> list[int]:
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        return [int(c) for t in tasks for c in (t / "children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def _alive(pid: int) -> bool:
    """Running (a zombie left for a parent that never reaps it is no server)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_a_killed_command_takes_its_temporary_prefect_server_with_it(
    sp_home,  # noqa: ANN001
    tiny_model_dir: Path,
    trust_accounts: str,
    tmp_path: Path,
) -> None:
    from rollout.usecases import add_usecase

    # the home made here, as `init` and `usecase add` make it (the session's migrated state DB, the use case
    # an operator added): two processes of their own cost ~10 s of the test and are not what it is about
    spec = tmp_path / "tiny-chat.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(tiny_model_dir, "tiny-chat")))
    add_usecase(spec, actor="olga")
    env = fresh_cli_env(sp_home.home, trust_accounts)

    cli = subprocess.Popen(
        [sys.executable, "-m", "sparsepilot", "calibrate", "tiny-chat", "--quick"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = None
    try:
        deadline = time.monotonic() + 120
        while server is None and time.monotonic() < deadline and cli.poll() is None:
            server = next((c for c in _children(cli.pid) if SERVER in _cmdline(c)), None)
            time.sleep(0.1)
        assert server is not None, f"no temporary server started under the command (rc {cli.poll()})"
        time.sleep(1.0)  # the server up and serving the command's flow run
        cli.send_signal(signal.SIGKILL)
        cli.wait(timeout=10)
        gone_by = time.monotonic() + 10
        while _alive(server) and time.monotonic() < gone_by:
            time.sleep(0.1)
        assert not _alive(server), f"the temporary server (pid {server}) outlived its killed command"
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
        if server is not None and _alive(server):
            os.kill(server, signal.SIGKILL)  # the orphan this test made: stopped by its pid


def test_a_prefect_without_the_replaced_names_keeps_its_own_server() -> None:
    """The hook replaces Prefect's private `SubprocessASGIServer._instances` / `_run_uvicorn_command`; the
    installed Prefect has both (else the test above is the one to fail), and a Prefect 3.x that renamed
    them is left to start its own server rather than a broken one."""
    from prefect.server.api.server import SubprocessASGIServer

    from flows.temporary_server import _hook_available

    assert _hook_available(SubprocessASGIServer)
    assert not _hook_available(type("Renamed", (), {"_instances": {}}))
    assert not _hook_available(type("Renamed", (), {"_run_uvicorn_command": lambda self: None}))
