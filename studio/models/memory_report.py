"""The memory part of every generation's report: where the weights are, and what moved.

A plain dict to merge into `Report.memory`. Peers print part of this (A1111: allocated/
reserved/system VRAM; Forge: model-move times; ComfyUI: loaded vs offloaded MB); we give all
of it per generation, with the mode that actually ran (auto picks one, a CPU-only machine
degrades every mode to "cpu", and the notes say why).
"""

from __future__ import annotations

from types import TracebackType

import torch

from studio.choices import MemoryMode
from studio.memory import PeakRss, rss_bytes
from studio.models.placement import Placement


def memory_report(placement: Placement, *, lora_cache_bytes: int = 0, h2d_bytes: int | None = None,
                  peak_rss: int | None = None, cuda_peaks: dict[str, int] | None = None) -> dict:
    """Where each component's weights are, pinned and cached bytes, peaks, and host-to-device bytes.

    `h2d_bytes`: copied during the generation (MemoryWatch measures it); None reports the total
    since the cache was made. `cuda_peaks` as studio.memory.cuda_peaks fills it.
    """
    cache = placement.cache
    components = {name: c.to_dict() for name, c in placement.components().items()}
    out: dict = {
        "mode": str(placement.mode),
        "mode_requested": placement.requested.value,
        "device": str(placement.device),
        "notes": list(placement.notes),
        "components": components,
        "weights_on_device_bytes": sum(c["device_bytes"] for c in components.values()),
        "weights_bytes": sum(c["bytes"] for c in components.values()),
        "pinned_bytes": cache.pinned_bytes(),
        "cache_ram_bytes": cache.used("cpu"),
        "lora_cache_bytes": int(lora_cache_bytes),
        "h2d_bytes": placement.h2d_bytes if h2d_bytes is None else h2d_bytes,
        "rss": rss_bytes(),
    }
    if peak_rss is not None:
        out["peak_rss"] = peak_rss
    if cuda_peaks:
        out.update(cuda_peaks)
    if placement.streamer is not None:
        stats = placement.streamer.stats
        out["stream"] = {"impl": placement.stream_impl.value, "lookahead": placement.streamer.lookahead,
                         "units": len(placement.streamer.units), "reserved_bytes": placement.streamer.reserved_bytes,
                         "max_in_flight": stats.max_in_flight, "resyncs": stats.resyncs,
                         "copied_bytes": stats.copied_bytes}
    elif placement.mode == MemoryMode.STREAM:
        out["stream"] = {"impl": placement.stream_impl.value, "lookahead": 1}
    return out


class MemoryWatch:
    """Measures one generation: host-to-device bytes, peak RSS and CUDA peaks between enter and exit.

        with MemoryWatch(placement) as watch:
            ... the generation ...
        report.memory.update(watch.report(lora_cache_bytes=lora_cache.bytes))
    """

    def __init__(self, placement: Placement) -> None:
        self.placement = placement
        self._rss = PeakRss()
        self._h2d_start = 0
        self.h2d_bytes = 0
        self.cuda: dict[str, int] = {}

    def __enter__(self) -> MemoryWatch:
        self._h2d_start = self.placement.h2d_bytes
        if self.placement.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.placement.device)
        self._rss.__enter__()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._rss.__exit__(t, e, tb)
        self.h2d_bytes = self.placement.h2d_bytes - self._h2d_start
        device = self.placement.device
        if device.type == "cuda":
            self.cuda = {"cuda_peak_allocated": torch.cuda.max_memory_allocated(device),
                         "cuda_peak_reserved": torch.cuda.max_memory_reserved(device),
                         "cuda_allocated": torch.cuda.memory_allocated(device)}

    def report(self, *, lora_cache_bytes: int = 0) -> dict:
        return memory_report(self.placement, lora_cache_bytes=lora_cache_bytes, h2d_bytes=self.h2d_bytes,
                             peak_rss=self._rss.peak, cuda_peaks=self.cuda)
