"""The small types of the model cache: the pin handle, device reservations, records and counters.

They hold no policy; studio.models.cache does. A handle knows its state and says plainly when
it is misused (released twice, used after release), as httpx's client does.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from studio.models.cache import ModelCache, _Entry


@dataclass(frozen=True)
class CacheRecord:
    key: str
    nbytes: int  # weights (one copy)
    device: str | None  # where the live copy is; None: at rest on the pristine copy
    locks: int
    pins: int
    streamed: bool
    pinned_memory: bool


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    locks: int = 0
    unlocks: int = 0
    loads: int = 0  # copies of a whole entry onto a device
    offloads: int = 0  # device copies dropped
    evictions: int = 0  # entries removed from RAM
    h2d_bytes: int = 0  # host -> CUDA bytes copied by locks


class PinHandle:
    """Holds an entry in RAM from creation until `release()` (or the end of a `with` block)."""

    def __init__(self, cache: ModelCache, entry: _Entry) -> None:
        self._cache, self._entry, self._released = cache, entry, False

    @property
    def key(self) -> str:
        return self._entry.key

    @property
    def module(self) -> nn.Module:
        return self.entry().module

    @property
    def released(self) -> bool:
        return self._released

    def entry(self) -> _Entry:
        if self._released:
            raise RuntimeError(f"the pin on {self.key!r} was released; pin it again before use")
        return self._entry

    def release(self) -> None:
        if self._released:
            raise RuntimeError(f"the pin on {self.key!r} was already released")
        self._released = True
        self._cache._unpin(self._entry)

    def __enter__(self) -> PinHandle:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"PinHandle({self.key!r}, {'released' if self._released else 'held'})"


class Reservation:
    """Device memory held outside any entry (stream buffers, VAE working memory); counted in budgets."""

    def __init__(self, cache: ModelCache, device: torch.device, nbytes: int, tag: str) -> None:
        self._cache, self.device, self.nbytes, self.tag, self.active = cache, device, nbytes, tag, True

    def release(self) -> None:
        with self._cache._mutex:
            if self.active:
                self.active = False
                self._cache._reservations.remove(self)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def normalize_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device
