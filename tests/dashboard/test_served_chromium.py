"""The dashboard as users get it: `streamlit run` on 127.0.0.1, opened in headless Chromium (Debian's
package, driven by Playwright), signed in, portfolio checked, screenshot saved."""

from __future__ import annotations

import csv
import io
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from rollout.settings import Settings
from sparsepilot.commands.dashboard import streamlit_command
from tests.fixtures.dashboard import PASSWORDS
from tests.fixtures.ports import free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.chromium,
    pytest.mark.skipif(
        not os.access(CHROMIUM, os.X_OK),
        reason=f"Chromium is not installed at {CHROMIUM} (Debian package 'chromium'; .ci/run installs it)",
    ),
]


@contextmanager
def streamlit_served(
    log_path: Path,
    *,
    port: int = 0,
    cwd: Path | None = None,
    before: Callable[[str, Path], object] | None = None,
) -> Iterator[str]:
    """`streamlit run` as `sparsepilot dashboard` runs it, on 127.0.0.1 (in ``cwd``: its .streamlit/
    secrets, which ``before(url, cwd)`` may write), until it answers its health check; yields its URL,
    stopped on exit."""
    port = port or free_port()
    if before is not None and cwd is not None:
        before(f"http://127.0.0.1:{port}", cwd)
    log = log_path.open("wb")
    proc = subprocess.Popen(
        streamlit_command(port, "127.0.0.1"),
        env=dict(os.environ),
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=cwd,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"streamlit did not come up: {log_path.read_text()}")
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def served(seeded: dict[str, Any], dash_env: Settings, tmp_path: Path) -> Iterator[str]:
    with streamlit_served(tmp_path / "streamlit.log") as url:
        yield url


def websocket_answer(url: str, host: str) -> str:
    """The status line the app's websocket endpoint answers a browser's handshake with, the page and
    the socket both on ``host`` (same-origin, as a page on a name rebound to this address would be)."""
    port = urllib.parse.urlparse(url).port
    request = (
        "GET /_stcore/stream HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\nOrigin: http://{host}:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(request.encode())
        return conn.recv(4096).decode("latin-1").split("\r\n")[0]


def test_sign_in_and_see_the_portfolio_in_chromium(served: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    shot = tmp_path / "portfolio.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.goto(f"{served}/login", wait_until="domcontentloaded")
            page.get_by_label("User name").fill("alice")
            page.get_by_label("Password", exact=True).fill(PASSWORDS["alice"])
            page.get_by_role("button", name="Sign in").click()
            sidebar = page.get_by_test_id("stSidebar")
            expect(sidebar.get_by_text("approver")).to_be_visible(timeout=30_000)
            # navigate inside the app (a reload would start a new, signed-out session)
            sidebar.get_by_role("link", name="Portfolio").click()
            expect(page.get_by_role("heading", name="Portfolio")).to_be_visible(timeout=30_000)
            grid = page.get_by_test_id("stDataFrame")
            expect(grid).to_be_visible(timeout=30_000)
            for name in ("contract-summarisation", "document-qa", "support-chat"):
                expect(grid.get_by_text(name, exact=True).first).to_be_attached(timeout=30_000)
            expect(page.get_by_test_id("stMetricValue").first).to_have_text("3")
            expect(page.locator(".vega-embed").first).to_be_visible(timeout=30_000)
            page.wait_for_timeout(500)  # let the chart finish drawing before the picture
            page.screenshot(path=str(shot), full_page=True)

            # selecting a row opens that use case in the same (signed-in) session
            box = grid.bounding_box()
            assert box is not None
            page.mouse.click(box["x"] + 12, box["y"] + 35 * 2.5)  # row marker of the 2nd row
            expect(page.get_by_role("heading", name="Use case")).to_be_visible(timeout=30_000)
            expect(page.get_by_text("owner search-team")).to_be_visible(timeout=30_000)
            expect(sidebar.get_by_text("approver")).to_be_visible()

            # the approver sees the approve button; the audit export downloads the log as CSV
            sidebar.get_by_role("link", name="Approvals").click()
            expect(page.get_by_role("button", name="Approve promotion")).to_be_visible(timeout=30_000)
            sidebar.get_by_role("link", name="Audit").click()
            download_button = page.get_by_role("button", name="Download CSV")
            expect(download_button).to_be_visible(timeout=30_000)
            with page.expect_download(timeout=30_000) as download:
                download_button.click()
            rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
        finally:
            browser.close()
    # a page on another name, e.g. one rebound to this address (DNS rebinding), gets no websocket: it
    # reads nothing of the app; the names it is served as do (`allowed_hosts`)
    assert websocket_answer(served, "evil.example").split(" ", 1)[1] == "403 Forbidden"
    assert websocket_answer(served, "localhost").split(" ", 2)[1] == "101"
    assert shot.stat().st_size > 10_000
    assert len(rows) == 5 and {r["action"] for r in rows} == {"usecase.add", "gate.decide"}
    keep = os.environ.get("SPARSEPILOT_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)


def test_sso_sign_in_ends_at_sign_out_for_every_copy_and_when_the_token_expires(
    sp_home: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Single sign-on through a local provider: the listed approver signs in. Streamlit keeps the sign-in
    as a 30-day cookie: a copy taken before Sign out no longer signs in after it, and a sign-in ends when
    its ID token expires."""
    pytest.importorskip("authlib", reason="single sign-on needs streamlit[auth]")
    from playwright.sync_api import expect, sync_playwright

    from tests.fixtures.oidc_idp import oidc_provider

    monkeypatch.setenv("SPARSEPILOT_OIDC_APPROVERS", "ann@example.com")
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    ann = {"sub": "ann-1", "email": "ann@example.com", "email_verified": True}
    with (
        oidc_provider(ann) as idp,
        streamlit_served(tmp_path / "streamlit.log", cwd=app_dir, before=idp.write_secrets) as url,
        sync_playwright() as p,
    ):
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            sidebar = page.get_by_test_id("stSidebar")

            def sign_in() -> None:
                page.goto(f"{url}/login", wait_until="domcontentloaded")
                page.get_by_role("button", name="Sign in with single sign-on").click()
                expect(sidebar.get_by_text("oidc:ann@example.com · approver")).to_be_visible(timeout=30_000)

            sign_in()
            copied = page.context.cookies()
            sidebar.get_by_role("button", name="Sign out").click()
            expect(page.get_by_text("Not signed in: read-only.")).to_be_visible(timeout=30_000)

            elsewhere = browser.new_context()  # whoever kept a copy of the cookie
            elsewhere.add_cookies(copied)
            other = elsewhere.new_page()
            other.goto(f"{url}/login", wait_until="domcontentloaded")
            expect(other.get_by_text("Not signed in: read-only.")).to_be_visible(timeout=30_000)
            expect(other.get_by_text("no longer counts: it was signed out")).to_be_visible()

            idp.lifetime_s = 2
            sign_in()
            time.sleep(max(0.0, idp.issued[-1]["exp"] - time.time()) + 0.2)
            sidebar.get_by_role("link", name="Sign out").click()  # the next click after the expiry
            expect(page.get_by_text("Not signed in: read-only.")).to_be_visible(timeout=30_000)
            expect(page.get_by_text("no longer counts: its ID token has expired")).to_be_visible()
        finally:
            browser.close()
