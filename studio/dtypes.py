"""Facts about torch dtypes that several layers ask (the LoRA patcher, the memory engine)."""

from __future__ import annotations

import torch

# Every float8 variant this torch build has; weights stored in one cannot hold a merged LoRA
# (re-rounding to fp8 loses ~85% of a typical delta, research/diffusers.md 0.5).
FP8_DTYPES: tuple[torch.dtype, ...] = tuple(
    getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, n))


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16" for torch.bfloat16: how reports spell a dtype."""
    return str(dtype).removeprefix("torch.")
