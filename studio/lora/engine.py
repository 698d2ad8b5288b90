"""The LoRA side of a session: file cache, key index and one patcher per phase of the pipeline.

One engine per session; `bind` is called for every (re)loaded pipeline. Parsed files are
bound to module names of one architecture, so a rebind empties the cache.

There is one patcher per phase that holds LoRA targets (text encoders, UNet): each applies
while its components are placed on the device (`WarmPipeline.phase`), so in offload mode a
LoRA is never merged into the pristine RAM copy a component rests on between phases.

Merged or sidecar is decided per layer from one question, the placement's `merge_blocker`
("why must this layer not be merged into?": streamed, stored in fp8): merged mode turns into
auto for a phase where any layer is blocked, and the report says why.

Block weights reach the patcher as per-layer weights (studio.lora.schedule.phase_weight). A
step range (`start=`/`stop=`) is switched at the step boundary (`AppliedStack.step`): in merged
mode by an incremental apply (only that LoRA's UNet tensors, exact: pristine + the active sum),
in sidecar mode by gating its sidecars; each switch's cost goes into the report.
"""

from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from studio.choices import LoraMode
from studio.lora.base import LoraFile
from studio.lora.cache import LoraCache, LoraPin
from studio.lora.keymap import ModelIndex
from studio.lora.block_weights import block_of, layer_weights
from studio.lora.patcher import LoraPatcher, PatcherSettings, PatchStats, UnpatchPath, Weight
from studio.lora.reader import read_lora
from studio.lora.schedule import active, boundaries, has_ranges, phase_weight, range_notes
from studio.lora.sidecar import MergeBlocker, fp8_blocker
from studio.lora.stack import StackItem
from studio.phases import LORA_TARGETS, PHASE_COMPONENTS, Component, Phase
from studio.report import PhaseTimer

MB = 1024 * 1024
_LABELS = {Component.UNET: "UNet", Component.TEXT_ENCODER: "text encoder 1", Component.TEXT_ENCODER_2: "text encoder 2"}


def _stats_dict(stats: PatchStats) -> dict[str, Any]:
    data = asdict(stats)
    data["unpatch_path"] = stats.unpatch_path.value
    data["seconds"] = round(stats.seconds, 5)
    data["bytes_moved"] = stats.bytes_moved
    return data


def _add(total: PatchStats, part: PatchStats) -> None:
    for f in fields(PatchStats):
        if f.name != "unpatch_path":
            setattr(total, f.name, getattr(total, f.name) + getattr(part, f.name))
    if part.unpatch_path is not UnpatchPath.NONE:
        total.unpatch_path = part.unpatch_path


