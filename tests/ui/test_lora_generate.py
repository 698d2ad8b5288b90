"""A stack row reaches the image: the report lists the LoRA and the PNG's `Lora hashes` names it, once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gradio_client import Client

from studio.infotext import read_png_infotext
from tests.demo_hashes import DEMO_SHORT_HASHES
from ui.generate_tab import GenerateForm
from ui.lora_sync import prompt_from_rows, rows_from_prompt
from ui.png_info import restorable
from ui.server import launch_app

WARM = "demo-kohya-warm"
WARM_HASH = DEMO_SHORT_HASHES[WARM]


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


@pytest.mark.parametrize("tag", ["/etc/passwd", "../loras/demo-kohya-warm", "~/x", "demo-kohya-warm.safetensors",
                                 "{copy}"])
def test_through_the_api_a_lora_is_a_name_from_the_lora_folders_never_a_path(client, tmp_path, tag):
    """`<lora:/etc/shadow:1>` opened any file and echoed its first bytes (issue 11, item 1)."""
    import shutil

    from gradio_client.exceptions import AppError

    from studio.paths import DEMO_LORA_DIR

    copy = tmp_path / "elsewhere.safetensors"  # a valid LoRA, outside every LoRA folder
    shutil.copy(DEMO_LORA_DIR / f"{WARM}.safetensors", copy)
    tag = tag.format(copy=copy)
    with pytest.raises(AppError) as refused:
        client.predict(f"a boat <lora:{tag}:1>", "", 9, 2, 5.0, 64, 64, "Euler", 1, api_name="/generate")
    message = str(refused.value)
    assert "is named by its file name in the LoRA folders" in message
    assert "root:" not in message and "bytes" not in message and "no such" not in message


def test_an_unknown_lora_name_names_no_local_folder(client):
    from gradio_client.exceptions import AppError

    from studio.paths import DEMO_LORA_DIR

    with pytest.raises(AppError) as refused:
        client.predict("a boat <lora:nothere:1>", "", 9, 2, 5.0, 64, 64, "Euler", 1, api_name="/generate")
    message = str(refused.value)
    assert "no LoRA named 'nothere' in the LoRA folders" in message and str(DEMO_LORA_DIR) not in message



def test_a_visitor_through_the_public_link_gets_a_report_without_local_paths(client, tiny_session):
    """The JSON beside the PNG named the model's location, the LoRA files and the outputs folder (issue 11)."""
    from urllib.parse import urlsplit

    import httpx

    from studio.paths import DEMO_LORA_DIR

    url = client.src.rstrip("/")
    data = [f"a boat <lora:{WARM}:0.5>", "", 9, 2, 5.0, 64, 64, "Euler", 1]
    with httpx.Client(base_url=url, headers={"host": "abcd.gradio.live"}, timeout=60) as http:
        event = http.post("/gradio_api/call/generate", json={"data": data}).json()["event_id"]
        answer = http.get(f"/gradio_api/call/generate/{event}").text
        payload = json.loads(answer.split("event: complete\ndata: ", 1)[1].splitlines()[0])
        served_at = urlsplit(payload[3][0]["url"])  # built from the visitor's Host: keep the path only
        report_text = http.get(served_at.path + (f"?{served_at.query}" if served_at.query else "")).text
    report = json.loads(report_text)
    assert "location" not in report["model"] and report["lora"]["stack"][0]["path"] == f"{WARM}.safetensors"
    assert all("/" not in p for p in report["outputs"])
    for local in (str(DEMO_LORA_DIR), str(tiny_session.outputs_root), str(tiny_session.dirs.data)):
        assert local not in report_text
    mine = json.loads(Path(client.predict(data[0], *data[1:], api_name="/generate")[3][0]).read_text())
    assert mine["lora"]["stack"][0]["path"] == str(DEMO_LORA_DIR / f"{WARM}.safetensors")  # here: the full path
