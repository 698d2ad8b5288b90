"""The LoRA panel in a real Chromium: browse, add, weigh, trigger words, edit the prompt, generate.

A temp LoRA folder with an SD 1.5 file is configured through the settings, so the browser
must list it with its reason and refuse to add it. Saves `lora-panel.png` beside the other
screenshots (test-artifacts/, or docs/screenshots with `make screenshots`).
"""

from __future__ import annotations

import re

import pytest

from tests.ui.conftest import LONG, SCREENSHOTS, loaded_page, open_tab, set_number
from tests.ui.test_lora_catalog import write_sd15_lora
from ui.server import launch_app

pytestmark = pytest.mark.browser
WARM = "demo-kohya-warm"


@pytest.fixture(scope="module")
def app_url(tiny_session, tmp_path_factory):
    folder = tmp_path_factory.mktemp("user-loras")
    write_sd15_lora(folder / "pastel-sd15.safetensors")
    original = tiny_session.settings
    tiny_session.apply_settings(original.replace(lora_dirs=(str(folder),)))
    running = launch_app(tiny_session, quiet=True)
    yield running.local_url
    running.close()
    tiny_session.apply_settings(original)


@pytest.fixture
def page(browser, app_url):
    from playwright.sync_api import expect

    with loaded_page(browser, app_url, height=1250) as page:
        expect(page.locator("#lora-note")).to_contain_text("4 LoRAs (3 usable with SDXL)", timeout=LONG)
        yield page


def _search(page, text: str) -> None:
    page.locator("#lora-search input, #lora-search textarea").first.fill(text)


def test_browse_add_weigh_trigger_words_and_generate(page):
    from playwright.sync_api import expect

    prompt = page.locator("#prompt textarea")
    browser = page.locator("#lora-browser .thumbnail-item")
    _search(page, "pastel")  # the SD 1.5 file is listed, with the reason, and a click only says why
    expect(browser).to_have_count(1)
    expect(browser.first).to_contain_text("⚠ pastel-sd15 · SD 1.x · can't be used")
    expect(page.locator("#lora-note")).to_contain_text("pastel-sd15 can't be used: made for SD 1.x")
    browser.first.click()
    expect(page.locator("#lora-action")).to_contain_text("can't be added: made for SD 1.x", timeout=LONG)
    expect(page.locator("#lora-stack-empty")).to_be_visible()

    prompt.fill("a lighthouse at dusk")
    _search(page, "warm")
    expect(browser).to_have_count(1)
    expect(browser.first).to_contain_text(f"{WARM} · SDXL")
    expect(browser.first.locator("img")).to_have_attribute("src", re.compile(r"gradio_api/file="))
    browser.first.click()
    row = page.locator(f"#lora-row-{WARM}")
    expect(row).to_be_visible(timeout=LONG)
    expect(prompt).to_have_value(f"a lighthouse at dusk <lora:{WARM}:1>")

    set_number(page, f"#lora-weight-{WARM} input[type=number]", "0.75")
    page.locator(f"#lora-weight-{WARM} input[type=number]").blur()  # the number box's release
    expect(prompt).to_have_value(f"a lighthouse at dusk <lora:{WARM}:0.75>", timeout=LONG)
    page.locator(f"#lora-chip-{WARM}-0").click()  # "+ golden hour": the trigger word, added once
    expect(prompt).to_have_value(f"a lighthouse at dusk, golden hour <lora:{WARM}:0.75>", timeout=LONG)

    # the other way: a tag typed into the prompt becomes a row when the prompt loses focus
    prompt.fill(f"a lighthouse at dusk, golden hour <lora:{WARM}:0.75> <lora:demo-peft-cool:-0.5>")
    page.locator("#negative textarea").click()
    peft = page.locator("#lora-row-demo-peft-cool")
    expect(peft).to_be_visible(timeout=LONG)
    expect(page.locator("#lora-weight-demo-peft-cool input[type=number]")).to_have_value("-0.5")
    page.locator("#lora-enable-demo-peft-cool input").uncheck()  # disabled: its tag leaves the prompt
    expect(prompt).to_have_value(f"a lighthouse at dusk, golden hour <lora:{WARM}:0.75>", timeout=LONG)
    expect(peft).to_be_visible()

    page.locator("#seed input").fill("21")
    set_number(page, "#steps input[type=number]", "2")
    page.locator("#generate").click()
    expect(page.locator("#gallery img").first).to_have_attribute("src", re.compile(r"gradio_api/file="),
                                                                 timeout=LONG)
    expect(page.locator("#summary")).to_contain_text("seed 21", timeout=LONG)
    _search(page, "")
    expect(browser).to_have_count(4)
    expect(page.locator("#live-status")).to_contain_text("Idle", timeout=LONG)  # the status line lags a tick
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.locator("#lora-panel").scroll_into_view_if_needed()
    page.screenshot(path=str(SCREENSHOTS / "lora-panel.png"), full_page=True)

    open_tab(page, "Report")
    table = page.locator("#report-table")
    expect(table).to_contain_text(WARM, timeout=LONG)
    expect(table).to_contain_text("0.75")
    expect(table).not_to_contain_text("demo-peft-cool")


