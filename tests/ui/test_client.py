"""The launched UI through gradio_client: the public API a script or another app would use."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
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


def test_a_stop_right_after_a_submit_stops_the_job_still_waiting_in_the_queue(served, client):
    """The submitted job holds no ticket until it starts: Stops sent then were lost and the job ran to
    its end (issue 11, item 6). Here it waits behind a running one, and one Stop ends both."""
    session, _ = served
    running = client.submit("long", "", 1, 200, 5.0, 128, 128, "Euler", 1, api_name="/generate")
    deadline = time.time() + 60
    while time.time() < deadline and not session.status()["busy"]:
        time.sleep(0.05)
    waiting = client.submit("next", "", 2, 200, 5.0, 128, 128, "Euler", 1, api_name="/generate")
    while time.time() < deadline and not client.predict(api_name="/status")["queued"]:
        time.sleep(0.02)
    ack = client.predict(api_name="/stop")
    assert ack.startswith("⏹ **Stop requested**") and "your queued job will not start" in ack
    assert running.result(timeout=60)[2].startswith("**Stopped** after 0 of 1 image")
    started = time.time()
    gallery, seeds, summary, jsons = waiting.result(timeout=60)
    assert summary.startswith("**Stopped** after 0 of 1 image") and time.time() - started < 20
    assert all(r.request["prompt"] != "next" for r in session.history)  # it never generated


def test_errors_reach_the_client_as_one_message(client):
    with pytest.raises(AppError, match="`width` must be a multiple of 8"):
        client.predict("x", "", 1, 2, 5.0, 100, 128, "Euler", 1, api_name="/generate")
    with pytest.raises(AppError, match="`batch count` must be between 1 and 16, got 40"):
        _generate(client, batch=40)


NAN = float("nan")


def _raw_generate(url: str, values: dict) -> str:
    """POST /generate as a hand-made request: json.dumps writes NaN, which gradio_client refuses to send."""
    data = [values.get("prompt", "a cat"), "", values.get("seed", 5), values.get("steps", 2), values.get("cfg", 5.0),
            values.get("width", 128), 128, "Euler", values.get("batch", 1)]
    with httpx.Client(base_url=url, timeout=60) as http:
        event = http.post("/gradio_api/call/generate", content=json.dumps({"data": data}),
                          headers={"content-type": "application/json"}).json()["event_id"]
        return http.get(f"/gradio_api/call/generate/{event}").text


@pytest.mark.parametrize("field, value, message", [
    ("steps", 2.5, "`steps` must be a whole number, got 2.5"),  # ran 2 steps
    ("seed", 1.5, "`seed` must be a whole number, got 1.5"),  # became 2
    ("steps", NAN, "`steps` must be a whole number, got nan"),  # `error: null`
    ("width", NAN, "`width` must be a whole number, got nan"),
    ("seed", NAN, "`seed` must be a whole number, got nan"),
    ("seed", "abc", "`seed` must be a whole number, got 'abc'"),  # Gradio's generic message
    ("batch", 1.5, "`batch count` must be a whole number, got 1.5"),
    ("cfg", NAN, "`cfg` must be a number, got nan"),
    ("prompt", "a cat " * 1400, "`prompt` is 8,400 characters long; the limit is 8,000"),  # 1 MB was accepted
])
def test_numbers_are_never_bent_and_each_refusal_names_its_field(served, field, value, message):
    """Issue 11, item 8: through the Gradio API, as a hand-made request sends them."""
    answer = _raw_generate(served[1], {field: value})
    assert "event: error" in answer and message in answer


def test_a_script_through_gradio_client_gets_the_same_refusal(client):
    with pytest.raises(AppError, match="`steps` must be a whole number, got 2.5"):
        _generate(client, steps=2.5)


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
