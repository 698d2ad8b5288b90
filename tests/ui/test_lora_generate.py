"""A stack row reaches the image: the report lists the LoRA and the PNG's `Lora hashes` names it, once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gradio_client import Client

from studio.infotext import read_png_infotext
from ui.generate_tab import GenerateForm
from ui.lora_sync import prompt_from_rows, rows_from_prompt
from ui.png_info import restorable
from ui.server import launch_app

WARM = "demo-kohya-warm"
WARM_HASH = "62853adc662c"


def _row(name: str, weight: float, enabled: bool = True) -> dict:
    return {"name": name, "weight": weight, "enabled": enabled}


def test_an_enabled_row_is_applied_once_and_a_disabled_one_is_not(tiny_session, tmp_path):
    rows = [_row(WARM, 0.75), _row("demo-peft-cool", 1.0, enabled=False)]
    prompt = prompt_from_rows("a red door", rows)
    assert prompt == f"a red door <lora:{WARM}:0.75>"
    form = GenerateForm.from_ui(prompt, rows, seed=3, steps=2, width=64, height=64)
    assert form.prompt == "a red door" and form.loras == ((WARM, 0.75),)
    result = tiny_session.generate(form.requests()[0], out_path=tmp_path / "row.png")
    assert [(r["name"], r["weight"]) for r in result.report.lora["stack"]] == [(WARM, 0.75)]
    info = read_png_infotext(result.paths[0])
    assert info.params["Lora hashes"] == f"{WARM}: {WARM_HASH}"
    assert info.prompt == f"a red door <lora:{WARM}:0.75>"  # one tag: not applied twice
    # PNG info -> Send to Generate rebuilds the same row from that prompt
    assert rows_from_prompt(info.prompt, []) == [_row(WARM, 0.75)]
    assert "seed" in restorable(info)[0]


@pytest.fixture(scope="module")
def client(tiny_session):
    running = launch_app(tiny_session, quiet=True)
    yield Client(running.local_url, verbose=False, analytics_enabled=False)
    running.close()


def test_an_api_caller_without_rows_gets_its_prompt_tags_as_the_stack(client):
    gallery, seeds, summary, jsons = client.predict(f"a boat <lora:{WARM}:0.5>", "", 9, 2, 5.0, 64, 64, "Euler", 1,
                                                    api_name="/generate")
    report = json.loads(Path(jsons[0]).read_text())
    assert report["request"]["prompt"] == "a boat" and report["request"]["loras"] == [[WARM, 0.5]]
    assert [row["name"] for row in report["lora"]["stack"]] == [WARM]
    assert read_png_infotext(Path(gallery[0]["image"])).params["Lora hashes"] == f"{WARM}: {WARM_HASH}"
