"""What the LoRA browser lists: every file in the configured folders, usable or not, with a thumbnail.

A scan walks the folders (studio.lora.stack.list_loras) and reads each header once
(`inspect_lora`); the result is cached per (path, size, mtime), so a rescan costs a
`stat` per file. Files the app cannot use stay in the list with the reason (another
base model, a pickle, a broken header) instead of vanishing without a word.

Thumbnails come from `<name>.png`, `<name>.preview.png`, `<name>.jpg`/`.jpeg`/`.webp`
beside the file, else the cover embedded in the metadata. They are decoded and
re-encoded as small PNGs into `<cache>/thumbnails/` (named by a hash of the source
path and mtime), the one folder the server shows: the LoRA folders themselves are
never served, and a file that only claims to be an image never reaches the browser.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from studio.errors import LoraError
from studio.lora.file_metadata import BASE_MODEL_NAMES
from studio.file_formats import PICKLE_SUFFIXES
from studio.lora.reader import LoraInfo, inspect_lora
from studio.lora.stack import list_loras

log = logging.getLogger(__name__)
THUMB_SIDE = 256
SIDECAR_SUFFIXES = (".png", ".preview.png", ".jpg", ".jpeg", ".preview.jpg", ".webp", ".preview.webp")
USABLE_BASES = ("sdxl", "unknown")  # "unknown": no evidence either way; loading then checks the keys
BADGES = {"sdxl": "SDXL", "unknown": "base ?", "sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl_refiner": "SDXL refiner",
          "sd3": "SD3", "flux": "Flux", "dit": "DiT"}


@dataclass(frozen=True)
class CatalogEntry:
    """One file as the browser shows it; `reason` is None when it can be added to the stack."""

    name: str
    path: Path
    title: str
    base_model: str  # reader's id ("sdxl", "sd1", ...), or "unreadable"
    badge: str
    reason: str | None
    trigger_words: tuple[str, ...] = ()
    thumbnail: Path | None = None  # inside the thumbnail cache, never in a LoRA folder
    format: str = ""

    @property
    def compatible(self) -> bool:
        return self.reason is None

    def caption(self) -> str:
        """Short enough to read whole under a tile; the reason itself is in the note below the browser."""
        head = f"{breakable(self.name)} · {self.badge}"
        return head if self.reason is None else f"⚠ {head} · can't be used"

    def matches(self, query: str) -> bool:
        """Every word of the query appears in the name, the title or a trigger word (any case)."""
        hay = " ".join((self.name, self.title, *self.trigger_words)).lower()
        return all(word in hay for word in query.lower().split())


def compatibility(info: LoraInfo) -> str | None:
    """None for a LoRA this SDXL app can load, else why not ("made for SD 1.x")."""
    if info.base_model in USABLE_BASES:
        return None
    name = BASE_MODEL_NAMES.get(info.base_model, info.base_model)
    return f"made for {name}, not SDXL ({info.base_model_evidence})" if info.base_model_evidence else \
        f"made for {name}, not SDXL"


class LoraCatalog:
    """The folders' LoRAs as CatalogEntry rows; thread-safe (every browser tab shares one)."""

    def __init__(self, thumbnails: Path) -> None:
        self.thumbnails = thumbnails
        self._lock = threading.Lock()
        self._infos: dict[tuple[str, int, int], LoraInfo | LoraError] = {}
        self._entries: dict[str, CatalogEntry] = {}
        self.reads = 0  # headers actually parsed (a rescan of unchanged files adds none)

    def scan(self, dirs: Sequence[Path]) -> list[CatalogEntry]:
        """Rescan the folders: unchanged files come from the cache; sorted by name."""
        files = dict(list_loras(dirs))
        for name, path in _pickles(dirs):
            files.setdefault(name, path)
        seen: set[tuple[str, int, int]] = set()
        entries = {name: self._entry(name, path, seen)
                   for name, path in sorted(files.items(), key=lambda kv: kv[0].lower())}
        with self._lock:
            self._entries = entries
            self._infos = {k: v for k, v in self._infos.items() if k in seen}  # forget removed/changed files
        return list(entries.values())

    def entries(self, query: str = "") -> list[CatalogEntry]:
        """The last scan, filtered by a search query."""
        with self._lock:
            found = list(self._entries.values())
        return [e for e in found if e.matches(query)] if query.strip() else found

    def get(self, name: str) -> CatalogEntry | None:
        with self._lock:
            return self._entries.get(name)

    def _info(self, path: Path, seen: set[tuple[str, int, int]]) -> LoraInfo | LoraError:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        seen.add(key)
        with self._lock:
            cached = self._infos.get(key)
        if cached is not None:
            return cached
        try:
            result: LoraInfo | LoraError = inspect_lora(path)
        except LoraError as err:
            result = err
        with self._lock:
            self._infos[key] = result
            self.reads += 1
        return result

    def _entry(self, name: str, path: Path, seen: set[tuple[str, int, int]]) -> CatalogEntry:
        try:
            info = self._info(path, seen)
        except OSError as err:  # removed or unreadable between the listing and now
            return CatalogEntry(name, path, name, "unreadable", "unreadable", f"{path.name}: {err.strerror or err}")
        if isinstance(info, LoraError):
            return CatalogEntry(name, path, name, "unreadable", "unreadable", str(info),
                                thumbnail=self._thumbnail(path, None))
        return CatalogEntry(name, path, info.title, info.base_model, BADGES.get(info.base_model, info.base_model),
                            compatibility(info), tuple(info.trigger_words), self._thumbnail(path, info.thumbnail),
                            info.format)

    def _thumbnail(self, lora: Path, embedded: tuple[str, bytes] | None) -> Path | None:
        """A sidecar image beside the file wins over the embedded cover; None when neither decodes."""
        for source in _sidecars(lora):
            made = self._cached_thumb(source, lambda s=source: s.read_bytes())
            if made is not None:
                return made
        if embedded is not None:
            return self._cached_thumb(lora, lambda: embedded[1])
        return None

    def _cached_thumb(self, source: Path, read) -> Path | None:
        try:
            stat = source.stat()
        except OSError:
            return None
        digest = hashlib.sha1(f"{source.resolve()}\0{stat.st_mtime_ns}\0{stat.st_size}".encode()).hexdigest()[:20]
        target = self.thumbnails / f"{digest}.png"
        if target.exists():
            return target
        try:
            with Image.open(io.BytesIO(read())) as img:
                img.thumbnail((THUMB_SIDE, THUMB_SIDE))
                small = img.convert("RGBA" if img.mode in ("RGBA", "LA", "P") else "RGB")
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
            log.info("thumbnail of %s not usable: %s", source, err)
            return None
        _write_png(small, target)
        return target

    def placeholder(self, text: str) -> Path:
        """A plain tile with the name, for files without any picture (a gallery needs an image)."""
        digest = hashlib.sha1(f"v3\0{text}".encode()).hexdigest()[:16]  # v3: bump when the drawing changes
        target = self.thumbnails / f"placeholder-{digest}.png"
        if not target.exists():
            tile = Image.new("RGB", (THUMB_SIDE, THUMB_SIDE), (60, 64, 72))
            draw = ImageDraw.Draw(tile)
            font = ImageFont.load_default(size=26)
            for row, line in enumerate(wrap_name(text, 14)[:5]):
                draw.text((18, 56 + 32 * row), line, fill=(230, 230, 235), font=font)
            _write_png(tile, target)
        return target

    def unusable_tile(self, entry: CatalogEntry) -> Path:
        """The entry's picture greyed and darkened under a red "can't use" band: it must not look addable.

        (A gallery item cannot carry a CSS class of its own, so the look is in the image.)
        """
        source = entry.thumbnail or self.placeholder(entry.name)
        stat = source.stat()
        digest = hashlib.sha1(f"unusable-v1\0{source}\0{stat.st_mtime_ns}\0{entry.badge}".encode()).hexdigest()[:16]
        target = self.thumbnails / f"unusable-{digest}.png"
        if not target.exists():
            with Image.open(source) as img:
                grey = img.convert("L").point(lambda v: 40 + v * 0.35).convert("RGB")
            grey = grey.resize((THUMB_SIDE, THUMB_SIDE))
            draw = ImageDraw.Draw(grey)
            middle = THUMB_SIDE * 3 // 5  # below the first lines of a name tile
            band = (0, middle - 34, THUMB_SIDE, middle + 34)
            draw.rectangle(band, fill=(150, 28, 28))
            font = ImageFont.load_default(size=24)
            for row, line in enumerate(("CAN'T BE USED", f"{entry.badge}, not SDXL" if entry.base_model not in
                                        ("unreadable",) else "unreadable file")):
                width = draw.textlength(line, font=font)
                draw.text(((THUMB_SIDE - width) / 2, band[1] + 6 + 30 * row), line, fill=(255, 255, 255), font=font)
            _write_png(grey, target)
        return target


