"""Full difference ("full"/LyCORIS `diff`): the file stores the dense delta itself.

Convention (LyCORIS modules/full.py, A1111 network_full.py): `diff` has the weight's
shape (or its numel) and is added at scale 1; `diff_b`, when present, is the bias delta.
"""

from __future__ import annotations

import math

import torch

from studio.lora.base import LayerPatch
from studio.lora.formats.common import LayerGroup, ParseContext, mismatch, shape_str

PARTS = ("diff", "diff_b")


class FullPatch(LayerPatch):
    """delta = diff; not low-rank, so factors() is None."""

    def __init__(self, component: str, module: str, diff: torch.Tensor, weight_shape: tuple[int, ...],
                 bias: torch.Tensor | None = None):
        self.component = component
        self.module = module
        self.diff = diff
        self.weight_shape = tuple(weight_shape)
        self.bias_delta = bias.float() if bias is not None else None

    def delta(self, base: torch.Tensor) -> torch.Tensor:
        return self.diff.float().reshape(self.weight_shape)

    def tensors(self) -> list[torch.Tensor]:
        return [self.diff]


def build(group: LayerGroup, ctx: ParseContext) -> LayerPatch:
    diff, bias = group.get("diff"), group.get("diff_b")
    shape = group.target.shape
    if diff is None:
        raise ValueError(f"incomplete {group.where}: diff_b without diff")
    if diff.numel() != math.prod(shape) or diff.shape[0] != shape[0]:
        raise mismatch(group, f"diff {shape_str(diff.shape)}")
    if bias is not None and bias.numel() != shape[0]:
        raise mismatch(group, f"diff_b {shape_str(bias.shape)} (bias of {shape[0]})")
    bias = bias.reshape(-1) if bias is not None else None
    return FullPatch(group.target.component, group.target.path, diff, shape, bias)
