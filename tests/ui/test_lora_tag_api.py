"""LoRA tags through the public API: a tag that does not parse is one clear error (issue 11 item 7),
and block weights reach the image's metadata."""

from __future__ import annotations

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image

from studio.infotext import PNG_KEY


@pytest.fixture
def client(served):
    return Client(served[1], verbose=False, analytics_enabled=False)


def _generate(client: Client, prompt: str):
    return client.predict(prompt, "", 5, 2, 5.0, 64, 64, "Euler", 1, api_name="/generate")


@pytest.mark.parametrize("tag, words", [
    ("<lora:demo-kohya-warm:1e30>", ["demo-kohya-warm", "between -4 and 4"]),
    ("<lora:demo-kohya-warm:nan>", ["demo-kohya-warm", "must be a number"]),
    ("<lora:demo-kohya-warm:1:lbw=1,0,1>", ["demo-kohya-warm", "12 values"]),
])
def test_a_tag_that_does_not_parse_is_one_error_and_no_image(served, client, tag, words):
    session, _ = served
    before = sum(1 for _ in session.dirs.default_outputs.rglob("*.png")) if session.dirs.default_outputs.exists() else 0
    with pytest.raises(AppError) as err:
        _generate(client, f"a cat {tag}")
    assert all(w in str(err.value) for w in words), str(err.value)
    after = sum(1 for _ in session.dirs.default_outputs.rglob("*.png")) if session.dirs.default_outputs.exists() else 0
    assert after == before


def test_block_weights_and_a_step_range_reach_the_png(client):
    gallery, _seeds, summary, _jsons = _generate(client, "a cat <lora:demo-kohya-warm:0.9:lbw=OUTD:stop=1>")
    with Image.open(gallery[0]["image"]) as img:
        assert "<lora:demo-kohya-warm:0.9:lbw=OUTD:stop=1>" in img.info[PNG_KEY]
