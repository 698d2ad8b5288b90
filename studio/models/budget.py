"""Memory budgets, the working-memory reserve, and turning an OOM into a clean engine error.

- RAM and VRAM limits default to what is measured free now (psutil, `torch.cuda.mem_get_info`)
  plus what our cache already holds; a limit set in the preferences wins. InvokeAI measures VRAM
  live too, and rejected sizing RAM from memory pressure (research/invokeai.md 1).
- A working reserve is kept free on the device for activations: 3 GiB by default (InvokeAI's
  `device_working_mem_gb`), raised before VAE decode to an estimate by image size.
- VAE decode estimate: pixels x element size x 2200 bytes, +25% when tiled (InvokeAI
  `vae_working_memory.py`, measured on GPUs). Measured here on the CPU (peak RSS over the decode,
  real-size SDXL VAE, random weights): 1,588 / 1,327 / 1,106 bytes at 128/256/512 px in bf16 and
  1,738 / 1,235 / 985 in fp32; the tiny VAE 209-300. So 2200 is a safe upper bound on the CPU;
  bench/gpu_suite.py measures the CUDA factor.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import psutil
import torch

from studio.errors import OutOfMemory

log = logging.getLogger(__name__)
MB = 1 << 20
GB = 1 << 30
DEFAULT_WORKING = 3 * GB
RAM_HEADROOM = 2 * GB  # left to the OS, the UI and the LoRA cache when RAM is measured
VAE_DECODE_BYTES_PER_PIXEL_ELEMENT = 2200
TILED_FACTOR = 1.25


@dataclass(frozen=True)
class Budgets:
    """Bytes the model cache may hold in RAM and on the device, and the device reserve."""

    ram: int
    vram: int  # for weights and stream buffers, the working reserve already taken off; 0 without a GPU
    working: int  # kept free on the device for activations
    vram_total: int = 0
    ram_source: str = "measured"  # "measured" or "setting"
    vram_source: str = "measured"
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict:
        return {"ram": self.ram, "vram": self.vram, "working": self.working, "vram_total": self.vram_total,
                "ram_source": self.ram_source, "vram_source": self.vram_source, "notes": list(self.notes)}


def measure_budgets(device: torch.device | str, *, ram_limit_mb: int = 0, vram_limit_mb: int = 0,
                    working_memory_mb: int = 0, held_ram: int = 0, held_vram: int = 0) -> Budgets:
    """Budgets from the settings where set, else from free memory now plus what we already hold."""
    device = torch.device(device)
    notes = []
    if ram_limit_mb:
        ram, ram_source = ram_limit_mb * MB, "setting"
    else:
        ram, ram_source = max(psutil.virtual_memory().available + held_ram - RAM_HEADROOM, 0), "measured"
    working = working_memory_mb * MB if working_memory_mb else DEFAULT_WORKING
    if device.type != "cuda":
        notes.append("no GPU: every weight stays in RAM")
        return Budgets(ram, 0, 0, 0, ram_source, "none", tuple(notes))
    free, total = torch.cuda.mem_get_info(device)
    if vram_limit_mb:
        vram, vram_source = vram_limit_mb * MB, "setting"
        if vram > total:
            notes.append(f"VRAM limit {vram_limit_mb} MB is above the card's {total // MB} MB")
    else:
        vram, vram_source = free + held_vram, "measured"
    if working >= vram:
        notes.append(f"working reserve {working // MB} MB leaves no VRAM for weights")
    return Budgets(ram, max(vram - working, 0), working, total, ram_source, vram_source, tuple(notes))


def vae_decode_bytes(width: int, height: int, dtype: torch.dtype, *, tiled: bool = False, batch: int = 1) -> int:
    """Working memory a VAE decode of this size needs (InvokeAI's estimate, see the module doc)."""
    need = batch * width * height * dtype.itemsize * VAE_DECODE_BYTES_PER_PIXEL_ELEMENT
    return int(need * TILED_FACTOR) if tiled else need


def device_free_bytes(device: torch.device | str) -> int:
    """Free device memory including what torch's allocator caches but does not use; 0 on the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


@contextmanager
def working_reserve(cache, device: torch.device | str, nbytes: int, *, baseline: int = 0,
                    tag: str = "working memory") -> Iterator[bool]:
    """Hold `nbytes` free on `device` for the block, dropping unlocked cached weights LRU to make room.

    `baseline` is the reserve the budgets already keep free (Budgets.working): only the rest is
    taken from the cache's budget. Yields False (nothing held) when it cannot fit even then: the
    caller tiles. The CPU has no reserve to keep: yields True.
    """
    device = torch.device(device)
    if device.type != "cuda":
        yield True
        return
    try:
        reservation = cache.reserve(device, max(nbytes - baseline, 0), tag)
    except OutOfMemory:
        yield False
        return
    try:
        if device_free_bytes(device) < nbytes:  # the budget is our bookkeeping; the card has the last word
            cache.drop_device_copies()
            torch.cuda.empty_cache()
        yield device_free_bytes(device) >= nbytes
    finally:
        reservation.release()


def is_oom(err: BaseException) -> bool:
    return isinstance(err, (torch.OutOfMemoryError, MemoryError))


@contextmanager
def oom_guard(cache=None, what: str = "the generation") -> Iterator[None]:
    """Turn a CUDA (or host) out-of-memory error into OutOfMemory after freeing what can be freed.

    Wrap it OUTSIDE the locks and phases: they unwind first (their `finally` blocks restore the
    cache's counts and put weights back at rest), then this drops every unlocked device copy and
    the allocator's cache, checks the cache is consistent, and raises one clear error.

    `cache` may be a callable returning the cache (or None): it is asked when the OOM happens, so
    a guard entered before a cold model load still frees the cache that load created (issue 11).
    """
    try:
        yield
    except BaseException as err:
        if not is_oom(err):
            raise
        if callable(cache):
            cache = cache()
        freed = cache.drop_device_copies() if cache is not None else 0
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        problems = cache.check() if cache is not None else []
        if problems:
            log.error("model cache inconsistent after an OOM: %s", "; ".join(problems[:5]))
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OutOfMemory(f"out of memory during {what} ({first}); freed {freed / MB:.0f} MB of cached weights. "
                          "Try a smaller size, the offload or stream memory mode, or close other GPU programs") \
            from err
