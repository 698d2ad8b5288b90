"""Baking a LoRA stack: the written model holds exactly the patched weights, the live one is untouched.

The tiny SDXL (float32, from its diffusers folder) with two demo LoRAs. "Patched weights" are
what LoraPatcher gives for the stack on a private copy of the components, so the folder must
equal generation-time weights bit for bit, and differ from pristine where the LoRAs touch.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from studio.bake import BAKE_INFO, bake
from studio.errors import InputError, LoraError, StudioError
from studio.lora.base import LoraFile
from studio.lora.keymap import ModelIndex
from studio.choices import LoraMode
from studio.lora.patcher import LoraPatcher, PatcherSettings
from studio.lora.reader import read_lora
from studio.models.architectures import TINY_DEFAULT_SIZE
from studio.paths import DEMO_LORA_DIR, TINY_MODEL_DIR

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
ALL = (*COMPONENTS, "vae")


@pytest.fixture(scope="module")
def pipe() -> Any:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(TINY_MODEL_DIR, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def stack(pipe: Any) -> list[tuple[LoraFile, float]]:
    index = ModelIndex.from_modules({c: getattr(pipe, c) for c in COMPONENTS})
    return [(read_lora(DEMO_LORA_DIR / "demo-kohya-warm.safetensors", index), 0.8),
            (read_lora(DEMO_LORA_DIR / "demo-peft-cool.safetensors", index), -0.5)]


def _state(pipe: Any, components: tuple[str, ...] = ALL) -> dict[str, dict[str, torch.Tensor]]:
    return {c: {k: v.detach().clone() for k, v in getattr(pipe, c).state_dict().items()} for c in components}


def _patched(pipe: Any, stack: list[tuple[LoraFile, float]]) -> dict[str, dict[str, torch.Tensor]]:
    """The weights generation uses for `stack`: the patcher on deep copies (the live pipe is not touched)."""
    comps = {c: copy.deepcopy(getattr(pipe, c)) for c in COMPONENTS}
    with LoraPatcher(comps) as patcher:
        patcher.apply(stack)
        return {c: {k: v.detach().clone() for k, v in m.state_dict().items()} for c, m in comps.items()}


def _assert_same(got: dict[str, dict[str, torch.Tensor]], want: dict[str, dict[str, torch.Tensor]]) -> None:
    for comp, tensors in want.items():
        assert set(got[comp]) == set(tensors), f"{comp}: different keys"
        bad = [k for k, v in tensors.items() if not torch.equal(got[comp][k], v)]
        assert bad == [], f"{comp}: {len(bad)} tensors differ, e.g. {bad[:3]}"


def _no_partials(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".partial")]


def test_baked_folder_holds_the_patched_weights_and_the_live_pipe_is_unchanged(pipe, stack, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    before = _state(pipe)
    expected = _patched(pipe, stack)
    result = bake(pipe, stack, tmp_path / "baked")

    _assert_same(_state(pipe), before)  # bit-identical live model, VAE included
    assert result.out_dir == tmp_path / "baked" and result.single_file is None
    assert [(s["name"], s["weight"]) for s in result.stack] == [("demo-kohya-warm", 0.8), ("demo-peft-cool", -0.5)]
    assert _no_partials(tmp_path) == []
    loaded = StableDiffusionXLPipeline.from_pretrained(result.out_dir, torch_dtype=torch.float32,
                                                      local_files_only=True)
    got = _state(loaded, COMPONENTS)
    _assert_same(got, expected)
    assert not any("lora" in k for c in got for k in got[c])  # plain weights, no adapter wrappers
    touched = {(p.component, f"{p.module}.weight") for lora, _ in stack for p in lora.patches}
    assert len(touched) == result.modules_patched > 100
    changed = {(c, k) for c in COMPONENTS for k, v in got[c].items() if not torch.equal(v, before[c][k])}
    # differs from pristine exactly where the LoRAs change something (TE1's last layer gets no gradient
    # in SDXL training, so a trained LoRA's delta there is zero)
    moving = {(p.component, f"{p.module}.weight") for lora, _ in stack for p in lora.patches
              if torch.count_nonzero(p.delta(before[p.component][f"{p.module}.weight"].float()))}
    assert changed == moving and len(moving) > 100
    assert loaded.tokenizer is not None and loaded.tokenizer_2 is not None and loaded.scheduler is not None
    info = json.loads((result.out_dir / BAKE_INFO).read_text())
    assert [s["short_hash"] for s in info["stack"]] == [lora.short_hash for lora, _ in stack]


def test_single_file_export_loads_back_with_equal_weights(pipe, stack, tmp_path):
    from studio.models.single_file import load_single_file

    before = _state(pipe)
    expected = _patched(pipe, stack)
    result = bake(pipe, stack, tmp_path / "baked", single_file=tmp_path / "baked.safetensors")
    _assert_same(_state(pipe), before)
    assert result.single_file == tmp_path / "baked.safetensors"
    assert not (tmp_path / "baked.safetensors.partial").exists()
    _assert_same(_state(load_single_file(result.single_file, torch.float32), COMPONENTS), expected)


def test_single_file_inside_the_folder_is_written_with_it(pipe, stack, tmp_path):
    from studio.models.single_file import load_single_file

    result = bake(pipe, stack[:1], tmp_path / "out", single_file=tmp_path / "out" / "ckpt" / "m.safetensors")
    assert (tmp_path / "out" / "model_index.json").is_file()
    loaded = load_single_file(tmp_path / "out" / "ckpt" / "m.safetensors", torch.float32)
    _assert_same(_state(loaded, COMPONENTS), _patched(pipe, stack[:1]))
    assert result.bytes_written > 0


def test_a_non_empty_folder_is_refused_and_nothing_changes(pipe, stack, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "model_index.json").write_text("{}")
    before = _state(pipe)
    with pytest.raises(StudioError, match="is not empty; baking never overwrites"):
        bake(pipe, stack, out)
    assert [p.name for p in out.iterdir()] == ["model_index.json"]
    assert (out / "model_index.json").read_text() == "{}"
    _assert_same(_state(pipe), before)
    assert _no_partials(tmp_path) == []


def test_an_empty_existing_folder_is_used(pipe, stack, tmp_path):
    (tmp_path / "empty").mkdir()
    assert (bake(pipe, stack[:1], tmp_path / "empty").out_dir / "model_index.json").is_file()


@pytest.mark.parametrize("name, match", [("exists.safetensors", "already exists"), ("model.ckpt", "must end in")])
def test_bad_single_file_targets_are_refused_before_any_work(pipe, stack, tmp_path, name, match):
    (tmp_path / "exists.safetensors").write_bytes(b"x")
    with pytest.raises(InputError, match=match):
        bake(pipe, stack, tmp_path / "out", single_file=tmp_path / name)
    assert not (tmp_path / "out").exists() and _no_partials(tmp_path) == []


def test_a_failed_write_leaves_nothing_and_restores_the_model(pipe, stack, tmp_path, monkeypatch):
    before = _state(pipe)
    seen: dict[str, bool] = {}

    def broken_save(*args: Any, **kwargs: Any) -> None:
        seen["patched"] = not torch.equal(pipe.unet.down_blocks[1].attentions[0].proj_in.weight,
                                          before["unet"]["down_blocks.1.attentions.0.proj_in.weight"])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipe, "save_pretrained", broken_save)
    with pytest.raises(StudioError, match="No space left on device; nothing was written|No space left"):
        bake(pipe, stack, tmp_path / "out", single_file=tmp_path / "out.safetensors")
    assert seen["patched"]  # the failure came while the stack was merged
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.safetensors").exists()
    assert _no_partials(tmp_path) == []
    _assert_same(_state(pipe), before)


def test_the_session_patchers_get_their_own_stack_and_settings_back(pipe, stack, tmp_path):
    """With the session's patchers (one per memory phase, as the engine binds them): the bake starts
    from pristine, and each patcher's stack and settings come back afterwards."""
    from diffusers import StableDiffusionXLPipeline

    pristine = _state(pipe)
    expected = _patched(pipe, stack[:1])
    settings = PatcherSettings(mode=LoraMode.MERGED, unpatch_lora_by_vram_offload=True)
    phases = [LoraPatcher({c: getattr(pipe, c) for c in names}, settings, partial=True)
              for names in (("text_encoder", "text_encoder_2"), ("unet",))]
    try:
        for p in phases:
            p.apply(stack[1:])  # the session currently generates with the peft LoRA only
        during = _state(pipe, COMPONENTS)
        bake(pipe, stack[:1], tmp_path / "baked", patchers=phases)
        for p in phases:
            assert p.settings == settings and [w for _, w in p.applied] == [-0.5]
        _assert_same(_state(pipe, COMPONENTS), during)
        loaded = StableDiffusionXLPipeline.from_pretrained(tmp_path / "baked", torch_dtype=torch.float32,
                                                          local_files_only=True)
        _assert_same(_state(loaded, COMPONENTS), expected)  # not stacked on the session's LoRA
    finally:
        for p in phases:
            p.close()
    _assert_same(_state(pipe), pristine)


