"""What a newcomer trips on, in a real Chromium: phases and the live preview, sizes, the header after a
change, the Report's charts, the output history and the model picker.

The app runs on the shared tiny session with its own outputs folder (30 older images in it, so
the history pages) and a model folder (the demo model as a diffusers folder and its VAE).
Screenshots: history-tab.png, model-picker.png, live-preview.png (beside the README's others).
"""

from __future__ import annotations

import os
import re
import shutil
import time

import pytest
from PIL import Image

from studio.infotext import format_infotext, save_png
from studio.paths import TINY_MODEL_DIR
from studio.report import Report
from studio.request import GenerationRequest
from tests.ui.conftest import LONG, SCREENSHOTS, loaded_page, open_tab, set_number
from ui.server import launch_app

pytestmark = pytest.mark.browser
OLD_IMAGES = 30


@pytest.fixture(scope="module")
def app_url(tiny_session, tmp_path_factory):
    outputs = tmp_path_factory.mktemp("outputs")
    day = outputs / "2024-05-01"
    for i in range(1, OLD_IMAGES + 1):  # older images, as a user's outputs folder holds them
        path = day / f"{i:05d}-{1000 + i}.png"
        request = GenerationRequest(prompt=f"old picture {i}", seed=1000 + i, steps=9, width=64, height=64)
        save_png(Image.new("RGB", (64, 64), (8 * i, 40, 90)), path,
                 format_infotext(request, width=64, height=64, model_name="tiny-sdxl", model_hash="abc"))
        Report(request=request.to_dict(), model={"name": "tiny-sdxl", "demo": True, "hash": "abc"}, device="cpu",
               dtype="bfloat16", phases={"text_encode": 0.02, "denoise": 0.5, "vae_decode": 0.06, "total": 0.6},
               step_seconds=[0.05] * 9, memory={"peak_rss": 600 << 20, "rss": 590 << 20},
               outputs=[str(path)]).write_json(path.with_suffix(".json"))
        stamp = time.time() - 86400 + i  # a day ago, one second apart
        os.utime(path, (stamp, stamp))
    models = tmp_path_factory.mktemp("models")
    shutil.copytree(TINY_MODEL_DIR, models / "my-tiny")
    shutil.copytree(TINY_MODEL_DIR / "vae", models / "vaes" / "plain-vae")
    original = tiny_session.settings
    tiny_session.dirs.settings_file.unlink(missing_ok=True)
    tiny_session.settings = original.replace(outputs_dir=str(outputs), model_dirs=(str(models),))
    kept_outputs = tiny_session._outputs  # outputs_dir applies at start: as if the app started with this one
    tiny_session._outputs = None
    running = launch_app(tiny_session, quiet=True)
    yield running.local_url
    running.close()
    tiny_session.dirs.settings_file.unlink(missing_ok=True)
    tiny_session.load_model("", vae="")
    tiny_session.settings = original
    tiny_session._outputs = kept_outputs
    tiny_session.apply_settings(original)


@pytest.fixture
def page(browser, app_url):
    with loaded_page(browser, app_url) as page:
        yield page


def test_each_phase_shows_and_a_live_preview_forms(page, monkeypatch):
    from playwright.sync_api import expect

    import studio.generation

    real_decode = studio.generation.decode_latents

    def slow_decode(*args, **kwargs):  # a real SDXL decode takes seconds: make this one visible
        time.sleep(3)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(studio.generation, "decode_latents", slow_decode)
    page.locator("#prompt textarea").fill("a red circle on a blue background")
    page.locator("#seed input").fill("5")
    set_number(page, "#steps input[type=number]", "6")
    page.locator("#generate").click()
    gallery = page.locator("#gallery")
    expect(gallery).to_contain_text("decoding the image (VAE)", timeout=LONG)  # not "denoising 100%"
    preview = page.locator("#live-preview")
    expect(preview.locator("img")).to_be_visible(timeout=LONG)
    expect(preview).to_contain_text("Live preview: step 6/6")  # the last picture, while the VAE decodes
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    preview.scroll_into_view_if_needed()
    page.screenshot(path=str(SCREENSHOTS / "live-preview.png"), full_page=False)
    expect(page.locator("#summary")).to_contain_text("seed 5", timeout=LONG)
    expect(preview).to_be_hidden(timeout=LONG)  # the image itself replaces it
    open_tab(page, "Report")
    expect(page.locator("#report-table")).to_contain_text("Live preview: 3 pictures (every 2 steps)", timeout=LONG)
    expect(page.locator("#report-table")).to_contain_text("ms per step")


def test_a_side_typed_past_the_limit_is_clamped_and_the_size_menu_says_so(page):
    from playwright.sync_api import expect

    width = page.locator("#width input[type=number]")
    width.fill("5000")
    width.blur()
    expect(width).to_have_value("2048")
    expect(page.locator("#size-preset input")).to_have_value("Custom")  # not the 128×128 it showed
    expect(page.locator(".toast-body")).to_have_count(0)  # and no error from the server
    set_number(page, "#width input[type=number]", "128")
    expect(page.locator("#size-preset input")).to_have_value("128×128 (1:1, demo scale)")


def test_the_api_gives_the_engines_one_size_message(app_url):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(app_url, verbose=False, analytics_enabled=False)
    with pytest.raises(AppError, match="`width` must be a multiple of 8 between 64 and 2048, got 5000"):
        client.predict("x", "", 1, 2, 5.0, 5000, 256, "Euler", 1, api_name="/generate")


