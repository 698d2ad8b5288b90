"""The shipped demo LoRAs as files: they load cleanly on the tiny model, hash stably, and are what our writers write.

What they do to an image (warm, cool, grain, more with weight) is tested in tests/test_demo_model.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from studio.demo_vocab import WARM_TRIGGER
from studio.lora import writers
from studio.lora.keymap import tiny_index
from studio.lora.reader import inspect_lora, read_lora
from studio.paths import DEMO_LORA_DIR
from tests.demo_hashes import DEMO_SHORT_HASHES

# name: (format, layers, A1111 short hash).
DEMOS = {
    "demo-kohya-warm": ("kohya", 216, DEMO_SHORT_HASHES["demo-kohya-warm"]),
    "demo-peft-cool": ("peft", 152, DEMO_SHORT_HASHES["demo-peft-cool"]),
    "demo-locon-grain": ("locon", 281, DEMO_SHORT_HASHES["demo-locon-grain"]),
}


def _path(name: str) -> Path:
    return DEMO_LORA_DIR / f"{name}.safetensors"


@pytest.mark.parametrize("name", DEMOS)
def test_demo_loads_with_every_key_matched(name):
    fmt, layers, short_hash = DEMOS[name]
    path = _path(name)
    assert path.stat().st_size < 1_000_000
    lora = read_lora(path, tiny_index())
    assert (lora.format, len(lora.patches), lora.unmatched_keys, lora.base_model) == (fmt, layers, [], "sdxl")
    assert {p.component for p in lora.patches} == {"unet", "text_encoder", "text_encoder_2"}
    assert lora.short_hash == short_hash


@pytest.mark.parametrize("name", DEMOS)
def test_short_hash_is_sha256_of_the_tensor_bytes(name):
    data = _path(name).read_bytes()
    header_length = int.from_bytes(data[:8], "little")
    assert hashlib.sha256(data[8 + header_length:]).hexdigest()[:12] == DEMOS[name][2]


@pytest.mark.parametrize("name", DEMOS)
def test_shipped_files_are_byte_for_byte_what_our_writer_writes(name):
    """Deterministic files: the same tensors and metadata serialise to the same bytes (sorted metadata)."""
    path = _path(name)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert writers.serialize(load_file(str(path)), metadata) == path.read_bytes()


def test_kohya_demo_metadata_for_the_browser():
    info = inspect_lora(_path("demo-kohya-warm"))
    assert info.trigger_words == [WARM_TRIGGER]  # taught by training (tests/test_demo_model.py)
    tags = json.loads(info.metadata["ss_tag_frequency"])
    assert list(tags.values())[0][WARM_TRIGGER] > 0  # how many training captions carried it
    assert info.thumbnail is not None and info.thumbnail[0] == "image/png"
    assert info.thumbnail[1].startswith(b"\x89PNG\r\n\x1a\n")
    assert info.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert "modelspec.thumbnail" not in info.metadata  # the browser gets it decoded, not as text
    assert (info.base_model, info.format, info.short_hash) == ("sdxl", "kohya", None)  # hash only on request
    assert inspect_lora(_path("demo-kohya-warm"), with_hash=True).short_hash == DEMOS["demo-kohya-warm"][2]


def test_peft_demo_scale_comes_from_the_metadata():
    lora = read_lora(_path("demo-peft-cool"), tiny_index())
    raw = load_file(str(_path("demo-peft-cool")))
    for patch in lora.patches[:5]:
        prefix = f"{patch.component}.{patch.module}"
        expected = raw[f"{prefix}.lora_B.weight"] @ raw[f"{prefix}.lora_A.weight"] * 2.0  # lora_alpha 8 / r 4
        assert torch.equal(patch.delta(torch.empty(0)), expected)


def test_locon_demo_trains_3x3_convolutions_too():
    lora = read_lora(_path("demo-locon-grain"), tiny_index())
    kernels = {tuple(p.weight_shape[2:]) for p in lora.patches if len(p.weight_shape) == 4}
    assert {(3, 3), (1, 1)} <= kernels
    assert json.loads(lora.metadata["ss_network_args"])["algo"] == "locon"


@pytest.mark.parametrize("name", DEMOS)
def test_every_unet_layer_was_trained(name):
    """Up factors start at zero, so a UNet layer still at zero would be dead weight in the file.

    (TE1's last layer does stay at zero, as in any SDXL LoRA: SDXL reads TE1's penultimate
    hidden states, so no gradient reaches it.)
    """
    for patch in read_lora(_path(name), tiny_index()).patches:
        if patch.component == "unet":
            assert patch.up.abs().max() > 0, f"{patch.module} never trained"
