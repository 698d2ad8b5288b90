"""Memory modes on a loaded SDXL pipeline: where each component's weights live, per phase.

    placement = apply_memory_mode(pipe, "auto", device, budgets, lookahead=2, cache=cache)
    with placement.phase("text_encode"): ...     # TE1+TE2 on the device
    with placement.phase("denoise"): ...         # UNet on the device, or streamed
    with placement.phase("decode"): ...          # VAE on the device
    placement = placement.switch("stream", budgets, 4)   # no reload: pristine copies are reused

- full: every component locked on the device for the placement's lifetime.
- offload: each phase locks what it needs through the model cache; unlocked copies stay on
  the device while the VRAM budget allows and are dropped least-recently-used after.
- stream: the UNet streams unit by unit from pinned RAM (studio.models.stream, our bounded
  N-lookahead ring), or through diffusers' group offloading (`stream_impl="diffusers_leaf"` or
  `"diffusers_block"`, lookahead 1 with a host sync per group) so the benchmark can compare;
  the other components behave as in offload.
- auto: full if everything fits the VRAM budget, else offload if the largest phase fits, else stream.
Without a GPU every mode degrades to "everything on the CPU" (mode "cpu", with a note), unless
`emulate_on_cpu` runs the requested mode's machinery on the CPU (tests, bench --dry-run).

Weights may only be written (LoRA patches) inside the phase that holds their component: outside
it they may point at the pristine copy. Streamed and fp8 layers take LoRAs as sidecars only
(`must_run_lora_as_sidecar`); a merge into a streamed layer is caught as PristineCorrupted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch

from studio.models.budget import Budgets
from studio.models.cache import ModelCache, PinHandle, PristineCorrupted, normalize_device
from studio.models.fp8 import is_fp8_stored
from studio.models.stream import LayerStreamer, is_streamed

log = logging.getLogger(__name__)
MB = 1 << 20
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae")
PHASES = {"text_encode": ("text_encoder", "text_encoder_2"), "denoise": ("unet",), "decode": ("vae",)}
MODES = ("auto", "full", "offload", "stream")
STREAM_IMPLS = ("ring", "diffusers_leaf", "diffusers_block")


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
    requested: str
    mode: str  # what runs: "full", "offload", "stream" or "cpu"
    lookahead: int
    stream_impl: str
    handles: dict[str, PinHandle]
    notes: list[str] = field(default_factory=list)
    streamer: LayerStreamer | None = None
    _stack: ExitStack = field(default_factory=ExitStack)
    _closed: bool = False

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """The components of phase `name` on the device for the block (no-op where already there)."""
        if self._closed:
            raise RuntimeError("this Placement was closed; use the one switch() returned")
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; expected one of {sorted(PHASES)}")
        with ExitStack() as stack:
            if self.mode in ("offload", "stream"):
                for component in PHASES[name]:
                    if component in self.handles and not (self.mode == "stream" and component == "unet"):
                        stack.enter_context(self.cache.lock(self.handles[component], self.device))
            if self.streamer is not None and name == "denoise":
                self.streamer.verify_rest()
                stack.callback(self.streamer.idle)  # in-flight buffers go back, also after an error
            yield

    def components(self) -> dict[str, ComponentPlacement]:
        out = {}
        for name, handle in self.handles.items():
            record = self.cache.lookup(handle.key)
            on_device = record is not None and record.device is not None and record.device != "cpu"
            if name == "unet" and self.mode == "stream":
                where = "streamed"
                device_bytes = self.streamer.resident_bytes if self.streamer and self.device.type == "cuda" else 0
            else:
                where = "gpu" if on_device else "cpu"
                device_bytes = record.nbytes if on_device else 0
            on_demand = self.mode in ("offload", "stream") and where != "streamed"
            out[name] = ComponentPlacement(where, record.nbytes if record else 0, device_bytes, on_demand)
        return out

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
        data = {"mode_requested": self.requested, "mode": self.mode, "device": str(self.device),
                "notes": list(self.notes), "components": {k: v.to_dict() for k, v in self.components().items()}}
        if self.mode == "stream":
            data["stream"] = {"impl": self.stream_impl, "lookahead": self.lookahead}
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

    def switch(self, mode: str, budgets: Budgets, lookahead: int | None = None, **kwargs) -> Placement:
        """Close this placement and apply `mode` to the same pipeline and cache (no reload)."""
        kwargs.setdefault("keys", {name: handle.key for name, handle in self.handles.items()})
        self.close()
        return apply_memory_mode(self.pipe, mode, self.device, budgets,
                                 self.lookahead if lookahead is None else lookahead, cache=self.cache,
                                 stream_impl=kwargs.pop("stream_impl", self.stream_impl), **kwargs)


def must_run_lora_as_sidecar(module: torch.nn.Module) -> bool:
    """True where the memory engine forbids merging a LoRA: streamed layers (their live weight is
    the pinned pristine copy between forwards) and fp8-stored layers (merging loses ~85% of the delta)."""
    return is_streamed(module) or is_fp8_stored(module)


def pipeline_components(pipe) -> dict[str, torch.nn.Module]:
    return {name: getattr(pipe, name) for name in COMPONENTS if isinstance(getattr(pipe, name, None), torch.nn.Module)}


def choose_mode(sizes: dict[str, int], budgets: Budgets) -> tuple[str, str]:
    """auto: (mode, why) from the component sizes and the VRAM budget (working reserve already off)."""
    total, vram = sum(sizes.values()), budgets.vram
    phase_max = max(sum(sizes.get(c, 0) for c in comps) for comps in PHASES.values())
    if total <= vram:
        return "full", f"all weights ({total / MB:.0f} MB) fit the {vram / MB:.0f} MB VRAM budget"
    if phase_max <= vram:
        return "offload", f"the largest phase ({phase_max / MB:.0f} MB) fits the {vram / MB:.0f} MB VRAM budget"
    return "stream", f"the UNet ({sizes.get('unet', 0) / MB:.0f} MB) does not fit the {vram / MB:.0f} MB VRAM budget"


def apply_memory_mode(pipe, mode: str, device: torch.device | str, budgets: Budgets, lookahead: int = 2, *,
                      cache: ModelCache | None = None, stream_impl: str = "ring", emulate_on_cpu: bool = False,
                      key_prefix: str = "", keys: dict[str, str] | None = None, max_unit_bytes: int = 64 << 20,
                      min_unit_bytes: int = 1 << 20, stream_backend=None) -> Placement:
    """Place `pipe`'s components for `mode`; returns the Placement that says where they are.

    Components are cached under `key_prefix + name` (or `keys[name]`), admitted on first use.
    """
    mode = str(getattr(mode, "value", mode))
    if mode not in MODES:
        raise ValueError(f"`memory_mode` must be one of {', '.join(MODES)}, got {mode!r}")
    if stream_impl not in STREAM_IMPLS:
        raise ValueError(f"`stream_impl` must be one of {', '.join(STREAM_IMPLS)}, got {stream_impl!r}")
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
    used = mode
    if device.type == "cpu" and not emulate_on_cpu:
        used = "cpu"
        notes.append(f"no GPU: {mode} mode has nothing to offload to; every component runs on the CPU")
    elif mode == "auto":
        used, why = choose_mode(sizes, budgets) if device.type == "cuda" else ("full", "emulated on the CPU")
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
    if p.mode in ("full", "cpu"):
        for handle in p.handles.values():
            p._stack.enter_context(p.cache.lock(handle, p.device))
        return
    if p.mode == "offload" or "unet" not in p.handles:
        return
    unet = p.handles["unet"].module
    slots = p._stack.enter_context(p.cache.streamed(p.handles["unet"]))
    if p.stream_impl != "ring":
        if p.device.type != "cuda":
            p.notes.append(f"{p.stream_impl} needs CUDA streams; the ring streamer runs instead")
            p.stream_impl = "ring"
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

    kind = "leaf_level" if p.stream_impl == "diffusers_leaf" else "block_level"
    apply_group_offloading(unet, onload_device=p.device, offload_device=torch.device("cpu"), offload_type=kind,
                           num_blocks_per_group=1 if kind == "block_level" else None, non_blocking=True,
                           use_stream=True, record_stream=True)

    def remove() -> None:
        registry = HookRegistry.check_if_exists_or_initialize(unet)
        for hook in ("group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading"):
            registry.remove_hook(hook, recurse=True)

    p._stack.callback(remove)
    p.notes.append(f"UNet streamed by diffusers group offloading ({kind}, use_stream=True); its host-to-device "
                   "bytes are not counted")


__all__ = ["ComponentPlacement", "Placement", "PristineCorrupted", "apply_memory_mode", "choose_mode",
           "must_run_lora_as_sidecar", "pipeline_components"]
