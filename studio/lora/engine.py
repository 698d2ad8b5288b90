"""The LoRA side of a session: file cache, key index and patcher for the loaded pipeline.

One engine per session; `bind` is called for every (re)loaded pipeline. Parsed files are
bound to module names of one architecture, so a rebind empties the cache.
"""

from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from torch import nn

from studio.lora.base import LoraFile
from studio.lora.cache import LoraCache
from studio.lora.keymap import ModelIndex
from studio.lora.patcher import LoraMode, LoraPatcher, PatcherSettings, PatchStats, UnpatchPath
from studio.lora.reader import read_lora
from studio.lora.stack import StackItem
from studio.report import PhaseTimer

MB = 1024 * 1024
COMPONENT_ATTRS = ("unet", "text_encoder", "text_encoder_2")


def _stats_dict(stats: PatchStats) -> dict[str, Any]:
    data = asdict(stats)
    data["unpatch_path"] = stats.unpatch_path.value
    data["seconds"] = round(stats.seconds, 5)
    data["bytes_moved"] = stats.bytes_moved
    return data


class LoraEngine:
    def __init__(self, cache_mb: int, settings: PatcherSettings) -> None:
        self.cache = LoraCache(cache_mb * MB, self._read)
        self.settings = settings
        self._index: ModelIndex | None = None
        self._patcher: LoraPatcher | None = None
        # method -> seconds of the last stack change that took LoRA weights off (patch included)
        self.unpatch_costs: dict[str, float] = {}

    def _read(self, path: Path) -> LoraFile:
        if self._index is None:
            raise RuntimeError("LoraEngine.bind() must run before LoRAs are read")
        return read_lora(path, self._index)

    def bind(self, components: Mapping[str, nn.Module]) -> None:
        """Attach to a freshly loaded pipeline (its weights are pristine)."""
        self.unbind()
        self._index = ModelIndex.from_modules(components)
        self._patcher = LoraPatcher(components, self.settings)

    def unbind(self) -> None:
        """Restore every weight of the old pipeline and forget its parses."""
        if self._patcher is not None:
            self._patcher.close()
        self._patcher = None
        self._index = None
        self.cache.clear()

    def configure(self, cache_mb: int, settings: PatcherSettings) -> None:
        self.cache.byte_budget = cache_mb * MB
        self.settings = settings
        if self._patcher is not None:
            self._patcher.configure(settings)

    @property
    def applied(self) -> list[tuple[LoraFile, float]]:
        return list(self._patcher.applied) if self._patcher else []

    @contextmanager
    def applied_stack(self, items: Sequence[StackItem], timer: PhaseTimer) -> Iterator[dict[str, Any]]:
        """Pin the files, bring the weights to the stack, yield the report's `lora` section.

        The pins hold for the whole block (the generation); the weights stay patched after
        it, so the same stack next time costs nothing.
        """
        assert self._patcher is not None, "bind() first"
        report: dict[str, Any] = {"mode": self.settings.mode.value,
                                  "unpatch_lora_by_vram_offload": self.settings.unpatch_lora_by_vram_offload}
        with ExitStack() as pins:
            with timer.phase("lora_load"):
                pinned = [(item, pins.enter_context(self.cache.pin(item.path))) for item in items]
            report["stack"] = [
                {"name": item.name, "path": str(item.path), "weight": item.weight, "hash": pin.lora.short_hash,
                 "format": pin.lora.format, "cache": "hit" if pin.hit else "miss", "layers": len(pin.lora.patches),
                 "unmatched_keys": len(pin.lora.unmatched_keys),
                 "unmatched_examples": pin.lora.unmatched_keys[:5]} for item, pin in pinned]
            with timer.phase("lora_patch"):
                stats = self._patcher.apply([(pin.lora, item.weight) for item, pin in pinned])
            report["patch"] = _stats_dict(stats)
            switch_seconds = stats.seconds  # restore and re-patch are one fused pass per tensor
            if self.settings.unpatch_lora_by_vram_offload and stats.tensors_restored:
                # Dropped weights reload from the pristine RAM copy; doing it here (rather than in
                # the first forward's hook) puts its cost in its own phase of the report.
                start = time.perf_counter()
                with timer.phase("lora_unpatch_reload"):
                    reload = self._patcher.materialize()
                report["reload"] = _stats_dict(reload)
                switch_seconds += time.perf_counter() - start
            if stats.tensors_restored:
                method = (UnpatchPath.OFFLOAD if self.settings.unpatch_lora_by_vram_offload
                          else UnpatchPath.RESTORE).value
                self.unpatch_costs[method] = switch_seconds
                report["unpatch"] = {"method": method, "tensors": stats.tensors_restored,
                                     "switch_seconds": round(switch_seconds, 5)}
            else:
                report["unpatch"] = {"method": UnpatchPath.NONE.value, "tensors": 0, "switch_seconds": 0.0}
            report["cache"] = {"bytes": self.cache.bytes_used, "entries": len(self.cache),
                               "budget_bytes": self.cache.byte_budget, **asdict(self.cache.stats)}
            yield report


def patcher_settings(mode: str, unpatch_by_offload: bool) -> PatcherSettings:
    return PatcherSettings(mode=LoraMode(mode), unpatch_lora_by_vram_offload=unpatch_by_offload)
