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


class _Sidecar:
    """The extra tensors and the forward hook of one module."""

    def __init__(self, module: nn.Module, entries: Sequence[Entry], base: Callable[[], torch.Tensor],
                 dtype: torch.dtype):
        self.entries = list(entries)
        self.dtype = dtype
        self.down: torch.Tensor | None = None  # [R, in] or conv kernel [R, in, kh, kw]
        self.up: torch.Tensor | None = None  # [out, R] or [out, R, 1, 1], user weights folded in
        self.dense: torch.Tensor | None = None  # weight-shaped, for patches without factors
        self.bias: torch.Tensor | None = None
        weight = module.weight
        device, shape = weight.device, tuple(weight.shape)
        conv = isinstance(module, nn.Conv2d)
        lowrank_ok = not conv or module.groups == 1
        ups: list[torch.Tensor] = []
        downs: list[torch.Tensor] = []
        dense: torch.Tensor | None = None
        bias: torch.Tensor | None = None
        base_cache: list[torch.Tensor] = []
        for _lora, w, patch in self.entries:
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
        if ups:
            up, down = torch.cat(ups, 1), torch.cat(downs, 0)
            if conv:
                up = up.reshape(shape[0], -1, 1, 1)
                down = down.reshape(down.shape[0], *shape[1:])
            self.up, self.down = _place(up, device, dtype), _place(down, device, dtype)
        if dense is not None:
            self.dense = _place(dense, device, dtype)
        if bias is not None:
            self.bias = _place(bias.reshape(-1, 1, 1) if conv else bias, device, dtype)
        self.device = device
        self.handle = module.register_forward_hook(self, with_kwargs=True)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                 output: torch.Tensor) -> torch.Tensor:
        x = args[0] if args else kwargs["input"]
        if x.device != self.device:
            # Follow the activations: a streamed module's weight may sit in RAM while it runs on
            # the GPU. Moved once and kept there.
            for name in ("down", "up", "dense", "bias"):
                if getattr(self, name) is not None:
                    setattr(self, name, getattr(self, name).to(x.device))
            self.device = x.device
        cast = (lambda t: t) if x.dtype == self.dtype else (lambda t: t.to(x.dtype))
        extra: torch.Tensor | None = None
        conv = isinstance(module, nn.Conv2d)
        if self.down is not None and self.up is not None:
            h = module._conv_forward(x, cast(self.down), None) if conv else F.linear(x, cast(self.down))
            extra = F.conv2d(h, cast(self.up)) if conv else F.linear(h, cast(self.up))
        if self.dense is not None:
            d = module._conv_forward(x, cast(self.dense), None) if conv else F.linear(x, cast(self.dense))
            extra = d if extra is None else extra + d
        if self.bias is not None:
            extra = cast(self.bias) if extra is None else extra + cast(self.bias)
        return output if extra is None else output + extra.to(output.dtype)

    @property
    def nbytes(self) -> int:
        ts = [t for t in (self.down, self.up, self.dense, self.bias) if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)


class SidecarSet:
    """Every sidecar of a patcher, keyed by (component, module path)."""

    def __init__(self) -> None:
        self._cars: dict[ModuleKey, _Sidecar] = {}

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
        new = _Sidecar(module, entries, base, dtype) if entries else None
        old = self._cars.pop(key, None)
        if old is not None:
            old.handle.remove()
        if new is not None:
            self._cars[key] = new

    def clear(self) -> None:
        for car in self._cars.values():
            car.handle.remove()
        self._cars.clear()
