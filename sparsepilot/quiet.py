"""Third-party chatter goes to a log file, not the console.

Long commands (the main job) would otherwise print MLflow's type-hint and CloudPickle warnings,
transformers' deprecation warnings and weight-loading bars, and Prefect's per-task INFO lines between the
user's progress lines. `to_log_file` sends Python warnings and the third-party loggers to
`SPARSEPILOT_HOME/logs/<command>-<time>.log` (everything at INFO and above, with our own progress lines
too), turns off third-party progress bars, and leaves the console to SparsePilot's own output.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from pathlib import Path

THIRD_PARTY = (
    "alembic",
    "great_expectations",
    "httpx",
    "huggingface_hub",
    "mlflow",
    "prefect",
    "py.warnings",
    "sqlalchemy",
    "torch",
    "transformers",
    "urllib3",
)
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


_installed: list[logging.Handler] = []  # the handler of this process's current log file


def to_log_file(home: Path, command: str, *, flows: bool = True) -> Path:
    """Route warnings and third-party logs to a new log file under `home/logs`; returns its path. A
    second call in the same process (commands run in-process, e.g. by tests) replaces the first file.
    `flows`: the command may run Prefect flows (not the model benchmarks, which skip Prefect's set-up)."""
    # tqdm reads TQDM_* when it is first imported (MLflow imports it, below): set before anything does,
    # or a library's own bar (transformers' "Converting and de-quantizing GGUF tensors" on a fresh
    # model cache) reaches the console
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    # Prefect's logging set-up (a dictConfig, when its main module is first imported) replaces the
    # handlers of the `prefect` logger: done first, so the file's handler below stays on it and the
    # flow- and task-run records (a failed run's traceback with them) reach the file
    if flows:
        _quiet_prefect_console()
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # the process id keeps two commands started in the same second (two benches side by side) apart
    path = logs / f"{command}-{dt.datetime.now(dt.UTC).strftime('%Y%m%dT%H%M%SZ')}-{os.getpid()}.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.setLevel(logging.INFO)
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger
    for name in (*THIRD_PARTY, *(_prefect_services() if flows else ()), "sparsepilot"):
        lg = logging.getLogger(name)
        for old in _installed:
            lg.removeHandler(old)
        lg.addHandler(handler)
        # torch keeps its own stderr handler: at INFO its compile/exit statistics would reach the
        # console (or a closed stream at exit), so torch stays at its WARNING
        if name != "torch" and (lg.level == logging.NOTSET or lg.level > logging.INFO):
            lg.setLevel(logging.INFO)
        # A library's records go to the file only: raised to INFO above, they would otherwise reach the
        # root logger's console handler, which a flow command's Prefect logging installs at level 0 (a
        # use-case `evaluate` printed ~880 lines of SQLAlchemy mapper and httpx request INFO). Prefect's
        # own records keep propagating: its flow- and task-run lines are the flow's progress. (Python's
        # warnings, "py.warnings", so never reach the last-resort stderr handler either.)
        lg.propagate = name in ("prefect", "sparsepilot")
    _mlflow_to(handler)
    for old in _installed:
        old.close()
    _installed[:] = [handler]
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.disable_default_handler()  # transformers' own stderr handler; ours writes the file
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    return path


class _KnownErrorTraceback(logging.Filter):
    """Drops, from the console only, Prefect's record of a flow or task that raised one of SparsePilot's
    own errors ("Encountered exception during execution", with its traceback): a refusal, bad input or a
    lost lease, which the command itself reports in one line ("error: ...", exit 2) and Prefect's
    "Finished in state Failed(...)" line names too. The record, traceback included, still reaches the log
    file, whose handler sits on the `prefect` logger that the record passes before the root's console."""

    def filter(self, record: logging.LogRecord) -> bool:
        from sparse_core.errors import SparsePilotError

        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, SparsePilotError)


class _PrefectChatter(logging.Filter):
    """Drops, from the console only, the INFO records of the `prefect` logger itself (not its flow- and
    task-run children, which are the flow's progress): "Starting temporary server on http://127.0.0.1:8444 /
    See https://www.prefect.io/docs/v3/concepts/server#how-to-guides for more information on running a
    dedicated Prefect server." and "Stopping temporary server" around every flow command. They still
    reach the log file; Prefect's warnings still reach the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "prefect" and record.levelno < logging.WARNING)


def _prefect_services() -> list[str]:
    """The loggers of Prefect's background services (events, API logs), which are named after their
    class, outside the `prefect` tree: at exit a flow command waits for them to drain and they warn
    "Still processing items: N items remaining..." at the console. Their records go to the log file."""
    try:
        from prefect._internal.concurrency.services import _QueueServiceBase
    except ImportError:  # a machine with only the model stack, or a Prefect that moved them
        return []

    def below(cls: type) -> list[type]:
        return [c for sub in cls.__subclasses__() for c in (sub, *below(sub))]

    return sorted({c.__name__ for c in below(_QueueServiceBase)})


def _quiet_prefect_console() -> None:
    """Give Prefect's console handler (on the root logger, set up when Prefect's main module is first
    imported) the `_KnownErrorTraceback` and `_PrefectChatter` filters, once."""
    try:
        import prefect.main  # noqa: F401 - sets up Prefect's logging, its console handler with it
        from prefect.logging.handlers import PrefectConsoleHandler
    except ImportError:  # a machine with only the model stack (a GPU box for `bench`): no flows
        return
    for h in logging.getLogger().handlers:
        if isinstance(h, PrefectConsoleHandler):
            for kind in (_KnownErrorTraceback, _PrefectChatter):
                if not any(isinstance(f, kind) for f in h.filters):
                    h.addFilter(kind())


def _mlflow_to(handler: logging.Handler) -> None:
    """MLflow sets its own stderr handler when imported and prints registry events ("Successfully
    registered model ...") through its `MLFLOW_LOGGING_STREAM`: both go to the log file instead, through
    the logging system (a handler that Prefect's logging setup closes reopens its file; a raw stream
    would not), and never at the cost of an exception inside MLflow."""
    try:
        import mlflow  # noqa: F401 - imported now so that its logger setup happens before ours
    except ImportError:  # a machine with only the model stack (a GPU box for `bench`): nothing to quiet
        return
    from mlflow.utils import logging_utils

    logging.getLogger("mlflow").handlers = [handler]
    events = logging.getLogger("mlflow.events")

    def write(text: str) -> None:
        if text.strip():
            try:
                events.info(text.rstrip())
            except Exception:  # noqa: BLE001, S110 - a log line must never break a registration
                pass

    logging_utils.MLFLOW_LOGGING_STREAM.write = write  # type: ignore[method-assign]
    logging_utils.MLFLOW_LOGGING_STREAM.flush = lambda: None  # type: ignore[method-assign]


def for_command(command: str, *, say_where: bool = True, flows: bool = True) -> Path:
    """`to_log_file` for a command that loads models or runs flows (calibrate, evaluate, pilot, bench):
    the console keeps the command's own output; the log file's path is said on stderr (not with
    --json, whose stdout is the JSON)."""
    from rollout.settings import get_settings
    from sparsepilot.console import err_console

    path = to_log_file(get_settings().home, command, flows=flows)
    if say_where:
        err_console.print(f"log file (warnings and library output): {path}", highlight=False, soft_wrap=True)
    return path


def progress_logger() -> logging.Logger:
    """Where SparsePilot's own progress lines go besides the console (the same log file)."""
    return logging.getLogger("sparsepilot.progress")
