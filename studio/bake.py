"""Bake a LoRA stack into a model: a diffusers folder (optionally also one single-file checkpoint).

The baked weights are exactly what generation with that stack uses: the patcher's merged
mode (`pristine + sum(w * delta)`, fp32, rounded once), written by `save_pretrained`, so the
folder holds plain UNet/TE weights and no LoRA wrapper. Afterwards the live pipeline is put
back bit for bit (the patcher restores from pristine, never by subtraction), so the app's warm
model is unchanged. Output is written into a hidden folder beside `out_dir` and renamed at the
end: a failure (disk full, bad LoRA) leaves neither a half-written folder nor a changed model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from studio.choices import LoraMode
from studio.errors import InputError, OutOfMemory, StudioError
from studio.lora.base import LoraFile
from studio.lora.patcher import LoraPatcher, PatcherSettings, Stack, Weight
from studio.phases import LORA_TARGETS

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLPipeline

log = logging.getLogger(__name__)

BAKE_INFO = "lora_studio_bake.json"  # provenance beside model_index.json; diffusers ignores it
PristineSource = Callable[[str, str], torch.Tensor | None]  # (component, "mod.path.weight") -> RAM copy


@dataclass(frozen=True)
class BakeResult:
    """What was written, and what it took."""

    out_dir: Path
    single_file: Path | None
    stack: list[dict[str, object]]  # name, file, short hash, weight of each LoRA baked in
    modules_patched: int  # layers whose weights differ from the base model's
    bytes_written: int
    seconds: float


def _components(pipe: StableDiffusionXLPipeline) -> dict[str, nn.Module]:
    return {part.value: model for part in LORA_TARGETS if (model := getattr(pipe, part, None)) is not None}


def _check_target(out_dir: Path, single_file: Path | None) -> None:
    """Everything that can be refused before a weight is touched."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"bake: {out_dir} exists and is not a folder; choose a new folder for the baked model")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise InputError(f"bake: the folder {out_dir} is not empty; baking never overwrites a model. "
                         "Choose a new folder or empty this one")
    if single_file is not None:
        if single_file.suffix.lower() != ".safetensors":
            raise InputError(f"bake: a single-file checkpoint must end in .safetensors, got {single_file.name}")
        if single_file.exists():
            raise InputError(f"bake: {single_file} already exists; baking never overwrites a model. "
                             "Choose a new file name")


def _check_pipeline(components: dict[str, nn.Module]) -> None:
    """diffusers/peft adapters would be saved as wrapper modules; the app never loads them, refuse them."""
    for name, model in components.items():
        wrapped = next((path for path, m in model.named_modules() if hasattr(m, "base_layer")), None)
        if wrapped is not None:
            raise InputError(f"bake: {name} holds diffusers/peft LoRA adapters ({wrapped}); "
                             "unload them (pipe.unload_lora_weights()) before baking")


def _stack_record(stack: Stack) -> list[dict[str, object]]:
    return [{"name": lora.name, "file": str(lora.path), "short_hash": lora.short_hash, **_weight_record(w)}
            for lora, w in stack]


def _weight_record(w: Weight) -> dict[str, object]:
    """A float weight, or what per-layer (block) weights were: te, unet and the 20 block values."""
    if isinstance(w, float):
        return {"weight": w}
    return {"weight": getattr(w, "te", None), "unet": getattr(w, "unet", None),
            "blocks": list(getattr(w, "blocks", None) or [])}


def _nonzero(lora: LoraFile, w: Weight) -> list:
    return [p for p in lora.patches if (w if isinstance(w, float) else w.of(p)) != 0.0]
