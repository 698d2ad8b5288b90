"""Timing and memory helpers of the benchmarks: host-synchronised wall time, RSS."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, result) of `fn()`, with the device's queued work inside the measurement."""
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - t0, result


def rss_gb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in GB (peak from VmHWM)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024 / 1e9
    return fields.get("VmRSS", 0.0), fields.get("VmHWM", 0.0)


def on_threads(threads: int, fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) with torch on `threads` threads (0: as it is), the count put back after."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(before)