def test_patchers_that_miss_a_component_are_a_programming_error(pipe, stack, tmp_path):
    with LoraPatcher({"unet": pipe.unet}) as unet_only, pytest.raises(ValueError, match="cover"):
        bake(pipe, stack, tmp_path / "out", patchers=[unet_only])


def test_a_pristine_source_spares_the_snapshot(pipe, stack, tmp_path):
    """With the model cache's RAM copy as pristine source, the private patcher copies nothing first."""
    ram = {(c, k): v.detach().clone() for c in COMPONENTS for k, v in getattr(pipe, c).named_parameters()}
    asked: list[tuple[str, str]] = []

    def source(component: str, name: str) -> torch.Tensor:
        asked.append((component, name))
        return ram[(component, name)]

    before = _state(pipe)
    bake(pipe, stack, tmp_path / "out", pristine_source=source)
    assert len(asked) == len({(p.component, p.module) for lora, _ in stack for p in lora.patches})
    _assert_same(_state(pipe), before)


def test_peft_adapters_in_the_pipeline_are_refused(pipe, stack, tmp_path):
    from torch import nn

    class Wrapped(nn.Module):
        def __init__(self, base: nn.Module):
            super().__init__()
            self.base_layer = base

    block = pipe.text_encoder.get_submodule("encoder.layers.0.self_attn")  # transformers 5 paths
    original = block.q_proj
    block.q_proj = Wrapped(original)  # what peft's inject_adapter leaves in place
    try:
        with pytest.raises(InputError, match="peft LoRA adapters"):
            bake(pipe, stack, tmp_path / "out")
    finally:
        block.q_proj = original
    assert not (tmp_path / "out").exists()


