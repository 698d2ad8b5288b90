"""Live preview: latents to a small RGB picture with one linear map, fitted to the loaded VAE.

A VAE decode per step would cost as much as a step; a 4->3 linear map (A1111's and
ComfyUI's "latent2rgb" previews) costs microseconds and shows colours and layout well
enough to stop a bad run early. Published factors exist for the SDXL VAE only, and this app
also loads the demo model and separate VAEs, so the map is fitted to the VAE at hand: decode
a few smooth random latents (no download, no real image needed) and solve least squares from
each latent pixel to the mean colour of the 8x8 image pixels it decodes to. The fit is cached
on disk by the VAE's identity, so a model loads as fast the second time. The map is applied
to the sampler's estimate of the finished latents (`CleanEstimate`), not to the noisy latents
of the step, so the preview shows the picture taking shape rather than noise.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

log = logging.getLogger(__name__)

PREVIEW_EVERY = 2  # steps between previews: a preview costs ~0.1 ms, the browser shows about one a second
FIT_SAMPLES = 2
FIT_SIDE = 16  # latent pixels per side of each fitting sample (128 image pixels)
PREVIEW_SIDE = 256  # the preview is the latent grid upscaled (nearest, whole times) to about this long side


@dataclass(frozen=True)
class LatentProjection:
    """rgb = weight @ latent + bias per latent pixel, in 0..1."""

    weight: tuple[tuple[float, ...], ...]  # 3 rows of `channels` numbers
    bias: tuple[float, float, float]
    rms_error: float  # of the fit, in 0..1 colour units (what the preview gets wrong on average)
    fit_seconds: float

    def image(self, latents: torch.Tensor) -> Image.Image:
        """The first latent of a batch (C, h, w) as a PIL image, each latent pixel a square of whole pixels."""
        lat = latents[0].detach().float().cpu()
        weight = torch.tensor(self.weight, dtype=torch.float32)
        bias = torch.tensor(self.bias, dtype=torch.float32)
        rgb = torch.einsum("chw,rc->hwr", lat, weight) + bias
        pixels = (rgb.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        picture = Image.fromarray(pixels, mode="RGB")
        scale = max(1, round(PREVIEW_SIDE / max(picture.size)))
        return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LatentProjection:
        return cls(tuple(tuple(float(v) for v in row) for row in data["weight"]),
                   tuple(float(v) for v in data["bias"]), float(data["rms_error"]), float(data["fit_seconds"]))


def _smooth_latents(channels: int, generator: torch.Generator) -> torch.Tensor:
    """Latents like a denoised image's: mostly smooth (upsampled coarse noise), a little fine detail, std ~1."""
    coarse = torch.randn(FIT_SAMPLES, channels, 4, 4, generator=generator)
    smooth = F.interpolate(coarse, size=(FIT_SIDE, FIT_SIDE), mode="bilinear", align_corners=False)
    fine = 0.3 * torch.randn(FIT_SAMPLES, channels, FIT_SIDE, FIT_SIDE, generator=generator)
    latents = smooth + fine
    return latents / latents.std()


def _fp32_copy(vae):
    """The VAE in fp32 beside the live one (built on meta, then given fp32 copies of the weights).

    Not `vae.to(float32)` and back: that would re-point the live weights away from the model
    cache's pristine copy. fp32 also because bf16 convolutions on a CPU without native bf16 run
    ~100x slower (DESIGN.md §8), and the SDXL VAE overflows in fp16.
    """
    with torch.device("meta"):
        fresh = type(vae).from_config(vae.config)
    state = {k: v.detach().float() for k, v in vae.state_dict().items()}
    fresh.load_state_dict(state, assign=True)
    return fresh.eval()


@torch.inference_mode()
def fit_projection(vae, seed: int = 0) -> LatentProjection:
    """Least-squares map from latent pixels to the colours `vae` decodes them to.

    The latents are in the pipeline's space (what the denoise loop holds): the decode divides
    by the VAE's scaling factor first, as `vae_decode.decode_latents` does.
    """
    start = time.perf_counter()
    config = vae.config
    channels = int(config.latent_channels)
    latents = _smooth_latents(channels, torch.Generator("cpu").manual_seed(seed))
    fresh = _fp32_copy(vae)
    device = next(fresh.parameters()).device
    decoded = fresh.decode((latents / config.scaling_factor).to(device), return_dict=False)[0]
    del fresh
    images = ((decoded.float().cpu() + 1) / 2).clamp(0, 1)
    scale = images.shape[-1] // FIT_SIDE
    target = F.avg_pool2d(images, scale)  # (N, 3, side, side): the colour of each latent pixel's patch
    x = latents.permute(0, 2, 3, 1).reshape(-1, channels)
    x = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    y = target.permute(0, 2, 3, 1).reshape(-1, 3)
    solution = torch.linalg.lstsq(x, y).solution  # (channels + 1, 3)
    rms = float(((x @ solution - y) ** 2).mean().sqrt())
    weight = solution[:channels].T
    return LatentProjection(tuple(tuple(round(float(v), 6) for v in row) for row in weight),
                            tuple(round(float(v), 6) for v in solution[channels]), round(rms, 5),
                            round(time.perf_counter() - start, 4))


