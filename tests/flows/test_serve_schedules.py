"""`sparsepilot serve` registers one cron schedule per use case (from its spec) and serves them; the
schedules are read back through the Prefect client while the command runs (a real subprocess against
the session's Prefect test server)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _read_deployments() -> dict[str, object]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {d.name: d for d in client.read_deployments()}


def test_serve_registers_one_schedule_per_use_case(
    flow_use_case, prefect_harness: str, tmp_path: Path
) -> None:
    flow_use_case("chat-a")
    flow_use_case("qa-b", schedule={"cron": "30 3 * * 1-5", "timezone": "Europe/Berlin"})
    flow_use_case("unscheduled-c", schedule=None)

    env = dict(os.environ, PREFECT_API_URL=prefect_harness, PREFECT_LOGGING_LEVEL="WARNING")
    log = (tmp_path / "serve.log").open("w")
    cmd = [sys.executable, "-m", "sparsepilot", "serve"]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        wanted = {"sparsepilot-chat-a", "sparsepilot-qa-b", "sparsepilot-approval"}
        deadline = time.monotonic() + 150
        found: dict[str, object] = {}
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            found = _read_deployments()
            if wanted <= set(found):
                break
            time.sleep(1)
        assert wanted <= set(found), (sorted(found), (tmp_path / "serve.log").read_text()[-3000:])
        assert "sparsepilot-unscheduled-c" not in found

        def schedule(name: str) -> tuple[str, str, bool]:
            (s,) = found[name].schedules
            return s.schedule.cron, s.schedule.timezone, s.active

        assert schedule("sparsepilot-chat-a") == ("15 4 * * *", "UTC", True)
        assert schedule("sparsepilot-qa-b") == ("30 3 * * 1-5", "Europe/Berlin", True)
        assert found["sparsepilot-chat-a"].parameters == {"use_case": "chat-a"}
        assert found["sparsepilot-qa-b"].parameters == {"use_case": "qa-b"}
        assert found["sparsepilot-approval"].schedules == []
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()