def test_a_lora_that_does_not_fit_is_refused_and_nothing_is_written(pipe, stack, tmp_path):
    from studio.lora.base import LowRankPatch

    bad = LoraFile(path=Path("/x/bad.safetensors"), name="bad", format="kohya", base_model="sdxl", short_hash="0" * 12,
                   patches=[LowRankPatch("unet", "down_blocks.1.attentions.0.proj_in", torch.ones(3, 1),
                                         torch.ones(1, 3), 1.0, (3, 3))])
    before = _state(pipe)
    with pytest.raises(LoraError, match="bad"):
        bake(pipe, [stack[0], (bad, 1.0)], tmp_path / "out")
    assert not (tmp_path / "out").exists() and _no_partials(tmp_path) == []
    _assert_same(_state(pipe), before)


@pytest.mark.parametrize("umask, folder_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_the_baked_files_get_the_modes_the_users_umask_asks_for(pipe, stack, tmp_path, umask, folder_mode, file_mode):
    import os
    import stat

    old = os.umask(umask)
    try:
        bake(pipe, stack, tmp_path / "out", tmp_path / "one.safetensors")
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode)
             for p in [tmp_path / "out", *(tmp_path / "out").rglob("*"), tmp_path / "one.safetensors"]}
    wrong = {name: oct(mode) for name, mode in modes.items()
             if mode != (folder_mode if (tmp_path / name).is_dir() else file_mode)}
    assert wrong == {}  # mkdtemp made the folder 0700 and safetensors every weight file 0600


def test_a_baked_demo_model_keeps_the_demos_native_size(pipe, stack, tmp_path):
    from studio.choices import Precision
    from studio.paths import AppDirs
    from studio.request import GenerationRequest
    from studio.session import Session
    from studio.settings import Settings

    bake(pipe, stack, tmp_path / "baked")
    dirs = AppDirs(config=tmp_path / "c", data=tmp_path / "d", cache=tmp_path / "cache")
    for folder in (dirs.config, dirs.data, dirs.cache):
        folder.mkdir()
    session = Session(Settings(model=str(tmp_path / "baked"), device="cpu", precision=Precision.FP32,
                               live_preview=False), dirs)
    try:
        info = session.load_model()
        assert not info.source.is_demo and info.native_size == TINY_DEFAULT_SIZE == session.native_size
        result = session.generate(GenerationRequest(prompt="a cat", seed=1, steps=1), out_path=tmp_path / "b.png")
        assert (result.report.request["width"], result.report.request["height"]) == (TINY_DEFAULT_SIZE,) * 2
    finally:
        session.close()
