"""What the demo-model and demo-LoRA training scripts share (not part of the app).

- Seeds: every batch comes from its own generator seeded by (stage, step), so a run
  resumed from a checkpoint draws exactly the batches the uninterrupted run would have.
- Checkpoints: plain tensors and numbers, written atomically, read with weights_only.
- Prompts: tokenised as the SDXL pipeline tokenises them and encoded the way
  `StableDiffusionXLPipeline.encode_prompt` encodes them (penultimate hidden states of
  both encoders, concatenated; TE2's projected EOS as the pooled embedding), but with
  gradients, so the text encoders can be fine-tuned.
- The diffusion loss: epsilon prediction on the pipeline's own noise schedule, min-SNR
  weighting, offset noise, and condition dropout to zeros (the pipeline's unconditional
  input: `force_zeros_for_empty_prompt`), so classifier-free guidance works.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from studio.demo_shapes import MAX_WIDTH, MIN_WIDTH, draw  # noqa: E402
from studio.demo_vocab import Scene, TEMPLATES, random_scene  # noqa: E402

log = logging.getLogger("demo-training")
SIZE = 128  # px: the demo's native size (studio.models.architectures.TINY_DEFAULT_SIZE)
DEFAULT_WORK = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lora-studio-demo-train"


def setup(threads: int, log_file: Path | None = None) -> None:
    """Fixed threads (results are bit-identical only for the same thread count and CPU), logging."""
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", handlers=handlers, force=True)
    for name in ("transformers", "diffusers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def stage_seed(seed: int, stage: str, step: int) -> int:
    digest = hashlib.sha256(f"{seed}:{stage}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generator(seed: int, stage: str, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(stage_seed(seed, stage, step))


# ---- pictures ---------------------------------------------------------------------------

def scene_images(rng: random.Random, n: int) -> tuple[list[Scene], torch.Tensor]:
    """n vocabulary scenes, each at a random width with the centre jittered by up to 2 px."""
    scenes, images = [], []
    for _ in range(n):
        scene = random_scene(rng)
        width = rng.uniform(MIN_WIDTH, MAX_WIDTH)
        centre = (rng.uniform(-2, 2), rng.uniform(-2, 2))
        scenes.append(scene)
        images.append(draw(scene, SIZE, width, centre))
    return scenes, torch.stack(images)


def tint(images: torch.Tensor, rgb: tuple[float, float, float], amount: float | torch.Tensor) -> torch.Tensor:
    """Blend every pixel towards one colour (the warm/cool LoRAs' targets)."""
    target = torch.tensor(rgb, dtype=images.dtype).view(1, 3, 1, 1)
    amount = torch.as_tensor(amount, dtype=images.dtype).reshape(-1, 1, 1, 1)
    return images + (target - images) * amount


def grain(images: torch.Tensor, g: torch.Generator, amount: float | torch.Tensor, cell: int = 2) -> torch.Tensor:
    """Film-grain-like texture: luminance noise in `cell`-pixel grains plus a little colour noise."""
    n, _, h, w = images.shape
    amount = torch.as_tensor(amount, dtype=images.dtype).reshape(-1, 1, 1, 1)
    luma = torch.randn(n, 1, h // cell, w // cell, generator=g)
    chroma = torch.randn(n, 3, h // cell, w // cell, generator=g) * 0.3
    noise = torch.nn.functional.interpolate(luma + chroma, scale_factor=cell, mode="nearest")
    return (images + noise * amount).clamp(0.0, 1.0)


def to_model(images: torch.Tensor) -> torch.Tensor:
    return images * 2.0 - 1.0


# ---- initialisation ----------------------------------------------------------------------

def residual_branches(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers that end a residual branch: each resnet's conv2, each attention's output projection."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    ends: list[torch.nn.Module] = []
    for module in model.modules():
        if isinstance(module, ResnetBlock2D):
            ends.append(module.conv2)
        elif isinstance(module, Attention):
            ends.append(module.to_out[0])
    return ends


def branch_parameters(model: torch.nn.Module) -> set[int]:
    """ids of the parameters inside residual branches (norms, convs, attention), not on the skip path."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, ResnetBlock2D):
            for part in (module.norm1, module.conv1, module.norm2, module.conv2, module.time_emb_proj):
                if part is not None:
                    ids.update(id(p) for p in part.parameters())
        elif isinstance(module, Attention):
            ids.update(id(p) for p in module.parameters())
    return ids


@torch.no_grad()
def zero_residual_branches(model: torch.nn.Module) -> None:
    """Start every residual block as the identity (guided-diffusion's zero_module).

    Measured on the demo VAE (250 steps of 64 px crops, 1 thread): with diffusers' default
    init every branch adds features of GroupNorm-ed inputs, which carry no absolute colour,
    on top of the skip path that does; reconstruction error was 57/255 and the colours had
    collapsed to an orange/blue pair. Zeroed branches (trained at a tenth of the rate in the
    VAE) gave 17/255 at 250 steps and 7/255 at 500.
    """
    for layer in residual_branches(model):
        layer.weight.zero_()
        if layer.bias is not None:
            layer.bias.zero_()


# ---- checkpoints -------------------------------------------------------------------------

def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path | str) -> dict[str, Any] | None:
    path = Path(path)
    return torch.load(path, weights_only=True) if path.exists() else None


class Ema:
    """Exponential moving average of some modules' parameters (what gets shipped)."""

    def __init__(self, modules: dict[str, torch.nn.Module], decay: float):
        self.decay = decay
        self.shadow = {f"{name}.{k}": v.detach().clone() for name, m in modules.items()
                       for k, v in m.named_parameters()}

    @torch.no_grad()
    def update(self, modules: dict[str, torch.nn.Module], step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for name, m in modules.items():
            for k, v in m.named_parameters():
                self.shadow[f"{name}.{k}"].lerp_(v.detach(), 1 - decay)



@torch.no_grad()
def load_shadow(shadow: dict[str, torch.Tensor], modules: dict[str, torch.nn.Module]) -> None:
    """Copy EMA weights (keys "component.parameter") into the modules."""
    for name, m in modules.items():
        for k, v in m.named_parameters():
            v.copy_(shadow[f"{name}.{k}"])


def cosine_lr(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def run_steps(name: str, total: int, start: int, step_fn: Callable[[int], dict[str, float]],
              checkpoint: Callable[[int], None], every: int = 100) -> None:
    """Call step_fn(step) for step in [start, total); log running means; checkpoint every `every` steps."""
    began, cpu, sums, count = time.perf_counter(), time.process_time(), {}, 0
    for step in range(start, total):
        for key, value in step_fn(step).items():
            sums[key] = sums.get(key, 0.0) + value
        count += 1
        if (step + 1) % every == 0 or step + 1 == total:
            checkpoint(step + 1)
            rate, cpu_rate = (time.perf_counter() - began) / count, (time.process_time() - cpu) / count
            means = " ".join(f"{k} {v / count:.4f}" for k, v in sums.items())
            log.info("%s step %d/%d %s (%.2f s/step wall, %.2f CPU, ~%.1f min left)", name, step + 1, total, means,
                     rate, cpu_rate, rate * (total - step - 1) / 60)
            began, cpu, sums, count = time.perf_counter(), time.process_time(), {}, 0


# ---- prompts -----------------------------------------------------------------------------

class PromptEncoder:
    """Tokenise (cached) and encode prompts as the SDXL pipeline does, with gradients."""

    def __init__(self, tokenizers: Iterable, text_encoders: Iterable[torch.nn.Module]):
        self.tokenizers = list(tokenizers)
        self.text_encoders = list(text_encoders)
        self._ids: dict[str, list[list[int]]] = {}

    def ids(self, prompt: str, extra: list[int] = ()) -> list[torch.Tensor]:
        """Token ids per tokenizer, padded to 77; `extra` token ids go in just before the EOS."""
        if prompt not in self._ids:
            self._ids[prompt] = [t(prompt, truncation=True, max_length=t.model_max_length).input_ids
                                 for t in self.tokenizers]
        out = []
        for tokenizer, ids in zip(self.tokenizers, self._ids[prompt]):
            ids = (ids[:-1] + list(extra))[: tokenizer.model_max_length - 1] + ids[-1:]
            ids = ids + [tokenizer.pad_token_id] * (tokenizer.model_max_length - len(ids))
            out.append(torch.tensor(ids))
        return out

    def encode(self, ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """ids: one [B, 77] tensor per encoder -> (embeds [B, 77, sum of widths], pooled [B, proj])."""
        hidden, pooled = [], None
        for encoder, batch in zip(self.text_encoders, ids):
            out = encoder(batch, output_hidden_states=True)
            if out[0].ndim == 2:
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled


def prompt_for(scene: Scene, rng: random.Random) -> str:
    """Half the time the canonical wording, else any of the others."""
    return scene.prompt(0 if rng.random() < 0.5 else rng.randrange(1, len(TEMPLATES)))


def time_ids(batch: int, size: int = SIZE) -> torch.Tensor:
    """SDXL micro-conditioning as the pipeline sends it: original size, crop (0, 0), target size."""
    return torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32).repeat(batch, 1)


# ---- diffusion ---------------------------------------------------------------------------

def alphas_cumprod(scheduler_config: dict[str, Any]) -> torch.Tensor:
    """The noise schedule the pipeline's scheduler uses (scaled_linear betas)."""
    if scheduler_config["beta_schedule"] != "scaled_linear":
        raise ValueError(f"expected a scaled_linear schedule, got {scheduler_config['beta_schedule']!r}")
    n = scheduler_config["num_train_timesteps"]
    betas = torch.linspace(scheduler_config["beta_start"] ** 0.5, scheduler_config["beta_end"] ** 0.5, n,
                           dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def diffusion_loss(unet: torch.nn.Module, latents: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor,
                   schedule: torch.Tensor, g: torch.Generator, offset_noise: float = 0.05,
                   min_snr: float = 5.0) -> torch.Tensor:
    """Epsilon-prediction loss with min-SNR-gamma weights (Hang et al. 2023) and offset noise.

    Offset noise (a per-channel constant added to the noise) teaches the model to move a
    region's mean far from the starting noise's: the background is one flat colour, and
    without it a sampler starting from zero-mean noise drifts towards grey.
    """
    n = latents.shape[0]
    t = torch.randint(0, schedule.numel(), (n,), generator=g)
    noise = torch.randn(latents.shape, generator=g)
    if offset_noise:
        noise = noise + offset_noise * torch.randn(n, latents.shape[1], 1, 1, generator=g)
    ab = schedule[t].view(n, 1, 1, 1)
    noisy = ab.sqrt() * latents + (1 - ab).sqrt() * noise
    pred = unet(noisy, t, encoder_hidden_states=embeds,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids(n)}).sample
    snr = ab.flatten() / (1 - ab.flatten())
    weight = torch.clamp(snr, max=min_snr) / snr
    return (((pred - noise) ** 2).mean(dim=(1, 2, 3)) * weight).mean()


def json_line(**values: Any) -> str:
    return json.dumps(values, sort_keys=True)