@dataclass
class AppliedStack:
    """The pinned files of one generation; `apply(phase)` patches that phase's components."""

    engine: LoraEngine
    pinned: list[tuple[StackItem, LoraPin]]
    timer: PhaseTimer
    report: dict[str, Any]
    total: PatchStats
    reload: PatchStats
    switch_seconds: float = 0.0
    unpatch_methods: list[UnpatchPath] = field(default_factory=list)  # what took LoRAs off, in order
    steps: int = 0  # the generation's denoise steps (0: no step ranges, as in bake)
    switch_steps: list[int] | None = None  # steps before which a step range switches (computed once)

    def stack(self, phase: Phase, step: int = 0) -> list[tuple[Any, Weight]]:
        """(LoraFile, weight) for `phase`'s patcher at denoise step `step` (gated LoRAs stay in)."""
        gating = self._gating(phase)
        return [(pin.lora, phase_weight(item, phase, self.engine.block_lookup,
                                        gating or not self.steps or active(item, step, self.steps)))
                for item, pin in self.pinned]

    def full_stack(self) -> list[tuple[Any, Weight]]:
        """Every layer's weight with no step range (bake: a checkpoint has no steps)."""
        return [(pin.lora, layer_weights(item.spec, item.blocks, self.engine.block_lookup))
                for item, pin in self.pinned]

    def _gating(self, phase: Phase) -> bool:
        patcher = self.engine.patcher(phase)
        return bool(self.steps) and phase is Phase.DENOISE and patcher is not None \
            and patcher.settings.mode is LoraMode.SIDECAR

    def _closed(self, step: int) -> list[Any]:
        return [pin.lora for item, pin in self.pinned if not active(item, step, self.steps)]

    def apply(self, phase: Phase) -> None:
        patcher = self.engine.patcher(phase)
        if patcher is None:
            return
        self._patch(patcher, self.stack(phase, 0))
        # a gate is the generation's: open every sidecar, then close what step 0 keeps off
        patcher.gate(self._closed(0) if self._gating(phase) else [])
        self._summarise()

    def step(self, phase: Phase, index: int) -> None:
        """Before denoise step `index` (0-based): switch the LoRAs a step range turns on or off there."""
        if not self.steps or index not in self._boundaries:
            return
        patcher = self.engine.patcher(phase)
        if patcher is None:
            return
        start = time.perf_counter()
        row: dict[str, Any] = {"step": index, "on": [item.name for item, _ in self.pinned
                                                    if active(item, index, self.steps)]}
        if self._gating(phase):
            with self.timer.phase("lora_step_switch"):
                row["method"], row["sidecars_gated"] = "gate", patcher.gate(self._closed(index))
        else:
            # Its own totals: the report's "patch" stays the work of bringing the stack in at step 0.
            stats = self._patch(patcher, self.stack(phase, index), "lora_step_switch", PatchStats())
            row["method"], row["tensors_touched"] = "incremental", stats.tensors_touched
        row["seconds"] = round(time.perf_counter() - start, 5)
        self.report.setdefault("step_switches", []).append(row)

    @property
    def _boundaries(self) -> list[int]:
        if self.switch_steps is None:
            items = [item for item, _ in self.pinned]
            self.switch_steps = boundaries(items, self.steps) if has_ranges(items) else []
        return self.switch_steps

    def _patch(self, patcher: LoraPatcher, stack: list[tuple[Any, Weight]], timer_phase: str = "lora_patch",
               total: PatchStats | None = None) -> PatchStats:
        start = time.perf_counter()
        with self.timer.phase(timer_phase):
            stats = patcher.apply(stack)
            if total is not None:  # a step switch: its reload is part of its own cost
                _add(total, stats)
                if patcher.settings.unpatch_lora_by_vram_offload and stats.tensors_restored:
                    _add(total, patcher.materialize())
                return total
        _add(self.total, stats)
        if stats.tensors_restored and stats.unpatch_path not in self.unpatch_methods:
            self.unpatch_methods.append(stats.unpatch_path)
        if patcher.settings.unpatch_lora_by_vram_offload and stats.tensors_restored:
            # Dropped weights reload from the pristine copy here rather than in the first forward's
            # hook, so their cost is a phase of its own in the report.
            with self.timer.phase("lora_unpatch_reload"):
                _add(self.reload, patcher.materialize())
        if stats.tensors_restored:
            self.switch_seconds += time.perf_counter() - start  # restore and re-patch: one pass per tensor
        return stats

    def record_cost(self) -> None:
        """Once the job's phases have run: what its stack change cost, under the one path that ran
        (a mixed switch's cost belongs to neither path alone)."""
        if self.total.tensors_restored and len(self.unpatch_methods) == 1:
            self.engine.unpatch_costs[self.unpatch_methods[0].value] = self.switch_seconds

    def _summarise(self) -> None:
        self.report["patch"] = _stats_dict(self.total)
        if self.reload.tensors_touched:
            self.report["reload"] = _stats_dict(self.reload)
        if self.total.tensors_restored:
            # The path(s) that ran, from the patchers' own stats: the setting may have changed since
            # (it applies now, between phases), and then each phase ran the one it had (issue 11).
            method = " + ".join(path.value for path in self.unpatch_methods)
            self.report["unpatch"] = {"method": method, "tensors": self.total.tensors_restored,
                                      "switch_seconds": round(self.switch_seconds, 5)}


