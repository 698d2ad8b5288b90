"""Model cache: look a record up, pin it in RAM, lock it on a device (DESIGN.md 3).

    record = cache.lookup("unet")                      # what is there; changes nothing
    with cache.put("unet", pipe.unet) as handle:       # or cache.pin(key) / cache.load(key, factory)
        with cache.lock(handle, "cuda") as unet:       # weights on the device for the block
            ...

- A PinHandle holds its pin from the moment it is returned, so nothing can evict the entry
  between load and lock: the window behind InvokeAI #7513 is closed by construction.
- Every entry keeps a pristine copy of its weights in one host arena (pinned with CUDA).
  Taking an entry off a device points its parameters back at pristine: no device-to-host copy.
- Live weights on a device (the CPU included) are always separate copies, so a LoRA written
  into them never reaches pristine (InvokeAI #6559: the "read-only" CPU dict was the live
  weights, and every image after the first was noise). At rest the parameters do point at
  pristine; weights must only be written under a lock, and a write made at rest is caught at
  the next lock (PristineCorrupted) instead of silently producing noise.
- Unpinned, unlocked entries are evicted least-recently-used when RAM is over budget;
  unlocked device copies are dropped least-recently-used when VRAM is over budget.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from studio.errors import OutOfMemory
from studio.handles import Pin
from studio.models.cache_records import CacheRecord, ModelCacheStats, normalize_device
from studio.models.slots import (HostArena, PristineCorrupted, Slot, check_rest, collect_slots,
                                 cuda_pinning_available, make_pristine)

log = logging.getLogger(__name__)
MB = 1 << 20
CPU = torch.device("cpu")


class CachedModule:
    """One module in the cache: its slots, the pristine arena, where the live copy is, the counts."""

    def __init__(self, key: str, module: nn.Module, slots: list[Slot], arena: HostArena) -> None:
        self.key, self.module, self.slots, self.arena = key, module, slots, arena
        self.nbytes = sum(s.nbytes for s in slots)
        self.by_name = {name: s for s in slots for name in s.aliases}
        self.device: torch.device | None = None
        self.locks = self.pins = 0
        self.streamed = False
        self.last_use = 0

    def rest(self) -> None:
        for slot in self.slots:
            slot.to_rest()
        self.device = None


class PinHandle(Pin):
    """Holds an entry in RAM from creation until `release()` (or the end of a `with` block)."""

    def __init__(self, cache: ModelCache, entry: CachedModule) -> None:
        super().__init__(f"the pin on {entry.key!r}")
        self._cache, self._entry = cache, entry

    @property
    def key(self) -> str:
        return self._entry.key

    @property
    def module(self) -> nn.Module:
        return self.entry().module

    def entry(self) -> CachedModule:
        self._check_held()
        return self._entry

    def _on_release(self) -> None:
        self._cache.release_pin(self._entry)


class Reservation:
    """Device memory held outside any entry (stream buffers, VAE working memory); counted in budgets.

    Releasing is idempotent: a reservation ends once, however many `finally` blocks release it.
    """

    def __init__(self, cache: ModelCache, device: torch.device, nbytes: int, tag: str) -> None:
        self._cache, self.device, self.nbytes, self.tag, self.active = cache, device, nbytes, tag, True

    def release(self) -> None:
        self._cache.release_reservation(self)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class ModelCache:
    """Entries by key; budgets in bytes (None: unlimited). Thread-safe."""

    def __init__(self, device: torch.device | str = CPU, *, ram_budget: int | None = None,
                 vram_budget: int | None = None, pin_memory: bool | None = None, keep_resident: bool = True) -> None:
        self.device = normalize_device(device)
        self.ram_budget, self.vram_budget = ram_budget, vram_budget
        self.pin_memory = (self.device.type == "cuda" and cuda_pinning_available()) if pin_memory is None \
            else pin_memory
        self.keep_resident = keep_resident  # unlocked device copies stay while the budget allows
        self.stats = ModelCacheStats()
        self._entries: dict[str, CachedModule] = {}
        self._reservations: list[Reservation] = []
        self._mutex = threading.RLock()
        self._clock = itertools.count(1)

    # -- look up and pin ----------------------------------------------------------------------
    def lookup(self, key: str) -> CacheRecord | None:
        with self._mutex:
            entry = self._entries.get(key)
            return None if entry is None else _record(entry)

    def records(self) -> list[CacheRecord]:
        with self._mutex:
            return [_record(e) for e in self._entries.values()]

    def pin(self, key: str) -> PinHandle:
        with self._mutex:
            entry = self._entries.get(key)
            if entry is None:
                self.stats.misses += 1
                raise KeyError(f"{key!r} is not in the model cache")
            self.stats.hits += 1
            return self._pin(entry)

    def load(self, key: str, factory: Callable[[], nn.Module]) -> PinHandle:
        """The entry for `key`, built by `factory` on a miss; pinned in the same step either way."""
        with self._mutex:
            if key in self._entries:
                self.stats.hits += 1
                return self._pin(self._entries[key])
            self.stats.misses += 1
            return self.put(key, factory())

    def put(self, key: str, module: nn.Module) -> PinHandle:
        """Admit `module` (its pristine copy is made now) and return it pinned."""
        with self._mutex:
            if key in self._entries:
                raise KeyError(f"{key!r} is already cached; pin it instead")
            slots = collect_slots(module)
            devices = {s.live.device for s in slots}
            if any(d.type == "meta" for d in devices):
                raise ValueError(f"{key!r} has weights on the meta device; fill them before caching")
            current = normalize_device(devices.pop()) if len(devices) == 1 else None
            keep_live = current is not None and current == self.device
            weights = sum(s.nbytes for s in slots)
            self._make_room(CPU, weights * (2 if keep_live and current.type == "cpu" else 1), keep=None)
            entry = CachedModule(key, module, slots, make_pristine(slots, self.pin_memory))
            if keep_live and (current.type == "cpu" or self._fits(current, weights)):
                entry.device = current  # the module's own tensors become its live copy
            else:
                entry.rest()  # frees the loaded tensors: pristine is all that is needed
            self._entries[key] = entry
            log.info("cache: admitted %s (%.1f MB%s, live on %s)", key, weights / MB,
                     ", pinned" if entry.arena.pinned else "", entry.device or "pristine")
            return self._pin(entry)

    def _pin(self, entry: CachedModule) -> PinHandle:
        entry.pins += 1
        entry.last_use = next(self._clock)
        return PinHandle(self, entry)

    def release_pin(self, entry: CachedModule) -> None:
        """A PinHandle's release: one pin fewer; an unpinned entry may be evicted to fit the RAM budget."""
        with self._mutex:
            entry.pins -= 1
            if self.ram_budget is not None:
                self._make_room(CPU, 0, keep=None, strict=False)

    # -- lock on a device ---------------------------------------------------------------------
    @contextmanager
    def lock(self, handle: PinHandle, device: torch.device | str | None = None) -> Iterator[nn.Module]:
        """The entry's weights on `device` (default: the cache's) for the block; counted, exception-safe."""
        entry = handle.entry()
        device = normalize_device(device or self.device)
        with self._mutex:
            if entry.streamed:
                raise RuntimeError(f"{entry.key!r} is streamed layer by layer; it cannot be locked whole")
            if entry.device is not None and entry.device != device:
                if entry.locks:
                    raise RuntimeError(f"{entry.key!r} is locked on {entry.device}; cannot lock it on {device} too")
                entry.rest()
            if entry.device is None:
                self._make_room(device, entry.nbytes, keep=entry)
                self._load(entry, device)
            entry.locks += 1
            entry.last_use = next(self._clock)
            self.stats.locks += 1
        try:
            yield entry.module
        finally:
            with self._mutex:
                entry.locks -= 1
                self.stats.unlocks += 1
                if entry.locks == 0:
                    if not self.keep_resident:
                        self._offload(entry)
                    else:
                        self._make_room(device, 0, keep=None, strict=False)

    def _load(self, entry: CachedModule, device: torch.device) -> None:
        """Copy pristine onto `device`; all-or-nothing (slots are pointed only once every copy exists)."""
        check_rest(entry.slots, entry.key)
        copies = []
        with torch.inference_mode(False), torch.no_grad():  # normal tensors: the LoRA patcher writes them
            for slot in entry.slots:
                copies.append(self._copy(slot.pristine, device, entry.arena.pinned))
        for slot, tensor in zip(entry.slots, copies):
            slot.point(tensor)
        entry.device = device
        self.stats.loads += 1
        if device.type != "cpu":
            self.stats.h2d_bytes += entry.nbytes

    @staticmethod
    def _copy(src: torch.Tensor, device: torch.device, pinned: bool) -> torch.Tensor:
        if device.type == "cpu":
            return src.clone()
        # Pinned source: the copy is queued on the current stream and the host goes on;
        # compute queued after it on the same stream is ordered after it.
        return torch.empty(src.shape, dtype=src.dtype, device=device).copy_(src, non_blocking=pinned)

    def _offload(self, entry: CachedModule) -> None:
        if entry.device is not None:
            entry.rest()
            self.stats.offloads += 1

    def offload(self, handle: PinHandle) -> None:
        """Drop the entry's device copy now (it must be unlocked)."""
        entry = handle.entry()
        with self._mutex:
            if entry.locks:
                raise RuntimeError(f"{entry.key!r} is locked; it cannot be offloaded")
            self._offload(entry)

    # -- budgets ------------------------------------------------------------------------------
    def set_budgets(self, ram: int | None, vram: int | None) -> None:
        with self._mutex:
            self.ram_budget, self.vram_budget = ram, vram
            self._make_room(CPU, 0, keep=None, strict=False)
            if self.device.type != "cpu":
                self._make_room(self.device, 0, keep=None, strict=False)

    def used(self, device: torch.device | str) -> int:
        """Bytes this cache holds on `device` (RAM for the CPU: pristine arenas plus live CPU copies)."""
        device = normalize_device(device)
        with self._mutex:
            held = sum(e.nbytes for e in self._entries.values() if e.device == device)
            held += sum(r.nbytes for r in self._reservations if r.device == device)
            if device.type == "cpu":
                held += sum(e.arena.size for e in self._entries.values())
            return held

    def pinned_bytes(self) -> int:
        with self._mutex:
            return sum(e.arena.size for e in self._entries.values() if e.arena.pinned)

    def reserve(self, device: torch.device | str, nbytes: int, tag: str) -> Reservation:
        """Hold `nbytes` on `device` for someone else, dropping unlocked copies LRU to make room."""
        device = normalize_device(device)
        with self._mutex:
            self._make_room(device, nbytes, keep=None)
            reservation = Reservation(self, device, nbytes, tag)
            self._reservations.append(reservation)
            return reservation

    def release_reservation(self, reservation: Reservation) -> None:
        with self._mutex:
            if reservation.active:
                reservation.active = False
                self._reservations.remove(reservation)

    def _budget(self, device: torch.device) -> int | None:
        return self.ram_budget if device.type == "cpu" else self.vram_budget

    def _fits(self, device: torch.device, need: int) -> bool:
        budget = self._budget(device)
        return budget is None or self.used(device) + need <= budget

    def _make_room(self, device: torch.device, need: int, keep: CachedModule | None, strict: bool = True) -> None:
        """Offload unlocked copies on `device` (and, for RAM, evict unpinned entries), oldest use first."""
        budget = self._budget(device)
        if budget is None or self.used(device) + need <= budget:
            return
        for entry in sorted(self._entries.values(), key=lambda e: e.last_use):
            if self.used(device) + need <= budget:
                return
            if entry is keep or entry.locks or entry.streamed:
                continue
            if entry.device == device:
                log.info("cache: %s off %s (LRU, over the %.0f MB budget)", entry.key, device, budget / MB)
                self._offload(entry)
            if device.type == "cpu" and entry.pins == 0 and self.used(device) + need > budget:
                self._evict(entry)
        if strict and self.used(device) + need > budget:
            raise OutOfMemory(f"{'RAM' if device.type == 'cpu' else 'VRAM'} budget of {budget / MB:.0f} MB cannot "
                              f"hold {need / MB:.0f} MB more: {self.used(device) / MB:.0f} MB is locked or pinned; "
                              "raise the limit in the preferences or choose a lower memory mode")

    def _evict(self, entry: CachedModule) -> None:
        """Remove an unpinned entry: its module is left on the meta device (reload it to use it)."""
        for slot in entry.slots:
            slot.to_meta()
            slot.pristine = None
        entry.arena.release()
        del self._entries[entry.key]
        self.stats.evictions += 1
        log.info("cache: evicted %s (%.1f MB)", entry.key, entry.nbytes / MB)

    def remove(self, key: str) -> None:
        """Evict `key` now; refused while it is pinned or locked."""
        with self._mutex:
            entry = self._entries[key]
            if entry.pins or entry.locks or entry.streamed:
                raise RuntimeError(f"{key!r} is pinned or locked; release it before removing it")
            self._evict(entry)

    def drop_device_copies(self) -> int:
        """Offload every unlocked entry from every device (OOM recovery); returns bytes freed."""
        with self._mutex:
            freed = 0
            for entry in self._entries.values():
                if entry.device is not None and entry.device.type != "cpu" and not entry.locks:
                    freed += entry.nbytes
                    self._offload(entry)
            return freed

    # -- for the LoRA patcher and the stream engine --------------------------------------------
    def pristine(self, key: str, name: str) -> torch.Tensor | None:
        """The read-only pristine copy of `key`'s tensor `name` ("mod.path.weight"); never written."""
        with self._mutex:
            entry = self._entries.get(key)
            slot = entry.by_name.get(name) if entry else None
            return slot.pristine if slot else None

    @contextmanager
    def streamed(self, handle: PinHandle) -> Iterator[list[Slot]]:
        """Hand the entry's slots to a layer streamer for the block; it cannot be locked meanwhile."""
        entry = handle.entry()
        with self._mutex:
            if entry.locks or entry.streamed:
                raise RuntimeError(f"{entry.key!r} is locked or already streamed")
            self._offload(entry)
            entry.streamed = True
        try:
            yield entry.slots
        finally:
            with self._mutex:
                entry.streamed = False
                entry.rest()

    def check(self) -> list[str]:
        """Consistency problems (empty when all is well): used by tests and after an OOM."""
        problems = []
        with self._mutex:
            for e in self._entries.values():
                if e.locks < 0 or e.pins < 0:
                    problems.append(f"{e.key}: negative count (locks {e.locks}, pins {e.pins})")
                for s in e.slots:
                    live = s.live
                    if s.written_at_rest():
                        problems.append(f"{e.key}.{s.name}: pristine written at rest")
                    if e.device is not None and not e.streamed:
                        if live.device != e.device and not (live.device.type == e.device.type == "cpu"):
                            problems.append(f"{e.key}.{s.name}: on {live.device}, entry says {e.device}")
                        elif s.nbytes and live.untyped_storage().data_ptr() == e.arena.buffer.data_ptr():
                            problems.append(f"{e.key}.{s.name}: live copy aliases the pristine arena")
        return problems


def _record(entry: CachedModule) -> CacheRecord:
    return CacheRecord(entry.key, entry.nbytes, None if entry.device is None else str(entry.device), entry.locks,
                       entry.pins, entry.streamed, entry.arena.pinned)


__all__ = ["CacheRecord", "CachedModule", "ModelCache", "ModelCacheStats", "PinHandle", "PristineCorrupted",
           "Reservation", "normalize_device"]
