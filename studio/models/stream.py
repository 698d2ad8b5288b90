"""Layer streaming: weights stay in pinned RAM and reach the GPU N units ahead of compute.

The design of A1111 PR #14855 (lowvram 1.65 -> 3.7 it/s on a 3060 Laptop), DESIGN.md 3:
- The model is cut into units (subtrees up to `max_unit_bytes`). Small subtrees, and the one
  holding the first parameter, stay resident: diffusers reads a model's device from its first
  parameter and would otherwise build latents on the CPU.
- Copies run on a side stream. The copy for position p+N waits on the compute event recorded
  after position p, so a ring of N events bounds the units in flight to N. Unbounded run-ahead
  fills VRAM and crashes (Forge README; ComfyUI PR #10733 had to budget in-flight buffers).
  N=1 is synchronous; N=2 overlaps one unit ahead, like diffusers' group offloading with streams.
- Compute waits on the copy's event. Nothing waits on the host in the loop: no synchronize,
  no query, no `.item()`. diffusers' `use_stream=True` calls `stream.synchronize()` before
  every group (group_offloading.py, `_onload_from_memory`), so the host cannot run ahead.
- A unit's buffers are dropped when position p+N is issued, just after the copy stream was
  told to wait for p's compute event. They were allocated on the copy stream, so only copy
  stream work can reuse their memory, and all of it is ordered after that event.
- The first forward records the execution order (units loaded on demand, still without host
  syncs); later forwards follow it. Positions run on across forwards, so the tail of one step
  prefetches the head of the next. A unit called out of order resynchronises the ring.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from studio.models.stream_backend import Backend, make_backend
from studio.models.slots import Slot, arena_bytes, check_rest

log = logging.getLogger(__name__)
STREAMED_ATTR = "_studio_streamed"


def is_streamed(module: nn.Module) -> bool:
    """True while `module`'s weights are streamed (merging a LoRA into them is wrong: use a sidecar)."""
    return bool(getattr(module, STREAMED_ATTR, False))


@dataclass(eq=False)
class Unit:
    index: int
    name: str
    module: nn.Module
    slots: list[Slot]
    nbytes: int
    ranges: list[tuple[int, int]] = field(default_factory=list)  # contiguous arena byte ranges


@dataclass
class StreamStats:
    copied_bytes: int = 0  # host to device (within RAM when emulated on the CPU)
    copies: int = 0  # units copied
    forwards: int = 0
    max_in_flight: int = 0
    resyncs: int = 0
    sync_loads: int = 0  # units loaded on demand (the tracing forward, strays)


def plan_units(root: nn.Module, slots: list[Slot], max_unit_bytes: int,
               min_unit_bytes: int) -> tuple[list[Unit], list[Slot]]:
    """Cut `root` into units; returns (units in module order, resident slots)."""
    direct: dict[int, list[Slot]] = {}
    for slot in slots:
        for owner, _, _ in slot.owners:
            direct.setdefault(id(owner), []).append(slot)
    sizes: dict[int, int] = {}

    def size(mod: nn.Module) -> int:
        if id(mod) not in sizes:
            sizes[id(mod)] = sum(s.nbytes for s in direct.get(id(mod), [])) + sum(size(c) for c in mod.children())
        return sizes[id(mod)]

    picked: list[tuple[str, nn.Module]] = []

    def walk(name: str, mod: nn.Module) -> None:
        total, children = size(mod), [(n, c) for n, c in mod.named_children() if size(c) > 0]
        if total == 0 or (mod is not root and total <= min_unit_bytes):
            return
        if mod is not root and (total <= max_unit_bytes or not children):
            picked.append((name, mod))
            return
        for child_name, child in children:
            walk(f"{name}.{child_name}" if name else child_name, child)

    walk("", root)
    home: dict[int, int] = {}
    for i, (_, mod) in enumerate(picked):
        for sub in mod.modules():
            home[id(sub)] = i
    first = next(root.parameters(), None)
    first_home = next((home.get(id(o)) for s in slots for o, _, _ in s.owners if s.live is first), None)
    members: list[list[Slot]] = [[] for _ in picked]
    resident: list[Slot] = []
    for slot in slots:
        homes = {home.get(id(owner)) for owner, _, _ in slot.owners}
        unit = homes.pop() if len(homes) == 1 else None
        if unit is None or unit == first_home or slot.offset < 0:
            resident.append(slot)
        else:
            members[unit].append(slot)
    units = []
    for (name, mod), own in zip(picked, members):
        own.sort(key=lambda s: s.offset)
        if own:
            units.append(Unit(len(units), name, mod, own, sum(s.nbytes for s in own), _ranges(own)))
    return units, resident


