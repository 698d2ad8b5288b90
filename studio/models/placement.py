"""Memory modes on a loaded SDXL pipeline: where each component's weights live, per phase.

    placement = apply_memory_mode(pipe, MemoryMode.AUTO, device, budgets, lookahead=2, cache=cache)
    with placement.phase(Phase.TEXT_ENCODE): ...    # TE1+TE2 on the device
    with placement.phase(Phase.DENOISE): ...        # UNet on the device, or streamed
    with placement.phase(Phase.DECODE): ...         # VAE on the device
    placement = placement.switch(MemoryMode.STREAM, budgets, 4)   # no reload: pristine copies are reused

- full: every component locked on the device for the placement's lifetime.
- offload: each phase locks what it needs through the model cache; unlocked copies stay on
  the device while the VRAM budget allows and are dropped least-recently-used after.
- stream: the UNet streams unit by unit from pinned RAM (studio.models.stream, our bounded
  N-lookahead ring), or through diffusers' group offloading (`StreamImpl.DIFFUSERS_LEAF` or
  `DIFFUSERS_BLOCK`, lookahead 1 with a host sync per group) so the benchmark can compare;
  the other components behave as in offload.
- auto: full if everything fits the VRAM budget, else offload if the largest phase fits, else stream.
Without a GPU every mode degrades to "everything on the CPU" (mode "cpu", with a note), unless
`emulate_on_cpu` runs the requested mode's machinery on the CPU (tests, bench --dry-run).

Weights may only be written (LoRA patches) inside the phase that holds their component: outside
it they may point at the pristine copy. Streamed and fp8 layers take LoRAs as sidecars only
(`Placement.merge_blocker` says which and why); a merge into a streamed layer is caught as
PristineCorrupted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch

from studio.choices import MemoryMode, StreamImpl, allowed
from studio.models.budget import Budgets
from studio.models.cache import ModelCache, PinHandle, PristineCorrupted, normalize_device
from studio.models.fp8 import is_fp8_stored
from studio.models.stream import STREAMED_ATTR, LayerStreamer, is_streamed
from studio.phases import PHASE_COMPONENTS, Component, Phase

log = logging.getLogger(__name__)
MB = 1 << 20
CPU_ONLY = "cpu"  # the mode that runs without a GPU, whatever was asked


@dataclass(frozen=True)
class ComponentPlacement:
    where: str  # "gpu", "cpu" or "streamed" (layers copied to the GPU as they run)
    bytes: int  # weights (one copy)
    device_bytes: int  # on the GPU right now (0 without one)
    on_demand: bool = False  # moves to the GPU for its phase (offload)

    def to_dict(self) -> dict:
        return {"where": self.where, "bytes": self.bytes, "device_bytes": self.device_bytes,
                "on_demand": self.on_demand}


@dataclass
class Placement:
    """Where the pipeline's weights are; phases lock what each step needs. Close it to undo."""

    pipe: object
    cache: ModelCache
    device: torch.device
    requested: MemoryMode
    mode: str  # what runs: a MemoryMode other than auto, or CPU_ONLY
    lookahead: int
    stream_impl: StreamImpl
    handles: dict[str, PinHandle]
    notes: list[str] = field(default_factory=list)
    streamer: LayerStreamer | None = None
    _stack: ExitStack = field(default_factory=ExitStack)
    _closed: bool = False

    @contextmanager
    def phase(self, phase: Phase | str) -> Iterator[None]:
        """The components of `phase` on the device for the block (no-op where already there)."""
        if self._closed:
            raise RuntimeError("this Placement was closed; use the one switch() returned")
        try:
            phase = Phase(phase)
        except ValueError:
            raise ValueError(f"unknown phase {phase!r}; expected one of {allowed(Phase)}") from None
        with ExitStack() as stack:
            if self.mode in (MemoryMode.OFFLOAD, MemoryMode.STREAM):
                for component in PHASE_COMPONENTS[phase]:
                    if component in self.handles and not (self.mode == MemoryMode.STREAM and component is Component.UNET):
                        stack.enter_context(self.cache.lock(self.handles[component], self.device))
            if self.streamer is not None and phase is Phase.DENOISE:
                self.streamer.verify_rest()
                stack.callback(self.streamer.idle)  # in-flight buffers go back, also after an error
            yield

    def components(self) -> dict[str, ComponentPlacement]:
        out = {}
        for name, handle in self.handles.items():
            record = self.cache.lookup(handle.key)
            on_device = record is not None and record.device is not None and record.device != "cpu"
            if name is Component.UNET and self.mode == MemoryMode.STREAM:
                where = "streamed"
                device_bytes = self.streamer.resident_bytes if self.streamer and self.device.type == "cuda" else 0
            else:
                where = "gpu" if on_device else "cpu"
                device_bytes = record.nbytes if on_device else 0
            on_demand = self.mode in (MemoryMode.OFFLOAD, MemoryMode.STREAM) and where != "streamed"
            out[name] = ComponentPlacement(where, record.nbytes if record else 0, device_bytes, on_demand)
        return out

    @staticmethod
    def merge_blocker(module: torch.nn.Module) -> str | None:
        """Why a LoRA must not be merged into `module` (None: it may be), for the LoRA engine: streamed
        layers (their live weight is the pinned pristine copy between forwards) and fp8-stored layers
        (merging loses ~85% of the delta) take LoRAs as sidecars."""
        if is_streamed(module):
            return "streamed"
        if is_fp8_stored(module):
            return "stored in fp8"
        return None

    def pristine(self, component: str, name: str) -> torch.Tensor | None:
        """The cache's read-only pristine copy of `component`'s tensor `name`: the LoRA patcher's
        `pristine_source`, so touched weights are not copied to RAM a second time."""
        handle = self.handles.get(component)
        return self.cache.pristine(handle.key, name) if handle is not None else None

    @property
    def h2d_bytes(self) -> int:
        """Host-to-device bytes copied by locks and the streamer since the cache was made."""
        streamed = self.streamer.stats.copied_bytes if self.streamer and self.device.type == "cuda" else 0
        return self.cache.stats.h2d_bytes + streamed

    def to_dict(self) -> dict:
        data = {"mode_requested": self.requested.value, "mode": self.mode, "device": str(self.device),
                "notes": list(self.notes), "components": {k: v.to_dict() for k, v in self.components().items()}}
        if self.mode == MemoryMode.STREAM:
            data["stream"] = {"impl": self.stream_impl.value, "lookahead": self.lookahead}
            if self.streamer is not None:
                s = self.streamer
                data["stream"].update(units=len(s.units), largest_unit=max((u.nbytes for u in s.units), default=0),
                                      reserved_bytes=s.reserved_bytes, **vars(s.stats))
        return data

    def close(self, *, to_rest: bool = False) -> None:
        """Undo: remove hooks, unlock, release the pins (entries stay cached for the next placement)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._stack.close()
        finally:
            for handle in self.handles.values():
                if to_rest:
                    try:
                        self.cache.offload(handle)
                    except RuntimeError:
                        log.exception("could not offload %s", handle.key)
                handle.release()

    def switch(self, mode: MemoryMode | str, budgets: Budgets, lookahead: int | None = None, **kwargs) -> Placement:
        """Close this placement and apply `mode` to the same pipeline and cache (no reload)."""
        kwargs.setdefault("keys", {name: handle.key for name, handle in self.handles.items()})
        self.close()
        return apply_memory_mode(self.pipe, mode, self.device, budgets,
                                 self.lookahead if lookahead is None else lookahead, cache=self.cache,
                                 stream_impl=kwargs.pop("stream_impl", self.stream_impl), **kwargs)


def pipeline_components(pipe) -> dict[Component, torch.nn.Module]:
    return {part: getattr(pipe, part) for part in Component if isinstance(getattr(pipe, part, None), torch.nn.Module)}


def choose_mode(sizes: dict[str, int], budgets: Budgets) -> tuple[MemoryMode, str]:
    """auto: (mode, why) from the component sizes and the VRAM budget (working reserve already off)."""
    total, vram = sum(sizes.values()), budgets.vram
    phase_max = max(sum(sizes.get(c, 0) for c in comps) for comps in PHASE_COMPONENTS.values())
    if total <= vram:
        return MemoryMode.FULL, f"all weights ({total / MB:.0f} MB) fit the {vram / MB:.0f} MB VRAM budget"
    if phase_max <= vram:
        return MemoryMode.OFFLOAD, f"the largest phase ({phase_max / MB:.0f} MB) fits the {vram / MB:.0f} MB VRAM budget"
    return MemoryMode.STREAM, f"the UNet ({sizes.get('unet', 0) / MB:.0f} MB) does not fit the {vram / MB:.0f} MB VRAM budget"


def apply_memory_mode(pipe, mode: MemoryMode | str, device: torch.device | str, budgets: Budgets, lookahead: int = 2,
                      *, cache: ModelCache | None = None, stream_impl: StreamImpl | str = StreamImpl.RING,
                      emulate_on_cpu: bool = False,
                      key_prefix: str = "", keys: dict[str, str] | None = None, max_unit_bytes: int = 64 << 20,
                      min_unit_bytes: int = 1 << 20, stream_backend=None) -> Placement:
    """Place `pipe`'s components for `mode`; returns the Placement that says where they are.

    Components are cached under `key_prefix + name` (or `keys[name]`), admitted on first use.
    """
    try:
        mode = MemoryMode(mode)
    except ValueError:
        raise ValueError(f"`memory_mode` must be one of {allowed(MemoryMode)}, got {mode!r}") from None
    try:
        stream_impl = StreamImpl(stream_impl)
    except ValueError:
        raise ValueError(f"`stream_impl` must be one of {allowed(StreamImpl)}, got {stream_impl!r}") from None
    device = normalize_device(device)
    if cache is None:
        cache = ModelCache(device, ram_budget=budgets.ram or None, vram_budget=budgets.vram or None)
    elif device.type == "cuda":
        cache.set_budgets(cache.ram_budget, budgets.vram)
    modules = pipeline_components(pipe)
    handles: dict[str, PinHandle] = {}
    try:
        for name, module in modules.items():
            key = (keys or {}).get(name, key_prefix + name)
            handles[name] = cache.pin(key) if cache.lookup(key) is not None else cache.put(key, module)
    except BaseException:
        for handle in handles.values():
            handle.release()
        raise
    sizes = {name: cache.lookup(h.key).nbytes for name, h in handles.items()}
    notes: list[str] = []
    used = mode.value
    if device.type == "cpu" and not emulate_on_cpu:
        used = CPU_ONLY
        notes.append(f"no GPU: {mode} mode has nothing to offload to; every component runs on the CPU")
    elif mode is MemoryMode.AUTO:
        used, why = choose_mode(sizes, budgets) if device.type == "cuda" else (MemoryMode.FULL, "emulated on the CPU")
        notes.append(f"auto chose {used}: {why}")
    placement = Placement(pipe, cache, device, mode, used, lookahead, stream_impl, handles, notes)
    try:
        _arrange(placement, budgets, max_unit_bytes, min_unit_bytes, stream_backend)
    except BaseException:
        placement.close()
        raise
    log.info("memory mode %s (asked %s) on %s; %s", used, mode, device, "; ".join(notes) or "no notes")
    return placement


def _arrange(p: Placement, budgets: Budgets, max_unit: int, min_unit: int, backend) -> None:
    if p.mode in (MemoryMode.FULL, CPU_ONLY):
        for handle in p.handles.values():
            p._stack.enter_context(p.cache.lock(handle, p.device))
        return
    if p.mode == MemoryMode.OFFLOAD or Component.UNET not in p.handles:
        return
    unet = p.handles[Component.UNET].module
    slots = p._stack.enter_context(p.cache.streamed(p.handles[Component.UNET]))
    if p.stream_impl is not StreamImpl.RING:
        if p.device.type != "cuda":
            p.notes.append(f"{p.stream_impl.value} needs CUDA streams; the ring streamer runs instead")
            p.stream_impl = StreamImpl.RING
        else:
            _diffusers_group_offload(p, unet)
            return
    streamer = LayerStreamer(unet, slots, p.device, p.lookahead, backend=backend, max_unit_bytes=max_unit,
                             min_unit_bytes=min_unit)
    p._stack.enter_context(p.cache.reserve(p.device, streamer.reserved_bytes, "stream buffers"))
    p._stack.callback(streamer.close)
    p.streamer = streamer.install()
    if streamer.lookahead < p.lookahead:
        p.notes.append(f"lookahead capped at {streamer.lookahead} (the number of units)")


def _diffusers_group_offload(p: Placement, unet: torch.nn.Module) -> None:
    """diffusers' stream prefetch (lookahead 1). Our pristine arena is already pinned, so its
    `pin_memory()` returns the same tensors and RAM is not doubled; H2D bytes are not counted."""
    from diffusers.hooks import HookRegistry, apply_group_offloading

    kind = "leaf_level" if p.stream_impl is StreamImpl.DIFFUSERS_LEAF else "block_level"
    apply_group_offloading(unet, onload_device=p.device, offload_device=torch.device("cpu"), offload_type=kind,
                           num_blocks_per_group=1 if kind == "block_level" else None, non_blocking=True,
                           use_stream=True, record_stream=True)

    for sub in unet.modules():
        setattr(sub, STREAMED_ATTR, True)  # its weights move with each group: merge_blocker says "streamed"

    def remove() -> None:
        registry = HookRegistry.check_if_exists_or_initialize(unet)
        for hook in ("group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading"):
            registry.remove_hook(hook, recurse=True)
        for sub in unet.modules():
            if hasattr(sub, STREAMED_ATTR):
                delattr(sub, STREAMED_ATTR)

    p._stack.callback(remove)
    p.notes.append(f"UNet streamed by diffusers group offloading ({kind}, use_stream=True); its host-to-device "
                   "bytes are not counted")


__all__ = ["ComponentPlacement", "Placement", "PristineCorrupted", "apply_memory_mode", "choose_mode",
           "pipeline_components"]
