"""A real Chromium (Debian's, driven by playwright) types a prompt, clicks Generate, sees image and report.

Never runs `playwright install`; skips with the reason when no chromium binary exists.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from ui.server import launch_app

pytestmark = pytest.mark.browser
ARTIFACTS = Path(__file__).resolve().parent.parent.parent / "test-artifacts"
CHROMIUM = next((p for p in (os.environ.get("CHROMIUM_PATH"), "/usr/bin/chromium", "/usr/bin/chromium-browser",
                             shutil.which("chromium")) if p and os.path.exists(p)), None)


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium binary (install Debian's `chromium`, or set CHROMIUM_PATH)")
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def app_url(tiny_session):
    app, url = launch_app(tiny_session, quiet=True)
    yield url
    app.close()


def test_type_prompt_generate_and_read_the_report(browser, app_url):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(app_url)
    expect(page.locator("#demo-notice")).to_contain_text("built-in demo model")
    page.locator("#prompt textarea").fill("a lighthouse at dusk")
    page.locator("#seed input").fill("11")
    steps = page.locator("#steps input[type=number]")
    steps.fill("4")
    steps.press("Enter")
    page.locator("#generate").click()
    expect(page.locator("#gallery img").first).to_have_attribute("src", re.compile(r"gradio_api/file="),
                                                                 timeout=60_000)
    expect(page.locator("#report")).to_contain_text("denoise", timeout=30_000)
    expect(page.locator("#report")).to_contain_text("seed 11")
    expect(page.locator("#report")).to_contain_text("4 steps")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "generate-tab.png"), full_page=True)
    page.close()
