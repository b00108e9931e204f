"""Driving the dashboard with Streamlit's AppTest: open a page, sign in, find widgets by key."""

from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

from tests.fixtures.dashboard import PASSWORDS

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"
PAGES = {
    "portfolio": "views/portfolio.py",
    "use_case": "views/use_case.py",
    "approvals": "views/approvals.py",
    "audit": "views/audit.py",
    "login": "views/login.py",
}


def new_app() -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=90)
    return at.run()


def open_page(at: AppTest, page: str) -> AppTest:
    at.switch_page(PAGES[page]).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def sign_in(at: AppTest, name: str, password: str | None = None) -> AppTest:
    open_page(at, "login")
    at.text_input(key="login_name").input(name)
    at.text_input(key="login_password").input(PASSWORDS.get(name, "") if password is None else password)
    next(b for b in at.button if b.label == "Sign in").click().run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def button_labels(at: AppTest) -> list[str]:
    return [b.label for b in at.button]


def texts(at: AppTest) -> str:
    """Everything the page wrote as markdown/info/success/warning/error/caption/code, joined."""
    parts: list[str] = []
    for kind in ("markdown", "info", "success", "warning", "error", "caption", "code", "title", "subheader"):
        parts += [str(e.value) for e in getattr(at, kind)]
    return "\n".join(parts)
