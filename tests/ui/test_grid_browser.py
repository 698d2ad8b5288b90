"""LoRA workflows in a real Chromium: the Grid tab, A/B compare, the per-block panel and the live scrub.

Saves `grid-tab.png` beside the other screenshots (test-artifacts/, or docs/screenshots with
`make screenshots`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.ui.conftest import LONG, SCREENSHOTS, loaded_page, open_tab, set_number

pytestmark = pytest.mark.browser
WARM, COOL = "demo-kohya-warm", "demo-peft-cool"


@pytest.fixture
def page(browser, served):
    _session, url = served
    with loaded_page(browser, url, height=1300) as page:
        yield page


def _pick(page, selector: str, text: str) -> None:
    """Choose `text` in a gradio dropdown: typed to filter, then its option clicked, then checked.

    Enter alone picks the highlighted option, which on a fast machine can still be the old value
    (the filter had not re-rendered yet): CI then ran a seed grid as a `lora` grid.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect

    box = page.locator(f"{selector} input").first
    for _ in range(3):
        box.click()
        box.fill(text)
        option = page.get_by_role("option", name=text, exact=True).first
        try:
            option.wait_for(state="visible", timeout=3_000)
            option.click()
        except PlaywrightTimeout:
            box.press("Enter")  # a custom value (allow_custom_value) has no option to click
        try:
            expect(box).to_have_value(text, timeout=5_000)
            box.blur()
            return
        except AssertionError:
            continue
    expect(box).to_have_value(text)


def _check(page, selector: str) -> None:
    """Tick a box in a stack row; a re-render still in flight may swap the box under the first click."""
    from playwright.sync_api import expect

    for _ in range(5):
        box = page.locator(selector)
        if not box.is_checked():
            box.click()
        try:
            expect(page.locator(selector)).to_be_checked(timeout=5_000)
            page.wait_for_timeout(1_000)  # the row's re-render with the box on
            if page.locator(selector).is_checked():
                return
        except AssertionError:
            continue
    expect(page.locator(selector)).to_be_checked()


def _base(page, prompt: str) -> None:
    page.locator("#prompt textarea").fill(prompt)
    page.locator("#negative textarea").click()  # blur: tags become rows
    page.locator("#seed input").fill("5")
    set_number(page, "#steps input[type=number]", "2")
    set_number(page, "#width input[type=number]", "128")
    set_number(page, "#height input[type=number]", "128")


def test_a_weight_grid_in_the_browser_with_its_lora_cost(page):
    from playwright.sync_api import expect

    _base(page, "a lighthouse at dusk")
    open_tab(page, "Grid")
    _pick(page, "#grid-x-target", WARM)
    page.locator("#grid-x-values textarea, #grid-x-values input").first.fill("0, 0.5, 1")
    _pick(page, "#grid-y-kind", "lora")
    _pick(page, "#grid-y-target", COOL)
    page.locator("#grid-y-values textarea, #grid-y-values input").first.fill("0, 0.7")
    page.locator("#grid-run").click()
    expect(page.locator("#grid-status")).to_contain_text("6 cells", timeout=4 * LONG)
    expect(page.locator("#grid-image img")).to_have_attribute("src", re.compile(r"gradio_api/file="), timeout=LONG)
    summary = page.locator("#grid-summary")
    expect(summary).to_contain_text("measured")
    expect(summary).to_contain_text("row by row would have been")
    expect(page.locator("#grid-cells .thumbnail-item")).to_have_count(6, timeout=LONG)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.locator("#grid-image").scroll_into_view_if_needed()
    page.screenshot(path=str(SCREENSHOTS / "grid-tab.png"), full_page=True)
    status = page.locator("#grid-status").inner_text()
    folder = Path(re.search(r"in (/\S+?)[ .]*\(order", status.replace("`", "")).group(1))
    data = json.loads((folder / "grid.json").read_text())
    assert len(data["cells"]) == 6 and data["cells"][5]["request"]["loras"] == [[WARM, 1.0], [COOL, 0.7]]


