"""Helpers for the web app tests: signing in over plain HTTP, and the headless browser."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import LiveServer

CSRF_RX = re.compile(r'name="csrf_token" value="([^"]+)"')
CHROMIUM = os.environ.get("AGENT_NETWORK_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def csrf_of(html: str) -> str:
    """The first CSRF token in a page's forms."""
    m = CSRF_RX.search(html)
    assert m, "no csrf_token field on the page"
    return m.group(1)


def browser_client(srv: LiveServer) -> httpx.Client:
    """An HTTP client for the web app (cookies kept, redirects not followed)."""
    return httpx.Client(base_url=srv.url, follow_redirects=False, timeout=60)


@contextlib.contextmanager
def sign_in(srv: LiveServer, key: str) -> Iterator[httpx.Client]:
    """A client signed in to the web app with ``key`` (through the login form)."""
    with browser_client(srv) as c:
        r = c.get("/app/login")
        assert r.status_code == 200, r.text
        r = c.post("/app/login", data={"key": key, "csrf_token": csrf_of(r.text)})
        assert r.status_code == 303, r.text
        yield c


def artefacts_dir() -> Path:
    """Where the browser tests save screenshots (``AGENT_NETWORK_ARTEFACTS`` or
    ``test-artefacts/web`` in the working directory); created, and printed by the tests."""
    path = Path(os.environ.get("AGENT_NETWORK_ARTEFACTS", "test-artefacts")) / "web"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def chromium(module_server: LiveServer) -> Iterator[Any]:
    """A headless Debian chromium driven by Playwright (no browser download); skips with the
    reason when Playwright or chromium is missing and this is not CI (CI must run them).

    It starts after ``module_server`` (use that server with it): the sync Playwright API keeps
    an event loop running in this thread, and a LiveServer's bootstrap cannot start its own
    then."""
    missing = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "the playwright package is not installed (pip install -e '.[test]')"
    if missing is None and not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        missing = f"no chromium at {CHROMIUM} (scripts/setup installs it: apt-get install chromium)"
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests cannot run on CI: {missing}")
        pytest.skip(missing)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()