class LoraEngine:
    def __init__(self, cache_mb: int, settings: PatcherSettings) -> None:
        self.cache = LoraCache(cache_mb * MB, self._read)
        self.settings = settings
        self._index: ModelIndex | None = None
        self._blocks: dict[tuple[str, str], int | None] = {}  # (component, module) -> LBW block
        self._roots: dict[str, nn.Module] = {}
        self._patchers: dict[Phase, LoraPatcher] = {}
        self._blocked: dict[Phase, list[str]] = {}  # phase -> notes on layers that cannot be merged into
        # method -> seconds of the last stack change that took LoRA weights off (patch included)
        self.unpatch_costs: dict[str, float] = {}

    def _read(self, path: Path) -> LoraFile:
        if self._index is None:
            raise RuntimeError("LoraEngine.bind() must run before LoRAs are read")
        return read_lora(path, self._index)

    def bind(self, components: Mapping[str, nn.Module], *,
             pristine_source: Callable[[str, str], torch.Tensor | None] | None = None,
             merge_blocker: MergeBlocker = fp8_blocker) -> None:
        """Attach to a freshly loaded pipeline (its weights are pristine).

        `merge_blocker(module)` says why a layer must not be merged into (None: it may be):
        the memory engine's answer for streamed and fp8-stored layers.
        """
        self.unbind()
        self._index = ModelIndex.from_modules(components)
        self._roots = dict(components)
        for phase, parts in PHASE_COMPONENTS.items():
            owned = {part.value: components[part] for part in parts if part in LORA_TARGETS and part in components}
            if not owned:
                continue
            self._blocked[phase] = [f"{_LABELS[Component(name)]} LoRAs run as sidecars where layers are {reason}"
                                    for name, root in owned.items() for reason in _block_reasons(root, merge_blocker)]
            self._patchers[phase] = LoraPatcher(owned, self._settings_for(phase), pristine_source=pristine_source,
                                                merge_blocker=merge_blocker, partial=True)

    def block_lookup(self, component: str, module: str) -> int | None:
        """The LoRA Block Weight block of a layer (index into block_weights.BLOCKS_20), None outside all."""
        key = (component, module)
        if key not in self._blocks:
            sgm = self._index.sgm_path(module) if self._index is not None and component == "unet" else None
            self._blocks[key] = block_of(component, sgm)
        return self._blocks[key]

    def footprint(self, lora: LoraFile) -> list[tuple[str, str, int | None, int]]:
        """(component, module, LBW block, weight bytes) of every layer `lora` patches: what a grid's
        cost model counts (studio.grid_order)."""
        out = []
        for patch in lora.patches:
            root = self._roots.get(patch.component)
            weight = getattr(root.get_submodule(patch.module), "weight", None) if root is not None else None
            size = weight.numel() * weight.element_size() if isinstance(weight, torch.Tensor) else 0
            out.append((patch.component, patch.module, self.block_lookup(patch.component, patch.module), size))
        return out

    def patcher(self, phase: Phase) -> LoraPatcher | None:
        """The patcher of `phase`'s components (None: nothing a LoRA patches runs in it)."""
        return self._patchers.get(phase)

    def _settings_for(self, phase: Phase) -> PatcherSettings:
        if self._blocked.get(phase) and self.settings.mode is LoraMode.MERGED:
            return replace(self.settings, mode=LoraMode.AUTO)
        return self.settings

    def unbind(self) -> None:
        """Restore every weight of the old pipeline and forget its parses."""
        try:
            for patcher in self._patchers.values():
                patcher.close()
        finally:
            self._patchers = {}
            self._blocked = {}
            self._blocks = {}
            self._roots = {}
            self._index = None
            self.cache.clear()

    def clear(self) -> None:
        """Take every LoRA off (weights back to pristine, reloaded if they were dropped)."""
        for patcher in self._patchers.values():
            patcher.clear()
            patcher.materialize()

    def configure(self, cache_mb: int, settings: PatcherSettings) -> None:
        """New settings, now: the cache budget at once, the patchers at their next apply."""
        self.cache.set_budget(cache_mb * MB)
        self.settings = settings
        for phase, patcher in self._patchers.items():
            patcher.configure(self._settings_for(phase))

    @contextmanager
    def pinned(self, items: Sequence[StackItem], timer: PhaseTimer, steps: int = 0) -> Iterator[AppliedStack]:
        """Pin the files for the whole block (the generation); phases then `apply` their part.

        `steps`: the denoise steps, for step ranges (0: none apply). The weights stay patched after
        the block, so the same stack next time costs nothing.
        """
        notes = [note for phase_notes in self._blocked.values() for note in phase_notes] \
            if self.settings.mode is LoraMode.MERGED else []
        notes = notes + (range_notes(items, steps) if steps else [])
        report: dict[str, Any] = {"mode": self.settings.mode.value,
                                  "unpatch_lora_by_vram_offload": self.settings.unpatch_lora_by_vram_offload,
                                  "notes": notes}
        with ExitStack() as pins:
            with timer.phase("lora_load"):
                pinned = [(item, pins.enter_context(self.cache.pin(item.path))) for item in items]
            report["stack"] = [
                {"name": item.name, "path": str(item.path), "weight": item.weight,
                 **({"options": item.spec.options} if item.spec.options else {}), "hash": pin.lora.short_hash,
                 "format": pin.lora.format, "cache": "hit" if pin.hit else "miss", "layers": len(pin.lora.patches),
                 "unmatched_keys": len(pin.lora.unmatched_keys),
                 "unmatched_examples": pin.lora.unmatched_keys[:5]} for item, pin in pinned]
            report["unpatch"] = {"method": UnpatchPath.NONE.value, "tensors": 0, "switch_seconds": 0.0}
            applied = AppliedStack(self, pinned, timer, report, PatchStats(),
                                   PatchStats(unpatch_path=UnpatchPath.OFFLOAD), steps=steps)
            applied._summarise()
            try:
                yield applied
            finally:
                applied.record_cost()
                report["cache"] = {"bytes": self.cache.bytes_used, "entries": len(self.cache),
                                   "budget_bytes": self.cache.byte_budget, **asdict(self.cache.stats)}


def _block_reasons(root: nn.Module, merge_blocker: MergeBlocker) -> list[str]:
    """Every reason `merge_blocker` gives for a layer under `root`, once each."""
    reasons = {merge_blocker(module) for module in root.modules()}
    return sorted(r for r in reasons if r)


def patcher_settings(mode: LoraMode | str, unpatch_by_offload: bool) -> PatcherSettings:
    return PatcherSettings(mode=LoraMode(mode), unpatch_lora_by_vram_offload=unpatch_by_offload)