def test_progress_counts_cells_and_stop_ends_the_grid_between_cells(page):
    from playwright.sync_api import expect

    _base(page, "a lighthouse at dusk")
    # 200 steps a cell (a few seconds at the demo's 128 px): a fast CI machine must not finish the
    # grid before the page shows its progress and the Stop lands
    set_number(page, "#steps input[type=number]", "200")
    open_tab(page, "Grid")
    _pick(page, "#grid-x-kind", "seed")
    page.locator("#grid-x-values textarea, #grid-x-values input").first.fill("1, 2, 3, 4, 5, 6, 7, 8")
    page.locator("#grid-run").click()
    # Gradio's progress text ("cell 2/8"), wherever the page renders it
    page.wait_for_function("() => /cell [1-7]\\/8/.test(document.body.innerText)", timeout=4 * LONG)
    page.locator("#grid-stop").click()
    status = page.locator("#grid-status")
    expect(status).to_contain_text("Stopped after", timeout=4 * LONG)
    ran = int(re.search(r"Stopped after (\d+) of 8", status.inner_text()).group(1))
    assert 1 <= ran < 8
    expect(page.locator("#grid-cells .thumbnail-item")).to_have_count(ran, timeout=LONG)  # what ran is saved


def test_ab_compare_shows_two_stacks_on_one_seed(page):
    from playwright.sync_api import expect

    _base(page, f"a lighthouse at dusk <lora:{WARM}:0.8>")
    open_tab(page, "Grid")
    page.locator("#ab-take").click()
    expect(page.locator("#ab-a textarea, #ab-a input").first).to_have_value(f"<lora:{WARM}:0.8>", timeout=LONG)
    page.locator("#ab-b textarea, #ab-b input").first.fill(f"<lora:{WARM}:0.8:lbw=OUTD>")
    page.locator("#ab-run").click()
    expect(page.locator("#ab-summary")).to_contain_text("seed 5", timeout=4 * LONG)
    expect(page.locator("#ab-summary")).to_contain_text("lbw=OUTD")
    expect(page.locator("#ab-slider img")).to_have_count(2, timeout=LONG)


def test_block_panel_presets_and_sliders_write_the_tag_and_the_scrub_follows_the_weight(page):
    from playwright.sync_api import expect

    prompt = page.locator("#prompt textarea")
    _base(page, f"a lighthouse <lora:{WARM}:1>")
    expect(page.locator(f"#lora-row-{WARM}")).to_be_visible(timeout=LONG)
    page.locator(f"#lora-adv-{WARM}").get_by_text("Blocks · steps · live scrub").click()
    _pick(page, f"#lora-lbw-{WARM}", "OUTD")
    expect(prompt).to_have_value(f"a lighthouse <lora:{WARM}:1:lbw=OUTD>", timeout=LONG)
    mid = page.locator(f"#lora-block-{WARM}-5 input[type=number]")  # MID in the 12-block layout
    expect(mid).to_have_value("0", timeout=LONG)
    set_number(page, f"#lora-block-{WARM}-5 input[type=number]", "0.5")
    mid.blur()
    expect(prompt).to_have_value(f"a lighthouse <lora:{WARM}:1:lbw=1,0,0,0,0,0.5,1,1,1,0,0,0>", timeout=LONG)
    stop = page.locator(f"#lora-stop-{WARM} textarea, #lora-stop-{WARM} input").first
    expect(stop).to_be_visible(timeout=LONG)  # the panel stayed open through the re-render
    stop.fill("0.5")
    stop.press("Enter")
    expect(prompt).to_have_value(f"a lighthouse <lora:{WARM}:1:lbw=1,0,0,0,0,0.5,1,1,1,0,0,0:stop=0.5>",
                                 timeout=LONG)

    _check(page, f"#lora-scrub-{WARM} input")
    weight = page.locator(f"#lora-weight-{WARM} input[type=number]")
    expect(weight).to_be_visible(timeout=LONG)
    weight.fill("0.6")  # each value typed or dragged reaches the scrub
    note = page.locator("#lora-scrub-note")
    expect(note).to_contain_text("after the last slider change", timeout=4 * LONG)
    expect(note).to_contain_text("at 0.6")
    expect(page.locator("#lora-scrub-image img")).to_be_visible(timeout=LONG)
    open_tab(page, "Report")
    expect(page.locator("#report-table")).to_contain_text(WARM, timeout=LONG)
