"""kohya LoRA and LoCon: `lora_down.weight`, `lora_up.weight`, optional `lora_mid.weight`, `alpha`.

Convention (sd-scripts networks/lora.py, LyCORIS modules/locon.py, A1111 network_lora.py):

- Linear: down [r, in], up [out, r]; conv (LoCon): down [r, in, kh, kw], up [out, r, 1, 1].
- delta = (alpha / r) * up @ down, with r = down.shape[0] read per module, so files
  resized with `--dynamic_method` (a different rank and alpha on each module) are exact.
  A missing alpha, or alpha 0, means alpha = r (scale 1), as in sd-scripts.
- Tucker (LyCORIS `use_tucker`): down [r, in, 1, 1], mid [r, r, kh, kw], up [out, r, 1, 1];
  delta[o, i, k, l] = sum_{n,m} up[o, n] mid[n, m, k, l] down[m, i]. We fold mid into
  down (down' [r, in, kh, kw]) so the patch stays low-rank and factors() stays valid.
"""

from __future__ import annotations

import torch

from studio.lora.base import LayerPatch, LowRankPatch
from studio.lora.formats.common import LayerGroup, ParseContext, alpha_scale, check_low_rank, scalar, shape_str

PARTS = ("lora_down", "lora_up", "lora_mid")


def fold_mid(mid: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Tucker core folded into the down factor: [r, r, kh, kw] x [r, in] -> [r, in, kh, kw]."""
    return torch.einsum("nmkl,mi->nikl", mid.float(), down.float().reshape(down.shape[0], -1))


def build(group: LayerGroup, ctx: ParseContext) -> LayerPatch:
    down, up, mid = group.get("lora_down"), group.get("lora_up"), group.get("lora_mid")
    if down is None or up is None:
        missing = "lora_down" if down is None else "lora_up"
        raise ValueError(f"incomplete {group.where}: {missing}.weight is missing")
    rank = down.shape[0]
    if mid is not None:
        fits = mid.dim() == 4 and mid.shape[:2] == (rank, rank) and down.numel() // rank == group.target.shape[1]
        if not fits:
            raise ValueError(f"shape mismatch at {group.where}: lora_mid {shape_str(mid.shape)} does not fit "
                             f"lora_down {shape_str(down.shape)} for weight {shape_str(group.target.shape)}")
        down = fold_mid(mid, down)
    check_low_rank(group, up, down, "lora_up x lora_down")
    scale = alpha_scale(scalar(group, "alpha"), rank)
    return LowRankPatch(group.target.component, group.target.path, up, down, scale, group.target.shape)
