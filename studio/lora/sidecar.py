"""Sidecar LoRA: the change is computed in forward instead of written into the weight.

A forward hook adds `w * up(down(x))` (all LoRAs of a layer fused by concatenating their
ranks, the user weights folded into `up`) to the module's output, in the compute dtype.
Switching a stack rewrites only these small tensors, never a model weight. It is the
only correct path for fp8-stored weights (merging into fp8 loses ~85% of a typical delta,
research/diffusers.md 0.5) and for streamed weights (the resident copy is transient),
at a per-step cost of ~10-45% (InvokeAI #3583), so merged stays the default.
Removing a hook leaves the module exactly as it was: same structure, same state_dict.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from studio.dtypes import FP8_DTYPES
from studio.errors import LoraError
from studio.lora.base import LayerPatch, LoraFile

log = logging.getLogger(__name__)

Entry = tuple[LoraFile, float, LayerPatch]  # (file, user weight, this layer's patch)
ModuleKey = tuple[str, str]  # (component, module path)
# Why a LoRA must not be merged into a module's weight ("streamed", "stored in fp8"), or None.
# The memory engine answers it for the whole pipeline (Placement.merge_blocker); in auto mode
# the patcher runs a sidecar wherever it answers.
MergeBlocker = Callable[[nn.Module], "str | None"]


def fp8_blocker(module: nn.Module) -> str | None:
    """What a module's own weight forbids: a float8 weight cannot hold a merged LoRA."""
    weight = getattr(module, "weight", None)
    return "stored in fp8" if isinstance(weight, torch.Tensor) and weight.dtype in FP8_DTYPES else None


def check_sidecar_module(lora: LoraFile, module_name: str, module: nn.Module) -> None:
    """Sidecars know how to run Linear and Conv2d; anything else must be merged."""
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise LoraError(f"{lora.name}: layer {module_name} is a {type(module).__name__}; sidecar mode runs "
                        "only Linear and Conv2d layers: use merged mode for this LoRA")


def compute_dtype_for(module: nn.Module, requested: torch.dtype | None) -> torch.dtype:
    """The dtype the sidecar math runs in: the requested one, else the weight's (bf16 for fp8)."""
    if requested is not None:
        return requested
    dtype = module.weight.dtype
    return torch.bfloat16 if dtype in FP8_DTYPES else dtype


