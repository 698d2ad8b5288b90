"""A newcomer's path in a real Chromium (Debian's, driven by playwright), with the README screenshots.

Open the app, generate, read the report, change a preference, reload (it is kept),
read a PNG's parameters back, stop a long run midway. Never runs `playwright install`;
skips with the reason when no chromium binary exists.
"""

from __future__ import annotations

import re

import pytest

from tests.ui.conftest import LONG, SCREENSHOTS, loaded_page, open_tab, set_number
from ui.server import launch_app

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def app_url(tiny_session):
    original = tiny_session.settings
    tiny_session.dirs.settings_file.unlink(missing_ok=True)
    running = launch_app(tiny_session, quiet=True)
    yield running.local_url
    running.close()
    tiny_session.dirs.settings_file.unlink(missing_ok=True)
    tiny_session.apply_settings(original)


@pytest.fixture
def page(browser, app_url):
    with loaded_page(browser, app_url) as page:
        yield page


def test_a_newcomer_generates_reads_the_report_and_keeps_a_preference(page):
    from playwright.sync_api import expect

    notice = page.locator("#demo-notice")
    expect(notice).to_contain_text("built-in demo model")
    expect(notice).to_contain_text("red, green, blue, yellow, white, black, purple, orange")  # what it knows
    expect(notice).to_contain_text("circle, square, triangle")
    expect(page.locator("#live-status")).to_contain_text("Idle")
    examples = page.locator("#demo-examples")
    expect(examples).to_contain_text("a yellow triangle on a purple background")
    examples.get_by_text("a red circle on a blue background", exact=True).click()  # an example fills the prompt
    expect(page.locator("#prompt textarea")).to_have_value("a red circle on a blue background")
    page.locator("#seed input").fill("11")
    set_number(page, "#steps input[type=number]", "20")  # the default: the demo model draws its shape
    set_number(page, "#batch-count input[type=number]", "2")
    page.locator("#generate").click()
    expect(page.locator("#gallery img").nth(1)).to_have_attribute("src", re.compile(r"gradio_api/file="), timeout=LONG)
    expect(page.locator("#seeds-note")).to_have_text("Seeds: 11, 12", timeout=LONG)
    expect(page.locator("#summary")).to_contain_text("seed 12")
    page.locator("#seed-random").click()
    expect(page.locator("#seed input")).to_have_value("-1")
    page.locator("#seed-reuse").click()
    expect(page.locator("#seed input")).to_have_value("11")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "generate-tab.png"), full_page=True)
    page.locator("#gallery img").nth(1).click()  # picking an image makes ♻ reuse its seed
    expect(page.locator("#seeds-note")).to_contain_text("Selected image: seed 12")
    page.locator("#seed-reuse").click()
    expect(page.locator("#seed input")).to_have_value("12")

    open_tab(page, "Report")
    table = page.locator("#report-table")
    expect(table).to_contain_text("Batch of 2 images (seeds 11, 12)")
    expect(table).to_contain_text("denoise")
    expect(table).to_contain_text("peak RAM")
    # the outputs folder is shared with earlier tests in the run: only the seed part is known
    expect(page.locator("#report-json")).to_contain_text(re.compile(r"\d{5}-12"))
    expect(page.locator("#phase-plot")).to_contain_text("Time per phase")
    expect(page.locator("#live-memory")).to_contain_text("RAM (RSS)")
    page.screenshot(path=str(SCREENSHOTS / "report-panel.png"), full_page=True)

    open_tab(page, "Preferences")
    expect(page.locator("#prefs-note")).to_contain_text("Loaded from")
    expect(page.locator("#pref-unpatch_lora_by_vram_offload")).to_contain_text("restore touched weights in place")
    expect(page.locator("#unpatch-costs")).to_contain_text("Last measured cost of each unpatch path")
    # three bad values at once: each is named at its own control, with its label; nothing vanishes in a toast
    set_number(page, "#pref-default_steps input", "0")
    set_number(page, "#pref-port input", "70000")
    page.locator("#pref-lora_dirs textarea").fill("/no/such/lora/folder")
    page.locator("#pref-share input").check()
    page.locator("#prefs-save").click()
    expect(page.locator("#pref-error-default_steps")).to_have_text("Default steps must be between 1 and 200, got 0",
                                                                  timeout=LONG)
    expect(page.locator("#pref-error-port")).to_have_text("Port must be between 0 and 65535, got 70000")
    expect(page.locator("#pref-error-lora_dirs")).to_contain_text("LoRA folders: /no/such/lora/folder does not exist")
    expect(page.locator("#pref-error-default_cfg")).to_be_hidden()
    expect(page.locator("#prefs-result")).to_contain_text("Nothing was saved: 3 values need fixing")
    expect(page.locator(".toast-body")).to_have_count(0)
    page.locator("#pref-error-port").scroll_into_view_if_needed()
    page.screenshot(path=str(SCREENSHOTS / "preferences.png"), full_page=True)
    set_number(page, "#pref-default_steps input", "7")
    set_number(page, "#pref-port input", "7860")
    page.locator("#pref-lora_dirs textarea").fill("")
    page.locator("#prefs-save").click()
    result = page.locator("#prefs-result")
    expect(result).to_contain_text("Default steps: 20 → 7", timeout=LONG)
    expect(result).to_contain_text("applies now")
    expect(result).to_contain_text("Public link: off → on")  # a switch reads on/off, not "(empty) → True"
    expect(page.locator("#pref-error-default_steps")).to_be_hidden()
    open_tab(page, "Generate")
    expect(page.locator("#steps input[type=number]")).to_have_value("7")  # "applies now": no reload needed

    page.reload()
    expect(page.locator("#model-line")).to_contain_text("ready", timeout=LONG)
    expect(page.locator("#steps input[type=number]")).to_have_value("7")  # the default took effect
    page.locator("#seed-reuse").click()  # a fresh page: ♻ takes the session's last seed, not -1
    expect(page.locator("#seed input")).to_have_value("12")
    open_tab(page, "Report")  # and the Report still shows the last run with its JSON
    expect(page.locator("#report-table")).to_contain_text("seed 12", timeout=LONG)
    expect(page.locator("#report-json")).to_contain_text(re.compile(r"\d{5}-12"))
    open_tab(page, "Preferences")
    expect(page.locator("#pref-default_steps input")).to_have_value("7")  # and was kept
    expect(page.locator("#pref-share")).to_contain_text("needs a restart")

    page.locator("#prefs-reset").click()  # Reset asks first, saying what it would change
    confirm = page.locator("#prefs-confirm")
    expect(confirm).to_be_visible(timeout=LONG)
    expect(confirm).to_contain_text("Reset 2 preferences to the defaults?")
    expect(confirm).to_contain_text("Default steps: 7 → 20")
    page.locator("#prefs-confirm-no").click()
    expect(confirm).to_be_hidden()
    expect(result).to_contain_text("Reset cancelled: nothing changed.")
    expect(page.locator("#pref-default_steps input")).to_have_value("7")
    page.locator("#prefs-reset").click()
    page.locator("#prefs-confirm-yes").click()
    expect(result).to_contain_text("Reset: 2 changes.", timeout=LONG)
    expect(page.locator("#pref-default_steps input")).to_have_value("20")
    expect(confirm).to_be_hidden()


