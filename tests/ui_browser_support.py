"""What the /ui browser tests share: headless Chromium (the Debian package, or DOTS_OCR_CHROMIUM)
driven by Playwright, the page opened with the API key entered in its dialog, console errors
collected, a screenshot at the end, and the wait for the server's generation slots to be free.

Chromium is part of the test setup (``scripts/install.sh`` installs Debian's package when it runs
as root, as in CI); without it these tests fail with a message that says how to install it, never
skip. Screenshots go to ``test-artifacts/ui/`` (or ``$DOTS_OCR_UI_ARTIFACTS``).
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

import pytest
import requests

from serverproc import ROOT, wait_for

KEY = "browser-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ARTIFACTS = Path(os.environ.get("DOTS_OCR_UI_ARTIFACTS", ROOT / "test-artifacts" / "ui"))
TIMEOUT_MS = 120_000  # one answer of the tiny model on a full page, on a busy 2-core machine


def chromium_executable() -> str | None:
    for candidate in (os.environ.get("DOTS_OCR_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def require_browser() -> str:
    executable = chromium_executable()
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        executable = None
    if executable is None:
        pytest.fail("the /ui browser tests need Chromium and playwright: `sudo apt-get install chromium` "
                    "(or set DOTS_OCR_CHROMIUM to a Chrome/Chromium binary) and `pip install -e '.[test]'`")
    return executable


@contextlib.contextmanager
def launched_browser() -> Iterator:
    executable = require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        yield browser
        browser.close()


@contextlib.contextmanager
def ui_page(browser, server: str, name: str) -> Iterator:
    """/ui with the key entered once in its dialog; console errors collected in ``page.errors``;
    a screenshot named ``name`` at the end."""
    # Playwright's wait_for_function evaluates strings, which the page's CSP forbids (no
    # 'unsafe-eval'); test_wrong_key_is_a_readable_error runs with the CSP on.
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, bypass_csp=True, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # Chromium logs every 4xx response ("Failed to load resource"); the 401 before the key is expected
    page.on("console", lambda msg: errors.append(msg.text)
            if msg.type == "error" and not msg.text.startswith("Failed to load resource") else None)
    page.goto(server + "/ui")
    page.wait_for_selector("#key-dialog[open]")
    page.fill("#key-input", KEY)
    page.click("#key-save")
    page.wait_for_function("document.querySelector('#prompt-type').options.length > 3")  # /ui/config answered
    page.errors = errors
    try:
        yield page
    finally:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
        context.close()


def wait_idle(server: str) -> None:
    wait_for(lambda: not requests.get(server + "/health", timeout=5).json()["running"], 60,
             what="every generation slot free", interval_s=0.2)
