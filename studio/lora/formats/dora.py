"""DoRA: a magnitude vector on top of any low-rank (or LyCORIS) delta.

delta(W) = m * (W + D) / ||W + D|| - W, where D is the inner format's delta at full
strength and the norm is taken per output row or per input column, depending on the
convention (checked against the trainers' source):

- kohya/LyCORIS `dora_scale` (modules/locon.py, loha.py, lokr.py `apply_weight_decompose`):
  shaped [1, in(, 1, 1)] -> norm over every axis except 1 (per input column: early LyCORIS
  and A1111 network.py); shaped [out, 1(, 1, 1)] -> norm over every axis except 0 (per output
  row: `wd_on_out`, the default in LyCORIS 4.1.3). We tell them apart by shape, as ComfyUI
  does; a 1-D vector with in == out is read per input column. LyCORIS adds float32 eps to
  the norm; so do we. Both axes match LyCORIS 4.1.3's merge to 4e-7 relative.
- peft `lora_magnitude_vector` (tuners/lora/dora.py `get_weight_norm`): shape [out] for
  Linear, [1, out, 1, 1] for conv; norm per output row over all other axes; no eps
  (tests compare with peft's own merge).

At user weight w the patcher adds w * delta(W) (A1111's convention for DoRA strength).
The delta depends on the base weight, so depends_on_base is True and factors() is None.
"""

from __future__ import annotations

import torch

from studio.lora.base import LayerPatch
from studio.lora.formats.common import LayerGroup, mismatch, shape_str

OUT, IN = "out", "in"
LYCORIS_EPS = float(torch.finfo(torch.float32).eps)


class DoraPatch(LayerPatch):
    """Weight-decomposed delta around an inner patch."""

    def __init__(self, inner: LayerPatch, magnitude: torch.Tensor, axis: str, eps: float,
                 weight_shape: tuple[int, ...]):
        self.component = inner.component
        self.module = inner.module
        self.inner = inner
        self.axis = axis
        self.eps = float(eps)
        self.weight_shape = tuple(weight_shape)
        ndim = len(self.weight_shape)
        view = (-1, *[1] * (ndim - 1)) if axis == OUT else (1, -1, *[1] * (ndim - 2))
        self.magnitude = magnitude.reshape(view)

    @property
    def depends_on_base(self) -> bool:
        return True

    def delta(self, base: torch.Tensor) -> torch.Tensor:
        w = base.float().reshape(self.weight_shape)
        merged = w + self.inner.delta(w)
        if self.axis == OUT:
            norm = merged.reshape(merged.shape[0], -1).norm(dim=1)
        else:
            norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
        norm = norm.reshape(self.magnitude.shape) + self.eps
        return merged * (self.magnitude.float() / norm) - w

    def tensors(self) -> list[torch.Tensor]:
        return self.inner.tensors() + [self.magnitude]


def wrap_kohya(inner: LayerPatch, group: LayerGroup) -> DoraPatch:
    """LyCORIS `dora_scale`: per-input-column by default, per-output-row when shaped [out, 1...]."""
    scale = group.parts["dora_scale"]
    out_dim, in_dim = group.target.shape[0], group.target.shape[1]
    dims = [int(s) for s in scale.shape]
    if scale.numel() == in_dim and (len(dims) == 1 or (dims[0] == 1 and dims[1] == in_dim)):
        axis = IN
    elif scale.numel() == out_dim and (len(dims) == 1 or dims[0] == out_dim):
        axis = OUT
    else:
        raise mismatch(group, f"dora_scale {shape_str(scale.shape)} (expected [1, {in_dim}] or [{out_dim}, 1])")
    return DoraPatch(inner, scale, axis, LYCORIS_EPS, group.target.shape)


def wrap_peft(inner: LayerPatch, group: LayerGroup) -> DoraPatch:
    """peft `lora_magnitude_vector`: one magnitude per output row."""
    mag = group.parts["magnitude"]
    if mag.numel() != group.target.shape[0]:
        raise mismatch(group, f"lora_magnitude_vector {shape_str(mag.shape)} (expected {group.target.shape[0]} values)")
    return DoraPatch(inner, mag, OUT, 0.0, group.target.shape)
