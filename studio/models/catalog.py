"""What the model picker lists: SDXL checkpoints and VAEs in the model folders, with what each will take.

A scan reads only headers (never a tensor, never a pickle): single `.safetensors` files are
classified by their keys (a whole SDXL checkpoint, a VAE, or something else, named with the
reason), diffusers folders by their `model_index.json`. The memory a model will take is its
parameter count from those headers times the bytes per weight of the precision it will run
in, so the picker can say "5.1 GB in bf16" before a byte of weights is read. Results are
cached per (path, size, mtime): a rescan of unchanged files costs a `stat` each.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from studio.errors import ModelLoadError
from studio.file_formats import PICKLE_SUFFIXES
from studio.models.single_file import classify, read_header
from studio.models.vae_file import vae_layout

log = logging.getLogger(__name__)
MAX_DEPTH = 3  # folders below a model folder that are searched (A1111 users keep sub-folders per family)
DIFFUSERS_PARTS = ("unet", "text_encoder", "text_encoder_2", "vae")


class EntryKind(StrEnum):
    CHECKPOINT = "checkpoint"  # a single-file SDXL checkpoint
    FOLDER = "folder"  # a diffusers SDXL folder
    VAE = "vae"  # a VAE file or folder


@dataclass(frozen=True)
class ModelEntry:
    """One model or VAE as the picker shows it; `reason` is None when it can be loaded."""

    name: str
    path: Path
    kind: EntryKind
    params: int  # weights, counted from the headers
    file_bytes: int
    reason: str | None = None
    detail: str = ""  # the architecture ("sdxl-base", "tiny-sdxl") or the VAE's key layout

    @property
    def usable(self) -> bool:
        return self.reason is None

    def memory_bytes(self, bytes_per_weight: int) -> int:
        """RAM (or VRAM) its weights take in a dtype of `bytes_per_weight` bytes."""
        return self.params * bytes_per_weight


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for n in shape:
        count *= n
    return count


def _params(files: Iterable[Path]) -> int:
    return sum(_numel(shape) for file in files for shape in read_header(file)[0].values())


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.safetensors") if p.is_file())


def inspect_file(path: Path) -> ModelEntry:
    """A `.safetensors` file as a checkpoint or a VAE; anything else with the reason it is not one."""
    size = path.stat().st_size
    try:
        shapes, _ = read_header(path)
    except ModelLoadError as err:
        return ModelEntry(path.stem, path, EntryKind.CHECKPOINT, 0, size, str(err))
    params = sum(_numel(s) for s in shapes.values())
    try:
        arch = classify(shapes, path.name)
        return ModelEntry(path.stem, path, EntryKind.CHECKPOINT, params, size, detail=arch.value)
    except ModelLoadError as err:
        try:
            layout = vae_layout(list(shapes), path.name)
        except ModelLoadError:
            return ModelEntry(path.stem, path, EntryKind.CHECKPOINT, params, size, str(err))
        return ModelEntry(path.stem, path, EntryKind.VAE, params, size, detail=f"{layout.value} layout")


def inspect_folder(folder: Path) -> ModelEntry | None:
    """A diffusers SDXL folder (model_index.json) or VAE folder (config.json of an AutoencoderKL); else None."""
    index = folder / "model_index.json"
    if index.is_file():
        try:
            cls = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
            parts = [folder / part for part in DIFFUSERS_PARTS]
            files = [f for part in parts for f in _weight_files(part)]
            size = sum(f.stat().st_size for f in files)
            if cls != "StableDiffusionXLPipeline":
                return ModelEntry(folder.name, folder, EntryKind.FOLDER, 0, size,
                                  f"{folder.name}: is a {cls or 'unknown'} folder, not an SDXL base pipeline")
            missing = [p.name for p in parts if not _weight_files(p)]
            if missing:
                return ModelEntry(folder.name, folder, EntryKind.FOLDER, 0, size,
                                  f"{folder.name}: has no .safetensors weights in {', '.join(missing)}")
            return ModelEntry(folder.name, folder, EntryKind.FOLDER, _params(files), size, detail="diffusers")
        except (OSError, ValueError, ModelLoadError) as err:
            return ModelEntry(folder.name, folder, EntryKind.FOLDER, 0, 0, f"{folder.name}: {err}")
    config = folder / "config.json"
    if config.is_file() and _weight_files(folder):
        try:
            if json.loads(config.read_text(encoding="utf-8")).get("_class_name") != "AutoencoderKL":
                return None
            files = _weight_files(folder)
            return ModelEntry(folder.name, folder, EntryKind.VAE, _params(files), sum(f.stat().st_size for f in files),
                              detail="diffusers folder")
        except (OSError, ValueError, ModelLoadError) as err:
            return ModelEntry(folder.name, folder, EntryKind.VAE, 0, 0, f"{folder.name}: {err}")
    return None


class ModelCatalog:
    """Checkpoints, diffusers folders and VAEs under the model folders; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, int, int], ModelEntry | None] = {}  # None: a folder that is no model
        self._entries: list[ModelEntry] = []
        self.reads = 0  # headers parsed (a rescan of unchanged files adds none)

    def scan(self, dirs: Sequence[Path]) -> list[ModelEntry]:
        """Rescan the folders; sorted by kind, then name."""
        found: dict[Path, ModelEntry] = {}
        seen: set[tuple[str, int, int]] = set()
        for root in dirs:
            root = Path(root).expanduser()
            if root.is_dir():
                self._walk(root, 0, found, seen)
        entries = sorted(found.values(), key=lambda e: (e.kind is EntryKind.VAE, e.name.lower()))
        with self._lock:
            self._entries = entries
            self._cache = {k: v for k, v in self._cache.items() if k in seen}
        return entries

    def entries(self) -> list[ModelEntry]:
        with self._lock:
            return list(self._entries)

    def models(self) -> list[ModelEntry]:
        return [e for e in self.entries() if e.kind is not EntryKind.VAE]

    def vaes(self) -> list[ModelEntry]:
        return [e for e in self.entries() if e.kind is EntryKind.VAE]

    def find(self, location: str) -> ModelEntry | None:
        target = str(Path(location).expanduser())
        return next((e for e in self.entries() if str(e.path) == target), None)

    def _walk(self, folder: Path, depth: int, found: dict[Path, ModelEntry], seen: set) -> None:
        entry = self._cached(folder, seen, lambda: inspect_folder(folder))
        if entry is not None:
            found[folder] = entry
            return  # a model folder's own files are its components, not models
        try:
            children = sorted(folder.iterdir())
        except OSError as err:
            log.info("model folder %s cannot be listed: %s", folder, err)
            return
        for child in children:
            if child.name.startswith("."):
                continue
            if child.is_dir() and depth < MAX_DEPTH:
                self._walk(child, depth + 1, found, seen)
            elif child.is_file() and child.suffix.lower() == ".safetensors":
                found[child] = self._cached(child, seen, lambda c=child: inspect_file(c))
            elif child.is_file() and child.suffix.lower() in PICKLE_SUFFIXES:
                found[child] = ModelEntry(child.stem, child, EntryKind.CHECKPOINT, 0, child.stat().st_size,
                                          f"{child.name}: pickle checkpoints are never loaded (they can run code); "
                                          "convert it to .safetensors")

    def _cached(self, path: Path, seen: set, inspect) -> ModelEntry | None:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        seen.add(key)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        entry = inspect()
        with self._lock:
            self._cache[key] = entry
            self.reads += 1
        return entry
