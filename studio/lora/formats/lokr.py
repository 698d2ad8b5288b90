"""LyCORIS LoKr: delta = scale * kron(w1, w2).

Convention (LyCORIS modules/lokr.py, A1111 network_lokr.py, ComfyUI weight_adapter/lokr.py):

- w1 = `lokr_w1` [a, c], or factorised `lokr_w1_a` [a, r] @ `lokr_w1_b` [r, c].
- w2 = `lokr_w2` [b, d(, kh, kw)], or `lokr_w2_a` [b, r] @ `lokr_w2_b` [r, d*kh*kw] (or [r, d, kh, kw]), or Tucker
  `lokr_t2` [r, r, kh, kw] with `lokr_w2_a` [r, b], `lokr_w2_b` [r, d].
- delta = kron(w1, w2 flattened to [b, d*kh*kw]) reshaped to the weight [a*b, c*d, kh, kw]
  (identical to LyCORIS's 4-D kron with w1 unsqueezed).
- scale = alpha / r only when a factorised half exists (r = w2_b.shape[0], else w1_b.shape[0],
  as A1111/ComfyUI read it); with both halves full LyCORIS forces alpha = r, so scale 1.
  A missing alpha means scale 1. (LyCORIS 4.1.3's own loader takes the rank of a Tucker file
  from w2_a.shape[1], which is b, not r; trainers and A1111/ComfyUI use r, so do we.)
- Checked against LyCORIS 4.1.3 `functional.lokr` on every layer kind: identical (rel. err 0).
"""

from __future__ import annotations

import math

import torch

from studio.lora.base import LayerPatch
from studio.lora.formats.common import LayerGroup, ParseContext, alpha_scale, mismatch, scalar, shape_str
from studio.lora.formats.loha import rebuild_tucker

PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


class LokrPatch(LayerPatch):
    """delta = scale * kron(w1, w2); the halves are rebuilt on demand from the file's tensors."""

    def __init__(self, component: str, module: str, parts: dict[str, torch.Tensor], scale: float,
                 weight_shape: tuple[int, ...]):
        self.component = component
        self.module = module
        self.parts = dict(parts)
        self.scale = float(scale)
        self.weight_shape = tuple(weight_shape)

    def halves(self) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.parts
        w1 = p["lokr_w1"].float() if "lokr_w1" in p else _matmul(p["lokr_w1_a"], p["lokr_w1_b"])
        if "lokr_w2" in p:
            w2 = p["lokr_w2"].float()
        elif "lokr_t2" in p:
            w2 = rebuild_tucker(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
        else:
            w2 = _matmul(p["lokr_w2_a"], p["lokr_w2_b"])
        return w1, w2.reshape(w2.shape[0], -1)

    def delta(self, base: torch.Tensor) -> torch.Tensor:
        w1, w2 = self.halves()
        return (torch.kron(w1.contiguous(), w2.contiguous()) * self.scale).reshape(self.weight_shape)

    def tensors(self) -> list[torch.Tensor]:
        return list(self.parts.values())


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [m, r] @ b [r, ...] with b's trailing axes flattened (LyCORIS 4 writes conv w2_b as [r, d, kh, kw])."""
    return a.float() @ b.float().reshape(b.shape[0], -1)


def _half_shape(group: LayerGroup, n: int) -> tuple[int, int]:
    """(rows, cols) of half n (cols flattened over the kernel), checking the factor shapes."""
    p = group.parts
    full, a, b = p.get(f"lokr_w{n}"), p.get(f"lokr_w{n}_a"), p.get(f"lokr_w{n}_b")
    t = p.get("lokr_t2") if n == 2 else None
    if full is not None:
        return full.shape[0], full.numel() // full.shape[0]
    if a is None or b is None:
        raise ValueError(f"incomplete {group.where}: needs lokr_w{n} or lokr_w{n}_a and lokr_w{n}_b")
    if t is not None:
        if t.dim() != 4 or a.dim() != 2 or b.dim() != 2 or a.shape[0] != t.shape[0] or b.shape[0] != t.shape[1]:
            raise mismatch(group, f"lokr_t2 {shape_str(t.shape)}, lokr_w2_a {shape_str(a.shape)}, "
                                  f"lokr_w2_b {shape_str(b.shape)}")
        return a.shape[1], b.shape[1] * math.prod(t.shape[2:])
    if a.dim() != 2 or a.shape[1] != b.shape[0]:
        raise mismatch(group, f"lokr_w{n}_a {shape_str(a.shape)} x lokr_w{n}_b {shape_str(b.shape)}")
    return a.shape[0], b.numel() // b.shape[0]


def build(group: LayerGroup, ctx: ParseContext) -> LayerPatch:
    (r1, c1), (r2, c2) = _half_shape(group, 1), _half_shape(group, 2)
    shape = group.target.shape
    if r1 * r2 != shape[0] or c1 * c2 != math.prod(shape[1:]):
        raise mismatch(group, f"kron of [{r1}, {c1}] and [{r2}, {c2}] = [{r1 * r2}, {c1 * c2}]")
    p = group.parts
    rank = None
    if "lokr_w1_b" in p:
        rank = p["lokr_w1_b"].shape[0]
    if "lokr_w2_b" in p:
        rank = p["lokr_w2_b"].shape[0]
    scale = alpha_scale(scalar(group, "alpha"), rank) if rank is not None else 1.0
    kept = {k: v for k, v in p.items() if k in PARTS}
    return LokrPatch(group.target.component, group.target.path, kept, scale, shape)
