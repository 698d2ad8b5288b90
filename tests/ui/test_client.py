"""The launched UI through gradio_client: the public API a script or another app would use."""

from __future__ import annotations

import time

import pytest
from gradio_client import Client
from PIL import Image

from studio.metadata import PNG_KEY
from ui.server import launch_app


@pytest.fixture(scope="module")
def served(tiny_session):
    app, url = launch_app(tiny_session, quiet=True)
    yield tiny_session, url
    app.close()


def test_generate_returns_a_png_with_metadata_and_a_report(served):
    session, url = served
    client = Client(url, verbose=False, analytics_enabled=False)
    names = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/generate", "/stop"} <= names.keys()
    gallery, report, seed = client.predict("a cat", "", 5, 3, 5.0, 256, 256, "Euler", api_name="/generate")
    assert seed == 5
    path = gallery[0]["image"]
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (256, 256)
        assert "Seed: 5" in img.info[PNG_KEY]
    assert "denoise" in report and "peak RAM" in report


def test_progress_is_reported_per_step_and_stop_cancels(served):
    session, url = served
    client = Client(url, verbose=False, analytics_enabled=False)
    job = client.submit("long", "", 1, 150, 5.0, 256, 256, "Euler", api_name="/generate")
    deadline = time.time() + 60
    progress = []
    while time.time() < deadline and not progress:
        status = job.status()
        progress = [u for u in (status.progress_data or []) if u.unit == "steps" and u.index]
        time.sleep(0.1)
    assert progress and progress[0].length == 150
    assert client.predict(api_name="/stop").startswith("Stopping")
    _, report, _ = job.result(timeout=60)
    assert report.startswith("**Stopped.**")
    assert session.status()["busy"] is False


def test_errors_reach_the_client_as_one_message(served):
    _, url = served
    client = Client(url, verbose=False, analytics_enabled=False)
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="`width` must be a multiple of 8"):
        client.predict("x", "", 1, 2, 5.0, 100, 256, "Euler", api_name="/generate")
