"""Size presets: SDXL's training buckets (about one megapixel), scaled for smaller models.

The tiny demo model is native at 128, so its presets are the same shapes at an eighth
of the side length (all still multiples of 8); the full SDXL buckets stay on offer.
"""

from __future__ import annotations

import math

SDXL_BUCKETS: tuple[tuple[int, int], ...] = (
    (1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216),
    (1344, 768), (768, 1344), (1536, 640), (640, 1536),
)
SDXL_NATIVE = 1024
CUSTOM = "Custom"


def _ratio(width: int, height: int) -> str:
    divisor = math.gcd(width, height)
    return f"{width // divisor}:{height // divisor}"


def _scaled(native: int) -> list[tuple[int, int]]:
    scale = native / SDXL_NATIVE
    return [(int(round(w * scale / 8)) * 8, int(round(h * scale / 8)) * 8) for w, h in SDXL_BUCKETS]


def size_presets(native: int) -> dict[str, tuple[int, int]]:
    """Label -> (width, height); the model's own scale first."""
    presets: dict[str, tuple[int, int]] = {}
    if native != SDXL_NATIVE:
        for w, h in _scaled(native):
            presets[f"{w}×{h} ({_ratio(w, h)}, demo scale)"] = (w, h)
    for w, h in SDXL_BUCKETS:
        presets[f"{w}×{h} ({_ratio(w, h)}, SDXL)"] = (w, h)
    return presets


def preset_for(presets: dict[str, tuple[int, int]], width: int, height: int) -> str:
    """The label of the preset with this exact size, else CUSTOM."""
    for label, size in presets.items():
        if size == (int(width), int(height)):
            return label
    return CUSTOM
