"""File hashes for PNG metadata, cached by (path, size, mtime) so big files are read once.

A1111 writes `Model hash` as the first 10 hex digits of the checkpoint file's sha256.
For a diffusers folder we hash its weight files in a fixed order, the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)
_CHUNK = 1 << 20
_LOCK = threading.Lock()
WEIGHT_SUFFIXES = (".safetensors",)


def _file_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def _sha256_files(files: list[Path], on_progress: Callable[[float], None] | None = None) -> str:
    digest = hashlib.sha256()
    total = sum(f.stat().st_size for f in files) or 1
    done = 0
    for file in files:
        with file.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
                done += len(chunk)
                if on_progress is not None and done % (64 * _CHUNK) < _CHUNK:
                    on_progress(min(1.0, done / total))
    return digest.hexdigest()


def weight_files(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    return sorted((p for p in source.rglob("*") if p.suffix in WEIGHT_SUFFIXES), key=lambda p: p.as_posix())


def model_sha256(source: Path, cache_file: Path | None = None,
                 on_progress: Callable[[float], None] | None = None) -> str:
    """Full sha256 of a checkpoint file, or of a folder's weight files in path order (cached)."""
    files = weight_files(source)
    key = "+".join(_file_key(f) for f in files)
    cache: dict[str, str] = {}
    if cache_file is not None:
        with _LOCK:
            try:
                cache = json.loads(cache_file.read_text())
            except (OSError, ValueError):
                cache = {}
        if key in cache:
            return cache[key]
    value = _sha256_files(files, on_progress)
    if cache_file is not None:
        with _LOCK:
            cache[key] = value
            tmp = cache_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_file)
    return value
