"""Shared pieces of the format readers: a layer's tensors, scales, and shape checks.

Every reader receives one `LayerGroup` (all tensors of a file that address one
module, keyed by canonical part name such as "lora_down" or "hada_w1_a") and
returns a `LayerPatch`. Readers raise `ValueError` with the layer and both shapes;
the reader module turns it into one `LoraError` line that names the file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from studio.lora.keymap import ModuleInfo


@dataclass
class LayerGroup:
    """The tensors of one target module, as found in the file."""

    prefix: str  # the key prefix shared by the tensors (kohya name, peft path, ...)
    target: ModuleInfo
    parts: dict[str, torch.Tensor]  # canonical part name -> tensor
    keys: dict[str, str] = field(default_factory=dict)  # canonical part name -> key in the file

    @property
    def where(self) -> str:
        return f"layer {self.target.component}:{self.target.path} (key {self.prefix})"

    def get(self, part: str) -> torch.Tensor | None:
        return self.parts.get(part)


@dataclass
class ParseContext:
    """What a reader may need beyond the layer itself: the file's metadata and a scratch cache."""

    metadata: dict[str, str] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)


def shape_str(shape: torch.Size | tuple[int, ...]) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def mismatch(group: LayerGroup, got: str) -> ValueError:
    """The one shape error every reader raises: the layer, its weight shape, what the file gives."""
    return ValueError(f"shape mismatch at {group.where}: the model's weight is "
                      f"{shape_str(group.target.shape)} but the file gives {got}")


def scalar(group: LayerGroup, part: str) -> float | None:
    """A one-element tensor (alpha) as a float, None when absent."""
    t = group.get(part)
    if t is None:
        return None
    if t.numel() != 1:
        raise ValueError(f"{part} at {group.where} must hold one number, got shape {shape_str(t.shape)}")
    return float(t.float().item())


def alpha_scale(alpha: float | None, rank: int, rs_lora: bool = False) -> float:
    """kohya/LyCORIS rule: scale = alpha / rank; a missing or zero alpha means alpha = rank."""
    if alpha is None or alpha == 0:
        return 1.0
    return alpha / (math.sqrt(rank) if rs_lora else rank)


def check_low_rank(group: LayerGroup, up: torch.Tensor, down: torch.Tensor, label: str) -> None:
    """up [out, r(,1,1)] @ down [r, in(,kh,kw)] must rebuild the target weight's shape."""
    shape = group.target.shape
    fan_in = math.prod(shape[1:])
    got = f"{label} {shape_str(up.shape)} x {shape_str(down.shape)}"
    if up.dim() < 2 or down.dim() < 2 or up.shape[0] != shape[0] or up.numel() // up.shape[0] != down.shape[0]:
        raise mismatch(group, got)
    if down.numel() // down.shape[0] != fan_in:
        raise mismatch(group, got)
    if down.dim() == 4 and len(shape) == 4 and tuple(down.shape[1:]) != tuple(shape[1:]):
        raise mismatch(group, got)
