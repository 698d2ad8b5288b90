"""The model picker's list and what it loads: checkpoints, diffusers folders, separate VAEs, refusals.

A temp model folder holds the tiny SDXL as a single file and as a diffusers folder, its VAE
in both layouts (one of them changed, so a test can see which VAE decoded), a LoRA, a
pickle and a VAE of the wrong shape.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from studio.choices import Precision
from studio.errors import ModelLoadError
from studio.infotext import read_png_infotext
from studio.models import sgm_keys
from studio.models.catalog import EntryKind, ModelCatalog
from studio.models.single_file import save_single_file
from studio.paths import AppDirs, DEMO_LORA_DIR, TINY_MODEL_DIR
from studio.request import GenerationRequest
from studio.settings import Settings


@pytest.fixture(scope="module")
def tiny_pipe() -> Any:
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(TINY_MODEL_DIR, torch_dtype=torch.float32, local_files_only=True)


def _params(pipe: Any) -> int:
    return sum(t.numel() for part in ("unet", "vae", "text_encoder", "text_encoder_2")
               for t in getattr(pipe, part).state_dict().values())


@pytest.fixture(scope="module")
def models(tiny_pipe, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    save_single_file(tiny_pipe, root / "tiny-single.safetensors")
    shutil.copytree(TINY_MODEL_DIR, root / "family" / "tiny-folder")
    vae_state = {k: v.clone() for k, v in tiny_pipe.vae.state_dict().items()}
    vae_state["decoder.conv_out.bias"] += 0.6  # a visibly brighter VAE: which one decoded is in the pixels
    original = sgm_keys.to_sgm("vae", vae_state, tiny_pipe.vae.config)
    (root / "vae").mkdir()
    save_file({k.removeprefix(sgm_keys.VAE_PREFIX): v.contiguous() for k, v in original.items()},
              str(root / "vae" / "bright-vae.safetensors"))
    shutil.copytree(TINY_MODEL_DIR / "vae", root / "vae" / "plain-vae")
    wrong = {k: v.contiguous() for k, v in vae_state.items()}
    wrong["decoder.conv_in.weight"] = torch.zeros(8, 4, 3, 3)
    save_file(wrong, str(root / "vae" / "other-family-vae.safetensors"))
    shutil.copy(DEMO_LORA_DIR / "demo-kohya-warm.safetensors", root / "a-lora.safetensors")
    (root / "old.ckpt").write_bytes(b"\x80\x04K\x01.")
    return root


def test_the_picker_lists_checkpoints_folders_and_vaes_with_their_memory(models, tiny_pipe):
    catalog = ModelCatalog()
    entries = {e.name: e for e in catalog.scan([models])}
    assert {e.name for e in catalog.models() if e.usable} == {"tiny-single", "tiny-folder"}
    assert {e.name for e in catalog.vaes()} == {"bright-vae", "plain-vae", "other-family-vae"}
    single, folder = entries["tiny-single"], entries["tiny-folder"]
    assert (single.kind, single.detail) == (EntryKind.CHECKPOINT, "tiny-sdxl")
    assert folder.kind is EntryKind.FOLDER and folder.path == models / "family" / "tiny-folder"
    params = _params(tiny_pipe)
    # counted from the headers alone (the single file also holds TE position ids: 78 numbers more)
    assert folder.params == params and 0 <= single.params - params <= 100
    assert single.memory_bytes(2) == 2 * single.params  # bf16
    assert entries["bright-vae"].detail == "original layout"
    assert "looks like a LoRA" in entries["a-lora"].reason
    assert "pickle" in entries["old"].reason
    reads = catalog.reads
    catalog.scan([models])
    assert catalog.reads == reads  # unchanged files are not read again


def _session(tmp_path: Path, **settings):
    from studio.session import Session

    dirs = AppDirs(config=tmp_path / "c", data=tmp_path / "d", cache=tmp_path / "cache")
    for folder in (dirs.config, dirs.data, dirs.cache):
        folder.mkdir(parents=True, exist_ok=True)
    return Session(Settings(device="cpu", precision=Precision.FP32, **settings), dirs)


def test_a_separate_vae_decodes_and_is_named_in_the_png(models, tmp_path):
    session = _session(tmp_path, model=str(models / "tiny-single.safetensors"))
    try:
        request = GenerationRequest(prompt="a cat", seed=5, steps=2, width=64, height=64)
        stages: list[str] = []
        own = session.generate(request, out_path=tmp_path / "own.png")
        info = session.load_model(str(models / "tiny-single.safetensors"),
                                  vae=str(models / "vae" / "bright-vae.safetensors"),
                                  on_progress=lambda stage, fraction: stages.append(stage))
        assert info.vae_name == "bright-vae.safetensors" and session.settings.vae.endswith("bright-vae.safetensors")
        assert stages[0] == "read" and {"vae", "hash", "place", "preview"} <= set(stages)
        bright = session.generate(request, out_path=tmp_path / "bright.png")
        pixels = [np.asarray(Image.open(result.paths[0]), float) for result in (bright, own)]
        lift = pixels[0].mean() - pixels[1].mean()
        assert lift > 20  # the changed VAE's bias really decoded this image
        assert read_png_infotext(bright.paths[0]).params["VAE"] == "bright-vae.safetensors"
        assert bright.report.model["vae"] == "bright-vae.safetensors"
        session.load_model(str(models / "family" / "tiny-folder"), vae=str(models / "vae" / "plain-vae"))
        plain = session.generate(request, out_path=tmp_path / "plain.png")
        assert np.array_equal(np.asarray(Image.open(plain.paths[0])), np.asarray(Image.open(own.paths[0])))
        with pytest.raises(ModelLoadError, match="other-family-vae.safetensors: does not fit this model's VAE: "
                                                 r"decoder.conv_in.weight is \[8, 4, 3, 3\]"):
            session.load_model(vae=str(models / "vae" / "other-family-vae.safetensors"))
    finally:
        session.close()
