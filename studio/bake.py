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
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from studio.errors import InputError, LoraError, OutOfMemory, StudioError
from studio.lora.base import COMPONENTS, LoraFile
from studio.lora.patcher import LoraMode, LoraPatcher, PatcherSettings

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLPipeline

log = logging.getLogger(__name__)

BAKE_INFO = "lora_studio_bake.json"  # provenance beside model_index.json; diffusers ignores it


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
    return {name: model for name in COMPONENTS if (model := getattr(pipe, name, None)) is not None}


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


def _stack_record(stack: Sequence[tuple[LoraFile, float]]) -> list[dict[str, object]]:
    return [{"name": lora.name, "file": str(lora.path), "short_hash": lora.short_hash, "weight": float(w)}
            for lora, w in stack]


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def bake(pipe: StableDiffusionXLPipeline, stack: Sequence[tuple[LoraFile, float]], out_dir: Path,
         single_file: Path | None = None, *, patcher: LoraPatcher | None = None) -> BakeResult:
    """Write `pipe` with `stack` merged as a diffusers folder (+ a single file), then restore `pipe` exactly.

    `patcher`: the session's patcher when the pipeline may have LoRAs applied. Its current stack
    and settings come back afterwards; the bake itself always starts from pristine weights. Without
    one, a private patcher is used and the pipeline's weights must be pristine (no stack applied).
    """
    from studio.models.single_file import save_single_file

    t0 = time.perf_counter()
    out_dir = Path(out_dir).expanduser()
    single_file = Path(single_file).expanduser() if single_file is not None else None
    stack = [(lora, float(w)) for lora, w in stack]
    _check_target(out_dir, single_file)
    components = _components(pipe)
    _check_pipeline(components)

    inside = single_file is not None and single_file.resolve().is_relative_to(out_dir.resolve())
    own = patcher is None
    active = LoraPatcher(components) if own else patcher
    previous = [] if own else list(active.applied)
    settings = active.settings
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    wrote_single = False
    try:
        # merged and restore-in-place while baking: sidecars would not be saved, dropped weights would
        active.configure(replace(settings, mode=LoraMode.MERGED, unpatch_lora_by_vram_offload=False))
        active.apply(stack)
        active.materialize()
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
        os.replace(partial, out_dir)
    except BaseException as err:
        shutil.rmtree(partial, ignore_errors=True)
        if wrote_single and single_file is not None:
            single_file.unlink(missing_ok=True)
        if isinstance(err, (StudioError, KeyboardInterrupt)) or not isinstance(err, Exception):
            raise
        if isinstance(err, MemoryError):
            raise OutOfMemory(f"bake: out of memory while writing {out_dir}; nothing was written") from err
        if isinstance(err, OSError):
            raise StudioError(f"bake: could not write {out_dir} ({err.strerror or err}); nothing was written") \
                from err
        raise StudioError(f"bake: failed ({type(err).__name__}: {err}); nothing was written") from err
    finally:
        _restore(active, own, previous, settings)
    bytes_written = _folder_bytes(out_dir) + (single_file.stat().st_size if single_file and not inside else 0)
    modules = len({(p.component, p.module) for lora, w in stack if w != 0.0 for p in lora.patches})
    result = BakeResult(out_dir, single_file, _stack_record(stack), modules, bytes_written, time.perf_counter() - t0)
    log.info("baked %d LoRA(s) into %s (%d layers, %.1f MB) in %.1f s", len(stack), out_dir, modules,
             bytes_written / 1e6, result.seconds)
    return result


def _restore(patcher: LoraPatcher, own: bool, previous: list[tuple[LoraFile, float]],
             settings: PatcherSettings) -> None:
    """Put the live weights back: pristine for a private patcher, the session's stack for its own."""
    if own:
        patcher.close()
        return
    patcher.configure(settings)
    try:
        patcher.apply(previous)
        patcher.materialize()  # with the offload toggle on, weights only the bake used were dropped: reload
    except LoraError:  # the same stack applied before the bake; only OOM-like trouble gets here
        log.exception("bake: could not re-apply the previous LoRA stack; clearing it")
        patcher.clear()
        raise
