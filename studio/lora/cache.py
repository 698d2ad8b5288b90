"""Parsed LoRA files, kept in RAM so each file version is read once.

Lookup and pin are one step: `pin(path)` returns a handle that already holds the pin,
so no other load can evict the entry between "found" and "in use" (the eviction window
of InvokeAI #7513). Pinned entries are never evicted, even over budget; unpinned ones
go least-recently-used first. A file is keyed by (resolved path, size, mtime_ns): an
edited file is a new version, and the old one is dropped as soon as nobody pins it.
The reader is injected as `loader` so this module knows nothing of formats.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from studio.errors import LoraError
from studio.handles import Pin
from studio.lora.base import LoraFile

log = logging.getLogger(__name__)

Loader = Callable[[Path], LoraFile]


@dataclass(frozen=True)
class CacheKey:
    """One version of one file on disk."""

    path: str
    size: int
    mtime_ns: int


@dataclass
class LoraCacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


@dataclass
class CachedLora:
    """One parsed file version in the cache, with its pin count."""

    key: CacheKey
    lora: LoraFile
    nbytes: int
    pins: int = 0
    stale: bool = False  # a newer version of the file exists: drop at last release


def file_key(path: str | os.PathLike[str]) -> CacheKey:
    """Key of the file's current version; a missing file is a LoraError naming it."""
    resolved = Path(path).expanduser().resolve()
    try:
        st = resolved.stat()
    except OSError as err:
        raise LoraError(f"LoRA file {str(path)!r} cannot be read: {err.strerror or err}") from err
    return CacheKey(str(resolved), st.st_size, st.st_mtime_ns)


class LoraPin(Pin):
    """A pin on one cached LoRA: holds it in RAM from creation until `release()`.

    Use as a context manager (`with cache.pin(p) as pin: pin.lora`) or call `release()` once.
    """

    def __init__(self, cache: LoraCache, entry: CachedLora, hit: bool):
        super().__init__(f"the LoRA pin on {entry.key.path!r}")
        self._cache = cache
        self._entry = entry
        self.hit = hit  # for the report: parsed earlier (True) or read now (False)

    @property
    def lora(self) -> LoraFile:
        self._check_held()
        return self._entry.lora

    @property
    def key(self) -> CacheKey:
        return self._entry.key

    def _on_release(self) -> None:
        self._cache.release_pin(self._entry)


class LoraCache:
    """LRU cache of parsed LoRA files with a byte budget and pin counts."""

    def __init__(self, byte_budget: int, loader: Loader):
        if byte_budget < 0:
            raise ValueError(f"`byte_budget` must be >= 0, got {byte_budget}")
        self.byte_budget = int(byte_budget)
        self._loader = loader
        self._entries: OrderedDict[CacheKey, CachedLora] = OrderedDict()  # oldest use first
        self._lock = threading.RLock()
        self.stats = LoraCacheStats()

    def set_budget(self, byte_budget: int) -> None:
        """A new budget that holds now: unpinned entries over it are evicted at once (issue 11)."""
        if byte_budget < 0:
            raise ValueError(f"`byte_budget` must be >= 0, got {byte_budget}")
        with self._lock:
            self.byte_budget = int(byte_budget)
            self._evict()

    # -- queries -------------------------------------------------------------------
    @property
    def bytes_used(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, path: str | os.PathLike[str]) -> bool:
        with self._lock:
            try:
                return file_key(path) in self._entries
            except LoraError:
                return False

    def keys(self) -> list[CacheKey]:
        """Cached versions, least recently used first."""
        with self._lock:
            return list(self._entries)

    def pin_count(self, key: CacheKey) -> int:
        with self._lock:
            entry = self._entries.get(key)
            return entry.pins if entry else 0

    # -- pin / release ---------------------------------------------------------------
    def pin(self, path: str | os.PathLike[str]) -> LoraPin:
        """Parse the file if this version is not cached, and pin it, in one step."""
        with self._lock:
            key = file_key(path)
            entry = self._entries.get(key)
            hit = entry is not None
            if entry is None:
                entry = self._load(Path(key.path), key)
            else:
                self._entries.move_to_end(key)
            entry.pins += 1
            if hit:
                self.stats.hits += 1
            else:
                self.stats.misses += 1
            self._evict()
            return LoraPin(self, entry, hit)

    def _load(self, path: Path, key: CacheKey) -> CachedLora:
        # Loading under the lock: a second pin of the same file waits instead of parsing
        # it twice; LoRA loads are the only slow thing done here.
        lora = self._loader(path)
        after = file_key(path)
        entry = CachedLora(key, lora, lora.nbytes)
        if after != key:
            # The file changed while it was read: use this parse for the pin that asked,
            # never serve it again (it may mix two versions).
            log.info("LoRA %s changed while being read; not caching this read", path)
            entry.stale = True
            return entry
        for old in [e for e in self._entries.values() if e.key.path == key.path]:
            old.stale = True  # an older version: gone at its last release
            if old.pins == 0:
                del self._entries[old.key]
        self._entries[key] = entry
        log.debug("LoRA cache miss: %s (%d bytes)", path, entry.nbytes)
        return entry

    def release_pin(self, entry: CachedLora) -> None:
        """A LoraPin's release: one pin fewer on `entry` (dropped if stale, evictable if over budget)."""
        with self._lock:
            if entry.pins <= 0:
                raise RuntimeError(f"LoRA cache pin count of {entry.key.path!r} would go negative")
            entry.pins -= 1
            if entry.pins == 0 and entry.stale:
                self._entries.pop(entry.key, None)
            self._evict()  # an over-budget pinned entry can go now

    def _evict(self) -> None:
        used = sum(e.nbytes for e in self._entries.values())
        for key in list(self._entries):
            if used <= self.byte_budget:
                break
            entry = self._entries[key]
            if entry.pins:
                continue
            del self._entries[key]
            used -= entry.nbytes
            self.stats.evictions += 1
            log.debug("LoRA cache evicted %s (%d bytes)", key.path, entry.nbytes)

    def clear(self) -> None:
        """Drop every unpinned entry (pinned ones stay until released)."""
        with self._lock:
            for key in [k for k, e in self._entries.items() if e.pins == 0]:
                del self._entries[key]
