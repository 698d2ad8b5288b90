"""What the model cache reports about itself: records of entries and counters.

Plain data; the cache (studio.models.cache) fills them and the memory report reads them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
class ModelCacheStats:
    hits: int = 0
    misses: int = 0
    locks: int = 0
    unlocks: int = 0
    loads: int = 0  # copies of a whole entry onto a device
    offloads: int = 0  # device copies dropped
    evictions: int = 0  # entries removed from RAM
    h2d_bytes: int = 0  # host -> CUDA bytes copied by locks


def normalize_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device
