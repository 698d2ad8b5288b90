from __future__ import annotations

import pytest
from PIL import Image

from studio.errors import SettingsError
from studio.infotext import format_infotext, parse_infotext, read_png_infotext, save_png, split_lora_tags
from studio.request import GenerationRequest


def _text(request: GenerationRequest, **extra) -> str:
    return format_infotext(request, width=832, height=1216, model_name="sd_xl_base_1.0", model_hash="31e35c80fc",
                           **extra)


def test_a1111_layout():
    request = GenerationRequest(prompt="a cat, in a hat", negative="blurry", seed=42, steps=30, cfg=7.0)
    assert _text(request).split("\n") == [
        "a cat, in a hat",
        "Negative prompt: blurry",
        "Steps: 30, Sampler: Euler, CFG scale: 7, Seed: 42, Size: 832x1216, Model hash: 31e35c80fc, "
        "Model: sd_xl_base_1.0",
    ]


@pytest.mark.parametrize("prompt,negative", [
    ("plain", ""),
    ("multi\nline prompt, with: colons", "neg, with \"quotes\""),
    ("Steps: 5, Seed: 9, Size: 1x1 looks like params", ""),
])
def test_round_trip_into_a_request(prompt, negative):
    request = GenerationRequest(prompt=prompt, negative=negative, seed=123456789, steps=17, cfg=4.5,
                                width=832, height=1216, sampler="DPM++ 2M Karras", loras=(("style-a", 0.8),))
    text = _text(request, lora_hashes={"style-a": "0123456789ab"}, version="lora-studio 0.1.0")
    info = parse_infotext(text)
    assert info.params["Lora hashes"] == "style-a: 0123456789ab"
    assert info.params["Model hash"] == "31e35c80fc"
    assert info.to_request() == request


def test_reads_an_a1111_forge_string():
    text = ('masterpiece, <lora:detail:0.6> portrait\nNegative prompt: lowres\nSteps: 25, Sampler: Euler a, '
            'Schedule type: Automatic, CFG scale: 6.5, Seed: 3456, Size: 1024x1024, Model hash: abcdef1234, '
            'Model: juggernaut, Lora hashes: "detail: 1234abcd5678", Version: f2.0.1')
    request = parse_infotext(text).to_request()
    assert request.prompt == "masterpiece, portrait"
    assert request.loras == (("detail", 0.6),)
    assert (request.steps, request.sampler, request.cfg, request.seed) == (25, "Euler a", 6.5, 3456)
    assert (request.width, request.height, request.negative) == (1024, 1024, "lowres")


def test_lora_tags_are_split_from_the_prompt():
    assert split_lora_tags("a <lora:x:1> cat <lora:y-2:-0.5>") == ("a cat", [("x", 1.0), ("y-2", -0.5)])


def test_png_round_trip_and_missing_text(tmp_path):
    request = GenerationRequest(prompt="p", seed=1, steps=2)
    image = Image.new("RGB", (8, 8), (10, 20, 30))
    save_png(image, tmp_path / "a.png", _text(request))
    assert read_png_infotext(tmp_path / "a.png").to_request().prompt == "p"
    image.save(tmp_path / "bare.png")
    with pytest.raises(SettingsError, match="has no generation parameters"):
        read_png_infotext(tmp_path / "bare.png")