def _place(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Host tensor -> device without a host sync (pinned + non_blocking) when CUDA."""
    if device.type == "cuda":
        return t.to(dtype).pin_memory().to(device, non_blocking=True)
    return t.to(device, dtype)


@dataclass
class _Tensors:
    """The device tensors of one sidecar (or of one gated variant of it)."""

    device: torch.device
    down: torch.Tensor | None = None  # [R, in] or conv kernel [R, in, kh, kw]
    up: torch.Tensor | None = None  # [out, R] or [out, R, 1, 1], user weights folded in
    dense: torch.Tensor | None = None  # weight-shaped, for patches without factors
    bias: torch.Tensor | None = None

    def follow(self, device: torch.device) -> None:
        """Move to the activations' device: a streamed module's weight may sit in RAM while it runs on
        the GPU. Moved once and kept there."""
        for name in ("down", "up", "dense", "bias"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))
        self.device = device

    @property
    def nbytes(self) -> int:
        ts = [t for t in (self.down, self.up, self.dense, self.bias) if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)


def _build(module: nn.Module, entries: Sequence[Entry], base: Callable[[], torch.Tensor],
           dtype: torch.dtype) -> _Tensors:
    weight = module.weight
    device, shape = weight.device, tuple(weight.shape)
    conv = isinstance(module, nn.Conv2d)
    lowrank_ok = not conv or module.groups == 1
    ups: list[torch.Tensor] = []
    downs: list[torch.Tensor] = []
    dense: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    base_cache: list[torch.Tensor] = []
    for _lora, w, patch in entries:
        factors = None if patch.depends_on_base or not lowrank_ok else patch.factors()
        if factors is not None:
            ups.append(factors[0] * w)
            downs.append(factors[1])
        else:
            if not base_cache:
                base_cache.append(base().float())
            d = patch.delta(base_cache[0]).float().reshape(shape)
            dense = d * w if dense is None else dense.add_(d, alpha=w)
        if patch.bias_delta is not None:
            b = patch.bias_delta.float() * w
            bias = b if bias is None else bias + b
    out = _Tensors(device)
    if ups:
        up, down = torch.cat(ups, 1), torch.cat(downs, 0)
        if conv:
            up = up.reshape(shape[0], -1, 1, 1)
            down = down.reshape(down.shape[0], *shape[1:])
        out.up, out.down = _place(up, device, dtype), _place(down, device, dtype)
    if dense is not None:
        out.dense = _place(dense, device, dtype)
    if bias is not None:
        out.bias = _place(bias.reshape(-1, 1, 1) if conv else bias, device, dtype)
    return out


class _Sidecar:
    """The extra tensors and the forward hook of one module.

    Gating (a LoRA's step range in sidecar mode): `owner.closed` names LoRAs whose part is off;
    the hook then runs the variant built from the open entries only, which is the very sidecar
    the smaller stack would have built (same tensors, bit for bit). Variants are built once, when
    a gate first closes, and kept while this sidecar lives.
    """

    def __init__(self, module: nn.Module, entries: Sequence[Entry], base: Callable[[], torch.Tensor],
                 dtype: torch.dtype, owner: SidecarSet):
        self.entries = list(entries)
        self.dtype = dtype
        self.owner = owner
        self.ids = frozenset(id(lora) for lora, _, _ in self.entries)
        self._module_ref, self._base = module, base
        self.full = _build(module, self.entries, base, dtype)
        self.variants: dict[frozenset[int], _Tensors | None] = {}
        self.handle = module.register_forward_hook(self, with_kwargs=True)

    def variant(self, closed: frozenset[int]) -> _Tensors | None:
        """The tensors with the LoRAs in `closed` gated off (None: nothing of this sidecar runs)."""
        closed = closed & self.ids
        if not closed:
            return self.full
        if closed not in self.variants:
            open_entries = [e for e in self.entries if id(e[0]) not in closed]
            self.variants[closed] = (_build(self._module_ref, open_entries, self._base, self.dtype)
                                     if open_entries else None)
        return self.variants[closed]

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                 output: torch.Tensor) -> torch.Tensor:
        tensors = self.variant(self.owner.closed) if self.owner.closed else self.full
        if tensors is None:
            return output
        x = args[0] if args else kwargs["input"]
        if x.device != tensors.device:
            tensors.follow(x.device)
        cast = (lambda t: t) if x.dtype == self.dtype else (lambda t: t.to(x.dtype))
        extra: torch.Tensor | None = None
        conv = isinstance(module, nn.Conv2d)
        if tensors.down is not None and tensors.up is not None:
            h = module._conv_forward(x, cast(tensors.down), None) if conv else F.linear(x, cast(tensors.down))
            extra = F.conv2d(h, cast(tensors.up)) if conv else F.linear(h, cast(tensors.up))
        if tensors.dense is not None:
            d = module._conv_forward(x, cast(tensors.dense), None) if conv else F.linear(x, cast(tensors.dense))
            extra = d if extra is None else extra + d
        if tensors.bias is not None:
            extra = cast(tensors.bias) if extra is None else extra + cast(tensors.bias)
        return output if extra is None else output + extra.to(output.dtype)

    @property
    def nbytes(self) -> int:
        return self.full.nbytes + sum(v.nbytes for v in self.variants.values() if v is not None)

    # the full (ungated) tensors, by their names
    up = property(lambda self: self.full.up)
    down = property(lambda self: self.full.down)
    dense = property(lambda self: self.full.dense)
    bias = property(lambda self: self.full.bias)
    device = property(lambda self: self.full.device)


class SidecarSet:
    """Every sidecar of a patcher, keyed by (component, module path)."""

    def __init__(self) -> None:
        self._cars: dict[ModuleKey, _Sidecar] = {}
        self.closed: frozenset[int] = frozenset()  # ids of LoraFiles gated off (a step range)

    def entries(self, key: ModuleKey) -> list[Entry]:
        car = self._cars.get(key)
        return car.entries if car else []

    def dtype(self, key: ModuleKey) -> torch.dtype | None:
        car = self._cars.get(key)
        return car.dtype if car else None

    def keys(self) -> list[ModuleKey]:
        return list(self._cars)

    def __len__(self) -> int:
        return len(self._cars)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self._cars.values())

    def set(self, key: ModuleKey, module: nn.Module, entries: Sequence[Entry], base: Callable[[], torch.Tensor],
            dtype: torch.dtype) -> None:
        """Run `entries` on `module` in forward (replacing what ran there); [] removes it."""
        # Build the new tensors first: if that fails the old sidecar is still in place.
        new = _Sidecar(module, entries, base, dtype, self) if entries else None
        old = self._cars.pop(key, None)
        if old is not None:
            old.handle.remove()
        if new is not None:
            self._cars[key] = new

    def gate(self, closed: frozenset[int]) -> int:
        """Gate the LoRAs with these ids off (empty: all on); returns how many sidecars it changes.

        The variants are built here, not in the next forward, so the switch's cost is where it is timed.
        """
        changed = 0
        for car in self._cars.values():
            if (car.ids & closed) != (car.ids & self.closed):
                car.variant(closed)
                changed += 1
        self.closed = frozenset(closed)
        return changed

    def clear(self) -> None:
        for car in self._cars.values():
            car.handle.remove()
        self._cars.clear()
        self.closed = frozenset()
