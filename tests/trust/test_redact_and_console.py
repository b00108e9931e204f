"""Secrets never reach a message, and messages are never read as markup (issue 15, items 7 and 8)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from rollout.redact import redact


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("cannot reach postgresql+psycopg://app:s3cr3t@db:5432/sp", "s3cr3t"),
        ("redis://:hunter2@cache:6379/0 refused", "hunter2"),
        ("PREFECT_API_AUTH_STRING=user:pa55 rejected", "pa55"),
        ("password=topsecret)", "topsecret"),
        ("Authorization: Bearer eyJhbGciOi.abc.def", "eyJhbGciOi.abc.def"),
        ("token sp1.eyJ1IjoiYWxpY2UifQ.mac-value in file", "eyJ1IjoiYWxpY2UifQ"),
        ("hash scrypt$131072$8$1$c2FsdHNhbHQ$ZGlnZXN0ZGlnZXN0 leaked", "ZGlnZXN0ZGlnZXN0"),
    ],
)
def test_secrets_are_redacted(text: str, secret: str) -> None:
    out = redact(text)
    assert secret not in out and "***" in out


def test_ordinary_text_is_left_alone() -> None:
    for text in (
        "traffic.prompt_tokens: the longest prompt (480) plus output (96) tokens exceed the context",
        "sqlite:////tmp/x/state.db",
        "https://mlflow.example.com:5000/#/models",
    ):
        assert redact(text) == text


def test_fail_prints_markup_literally_and_redacts(sp_home) -> None:  # noqa: ANN001
    from sparsepilot.cli import app

    res = CliRunner().invoke(app, ["usecase", "show", "[bold red]x[/] postgresql://u:pw123@h/db"])
    assert res.exit_code == 2
    assert "[bold red]x[/]" in res.output and "pw123" not in res.output and "Traceback" not in res.output


def test_dashboard_hides_the_database_password(monkeypatch: pytest.MonkeyPatch) -> None:
    from dashboard.data import schema_ready

    monkeypatch.setenv("SPARSEPILOT_DATABASE_URL", "postgresql+psycopg://app:db-pass-42@127.0.0.1:1/nope")
    ready, shown, _ = schema_ready()
    assert not ready and "db-pass-42" not in shown and "app:***@127.0.0.1" in shown
