"""Review s46 A12, what remained: the pieces that keep a secret out of Prefect's logs and run states, on
their own (tests/flows/test_mlflow_down_keeps_its_password.py runs them end to end). A log record's
message and traceback pass a `RedactingFilter`; an error's text is made again redacted, same type, before
Prefect stores it."""

from __future__ import annotations

import io
import logging
import pickle

import pytest

from rollout.redact import RedactingFilter, redact_log_records, redacted_exception

URL = "http://ops:S3cretMlflowPw@mlflow:5000/api/2.0/mlflow/runs/get"


def _raised_with_cause() -> BaseException:
    try:
        try:
            raise ConnectionError(f"GET {URL}: connection refused")
        except ConnectionError as cause:
            raise RuntimeError("logging the run failed") from cause
    except RuntimeError as exc:
        return exc


def test_a_filtered_handler_writes_no_secret_in_message_arguments_or_traceback() -> None:
    first, later = io.StringIO(), io.StringIO()
    logger = logging.getLogger("tests.redacted.logs")
    logger.propagate = False
    filtered, plain = logging.StreamHandler(first), logging.StreamHandler(later)
    redact_log_records([filtered, filtered])  # once, however often it is asked
    assert sum(isinstance(f, RedactingFilter) for f in filtered.filters) == 1
    for h in (filtered, plain):
        logger.addHandler(h)
    try:
        exc = _raised_with_cause()
        logger.error("run failed: %s (token=%s)", URL, "abc123", exc_info=exc)
        logger.warning("a bad format %d", "not a number")  # still reaches the handler's own error path
    finally:
        for h in (filtered, plain):
            logger.removeHandler(h)
    for out in (first.getvalue(), later.getvalue()):  # the record is redacted in place: later handlers too
        assert "S3cretMlflowPw" not in out and "abc123" not in out
        assert "run failed: http://ops:***@mlflow:5000" in out and "token=***" in out
        assert "ConnectionError: GET http://ops:***@mlflow:5000" in out  # the cause's traceback, redacted
        assert "The above exception was the direct cause" in out


def test_an_mlflow_error_is_made_again_of_its_type_with_its_text_redacted() -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    exc = MlflowException(f"API request to {URL} failed", error_code=RESOURCE_DOES_NOT_EXIST)
    clean = redacted_exception(exc)
    assert type(clean) is MlflowException
    assert str(clean) == "API request to http://ops:***@mlflow:5000/api/2.0/mlflow/runs/get failed"
    assert clean.message == str(clean) and clean.get_http_status_code() == 404
    # what Prefect does with it: `Type: text` as the state message, the pickled error as the result
    try:
        raise clean from exc
    except MlflowException as raised:
        stored = pickle.loads(pickle.dumps(raised))
    assert stored.__cause__ is None and "S3cretMlflowPw" not in repr(vars(stored)) + str(stored)


def test_an_error_without_a_secret_is_left_alone_and_one_that_cannot_be_remade_is_told() -> None:
    assert redacted_exception(ValueError("no such use case 'x'")) is None

    class NeedsTwo(Exception):
        def __init__(self, what: str, where: str) -> None:
            super().__init__(what, where)
            self.where = where

        def __str__(self) -> str:
            return f"{self.args[0]} at {self.where}"

    made = redacted_exception(NeedsTwo("refused", URL))
    assert type(made) is RuntimeError
    assert str(made) == "NeedsTwo: refused at http://ops:***@mlflow:5000/api/2.0/mlflow/runs/get"


@pytest.mark.parametrize("kind", ["SettingsError", "LeaseLost"])
def test_sparsepilots_own_errors_keep_their_type(kind: str) -> None:
    """The CLI's one handler (`error: ...`, exit 2) and the tasks' retry rule go by the type."""
    from rollout.leases import LeaseLost
    from rollout.settings import SettingsError

    cls = {"SettingsError": SettingsError, "LeaseLost": LeaseLost}[kind]
    made = redacted_exception(cls(f"PREFECT_API_URL={URL}: the Prefect server does not answer"))
    assert type(made) is cls and "S3cretMlflowPw" not in str(made) and "http://ops:***@" in str(made)


class _CountedWalks(dict):
    """The logging manager's logger dict, counting the walks over it: iteration, `keys()` (what `dict(...)`
    of it calls), `items()`."""

    walks = 0

    def __iter__(self):  # noqa: ANN204
        self.walks += 1
        return super().__iter__()

    def keys(self):  # noqa: ANN201
        self.walks += 1
        return super().keys()

    def items(self):  # noqa: ANN201
        self.walks += 1
        return super().items()


def test_prefect_logs_are_walked_once_and_again_only_when_the_set_up_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`redact_prefect_logs`, run at every flow and task start, walked the whole logger tree each time
    (fix-k): now once, and again only when a logger was made or a handler added or replaced since."""
    from prefect.logging.handlers import APILogHandler, PrefectConsoleHandler

    from flows.common import redact_prefect_logs

    manager = logging.Logger.manager
    counted = _CountedWalks(manager.loggerDict)
    monkeypatch.setattr(manager, "loggerDict", counted)  # loggers made here are gone afterwards
    redact_prefect_logs()  # the set-up may have changed since the last run in this process: walked now
    counted.walks = 0
    for _ in range(50):
        redact_prefect_logs()
    assert counted.walks == 0

    def filtered(h: logging.Handler) -> bool:
        return any(isinstance(f, RedactingFilter) for f in h.filters)

    runs, added = logging.getLogger("prefect.flow_runs"), APILogHandler()
    runs.addHandler(added)  # a handler added to a logger it walked, as a Prefect set-up run again does
    try:
        redact_prefect_logs()
        assert counted.walks == 1 and filtered(added)
    finally:
        runs.removeHandler(added)
    child = logging.getLogger("prefect.sparsepilot-test.child")  # a logger made since, with its handler
    child.addHandler(PrefectConsoleHandler())
    redact_prefect_logs()
    assert counted.walks == 2 and filtered(child.handlers[0])
    parent = logging.getLogger("prefect.sparsepilot-test")  # was a placeholder: the dict did not grow
    parent.addHandler(PrefectConsoleHandler())
    redact_prefect_logs()
    assert counted.walks == 3 and filtered(parent.handlers[0])