def wrap_name(name: str, width: int) -> list[str]:
    """Lines of at most about `width` characters, broken after separators (- _ . space), never inside a word
    unless a single word is longer than a whole line."""
    parts = re.findall(r"[^-_. ]+[-_. ]*|[-_. ]+", name)
    lines: list[str] = []
    line = ""
    for part in parts:
        if line and len(line) + len(part.rstrip()) > width:
            lines.append(line.rstrip())
            line = ""
        while len(part) > width:  # one word longer than a line: it has to be cut somewhere
            lines.append(part[:width])
            part = part[width:]
        line += part
    if line.strip():
        lines.append(line.rstrip())
    return lines


def breakable(name: str) -> str:
    """The name with a zero-width space after each _ and . so a caption wraps there, not mid-word."""
    return re.sub(r"([_.])", "\\1\u200b", name)


def _sidecars(lora: Path) -> Iterable[Path]:
    base = lora.with_suffix("")
    for suffix in SIDECAR_SUFFIXES:
        candidate = base.parent / (base.name + suffix)
        if candidate.is_file():
            yield candidate


def _pickles(dirs: Sequence[Path]) -> Iterable[tuple[str, Path]]:
    """Pickled "LoRAs" (.ckpt/.pt/...): listed so the browser can say why they are refused."""
    for folder in dirs:
        if folder.is_dir():
            for path in sorted(folder.rglob("*")):
                if path.suffix.lower() in PICKLE_SUFFIXES and path.is_file():
                    yield path.stem, path


def _write_png(image: Image.Image, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    image.save(partial, format="PNG")
    os.replace(partial, target)