def _user_umask() -> int:
    """The process umask (reading it means setting it: put straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_umask_allows(path: Path) -> None:
    """Give `path` (and, for a folder, all in it) the modes the user's umask asks for, as `mkdir` and
    `open` would have: mkdtemp makes the folder 0700 and safetensors writes every weight file 0600,
    but a baked model is meant to be shared and loaded like any other file of its owner."""
    mask = _user_umask()
    for item in [path, *(path.rglob("*") if path.is_dir() else ())]:
        item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def bake(pipe: StableDiffusionXLPipeline, stack: Stack, out_dir: Path,
         single_file: Path | None = None, *, patchers: Sequence[LoraPatcher] = (),
         pristine_source: PristineSource | None = None) -> BakeResult:
    """Write `pipe` with `stack` merged as a diffusers folder (+ a single file), then restore `pipe` exactly.

    `patchers`: the session's patchers (together covering UNet/TE1/TE2, e.g. the engine's one per
    memory phase) when the pipeline may have LoRAs applied. Their stacks and settings come back
    afterwards; the bake itself always starts from pristine weights. Without them a private patcher
    is used, the weights must be pristine, and `pristine_source` (the model cache's RAM copy) spares
    it a snapshot of every touched weight (5.9 GB for an SDXL LoRA in bf16).
    """
    from studio.models.single_file import save_single_file

    t0 = time.perf_counter()
    out_dir = Path(out_dir).expanduser()
    single_file = Path(single_file).expanduser() if single_file is not None else None
    stack = [(lora, w if hasattr(w, "of") else float(w)) for lora, w in stack]
    _check_target(out_dir, single_file)
    components = _components(pipe)
    _check_pipeline(components)

    inside = single_file is not None and single_file.resolve().is_relative_to(out_dir.resolve())
    own = not patchers
    active = [LoraPatcher(components, pristine_source=pristine_source)] if own else list(patchers)
    covered = {name for p in active for name in p.components}
    if not set(components) <= covered:
        raise ValueError(f"bake: the patchers cover {sorted(covered)}, the pipeline has {sorted(components)}")
    previous = [(p.settings, list(p.applied)) for p in active]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    wrote_single = False
    try:
        for p in active:
            # merged and restore-in-place while baking: sidecars would not be saved, dropped weights would
            p.configure(replace(p.settings, mode=LoraMode.MERGED, unpatch_lora_by_vram_offload=False))
            p.apply(stack)
            p.materialize()
        pipe.save_pretrained(partial, safe_serialization=True)
        (partial / BAKE_INFO).write_text(json.dumps({"stack": _stack_record(stack)}, indent=1))
        if single_file is not None:
            # inside out_dir: written into the hidden folder and renamed with it
            target = partial / single_file.resolve().relative_to(out_dir.resolve()) if inside else single_file
            target.parent.mkdir(parents=True, exist_ok=True)
            save_single_file(pipe, target)  # atomic on its own (.partial + rename)
            wrote_single = not inside
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (checked above); rename cannot replace a folder on every OS
        _as_umask_allows(partial)
        if single_file is not None:
            _as_umask_allows(target)
        os.replace(partial, out_dir)
    except BaseException as err:
        shutil.rmtree(partial, ignore_errors=True)
        if wrote_single and single_file is not None:
            single_file.unlink(missing_ok=True)
        if isinstance(err, StudioError) or not isinstance(err, Exception):  # ours, or Ctrl-C
            raise
        if isinstance(err, MemoryError):
            raise OutOfMemory(f"bake: out of memory while writing {out_dir}; nothing was written") from err
        if isinstance(err, OSError):
            raise StudioError(f"bake: could not write {out_dir} ({err.strerror or err}); nothing was written") \
                from err
        raise StudioError(f"bake: failed ({type(err).__name__}: {err}); nothing was written") from err
    finally:
        _restore(active, own, previous)
    bytes_written = _folder_bytes(out_dir) + (single_file.stat().st_size if single_file and not inside else 0)
    modules = len({(p.component, p.module) for lora, w in stack for p in _nonzero(lora, w)})
    result = BakeResult(out_dir, single_file, _stack_record(stack), modules, bytes_written, time.perf_counter() - t0)
    log.info("baked %d LoRA(s) into %s (%d layers, %.1f MB) in %.1f s", len(stack), out_dir, modules,
             bytes_written / 1e6, result.seconds)
    return result


def _restore(patchers: list[LoraPatcher], own: bool, previous: list[tuple[PatcherSettings, Stack]]) -> None:
    """Put the live weights back: pristine for a private patcher, the session's stacks for its own."""
    if own:
        patchers[0].close()
        return
    failed: BaseException | None = None
    for patcher, (settings, stack) in zip(patchers, previous):
        patcher.configure(settings)
        try:
            patcher.apply(stack)  # applied before the bake, so only resource trouble can fail here
            patcher.materialize()  # with the offload toggle on, weights only the bake used were dropped
        except StudioError as err:
            log.exception("bake: could not re-apply the session's LoRA stack; clearing it")
            patcher.clear()
            patcher.materialize()
            failed = failed or err
    if failed is not None:
        raise failed
