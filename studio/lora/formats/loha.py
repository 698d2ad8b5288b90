"""LyCORIS LoHa: `hada_w1_a/b`, `hada_w2_a/b`, optional Tucker cores `hada_t1/t2`, `alpha`.

Convention (LyCORIS modules/loha.py, A1111 network_hada.py):

- Plain: w1 = hada_w1_a [out, r] @ hada_w1_b [r, in*kh*kw], w2 likewise.
- Tucker (3x3 convs): hada_t1 [r, r, kh, kw], hada_w1_a [r, out], hada_w1_b [r, in];
  w1[o, i, k, l] = sum_{p,q} t1[p, q, k, l] w1_a[p, o] w1_b[q, i].
- delta = (alpha / r) * (w1 * w2) (Hadamard product), r = hada_w1_b.shape[0];
  alpha missing or 0 means scale 1. The product of two rank-r matrices has rank up to
  r^2, so there are no factors: factors() is None.
- Matches LyCORIS 4.1.3's training forward (`get_weight`) to 1.5e-7 relative; its
  `get_diff_weight` multiplies by the scale a second time, which A1111/ComfyUI do not.
"""

from __future__ import annotations

import math

import torch

from studio.lora.base import LayerPatch
from studio.lora.formats.common import LayerGroup, ParseContext, alpha_scale, mismatch, scalar, shape_str

PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


def rebuild_tucker(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """LyCORIS Tucker rebuild: core [r, r, kh, kw], wa [r, out], wb [r, in] -> [out, in, kh, kw]."""
    return torch.einsum("pqkl,po,qi->oikl", core.float(), wa.float(), wb.float())


def _half(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
    if t is not None:
        return rebuild_tucker(t, a, b)
    return a.float() @ b.float()


class LohaPatch(LayerPatch):
    """delta = scale * (w1_a @ w1_b) * (w2_a @ w2_b), each half optionally Tucker."""

    def __init__(self, component: str, module: str, w1: tuple, w2: tuple, scale: float,
                 weight_shape: tuple[int, ...]):
        self.component = component
        self.module = module
        self.w1 = w1  # (a, b, t or None)
        self.w2 = w2
        self.scale = float(scale)
        self.weight_shape = tuple(weight_shape)

    def delta(self, base: torch.Tensor) -> torch.Tensor:
        w = _half(*self.w1) * _half(*self.w2)
        return (w * self.scale).reshape(self.weight_shape)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (*self.w1, *self.w2) if t is not None]


def _check(group: LayerGroup, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None, n: int) -> None:
    shape = group.target.shape
    if t is not None:
        ok = (len(shape) == 4 and t.dim() == 4 and tuple(t.shape[2:]) == tuple(shape[2:]) and a.dim() == 2
              and b.dim() == 2 and a.shape == (t.shape[0], shape[0]) and b.shape == (t.shape[1], shape[1]))
        got = f"hada_t{n} {shape_str(t.shape)}, hada_w{n}_a {shape_str(a.shape)}, hada_w{n}_b {shape_str(b.shape)}"
    else:
        ok = (a.dim() == 2 and b.dim() >= 2 and a.shape[0] == shape[0] and a.shape[1] == b.shape[0]
              and b.numel() // b.shape[0] == math.prod(shape[1:]))
        got = f"hada_w{n}_a {shape_str(a.shape)} x hada_w{n}_b {shape_str(b.shape)}"
    if not ok:
        raise mismatch(group, got)


def build(group: LayerGroup, ctx: ParseContext) -> LayerPatch:
    halves = []
    for n in (1, 2):
        a, b, t = group.get(f"hada_w{n}_a"), group.get(f"hada_w{n}_b"), group.get(f"hada_t{n}")
        if a is None or b is None:
            raise ValueError(f"incomplete {group.where}: hada_w{n}_a/hada_w{n}_b missing")
        _check(group, a, b, t, n)
        halves.append((a, b.reshape(b.shape[0], -1) if t is None else b, t))
    rank = halves[0][1].shape[0]
    scale = alpha_scale(scalar(group, "alpha"), rank)
    return LohaPatch(group.target.component, group.target.path, halves[0], halves[1], scale, group.target.shape)
