"""A module's tensors as slots, and the one host buffer that holds their pristine copies.

A slot is one unique parameter or buffer (tied weights share a slot) with every
(owner module, attribute) that refers to it. Pointing a slot elsewhere sets `param.data`,
so the Parameter object itself survives: the LoRA patcher, hooks and optimizers hold it.

Pristine copies live in one exact-size `HostArena` per model instead of one
`pin_memory()` per tensor: torch's caching host allocator rounds every pinned block up to
a power of two and keeps freed blocks cached (vLLM #56410: 1.9x the host memory asked for;
sglang #36562: 20.4 GiB asked, 32 GiB pinned). The arena is plain CPU memory registered
with `cudaHostRegister`, which pins exactly what it holds.
"""

from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from studio.errors import PristineCorrupted

log = logging.getLogger(__name__)

ALIGN = 256  # bytes: keeps every dtype view aligned and DMA-friendly
Owner = tuple[nn.Module, str, bool]  # (module, attribute, is_parameter)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass(eq=False)
class Slot:
    """One unique tensor of a module: its name, who refers to it, and its pristine copy."""

    name: str  # first qualified name ("down_blocks.0.resnets.0.conv1.weight")
    aliases: tuple[str, ...]  # every qualified name (tied weights have several)
    owners: tuple[Owner, ...]
    shape: torch.Size
    dtype: torch.dtype
    nbytes: int
    pristine: torch.Tensor | None = None
    offset: int = -1  # byte offset of `pristine` in its arena (-1: not in one)
    rest_version: int = -1  # the owner parameter's _version when it was pointed at pristine

    @property
    def live(self) -> torch.Tensor:
        owner, attr, is_param = self.owners[0]
        return getattr(owner, attr) if is_param else owner._buffers[attr]

    def point(self, tensor: torch.Tensor) -> None:
        """Make every owner refer to `tensor` (the Parameter objects are kept)."""
        for owner, attr, is_param in self.owners:
            if is_param:
                owner._parameters[attr].data = tensor
            else:
                owner._buffers[attr] = tensor

    def to_meta(self) -> None:
        """Drop the data (eviction): new meta Parameters, since set_data cannot cross to meta."""
        for owner, attr, is_param in self.owners:
            meta = torch.empty(self.shape, dtype=self.dtype, device="meta")
            if is_param:
                owner._parameters[attr] = nn.Parameter(meta, requires_grad=owner._parameters[attr].requires_grad)
            else:
                owner._buffers[attr] = meta

    def to_rest(self) -> None:
        """Point at the pristine copy and remember the version, so a later write into it shows."""
        assert self.pristine is not None
        self.point(self.pristine)
        self.rest_version = self.live._version

    def written_at_rest(self) -> bool:
        """True when the live tensor IS the pristine storage and was written since `to_rest`.

        `param.data = pristine` gives the Parameter its own version counter, so an in-place
        write through it bumps the Parameter's `_version`, not the pristine tensor's (checked
        on torch 2.13). A replaced tensor (layerwise casting re-creates its weights) is harmless.
        """
        live = self.live
        return (self.pristine is not None and live.data_ptr() == self.pristine.data_ptr()
                and live._version != self.rest_version)


def check_rest(slots: list[Slot], what: str) -> None:
    """Raise PristineCorrupted when any slot was written while it pointed at pristine."""
    bad = [s.name for s in slots if s.written_at_rest()]
    if bad:
        raise PristineCorrupted(f"{what}: {len(bad)} tensors (first {bad[0]}) were written while at rest on the "
                                "pristine copy; weights may only be written under a lock. Reload the model.")


def collect_slots(module: nn.Module) -> list[Slot]:
    """Every unique parameter and buffer under `module`, in registration order."""
    found: dict[int, tuple[list[str], list[Owner], torch.Tensor]] = {}
    for prefix, sub in module.named_modules(remove_duplicate=False):
        for table, is_param in ((sub._parameters, True), (sub._buffers, False)):
            for attr, tensor in table.items():
                if tensor is None:
                    continue
                name = f"{prefix}.{attr}" if prefix else attr
                key = id(tensor)
                names, owners, _ = found.setdefault(key, ([], [], tensor))
                names.append(name)
                if not any(o is sub and a == attr for o, a, _ in owners):
                    owners.append((sub, attr, is_param))
    return [Slot(names[0], tuple(names), tuple(owners), t.shape, t.dtype, nbytes(t))
            for names, owners, t in found.values()]


def cuda_pinning_available() -> bool:
    return torch.cuda.is_available()


class HostArena:
    """One exact-size CPU buffer for a model's pristine tensors; pinned when asked and possible.

    Lifetime: `release()` unregisters the pinning (before the memory can be freed, which
    happens only when the last view dies); a finalizer does it if the owner forgot.
    """

    def __init__(self, size: int, pin: bool) -> None:
        self.size = size
        self.buffer = torch.empty(max(size, 1), dtype=torch.uint8)
        self.pinned = False
        if pin and size > 0:
            _register(self.buffer)
            self.pinned = True
        # The finalizer holds the buffer, so the memory outlives its registration.
        self._finalizer = weakref.finalize(self, _unregister, self.buffer) if self.pinned else None

    def view(self, offset: int, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        count = math.prod(shape)
        size = count * dtype.itemsize
        flat = self.buffer[offset:offset + size]
        return flat.view(dtype).view(shape) if count else torch.empty(shape, dtype=dtype)

    def release(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # runs once: unregister while the memory is still alive
            self._finalizer = None
        self.pinned = False


def _register(buffer: torch.Tensor) -> None:
    err = int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0))
    if err != 0:
        raise RuntimeError(f"cudaHostRegister of {buffer.numel()} bytes failed (cudaError {err})")


def _unregister(buffer: torch.Tensor) -> None:
    try:
        torch.cuda.synchronize()  # no copy may still be reading it (eviction is rare: never in the loop)
        err = int(torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr()))
    except RuntimeError:  # interpreter shutdown: the CUDA context may already be gone
        return
    if err != 0:
        log.warning("cudaHostUnregister failed (cudaError %d)", err)


def arena_bytes(slot: Slot) -> torch.Tensor:
    """The whole arena that holds `slot.pristine`, as flat bytes (for copying many slots at once)."""
    assert slot.pristine is not None
    storage = slot.pristine.untyped_storage()
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),))


def aligned(size: int) -> int:
    return -(-size // ALIGN) * ALIGN


def make_pristine(slots: list[Slot], pin: bool) -> HostArena:
    """Copy every slot's current tensor into a fresh arena and set `slot.pristine`.

    Always a copy into new memory, never `live.to("cpu")`: on CPU that returns the live
    tensor itself, which is how InvokeAI's read-only copy aliased the weights (#6559).
    """
    offsets, total = [], 0
    for slot in slots:
        offsets.append(total)
        total += aligned(slot.nbytes)
    arena = HostArena(total, pin)
    with torch.inference_mode(False), torch.no_grad():
        for slot, offset in zip(slots, offsets):
            view = arena.view(offset, slot.shape, slot.dtype)
            view.copy_(slot.live.detach())
            slot.pristine, slot.offset = view, (offset if slot.nbytes else -1)
    return arena
