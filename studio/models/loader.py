"""Resolve a model spec (empty, folder, .safetensors file, hub id) and load an SDXL pipeline.

Every source goes through diffusers with `local_files_only=True` except an explicit hub
id, so nothing is fetched unless the user asked for a hub model. Pickle formats are
refused before anything is read: we never unpickle.
"""

from __future__ import annotations

import gc
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import torch

from studio.errors import ModelLoadError
from studio.file_formats import PICKLE_SUFFIXES
from studio.paths import TINY_MODEL_DIR
from studio.report import PhaseTimer

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class SourceKind(StrEnum):
    EMBEDDED = "embedded"
    FOLDER = "folder"
    SINGLE_FILE = "single_file"
    HUB = "hub"


@dataclass(frozen=True)
class ModelSource:
    kind: SourceKind
    location: str  # a path, or a hub repo id
    name: str  # what the PNG metadata calls it

    @property
    def path(self) -> Path:
        return Path(self.location)

    @property
    def is_demo(self) -> bool:
        return self.kind is SourceKind.EMBEDDED


def resolve_source(spec: str | os.PathLike | None) -> ModelSource:
    """Turn what the user typed into a source, or raise one clear ModelLoadError."""
    text = str(spec).strip() if spec else ""
    if not text or text in ("tiny", "embedded", "tiny-sdxl"):
        return ModelSource(SourceKind.EMBEDDED, str(TINY_MODEL_DIR), "tiny-sdxl")
    path = Path(text).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(
            f"{path.name}: pickle checkpoints ({path.suffix}) are never loaded, because unpickling can run "
            "arbitrary code; convert it to .safetensors first"
        )
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise ModelLoadError(f"{path}: not a diffusers model folder (no model_index.json)")
        return ModelSource(SourceKind.FOLDER, str(path.resolve()), path.resolve().name)
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise ModelLoadError(f"{path.name}: unsupported model file; expected a .safetensors SDXL checkpoint")
        return ModelSource(SourceKind.SINGLE_FILE, str(path.resolve()), path.stem)
    if _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        return ModelSource(SourceKind.HUB, text, text.split("/")[-1])
    raise ModelLoadError(f"{text}: no such file or folder (give a diffusers folder, an SDXL .safetensors file, "
                         "or leave it empty for the built-in demo model)")


def load_pipeline(source: ModelSource, dtype: torch.dtype, device: torch.device | None = None,
                  on_progress: Callable[[float], None] | None = None, timer: PhaseTimer | None = None):
    """Load an SDXL pipeline on the CPU in `dtype`; the memory placement moves weights to `device`.

    `device` becomes the pipeline's execution device: with offload or streaming, components
    rest in RAM between phases, and diffusers would otherwise create latents on the CPU.
    `on_progress(fraction)` hears a single file's read progress. `timer` gets the phases "imports"
    (diffusers' and transformers' pipeline modules: only the first load in a process pays them) and
    "read_build" (configs, tokenizers, weights, modules).
    """
    timer = timer or PhaseTimer()
    with timer.phase("imports"):
        StableDiffusionXLPipeline = import_pipeline_modules()
    with timer.phase("read_build"):
        pipe = _from_source(source, dtype, StableDiffusionXLPipeline, on_progress)
    if device is not None:
        pipe.__class__ = _with_execution_device(type(pipe))
        pipe._studio_device = torch.device(device)
    return pipe


_FROZEN = False


def import_pipeline_modules() -> type:
    """Import the SDXL pipeline's modules (2-5 s on a 2-core CPU, once per process) and return its class.

    Then, once, move every object alive so far (modules, classes, the imported libraries' tables: ~400k)
    to the collector's permanent generation: each full `gc.collect()` after a model unload had to walk
    them again, 1.5-1.9 s a time on the busy 2-core machine (measured), and none of them is ever garbage.
    Only the young generations are collected first (a full pass would put that cost back on the first
    load): old cyclic garbage alive at this moment would stay, and a process has none before its first
    model (no pipeline can exist before these imports).
    """
    global _FROZEN
    import diffusers
    import transformers
    from diffusers import StableDiffusionXLPipeline

    diffusers.utils.logging.disable_progress_bar()  # our report times the load; bars only clutter the terminal
    transformers.utils.logging.disable_progress_bar()
    if not _FROZEN:
        _FROZEN = True
        gc.collect(1)  # the import temporaries are freed, not frozen
        gc.freeze()
    return StableDiffusionXLPipeline


def _from_source(source: ModelSource, dtype: torch.dtype, StableDiffusionXLPipeline: type,
                 on_progress: Callable[[float], None] | None):
    try:
        if source.kind is SourceKind.SINGLE_FILE:
            from studio.models.single_file import load_single_file

            pipe = load_single_file(source.path, torch_dtype=dtype, on_progress=on_progress)
        else:
            offline = source.kind is not SourceKind.HUB or os.environ.get("HF_HUB_OFFLINE") == "1"
            pipe = StableDiffusionXLPipeline.from_pretrained(
                source.location, torch_dtype=dtype, local_files_only=offline, use_safetensors=True
            )
    except ModelLoadError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"{source.name}: could not be loaded as an SDXL model ({first})") from err
    if not isinstance(pipe, StableDiffusionXLPipeline):
        raise ModelLoadError(f"{source.name}: is a {type(pipe).__name__}, not an SDXL base pipeline")
    pipe.set_progress_bar_config(disable=True)
    return pipe


_EXECUTION_CLASSES: dict[type, type] = {}


def _with_execution_device(cls: type) -> type:
    """A subclass whose `_execution_device` is the session's device, not guessed from where weights rest."""
    if cls not in _EXECUTION_CLASSES:
        _EXECUTION_CLASSES[cls] = type(f"Studio{cls.__name__}", (cls,), {
            "_execution_device": property(lambda self: self._studio_device),
            "__module__": __name__,
        })
    return _EXECUTION_CLASSES[cls]
