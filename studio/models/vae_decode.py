"""VAE decode: latents to an image as the SDXL pipeline does it, in tiles when memory is short.

`decode_latents` is the generation's decode (unscale, upcast an fp16 VAE that asks for it,
postprocess to PIL); `plan_decode` reserves its working memory first.

Tiles are used when even the working reserve does not fit on the device.

Tiles overlap by `overlap` latent pixels. In each overlap a tile's outer quarter is thrown
away (weight 0: those pixels saw a receptive field cut by the tile edge) and the rest is
cross-faded linearly; the blend is normalised by the summed weights. For a decoder whose
receptive field fits in the margin the result equals the untiled decode (tested with a
local conv decoder). The SDXL VAE is not local: GroupNorm takes statistics over the whole
tile and the mid-block attends over it, so tiles differ from the full decode everywhere;
tests/models/test_vae_decode.py measures by how much.

Why not only diffusers' `enable_tiling`: it cross-fades from the very edge of a tile (no
margin, so cut-off pixels get weight), steps by a fixed stride so the last tile in a row can
be a sliver of a few latents (its GroupNorm statistics then come from that sliver), and it
only tiles above `sample_size` (1024 px for SDXL), i.e. never at 1024x1024 unless reconfigured.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from studio.models.budget import (TILED_FACTOR, VAE_DECODE_BYTES_PER_PIXEL_ELEMENT, device_free_bytes,
                                  vae_decode_bytes, working_reserve)

log = logging.getLogger(__name__)
SCALE = 8  # SDXL VAE: one latent pixel is 8x8 image pixels
MIN_TILE = 32  # latent pixels; smaller tiles make GroupNorm statistics too local


@dataclass(frozen=True)
class TilePlan:
    tile: int  # latent pixels per side
    overlap: int  # latent pixels shared by neighbours (margins + cross-fade)

    def __post_init__(self) -> None:
        if not 0 <= 2 * self.overlap <= self.tile:
            raise ValueError(f"`overlap` must be between 0 and half the tile ({self.tile}), got {self.overlap}")


def plan_tiles(width: int, height: int, dtype: torch.dtype, available: int, *, batch: int = 1) -> TilePlan | None:
    """The largest tile whose decode fits in `available` bytes; None when the whole image fits."""
    per_pixel = batch * dtype.itemsize * VAE_DECODE_BYTES_PER_PIXEL_ELEMENT
    if width * height * per_pixel <= available:
        return None
    side_px = int((available / (per_pixel * TILED_FACTOR)) ** 0.5)
    tile = max(MIN_TILE, (side_px // SCALE) // 8 * 8)
    if tile == MIN_TILE and (tile * SCALE) ** 2 * per_pixel * TILED_FACTOR > available:
        log.warning("VAE decode: even %d px tiles need more than the %d MB free; trying anyway",
                    tile * SCALE, available >> 20)
    return TilePlan(tile=tile, overlap=max(8, tile // 4))


def decode(vae, latents: torch.Tensor, plan: TilePlan | None = None) -> torch.Tensor:
    """`vae.decode(latents)` (already scaled latents), tiled when `plan` says so."""
    def run(z: torch.Tensor) -> torch.Tensor:
        return vae.decode(z, return_dict=False)[0]

    if plan is None:
        return run(latents)
    return tiled_decode(run, latents, plan)


def decode_latents(pipe, latents: torch.Tensor, plan: TilePlan | None = None):
    """VAE decode as the SDXL pipeline does it (fp16 VAEs with force_upcast run in fp32); tiled by `plan`."""
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and vae.config.force_upcast
    if upcast:
        vae.to(torch.float32)
    try:
        latents = latents.to(vae.dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean_t = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
            std_t = torch.tensor(std).view(1, -1, 1, 1).to(latents)
            latents = latents * std_t / vae.config.scaling_factor + mean_t
        else:
            latents = latents / vae.config.scaling_factor
        image = decode(vae, latents, plan)
    finally:
        if upcast:
            vae.to(torch.float16)
    return pipe.image_processor.postprocess(image, output_type="pil")[0]


def tiled_decode(decode_fn: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor, plan: TilePlan,
                 scale: int = SCALE) -> torch.Tensor:
    """Decode overlapping latent tiles with `decode_fn` and blend them (see the module doc)."""
    height, width = latents.shape[-2:]
    ys, xs = _spans(height, plan), _spans(width, plan)
    if len(ys) == 1 and len(xs) == 1:
        return decode_fn(latents)
    out = weight = None
    for iy, (y0, y1) in enumerate(ys):
        wy = _weights(ys, iy, plan, scale, latents.device)
        for ix, (x0, x1) in enumerate(xs):
            wx = _weights(xs, ix, plan, scale, latents.device)
            image = decode_fn(latents[..., y0:y1, x0:x1])
            if out is None:
                out = torch.zeros(*image.shape[:-2], height * scale, width * scale, dtype=torch.float32,
                                  device=image.device)
                weight = torch.zeros(height * scale, width * scale, dtype=torch.float32, device=image.device)
            w = wy[:, None] * wx[None, :]
            region = (..., slice(y0 * scale, y1 * scale), slice(x0 * scale, x1 * scale))
            out[region] += image.float() * w
            weight[y0 * scale:y1 * scale, x0 * scale:x1 * scale] += w
            del image
    log.debug("VAE decode in %d x %d tiles of %d latents", len(ys), len(xs), plan.tile)
    return (out / weight).to(latents.dtype)


def _spans(length: int, plan: TilePlan) -> list[tuple[int, int]]:
    """Tile spans covering [0, length): equal strides, the last tile flush with the end (never a sliver)."""
    if length <= plan.tile:
        return [(0, length)]
    stride = plan.tile - plan.overlap
    count = -(-(length - plan.tile) // stride) + 1
    starts = [round(i * (length - plan.tile) / (count - 1)) for i in range(count)]
    return [(s, s + plan.tile) for s in starts]


def _weights(spans: list[tuple[int, int]], i: int, plan: TilePlan, scale: int,
             device: torch.device) -> torch.Tensor:
    """Per-pixel weight of tile i along one axis: 0 within the margin of an inner edge, then a linear
    rise to 1. Image edges get no margin. The blend divides by the summed weights, so neighbours
    need not sum to 1, only cover every pixel: overlap > 2 x margin guarantees that."""
    start, end = spans[i]
    n = (end - start) * scale
    margin = plan.overlap // 4 * scale
    fade = max(plan.overlap * scale - 2 * margin, 1)
    d = torch.arange(n, dtype=torch.float32, device=device) + 0.5
    w = torch.ones(n, dtype=torch.float32, device=device)
    if i > 0:
        w *= ((d - margin) / fade).clamp(0, 1)
    if i + 1 < len(spans):
        w *= ((n - d - margin) / fade).clamp(0, 1)
    return w


@contextmanager
def plan_decode(cache, device: torch.device, width: int, height: int, vae, working_memory_mb: int,
                baseline: int) -> Iterator[TilePlan | None]:
    """Reserve the decode's working memory for the block; yields a tile plan when it cannot fit.

    The estimate is by image size (budget.vae_decode_bytes) unless `working_memory_mb` is set;
    an fp16 VAE with force_upcast decodes in fp32, so it is sized for fp32.
    """
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    dtype = torch.float32 if upcast else vae.dtype
    need = working_memory_mb * (1 << 20) if working_memory_mb else vae_decode_bytes(width, height, dtype)
    with working_reserve(cache, device, need, baseline=baseline) as fits:
        yield None if fits else plan_tiles(width, height, dtype, device_free_bytes(device))
