"""Fixtures shared by the UI tests: the launched app and Debian's chromium through playwright."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest

from ui.server import launch_app

# Screenshots go to test-artifacts/ (ignored by git) so a test run never dirties the tree;
# `make screenshots` points this at docs/screenshots to refresh the README's pictures.
SCREENSHOTS = Path(os.environ.get("LORA_STUDIO_SCREENSHOTS") or
                   Path(__file__).resolve().parent.parent.parent / "test-artifacts")
CHROMIUM = next((p for p in (os.environ.get("CHROMIUM_PATH"), "/usr/bin/chromium", "/usr/bin/chromium-browser",
                             shutil.which("chromium")) if p and os.path.exists(p)), None)
LONG = 60_000  # ms: a generation on a busy 2-core machine


@pytest.fixture(scope="module")
def served(tiny_session):
    """The app on the shared tiny session, launched once per module: (session, local URL)."""
    running = launch_app(tiny_session, quiet=True)
    yield tiny_session, running.local_url
    running.close()


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium (never `playwright install`); skips with the reason when there is none."""
    if CHROMIUM is None:
        pytest.skip("no chromium binary (install Debian's `chromium`, or set CHROMIUM_PATH)")
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield chromium
        chromium.close()


@contextlib.contextmanager
def loaded_page(browser, url: str, height: int = 1000):
    """A fresh browser context's page on `url`, once the page load has finished (the model line says ready)."""
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1400, "height": height})
    page = context.new_page()
    page.goto(url)
    expect(page.locator("#model-line")).to_contain_text("ready", timeout=LONG)
    try:
        yield page
    finally:
        context.close()


def set_number(page, selector: str, value: str) -> None:
    box = page.locator(selector)
    box.fill(value)
    box.press("Enter")


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()
