"""The launched UI through gradio_client: the public API a script or another app would use."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from studio.infotext import PNG_KEY

PUBLIC = {"/generate", "/stop", "/png_info", "/save_preferences", "/reset_preferences", "/preferences", "/status"}


@pytest.fixture
def client(served):
    return Client(served[1], verbose=False, analytics_enabled=False)


def _generate(client: Client, prompt: str = "a cat", seed: int = 5, steps: int = 2, size: int = 128,
              batch: int = 1, **kw):
    return client.predict(prompt, kw.get("negative", ""), seed, steps, 5.0, size, size, kw.get("sampler", "Euler"),
                          batch, api_name="/generate")


def test_the_public_endpoints_are_exactly_these(client):
    assert set(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == PUBLIC


def test_a_batch_returns_pngs_with_metadata_and_a_json_report_next_to_each(served, client):
    session, _ = served
    gallery, seeds, summary, jsons = _generate(client, seed=5, batch=2)
    assert seeds == "Seeds: 5, 6" and "seed 6" in summary
    for item, seed in zip(gallery, (5, 6)):
        with Image.open(item["image"]) as img:
            assert img.format == "PNG" and img.size == (128, 128)
            assert f"Seed: {seed}" in img.info[PNG_KEY]
    assert [Path(p).name for p in jsons] == [Path(g["image"]).with_suffix(".json").name for g in gallery]
    report = json.loads(Path(jsons[1]).read_text())
    assert report["request"]["seed"] == 6 and "denoise" in report["phases"]
    outputs = session.dirs.default_outputs
    assert any(p.name == Path(jsons[0]).name for p in outputs.rglob("*.json"))  # written beside the PNG


def test_progress_arrives_per_step_and_stop_ends_the_run(served, client):
    session, _ = served
    job = client.submit("long", "", 1, 200, 5.0, 128, 128, "Euler", 3, api_name="/generate")
    progress, deadline = [], time.time() + 60
    while time.time() < deadline and not progress:
        progress = [u for u in (job.status().progress_data or []) if u.unit == "steps" and u.index]
        time.sleep(0.05)
    assert progress and progress[0].length == 600  # steps counted over the whole batch
    assert re.fullmatch(r"image 1 of 3: denoise step \d+/200 · ETA [\d.]+ (s|min \d+ s)", progress[0].desc)
    ack = client.predict(api_name="/stop")
    assert ack.startswith("⏹ **Stop requested**")
    gallery, seeds, summary, jsons = job.result(timeout=60)
    assert summary.startswith("**Stopped** after 0 of 3 images")
    assert session.status()["busy"] is False
    assert client.predict(api_name="/stop") == "Nothing of yours is running."


def test_errors_reach_the_client_as_one_message(client):
    with pytest.raises(AppError, match="`width` must be a multiple of 8"):
        client.predict("x", "", 1, 2, 5.0, 100, 128, "Euler", 1, api_name="/generate")
    with pytest.raises(AppError, match="greater than maximum value 16"):  # Gradio checks slider bounds first
        _generate(client, batch=40)


def test_png_info_reads_back_what_generate_wrote(client, tmp_path):
    gallery, *_ = _generate(client, prompt="a red door", negative="fog", seed=77)
    prompt, negative, table, note, preview = client.predict(handle_file(gallery[0]["image"]), api_name="/png_info")
    assert (prompt, negative) == ("a red door", "fog")
    params = dict(table["data"])
    assert params["Seed"] == "77" and params["Size"] == "128x128" and params["Sampler"] == "Euler"
    assert "is a 128×128 PNG" in note and "generation parameters, made by lora-studio" in note and preview
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    *_, note, preview = client.predict(handle_file(str(plain)), api_name="/png_info")
    assert note.startswith("**plain.png** is a 8×8 PNG") and "without generation parameters" in note and preview


def test_a_file_that_is_not_an_image_is_named_in_one_line_without_an_error(client, tmp_path):
    fake = tmp_path / "holiday.png"
    fake.write_text("<!DOCTYPE html><html>not a picture</html>")
    prompt, negative, table, note, preview = client.predict(handle_file(str(fake)), api_name="/png_info")
    assert (prompt, negative, table["data"], preview) == ("", "", [], None)
    assert note.startswith("⚠ **holiday.png** is not an image: it starts with the text `<!DOCTYPE html><html>not")
    assert len(note.splitlines()) == 1


def test_status_is_cheap_and_says_idle_or_busy(client):
    status = client.predict(api_name="/status")
    assert status["busy"] is False and status["waiting"] == 0 and status["queued"] == 0
    assert status["rss"] > 0 and status["public_link"] == "off"
