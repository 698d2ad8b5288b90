"""The shipped demo LoRAs: they load cleanly on the tiny model, hash stably, and really change it."""

from __future__ import annotations

import hashlib
import importlib.util
import statistics
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from studio.lora.keymap import tiny_index
from studio.lora.reader import inspect_lora, read_lora
from studio.paths import DEMO_LORA_DIR, REPO_ROOT, TINY_MODEL_DIR

# name: (format, layers, A1111 short hash). A hash change means the shipped files changed:
# PNG infotext written with the old files would no longer point at them.
DEMOS = {
    "demo-kohya-warm": ("kohya", 216, "62853adc662c"),
    "demo-peft-cool": ("peft", 152, "8357708e33d5"),
    "demo-locon-grain": ("locon", 281, "525a25e658e1"),
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


def test_regenerating_gives_identical_files(tmp_path):
    spec = importlib.util.spec_from_file_location("make_demo_loras", REPO_ROOT / "scripts" / "make_demo_loras.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for path in script.write_demo_loras(tmp_path):
        assert path.read_bytes() == _path(path.stem).read_bytes(), path.name


def test_kohya_demo_metadata_for_the_browser():
    info = inspect_lora(_path("demo-kohya-warm"))
    assert info.trigger_words == ["warm light", "golden hour", "amber glow", "sunset"]
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


def _tiny_weights() -> dict[tuple[str, str], torch.Tensor]:
    files = {"unet": "unet/diffusion_pytorch_model.safetensors", "text_encoder": "text_encoder/model.safetensors",
             "text_encoder_2": "text_encoder_2/model.safetensors"}
    weights = {}
    for component, rel in files.items():
        for key, tensor in load_file(str(TINY_MODEL_DIR / rel)).items():
            if key.endswith(".weight"):
                weights[(component, key[: -len(".weight")])] = tensor
    return weights


@pytest.mark.parametrize("name", DEMOS)
def test_demo_deltas_are_large_enough_to_see(name):
    """A cheap stand-in for the image check in scripts/make_demo_loras.py --check.

    That check measured mean |pixel difference| at weight 1 on a 256x256, 4-step image:
    46/255 (warm), 37/255 (cool), 49/255 (grain); this keeps the deltas at that size.
    """
    weights = _tiny_weights()
    ratios = []
    for patch in read_lora(_path(name), tiny_index()).patches:
        w = weights[(patch.component, patch.module)]
        ratios.append(float(patch.delta(w.float()).norm() / w.float().norm()))
    assert statistics.median(ratios) > 0.25
