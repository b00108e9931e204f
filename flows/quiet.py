"""Third-party chatter goes to a log file, not the console.

Long commands (the main job) would otherwise print MLflow's type-hint and CloudPickle warnings,
transformers' deprecation warnings and weight-loading bars, and Prefect's per-task INFO lines between the
user's progress lines. `to_log_file` sends Python warnings and the third-party loggers to
`SPARSEPILOT_HOME/logs/<command>-<time>.log` (everything at INFO and above, with our own progress lines
too; SQLAlchemy and GX at WARNING, `AT_WARNING`), turns off third-party progress bars, and leaves the
console to SparsePilot's own output.

It lives in `flows` because a flow run needs it too: `sparsepilot serve` runs each scheduled flow run in a
process of its own (Prefect's runner), which has none of the serve's logging set-up; serve names its log
file in `SERVED_LOG_FILE`, which that process inherits, and each flow run there joins it
(`join_served_log_file`, from `flows.common.sparsepilot_flow`). The CLI's own helpers are in
`sparsepilot/quiet.py`.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from pathlib import Path

from rollout.redact import redact_log_records

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
# Kept at WARNING in the file too: at INFO, SQLAlchemy's ORM logs every mapper's configuration
# ("_configure_property(...)", "Identified primary key columns") and GX its docs decorators, ~95% of a
# flow command's log (3,914 of 4,171 lines of a `calibrate NAME`), burying the progress lines
AT_WARNING = ("great_expectations", "sqlalchemy")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
PROGRESS = "sparsepilot.progress"  # our progress lines: to the file, never propagated to a console
# set by `sparsepilot serve` to its log file's path: the flow runs its runner starts write there too
SERVED_LOG_FILE = "SPARSEPILOT_SERVED_LOG_FILE"


_installed: list[logging.Handler] = []  # the handler of this process's current log file


def to_log_file(
    home: Path,
    command: str,
    *,
    flows: bool = True,
    streamlit: bool = False,
    models: bool = True,
    path: Path | None = None,
) -> Path:
    """Route warnings and third-party logs to a new log file under `home/logs`; returns its path. A
    second call in the same process (commands run in-process, e.g. by tests) replaces the first file.
    `flows`: the command may run Prefect flows (not the model benchmarks, which skip Prefect's set-up).
    `streamlit`: the command renders dashboard pages in-process (`bench dashboard`): Streamlit's loggers
    write to the file too. `models`: the command may load models, so transformers' own stderr handler and
    progress bars are turned off (not for `init`, which loads none: importing transformers costs ~2 s).
    `path`: append to this file (another process's, `join_served_log_file`) instead of a new one."""
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
    if path is None:
        logs = home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        # the process id keeps two commands started in the same second (two benches side by side) apart
        path = logs / f"{command}-{dt.datetime.now(dt.UTC).strftime('%Y%m%dT%H%M%SZ')}-{os.getpid()}.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.setLevel(logging.INFO)
    # no secret in the file: a record's message and traceback redacted (an MLflow URL's password)
    redact_log_records([handler])
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger
    # sparsepilot.progress: the lines a command also prints itself; the file only (through the root
    # logger, Prefect's console handler printed each one a second time)
    for name in (*THIRD_PARTY, *(_prefect_services() if flows else ()), "sparsepilot", PROGRESS):
        lg = logging.getLogger(name)
        for old in _installed:
            lg.removeHandler(old)
        lg.addHandler(handler)
        # torch keeps its own stderr handler: at INFO its compile/exit statistics would reach the
        # console (or a closed stream at exit), so torch stays at its WARNING
        if name in AT_WARNING:
            lg.setLevel(logging.WARNING)
        elif name != "torch" and (lg.level == logging.NOTSET or lg.level > logging.INFO):
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
    if streamlit:
        _streamlit_to_file()
    if not models:
        return path
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.disable_default_handler()  # transformers' own stderr handler; ours writes the file
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    return path


def join_served_log_file() -> Path | None:
    """In a flow-run process that `sparsepilot serve`'s runner started (`SERVED_LOG_FILE` set, inherited
    from the serve): this process's warnings, third-party logs and flow-run records go to the serve's log
    file as well, and the libraries' output off the console (the serve's terminal), as in the serve's own
    process. Once per process (a subflow, or a second flow run in the same process, finds it done);
    returns the file, or None where no serve named one."""
    served = os.environ.get(SERVED_LOG_FILE)
    if not served:
        return None
    path = Path(served)
    if not any(getattr(h, "baseFilename", None) == os.path.abspath(path) for h in _installed):
        to_log_file(path.parent.parent, "serve", path=path)
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
    imported) the `_KnownErrorTraceback` and `_PrefectChatter` filters, once; and every Prefect handler
    (console, API logs) the redacting filter (`flows.common.redact_prefect_logs`, which each flow and
    task run applies again)."""
    try:
        import prefect.main  # noqa: F401 - sets up Prefect's logging, its console handler with it
        from prefect.logging.handlers import PrefectConsoleHandler

        from flows.common import redact_prefect_logs
    except ImportError:  # a machine with only the model stack (a GPU box for `bench`): no flows
        return
    redact_prefect_logs()
    for h in logging.getLogger().handlers:
        if isinstance(h, PrefectConsoleHandler):
            for kind in (_KnownErrorTraceback, _PrefectChatter):
                if not any(isinstance(f, kind) for f in h.filters):
                    h.addFilter(kind())


def _streamlit_to_file() -> None:
    """Streamlit gives each of its loggers its own stderr handler and stops their propagation
    (`streamlit.logger.get_logger`), and gives them new ones when its config is read
    (`update_formatter`): a page rendered outside `streamlit run` (AppTest, `bench dashboard`) printed
    "missing ScriptRunContext! This warning can be ignored when running in bare mode." on the console
    for every page. Each of its loggers, those made later too, writes to the log file instead."""
    try:
        from streamlit import logger as st_logger
    except ImportError:  # pragma: no cover - streamlit is a dependency
        return

    def to_file(lg: logging.Logger) -> None:
        console = getattr(lg, "streamlit_console_handler", None)
        if console is not None:
            lg.removeHandler(console)
            del lg.streamlit_console_handler
        for h in list(lg.handlers):
            if isinstance(h, logging.FileHandler) and h not in _installed:  # an earlier command's file
                lg.removeHandler(h)
        for h in _installed:
            if h not in lg.handlers:
                lg.addHandler(h)

    original = getattr(st_logger.setup_formatter, "__wrapped__", st_logger.setup_formatter)

    def setup_formatter(lg: logging.Logger) -> None:
        original(lg)
        to_file(lg)

    setup_formatter.__wrapped__ = original  # type: ignore[attr-defined]
    st_logger.setup_formatter = setup_formatter  # type: ignore[assignment]
    for lg in list(st_logger._loggers.values()):
        to_file(lg)


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