def _ranges(slots: list[Slot]) -> list[tuple[int, int]]:
    """Merge the slots' arena spans into as few contiguous byte ranges as possible (one copy each)."""
    spans = sorted((s.offset, s.offset + s.nbytes) for s in slots)
    merged: list[list[int]] = []
    for start, end in spans:
        if merged and start - merged[-1][1] < 256:  # only alignment padding in between
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


class LayerStreamer:
    """Hooks that stream `root`'s units; `close()` removes them and leaves the weights at rest."""

    def __init__(self, root: nn.Module, slots: list[Slot], device: torch.device | str, lookahead: int, *,
                 backend: Backend | None = None, max_unit_bytes: int = 64 << 20, min_unit_bytes: int = 1 << 20):
        if lookahead < 1:
            raise ValueError(f"`lookahead` must be at least 1 unit, got {lookahead}")
        self.root, self.device = root, torch.device(device)
        self.backend = backend or make_backend(self.device)
        self.units, self.resident = plan_units(root, slots, max_unit_bytes, min_unit_bytes)
        self.lookahead = max(1, min(lookahead, len(self.units)))
        self.stats = StreamStats()
        self.order: list[int] | None = None
        self._trace: list[int] = []
        self._copy = self.backend.new_stream()
        self._compute = self.backend.current_stream()
        self._done = [self.backend.new_event() for _ in range(self.lookahead)]  # compute ring
        self._ready = [self.backend.new_event() for _ in range(self.lookahead)]  # copy ring
        self._barrier = self.backend.new_event()  # "all compute so far", for the copy stream to wait on
        self._loaded = self.backend.new_event()  # an on-demand copy is done
        self._flight: dict[int, tuple[Unit, list[torch.Tensor]]] = {}  # position -> (unit, buffers)
        self._active: dict[int, int | None] = {}  # unit index -> its position (None: loaded on demand)
        self._cur = self._next = 0
        self._hooks: list = []
        self._installed = False

    @property
    def resident_bytes(self) -> int:
        return sum(s.nbytes for s in self.resident)

    @property
    def reserved_bytes(self) -> int:
        """VRAM this streamer may hold at once: resident tensors plus N of the largest units."""
        largest = max((u.nbytes for u in self.units), default=0)
        return self.resident_bytes + self.lookahead * largest

    @property
    def in_flight(self) -> int:
        return len(self._flight) + sum(1 for p in self._active.values() if p is None)

    def install(self) -> LayerStreamer:
        with torch.inference_mode(False), torch.no_grad():
            for slot in self.resident:
                slot.point(self.backend.copy(slot.pristine, self.device))
        self.stats.copied_bytes += self.resident_bytes
        self._hooks.append(self.root.register_forward_pre_hook(self._root_pre))
        self._hooks.append(self.root.register_forward_hook(self._root_post))
        for unit in self.units:
            self._hooks.append(unit.module.register_forward_pre_hook(lambda m, a, u=unit: self._pre(u)))
            self._hooks.append(unit.module.register_forward_hook(lambda m, a, o, u=unit: self._post(u),
                                                                 always_call=True))
            for sub in unit.module.modules():
                setattr(sub, STREAMED_ATTR, True)
        self._installed = True
        log.info("streaming %d units (%.0f MB) over %d in flight; %.1f MB resident", len(self.units),
                 sum(u.nbytes for u in self.units) / 2**20, self.lookahead, self.resident_bytes / 2**20)
        return self

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self.idle()
        for unit in self.units:
            for sub in unit.module.modules():
                if hasattr(sub, STREAMED_ATTR):
                    delattr(sub, STREAMED_ATTR)
        for slot in self.resident:
            slot.to_rest()
        self._installed = False

    def verify_rest(self) -> None:
        """Raise PristineCorrupted if a streamed weight was written at rest (e.g. a LoRA merged into it)."""
        check_rest([s for u in self.units for s in u.slots], "streamed UNet")

    def idle(self) -> None:
        """Drop every in-flight buffer and put units back at rest (end of a phase, or after an error).

        Units in flight but not yet running were never pointed at their buffers; dropping the
        buffers is safe because they belong to the copy stream, which is ordered after their copies.
        """
        for index in self._active:
            for slot in self.units[index].slots:
                slot.to_rest()
        self._flight.clear()
        self._active.clear()
        self._next = self._cur

    # -- hooks ---------------------------------------------------------------------------------
    def _root_pre(self, _module: nn.Module, _args: tuple) -> None:
        self._compute = self.backend.current_stream()
        self.stats.forwards += 1
        if self.order is None:
            self._trace = []

    def _root_post(self, _module: nn.Module, _args: tuple, _out: object) -> None:
        if self.order is None and self._trace:
            self.order = self._trace
            self.lookahead = max(1, min(self.lookahead, len(self.order)))
            self._cur = self._next = 0
            log.debug("stream order recorded: %d unit calls per forward", len(self.order))

    def _pre(self, unit: Unit) -> None:
        if self.order is None:
            self._trace.append(unit.index)
            self._load_now(unit)
            return
        if self.order[self._cur % len(self.order)] != unit.index and not self._resync(unit):
            self._load_now(unit)
            return
        self._fill()
        owner, buffers = self._flight[self._cur]
        assert owner is unit, (owner.name, unit.name)
        self.backend.wait(self._compute, self._ready[self._cur % self.lookahead], ("ready", self._cur))
        _point(unit, buffers)
        self._active[unit.index] = self._cur

    def _post(self, unit: Unit) -> None:
        position = self._active.pop(unit.index, "absent")
        if position == "absent":
            return  # forward raised before our pre-hook ran
        for slot in unit.slots:
            slot.to_rest()
        if position is None:  # loaded on demand; the next copy waits on a fresh barrier first
            return
        self.backend.record(self._done[position % self.lookahead], self._compute, ("computed", position))
        del self._flight[position]  # safe: the copy issued next (position + N) waits on that event first
        self._cur = max(self._cur, position + 1)
        self._fill()

    # -- copies --------------------------------------------------------------------------------
    def _fill(self) -> None:
        if self._next < self._cur:
            self._next = self._cur
        if not self._flight:  # after a trace, idle or resync: order the copy stream after all compute
            self.backend.record(self._barrier, self._compute, ("barrier", self._cur))
            self.backend.wait(self._copy, self._barrier, ("barrier", self._cur))
        while self._next < self._cur + self.lookahead:
            position = self._next
            unit = self.units[self.order[position % len(self.order)]]
            slot = position % self.lookahead
            with self.backend.on_stream(self._copy):
                self.backend.wait(self._copy, self._done[slot], ("computed", position - self.lookahead))
                buffers = self._copy_unit(unit)
                self.backend.record(self._ready[slot], self._copy, ("ready", position))
            self._flight[position] = (unit, buffers)
            self._next += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.in_flight)

    def _load_now(self, unit: Unit) -> None:
        """Load one unit on demand: copy stream after all compute so far, compute after the copy."""
        self.stats.sync_loads += 1
        self.backend.record(self._barrier, self._compute, ("barrier", unit.index))
        with self.backend.on_stream(self._copy):
            self.backend.wait(self._copy, self._barrier, ("barrier", unit.index))
            buffers = self._copy_unit(unit)
            self.backend.record(self._loaded, self._copy, ("loaded", unit.index))
        self.backend.wait(self._compute, self._loaded, ("loaded", unit.index))
        _point(unit, buffers)
        self._active[unit.index] = None
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.in_flight)

    def _copy_unit(self, unit: Unit) -> list[torch.Tensor]:
        source = arena_bytes(unit.slots[0])
        with torch.inference_mode(False), torch.no_grad():
            buffers = [self.backend.copy(source[a:b], self.device) for a, b in unit.ranges]
        self.stats.copied_bytes += unit.nbytes
        self.stats.copies += 1
        return buffers

    def _resync(self, unit: Unit) -> bool:
        """The model called `unit` out of the recorded order: restart the ring at its next position.

        Returns False (the caller loads the unit on demand) when it is not in the order, or when
        another unit is still running: units are disjoint subtrees, so that only happens when a
        module calls one outside its own subtree, and the ring is then left as it is.
        """
        length = len(self.order)
        ahead = next((d for d in range(length) if self.order[(self._cur + d) % length] == unit.index), None)
        self.stats.resyncs += 1
        log.debug("stream: %s out of order (%s)", unit.name, "resync" if ahead is not None else "not in the order")
        if ahead is None or self._active:
            return False
        self.idle()
        self._cur = self._next = self._cur + ahead
        return True


def _point(unit: Unit, buffers: list[torch.Tensor]) -> None:
    """Point each slot of `unit` at its bytes inside the copied ranges."""
    spans = iter(zip(unit.ranges, buffers))
    (start, end), buf = next(spans)
    for slot in unit.slots:  # sorted by offset in plan_units
        while slot.offset >= end:
            (start, end), buf = next(spans)
        raw = buf[slot.offset - start:slot.offset - start + slot.nbytes]
        slot.point(raw.view(slot.dtype).view(slot.shape))


def iter_streamed(root: nn.Module) -> Iterator[nn.Module]:
    return (m for m in root.modules() if is_streamed(m))