def test_the_header_names_the_precision_as_soon_as_it_is_saved(page, tiny_session):
    from playwright.sync_api import expect

    open_tab(page, "Preferences")
    expect(page.locator("#prefs-note")).to_contain_text("Loaded from")
    page.locator("#pref-precision input").click()
    page.get_by_role("option", name="fp32").click()
    page.locator("#prefs-save").click()
    expect(page.locator("#prefs-result")).to_contain_text("Precision: auto → fp32", timeout=LONG)
    expect(page.locator("#model-line")).to_contain_text("cpu/float32")  # no reload needed
    expect(page.locator("#model-line")).to_contain_text("ready")
    page.locator("#pref-precision input").click()
    page.get_by_role("option", name="bf16").click()
    page.locator("#prefs-save").click()
    expect(page.locator("#model-line")).to_contain_text("cpu/bfloat16", timeout=LONG)


def test_the_report_charts_show_every_run(page):
    from playwright.sync_api import expect

    page.locator("#prompt textarea").fill("one more")
    set_number(page, "#steps input[type=number]", "2")
    page.locator("#generate").click()
    expect(page.locator("#summary")).to_contain_text("2 steps", timeout=LONG)
    open_tab(page, "Report")
    points = page.locator("#memory-plot circle.memory-point")
    expect(points.first).to_be_visible(timeout=LONG)  # a dot per run: one run is not a blank chart
    bars = page.locator("#phase-plot rect.run-bar")
    expect(bars.first).to_be_attached()
    heights = [b.bounding_box()["height"] for b in bars.all()]
    assert heights and min(heights) >= 8, heights  # the log axis keeps the fastest run in sight
    expect(page.locator("#phase-plot")).to_contain_text("log scale")


def test_the_output_history_pages_shows_parameters_and_reports_and_sends_to_generate(page, monkeypatch):
    from playwright.sync_api import expect

    import ui.history_tab

    opened = []
    monkeypatch.setattr(ui.history_tab, "open_in_file_manager", opened.append)
    open_tab(page, "History")
    note = page.locator("#history-note")
    expect(note).to_contain_text(re.compile(r"Images 1–24 of \d+, newest first \(page 1 of 2\)"), timeout=LONG)
    tiles = page.locator("#history-gallery .thumbnail-item")
    expect(tiles).to_have_count(24)
    expect(tiles.first).not_to_contain_text("seed 1030")  # this session's images come first
    tiles.first.click()  # the newest: made by this app in this module, its report beside it
    expect(page.locator("#history-report")).to_contain_text("steps", timeout=LONG)
    expect(page.locator("#history-summary")).to_contain_text("made by lora-studio")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "history-tab.png"), full_page=True)
    page.locator("#history-older").click()
    expect(note).to_contain_text("(page 2 of 2)")
    oldest = tiles.last
    expect(oldest).to_contain_text("seed 1001 · 64x64 · 9 steps")
    oldest.click()
    expect(page.locator("#history-summary")).to_contain_text("00001-1001.png is a 64×64 PNG", timeout=LONG)
    expect(page.locator("#history-summary")).to_contain_text("old picture 1")
    expect(page.locator("#history-report")).to_contain_text("seed 1001")  # the Report, from its JSON
    page.locator("#history-open").click()
    expect(page.locator("#history-action")).to_contain_text("Opened", timeout=LONG)
    assert [p.name for p in opened] == ["2024-05-01"]
    page.locator("#history-send").click()
    expect(page.get_by_role("tab", name="Generate")).to_have_attribute("aria-selected", "true", timeout=LONG)
    expect(page.locator("#prompt textarea")).to_have_value("old picture 1")
    expect(page.locator("#seed input")).to_have_value("1001")
    expect(page.locator("#steps input[type=number]")).to_have_value("9")


def test_the_model_picker_loads_a_folder_and_a_vae_with_its_memory_and_keeps_the_stack(page):
    from playwright.sync_api import expect

    prompt = page.locator("#prompt textarea")
    prompt.fill("a boat <lora:demo-kohya-warm:0.6>")
    page.locator("#negative textarea").click()  # the tag becomes a row
    expect(page.locator("#lora-row-demo-kohya-warm")).to_be_visible(timeout=LONG)
    page.locator("#model-picker").get_by_text("Model", exact=True).first.click()  # open the accordion
    page.locator("#model-choice input").click()
    page.get_by_role("option", name=re.compile(r"^my-tiny · diffusers folder")).click()
    note = page.locator("#model-note")
    expect(note).to_contain_text(re.compile(r"my-tiny.*will take ≈ \d+ MB of RAM in bfloat16"), timeout=LONG)
    page.locator("#vae-choice input").click()
    page.get_by_role("option", name=re.compile(r"^plain-vae")).click()
    expect(note).to_contain_text("Its VAE is replaced by plain-vae")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.locator("#model-picker").screenshot(path=str(SCREENSHOTS / "model-picker.png"))
    page.locator("#model-load").click()
    expect(note).to_contain_text("Loaded my-tiny with the VAE plain-vae", timeout=LONG)
    expect(note).to_contain_text("The LoRA stack is kept")
    expect(page.locator("#model-line")).to_contain_text("my-tiny (folder) + VAE plain-vae on cpu/bfloat16")
    expect(page.locator("#lora-row-demo-kohya-warm")).to_be_visible()  # the stack survived the switch
    set_number(page, "#steps input[type=number]", "2")
    page.locator("#generate").click()
    expect(page.locator("#summary")).to_contain_text("2 steps", timeout=LONG)
    open_tab(page, "Report")
    table = page.locator("#report-table")
    expect(table).to_contain_text("my-tiny", timeout=LONG)
    expect(table.locator("tr", has_text="demo-kohya-warm")).to_be_visible()  # the stack applied to the new model
