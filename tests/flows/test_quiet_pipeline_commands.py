"""gate, approve, promote, rollback, monitor and serve keep third-party chatter off the console as
calibrate, evaluate and pilot do: the log file's path said first, Prefect's temporary-server lines and
its traceback of an error the command reports as `error: ...` in that file only (review O5). Real
processes on embedded defaults (no Prefect API configured), as a user runs them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.fixtures.env import fresh_cli_env
from tests.fixtures.flows import tiny_spec
from tests.fixtures.trust import sparsepilot_as

LOG_LINE = re.compile(r"log file \(warnings and library output\): (\S+)")


@pytest.mark.slow  # eight real commands; the flow commands each start a temporary Prefect server
def test_the_pipeline_commands_keep_prefects_chatter_and_tracebacks_in_their_log_file(
    tiny_model_dir: Path, trust_accounts: str, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    env = fresh_cli_env(home, trust_accounts, COLUMNS="160")
    subprocess.run([sys.executable, "-m", "sparsepilot", "init"], env=env, check=True, capture_output=True)
    spec = tmp_path / "tiny-chat.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(tiny_model_dir, "tiny-chat")))
    rc, out = sparsepilot_as(["usecase", "add", str(spec)], env, "olga")
    assert rc == 0, out

    # a flow that stops on a SparsePilot error: the console has the flow's state line and `error:`
    rc, out = sparsepilot_as(["gate", "tiny-chat"], env, "olga")
    assert rc == 2 and "error: tiny-chat: no active pilot" in out, out
    assert "Flow run" in out and "Finished in state Failed" in out, out  # the flow's own lines stay
    # the command's own temporary Prefect server is told in the log, not on the console
    assert "temporary server" not in out and "prefect.io/docs" not in out, out
    assert "Traceback" not in out and "Encountered exception" not in out, out
    log = Path(LOG_LINE.search(out).group(1))
    assert log.parent == home / "logs" and log.name.startswith("gate-"), log
    text = log.read_text()
    assert "INFO prefect: Starting temporary server on http://127.0.0.1:" in text, text
    assert "Traceback" in text and "GateError" in text, text

    # the others announce their log file the same way (refused here before or inside their flow; monitor
    # runs its flow and says there is nothing to monitor)
    for args, who, code in (
        (["approve", "tiny-chat", "--decision", "1", "--reason", "ok"], "alice", 2),
        (["promote", "tiny-chat", "--decision", "1", "--reason", "ok"], "alice", 2),
        (["rollback", "tiny-chat", "--reason", "back"], "alice", 2),
        (["monitor", "tiny-chat"], "olga", 0),
        (["serve", "--use-case", "no-such-case"], None, 2),
    ):
        rc, out = sparsepilot_as(args, env, who)
        assert rc == code and ("error: " in out) == (code == 2), (args, out)
        found = LOG_LINE.search(out)
        assert found and Path(found.group(1)).name.startswith(f"{args[0]}-"), (args, out)
        assert "temporary server" not in out and "Traceback" not in out, (args, out)