def test_png_info_restores_the_parameters_into_generate(page, tmp_path):
    from PIL import Image
    from playwright.sync_api import expect

    from studio.infotext import save_png

    source = tmp_path / "from-a1111.png"
    save_png(Image.new("RGB", (64, 64)), source, "a green boat <lora:demo-kohya-warm:0.7>\nNegative prompt: fog\n"
             "Steps: 12, Sampler: DPM++ 2M, CFG scale: 6.5, Seed: 4242, Size: 832x1216, Model: sdxl")
    open_tab(page, "PNG info")
    page.locator("#png-drop input[type=file]").set_input_files(str(source))
    expect(page.locator("#png-params")).to_contain_text("4242", timeout=LONG)
    expect(page.locator("#png-prompt textarea")).to_have_value("a green boat <lora:demo-kohya-warm:0.7>")
    page.locator("#png-send").click()
    expect(page.get_by_role("tab", name="Generate")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#prompt textarea")).to_have_value("a green boat <lora:demo-kohya-warm:0.7>")  # tags kept
    expect(page.locator("#negative textarea")).to_have_value("fog")
    expect(page.locator("#seed input")).to_have_value("4242")
    expect(page.locator("#steps input[type=number]")).to_have_value("12")
    expect(page.locator("#cfg input[type=number]")).to_have_value("6.5")
    expect(page.locator("#width input[type=number]")).to_have_value("832")
    expect(page.locator("#height input[type=number]")).to_have_value("1216")
    expect(page.locator("#sampler input")).to_have_value("DPM++ 2M")
    expect(page.locator("#size-preset input")).to_have_value("832×1216 (13:19, SDXL)")


def test_png_info_says_in_one_line_what_a_bad_file_is(page, tmp_path):
    from PIL import Image
    from playwright.sync_api import expect

    from studio.infotext import save_png

    good = tmp_path / "good.png"
    save_png(Image.new("RGB", (64, 64)), good, "a boat\nSteps: 3, Sampler: Euler, CFG scale: 5, Seed: 8, Size: 64x64")
    fake = tmp_path / "holiday.png"
    fake.write_text("<!DOCTYPE html><html>not a picture at all</html>")
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    open_tab(page, "PNG info")
    note = page.locator("#png-note")

    def drop(path) -> None:
        """Drop a file, taking the one shown off first (as a user does with its ✕)."""
        remove = page.locator("#png-drop button[aria-label=Clear]")
        if remove.count():
            remove.first.click()
        page.locator("#png-drop input[type=file]").set_input_files(str(path))

    drop(good)
    expect(note).to_contain_text("good.png is a 64×64 PNG", timeout=LONG)
    page.locator("#png-send").click()
    expect(page.get_by_role("tab", name="Generate")).to_have_attribute("aria-selected", "true", timeout=LONG)
    open_tab(page, "PNG info")
    expect(note).to_contain_text("Sent to Generate.")

    drop(fake)
    expect(note).to_contain_text("holiday.png is not an image: it starts with the text <!DOCTYPE html><html>not",
                                 timeout=LONG)
    expect(note).not_to_contain_text("Sent to Generate")  # the old note went with the old file
    expect(page.locator("#png-preview img")).to_have_count(0)  # no broken picture
    expect(page.get_by_text("Error", exact=True)).to_have_count(0)  # no bare red "Error" pills
    expect(page.locator(".toast-body")).to_have_count(0)
    expect(page.locator("#png-prompt textarea")).to_have_value("")

    drop(plain)
    expect(note).to_contain_text("plain.png is a 8×8 PNG (", timeout=LONG)
    expect(note).to_contain_text("without generation parameters (no parameters text; it holds no text at all)")
    expect(page.locator("#png-preview img")).to_be_visible()
    expect(page.get_by_text("Error", exact=True)).to_have_count(0)
    page.locator("#png-send").click()
    expect(note).to_contain_text("Nothing was sent to Generate.", timeout=LONG)
    expect(page.get_by_role("tab", name="PNG info")).to_have_attribute("aria-selected", "true")


def test_a_second_visitor_sees_the_queue_and_stop_midway_is_acknowledged_at_once(page, browser, app_url):
    from playwright.sync_api import expect

    page.locator("#prompt textarea").fill("a very long run")
    set_number(page, "#steps input[type=number]", "200")
    set_number(page, "#batch-count input[type=number]", "4")
    page.locator("#generate").click()
    expect(page.locator("#gallery")).to_contain_text("denoise step", timeout=LONG)
    expect(page.locator("#live-status")).to_contain_text("Generating", timeout=LONG)

    other = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    other.goto(app_url)
    expect(other.locator("#model-line")).to_contain_text("ready", timeout=LONG)
    other.locator("#prompt textarea").fill("waits its turn")
    set_number(other, "#steps input[type=number]", "2")
    other.locator("#generate").click()
    expect(other.locator("#gallery")).to_contain_text("queue: 1/1", timeout=LONG)  # Gradio's own position
    expect(other.locator("#live-status")).to_contain_text("1 in the queue", timeout=LONG)
    other.locator("#stop").click()  # the other visitor's Stop never touches the first one's run
    expect(other.locator("#stop-note")).to_contain_text("your queued job will not start", timeout=5_000)
    expect(page.locator("#live-status")).to_contain_text("Generating")

    page.locator("#stop").click()
    # acknowledged within 5 s: the note says so, or (on a fast machine) the run has already ended and the
    # note was cleared with it, so the summary says it stopped
    page.wait_for_function(
        """() => (document.querySelector('#stop-note')?.innerText || '').includes('Stop requested')
                 || /Stopped after \\d of 4 images/.test(document.querySelector('#summary')?.innerText || '')""",
        timeout=5_000,
    )
    expect(page.locator("#summary")).to_contain_text(re.compile(r"Stopped after \d of 4 images"), timeout=LONG)
    expect(page.locator("#stop-note")).to_have_text("", timeout=LONG)  # the run ended: no stale "Stop requested"
    # the queued job ends as soon as its turn comes, without running
    expect(other.locator("#summary")).to_contain_text("Stopped after 0 of 1 image", timeout=LONG)
    expect(page.locator("#live-status")).to_contain_text("Idle", timeout=LONG)
    other.context.close()


def test_the_saved_password_never_reaches_the_page(page, tiny_session):
    """Issue 11, item 11: the panel's password box is never filled; it says whether one is saved."""
    from playwright.sync_api import expect

    from studio.settings import load_settings, save_settings

    path = tiny_session.dirs.settings_file
    before = path.read_text() if path.exists() else None
    save_settings(load_settings(path).replace(auth_password="s3cret-in-the-file"), path)
    try:
        page.reload()
        expect(page.locator("#model-line")).to_contain_text("ready", timeout=LONG)
        open_tab(page, "Preferences")
        box = page.locator("#pref-auth_password input")
        expect(box).to_have_attribute("placeholder", re.compile("saved \\(never shown\\)"))
        expect(box).to_have_value("")
        assert "s3cret-in-the-file" not in page.content()
    finally:
        path.write_text(before) if before is not None else path.unlink(missing_ok=True)


def test_an_outputs_folder_that_would_serve_other_files_is_named_at_its_control(page):
    """Issue 11, item 2: `/` as the outputs folder served /etc/passwd; the panel refuses it where it was typed."""
    from playwright.sync_api import expect

    open_tab(page, "Preferences")
    expect(page.locator("#prefs-note")).to_contain_text("Loaded from", timeout=LONG)
    page.locator("#pref-outputs_dir").locator("textarea, input").first.fill("/")
    page.locator("#prefs-save").click()
    expect(page.locator("#pref-error-outputs_dir")).to_contain_text("is refused: it is the filesystem root",
                                                                   timeout=LONG)
    expect(page.locator("#prefs-result")).to_contain_text("Nothing was saved: 1 value needs fixing")
    expect(page.locator(".toast-body")).to_have_count(0)