def test_png_info_brings_the_stack_back_as_rows_that_reorder_and_remove(page, tmp_path):
    from PIL import Image
    from playwright.sync_api import expect

    from studio.infotext import save_png

    source = tmp_path / "with-loras.png"
    save_png(Image.new("RGB", (64, 64)), source, f"a green boat <lora:{WARM}:0.7> <lora:demo-locon-grain:0.4>\n"
             "Steps: 12, Sampler: Euler, CFG scale: 6.5, Seed: 4242, Size: 256x256")
    open_tab(page, "PNG info")
    page.locator("#png-drop input[type=file]").set_input_files(str(source))
    expect(page.locator("#png-params")).to_contain_text("4242", timeout=LONG)
    page.locator("#png-send").click()
    prompt = page.locator("#prompt textarea")
    expect(prompt).to_have_value(f"a green boat <lora:{WARM}:0.7> <lora:demo-locon-grain:0.4>", timeout=LONG)
    expect(page.locator(f"#lora-weight-{WARM} input[type=number]")).to_have_value("0.7", timeout=LONG)
    expect(page.locator("#lora-weight-demo-locon-grain input[type=number]")).to_have_value("0.4")
    page.locator(f"#lora-down-{WARM}").click()  # the rows swap, and so do the tags
    expect(prompt).to_have_value(f"a green boat <lora:demo-locon-grain:0.4> <lora:{WARM}:0.7>", timeout=LONG)
    # the prompt lands before the re-rendered rows; click only once they have moved too
    expect(page.locator("[id^=lora-remove-]").first).to_have_id("lora-remove-demo-locon-grain", timeout=LONG)
    page.locator(f"#lora-remove-{WARM}").click()
    expect(prompt).to_have_value("a green boat <lora:demo-locon-grain:0.4>", timeout=LONG)
    expect(page.locator(f"#lora-row-{WARM}")).to_have_count(0)


def test_a_weight_changed_by_keys_typing_or_drag_is_what_the_tag_and_the_image_use(page):
    from playwright.sync_api import expect

    from ui.lora_sync import fmt

    prompt = page.locator("#prompt textarea")
    prompt.fill("a quiet harbour")
    _search(page, "warm")
    page.locator("#lora-browser .thumbnail-item").first.click()
    expect(prompt).to_have_value(f"a quiet harbour <lora:{WARM}:1>", timeout=LONG)
    action = page.locator("#lora-action")
    expect(action).to_contain_text(f"Added {WARM} to the stack")
    slider = page.locator(f"#lora-weight-{WARM} input[type=range]")
    number = page.locator(f"#lora-weight-{WARM} input[type=number]")

    slider.focus()  # the keyboard: two steps of 0.05 down; no pointer, so no "release"
    slider.press("ArrowLeft")
    slider.press("ArrowLeft")
    expect(number).to_have_value("0.9")
    expect(prompt).to_have_value(f"a quiet harbour <lora:{WARM}:0.9>", timeout=LONG)
    expect(action).to_have_text("")  # "Added …" was about the click, not about what came after
    page.locator("#lora-browser .thumbnail-item").first.click()  # the same tile again
    expect(action).to_contain_text(f"{WARM} is already in the stack (weight 0.9); nothing changed", timeout=LONG)

    number.fill("0.35")  # typed into the box, focus still in it
    expect(prompt).to_have_value(f"a quiet harbour <lora:{WARM}:0.35>", timeout=LONG)

    box = slider.bounding_box()  # a drag from the thumb's place to a quarter of the track
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * (0.35 + 2) / 4, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.25, y, steps=12)
    page.mouse.up()
    expect(number).not_to_have_value("0.35")
    dragged = float(number.input_value())
    assert -1.3 < dragged < -0.7
    expect(prompt).to_have_value(f"a quiet harbour <lora:{WARM}:{fmt(dragged)}>", timeout=LONG)

    slider.focus()
    slider.press("ArrowRight")  # and one key press just before Generate
    after = round(dragged + 0.05, 4)
    expect(number).to_have_value(fmt(after))
    page.locator("#seed input").fill("31")
    set_number(page, "#steps input[type=number]", "2")
    page.locator("#generate").click()
    expect(page.locator("#summary")).to_contain_text("seed 31", timeout=LONG)
    expect(prompt).to_have_value(f"a quiet harbour <lora:{WARM}:{fmt(after)}>")
    open_tab(page, "Report")
    row = page.locator("#report-table tr", has_text=WARM)
    expect(row.locator("td").nth(1)).to_have_text(str(float(after)), timeout=LONG)  # what ran


def test_unusable_tiles_look_unusable_and_captions_are_read_whole(page):
    import io

    from PIL import Image
    from playwright.sync_api import expect

    _search(page, "")
    tiles = page.locator("#lora-browser .thumbnail-item")
    expect(tiles).to_have_count(4)
    pastel = tiles.filter(has_text="pastel-sd15")
    warm = tiles.filter(has_text=WARM)
    expect(pastel.locator("img")).to_have_attribute("src", re.compile(r"unusable-\w+\.png"))

    def saturation(tile) -> float:  # what the eye sees: the tile's pixels as the browser drew them
        shot = Image.open(io.BytesIO(tile.screenshot())).convert("RGB").convert("HSV")
        top = shot.crop((0, 0, shot.width, shot.height // 4)).getchannel("S")
        return sum(top.getdata()) / (top.width * top.height)

    assert saturation(pastel) < 10 < 40 < saturation(warm)
    for caption in page.locator("#lora-browser .caption-label").all():  # no caption is cut off
        fits = caption.evaluate("e => e.scrollWidth <= e.clientWidth + 1 && "
                                "getComputedStyle(e).textOverflow != 'ellipsis' || "
                                "getComputedStyle(e).whiteSpace == 'normal'")
        assert fits, caption.inner_text()
    assert "can't be used" in pastel.locator(".caption-label").inner_text()
    info = page.locator("#lora-note")
    expect(info).to_contain_text("pastel-sd15 can't be used")
