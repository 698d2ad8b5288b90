"""Memory readings for reports: process RSS (and its peak over a span), CUDA peaks.

Peak RSS over a span uses Linux's VmHWM, reset through /proc/self/clear_refs ("5"),
which is exact and free; elsewhere a sampling thread (10 ms) stands in.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psutil
import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def _vm_hwm() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


class PeakRss:
    """Peak RSS between enter and exit; read `.peak` after the block."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._exact = False

    def __enter__(self) -> PeakRss:
        self.peak = rss_bytes()
        self._exact = _reset_hwm() and _vm_hwm() is not None
        if not self._exact:
            self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        hwm = _vm_hwm() if self._exact else None
        self.peak = max(self.peak, hwm or 0, rss_bytes())


def cuda_now(device: torch.device) -> dict[str, int]:
    """Allocated/reserved bytes on a CUDA device now (empty dict on CPU), for the status line."""
    if device.type != "cuda":
        return {}
    return {"cuda_allocated": torch.cuda.memory_allocated(device),
            "cuda_reserved": torch.cuda.memory_reserved(device)}


@contextmanager
def cuda_peaks(device: torch.device) -> Iterator[dict[str, int]]:
    """Peak allocated/reserved bytes on a CUDA device during the block (empty dict on CPU)."""
    out: dict[str, int] = {}
    if device.type != "cuda":
        yield out
        return
    torch.cuda.reset_peak_memory_stats(device)
    try:
        yield out
    finally:
        out["cuda_peak_allocated"] = torch.cuda.max_memory_allocated(device)
        out["cuda_peak_reserved"] = torch.cuda.max_memory_reserved(device)
        out["cuda_allocated"] = torch.cuda.memory_allocated(device)


def release_freed_memory() -> None:
    """Give freed heap pages back to the OS (glibc keeps them otherwise, which looks like a leak)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        try:
            ctypes.CDLL(libc_name).malloc_trim(0)
        except (OSError, AttributeError):
            pass
