"""The CLI's side of the log file (`flows.quiet`, re-exported here): `for_command`, which routes a
command's third-party chatter to its own file and says where, and `progress_logger`, where SparsePilot's
progress lines go besides the console."""

from __future__ import annotations

import logging
from pathlib import Path

from flows.quiet import AT_WARNING, PROGRESS, SERVED_LOG_FILE, THIRD_PARTY, to_log_file

__all__ = ["AT_WARNING", "PROGRESS", "SERVED_LOG_FILE", "THIRD_PARTY", "for_command", "progress_logger"]
__all__ += ["to_log_file"]


def for_command(command: str, *, say_where: bool = True, flows: bool = True, streamlit: bool = False) -> Path:
    """`to_log_file` for a command that loads models or runs flows (calibrate, evaluate, pilot, bench):
    the console keeps the command's own output; the log file's path is said on stderr (not with
    --json, whose stdout is the JSON)."""
    from rollout.settings import get_settings
    from sparsepilot.console import err_console

    path = to_log_file(get_settings().home, command, flows=flows, streamlit=streamlit)
    if say_where:
        err_console.print(f"log file (warnings and library output): {path}", highlight=False, soft_wrap=True)
    return path


def progress_logger() -> logging.Logger:
    """Where SparsePilot's own progress lines go besides the console (the same log file)."""
    return logging.getLogger(PROGRESS)