def cached_projection(vae, key: str, cache_file: Path | None) -> LatentProjection:
    """The fit for the VAE known as `key` (its weights' hash): from `cache_file` when it was fitted before."""
    cache: dict = {}
    if cache_file is not None:
        try:
            cache = json.loads(cache_file.read_text())
            if key in cache:
                return LatentProjection.from_dict(cache[key])
        except (OSError, ValueError, KeyError, TypeError):
            cache = {}
    projection = fit_projection(vae)
    log.info("live preview fitted to the VAE in %.2f s (rms error %.3f)", projection.fit_seconds,
             projection.rms_error)
    if cache_file is not None:
        cache[key] = projection.to_dict()
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            partial = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
            partial.write_text(json.dumps(cache))
            os.replace(partial, cache_file)
        except OSError as err:  # a read-only cache only costs the fit again next time
            log.info("could not cache the preview fit in %s: %s", cache_file, err)
    return projection


class CleanEstimate:
    """The scheduler's own estimate of the finished latents (x0) after its latest step.

    Mid-run latents are mostly noise, so a picture of them is coloured noise until the last few
    steps; A1111's and ComfyUI's previews show the denoised estimate instead. Euler, Euler a and
    DDIM return it from `step` (their second output); DPM++ (dpmsolver++) and UniPC (predict_x0)
    keep it as their latest model output. With a scheduler that has neither, `latest` stays None
    and the preview shows the latents themselves. Only references are kept: nothing the
    scheduler computes changes, so the image is the same with the preview on or off.
    """

    def __init__(self, scheduler) -> None:
        self.latest: torch.Tensor | None = None
        self._scheduler = scheduler
        step = scheduler.step

        def step_and_keep(*args, **kwargs):
            out = step(*args, **kwargs)
            self.latest = self._estimate(out)
            return out

        scheduler.step = step_and_keep

    def _estimate(self, out) -> torch.Tensor | None:
        if isinstance(out, tuple):
            found = out[1] if len(out) > 1 else None
        else:
            found = getattr(out, "pred_original_sample", None)
        if isinstance(found, torch.Tensor):
            return found
        config = self._scheduler.config
        if config.get("algorithm_type") in ("dpmsolver++", "sde-dpmsolver++") or config.get("predict_x0") is True:
            outputs = getattr(self._scheduler, "model_outputs", None) or [None]
            if isinstance(outputs[-1], torch.Tensor):
                return outputs[-1]
        return None


class PreviewMeter:
    """Counts what the previews of one generation cost, for the report."""

    def __init__(self, enabled: bool, every: int = PREVIEW_EVERY) -> None:
        self.enabled, self.every = enabled, every
        self.images = 0
        self.denoised = 0  # of those, pictures of the scheduler's denoised estimate (the rest: raw latents)
        self.seconds = 0.0

    def due(self, step: int, total: int) -> bool:
        return self.enabled and (step % self.every == 0 or step == total)

    def report(self, steps: int, step_seconds: float, projection: LatentProjection | None) -> dict:
        out: dict = {"enabled": self.enabled, "every_steps": self.every, "images": self.images}
        if self.images:
            out["shows"] = "denoised estimate" if self.denoised == self.images else \
                "latents" if not self.denoised else f"denoised estimate ({self.denoised} of {self.images})"
        if self.enabled and steps:
            per_step = self.seconds / steps
            out |= {"seconds": round(self.seconds, 6), "ms_per_step": round(1000 * per_step, 4),
                    "share_of_step": round(per_step / step_seconds, 6) if step_seconds > 0 else 0.0}
        if projection is not None:
            out |= {"fit_seconds": projection.fit_seconds, "fit_rms_error": projection.rms_error}
        return out
