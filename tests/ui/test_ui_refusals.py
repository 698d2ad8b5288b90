"""A refusal is one line in the log and one message for the visitor; a traceback only for a bug (issue 11, item 9)."""

from __future__ import annotations

import json
import logging

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError


def _raw(url: str, api_name: str, data: list, host: str | None = None) -> str:
    headers = {"content-type": "application/json", **({"host": host} if host else {})}
    with httpx.Client(base_url=url, timeout=60, headers=headers) as http:
        event = http.post(f"/gradio_api/call/{api_name}", content=json.dumps({"data": data})).json()["event_id"]
        return http.get(f"/gradio_api/call/{api_name}/{event}").text


def test_thirteen_refusals_log_thirteen_lines_and_no_traceback(served, capfd, caplog):
    session, url = served
    client = Client(url, verbose=False, analytics_enabled=False)
    # (a PNG without parameters is no refusal since issue 13: /png_info answers what the file is)

    capfd.readouterr()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        refusals = [
            lambda: client.predict("a cat", "", 5, 2.5, 5.0, 64, 64, "Euler", 1, api_name="/generate"),
            lambda: client.predict("a cat", "", 5, 2, 5.0, 100, 64, "Euler", 1, api_name="/generate"),
            lambda: client.predict("a cat", "", 5, 2, 5.0, 64, 64, "Euler", 40, api_name="/generate"),
            lambda: client.predict("a cat", "", 5, 2, 5.0, 64, 64, "Heun", 1, api_name="/generate"),
            lambda: client.predict("x" * 9000, "", 5, 2, 5.0, 64, 64, "Euler", 1, api_name="/generate"),
            lambda: client.predict("<lora:/etc/passwd:1>", "", 5, 2, 5.0, 64, 64, "Euler", 1, api_name="/generate"),
            lambda: client.predict("<lora:nothere:1>", "", 5, 2, 5.0, 64, 64, "Euler", 1, api_name="/generate"),
            lambda: client.predict({"lora_dirs": ["/no/such/lora/folder"]}, api_name="/save_preferences"),
            lambda: client.predict({"default_steps": 0}, api_name="/save_preferences"),
            lambda: client.predict({"colour": "blue"}, api_name="/save_preferences"),
            lambda: client.predict({"outputs_dir": "/"}, api_name="/save_preferences"),
        ]
        for refuse in refusals:
            with pytest.raises(AppError):
                refuse()
        raw = [_raw(url, "generate", ["a cat", "", "abc", 2, 5.0, 64, 64, "Euler", 1]),
               _raw(url, "save_preferences", [{"default_steps": 3}], host="abcd.gradio.live")]
        assert all("event: error" in answer for answer in raw)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    lines = [r.getMessage() for r in caplog.records if r.name == "ui.errors"]
    assert len(lines) == 13 and all(line.startswith("refused: ") and "\n" not in line for line in lines), lines
    assert session.status()["busy"] is False


def test_an_engine_fault_keeps_its_traceback_in_the_log_and_the_visitor_gets_its_message(caplog):
    import gradio as gr

    from studio.errors import PristineCorrupted
    from ui.errors import engine_call

    with pytest.raises(gr.Error, match="reload the model"):
        with engine_call():
            raise PristineCorrupted("unet: 3 tensors were written while at rest; reload the model")
    [record] = [r for r in caplog.records if r.name == "ui.errors"]
    assert record.levelno == logging.ERROR and record.exc_info is not None
