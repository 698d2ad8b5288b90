"""An SDXL-shaped UNet + TE1 + TE2 with random weights, built without any download.

Time and memory of LoRA switching depend on shapes, not values (DESIGN.md 5), so the
benchmark builds the real shapes on the meta device and fills them. Filling 3.4 B params
with `normal_` takes ~30 s on 2 cores (research/diffusers.md 6); instead every tensor is
a slice of one seeded N(0, 0.02) pool at an offset fixed by its name: a memory copy per
tensor (~2 s), and the pristine value of any weight can be rebuilt at any time from the
pool alone. That gives the exactness checks a pristine reference that shares nothing with
the patcher's own RAM copies, at no memory cost.
"""

from __future__ import annotations

import hashlib
import logging
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from studio.models.architectures import SDXL_TE1, SDXL_TE2, SDXL_UNET
from studio.phases import LORA_TARGETS

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLPipeline

log = logging.getLogger(__name__)

WEIGHT_STD = 0.02
_SEED = 20240613
# 16x the L3 cache of the benchmark machine, so reading pristine values from the pool is no
# cheaper than reading a per-tensor RAM copy would be
MIN_POOL = 256 << 20


@dataclass
class BenchModel:
    """The pipeline under test, its three patchable components and where pristine weights come from."""

    pipe: StableDiffusionXLPipeline
    components: dict[str, nn.Module]
    pristine: Callable[[str, str], torch.Tensor]  # (component, "mod.path.weight") -> read-only pristine
    weight_std: Callable[[str, str], float]  # (component, module path) -> typical |w| of that weight
    label: str
    build_seconds: float = 0.0
    # the model cache's read-only RAM copy, for LoraPatcher(pristine_source=...); None: it snapshots
    pristine_source: Callable[[str, str], torch.Tensor] | None = None
    integrity: Callable[[], str] | None = None  # fingerprint of the pristine source (must never change)


def _offset(component: str, name: str, numel: int, pool_len: int) -> int:
    return zlib.crc32(f"{component}.{name}".encode()) % (pool_len - numel + 1)


class _Pool:
    """One seeded N(0, 0.02) vector; a weight is `pool[offset(name):][:numel]`."""

    def __init__(self, length: int, dtype: torch.dtype, device: torch.device):
        g = torch.Generator(device="cpu").manual_seed(_SEED)
        chunk = 1 << 22  # fp32 chunks keep the transient small; the pool itself is in `dtype`
        self.data = torch.empty(length, dtype=dtype, device=device)
        for start in range(0, length, chunk):
            n = min(chunk, length - start)
            self.data[start:start + n].copy_(torch.randn(n, generator=g) * WEIGHT_STD)

    def slice(self, component: str, name: str, shape: torch.Size) -> torch.Tensor:
        n = shape.numel()
        start = _offset(component, name, n, self.data.numel())
        return self.data[start:start + n].view(shape)


def _is_random(t: torch.Tensor) -> bool:
    """Matrices (Linear, conv, embeddings) are random; norms are 1 and biases 0, as after training init."""
    return t.dim() >= 2


def _fill_(component: str, module: nn.Module, pool: _Pool) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if _is_random(p):
                p.copy_(pool.slice(component, name, p.shape))
            else:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
        for name, b in module.named_buffers():
            if name.endswith("position_ids"):
                b.copy_(torch.arange(b.shape[-1], device=b.device).expand_as(b))
            else:
                b.zero_()


# Reduced: SDXL's widths and module names, fewer transformer layers (1, 1, 2 instead of 1, 2, 10) and
# 4-layer text encoders: 240 kohya modules instead of 986, every one of a shape full SDXL has, so
# per-layer costs are SDXL's; it fits three peers' copies of model and LoRAs in fp32 on 24 GB.
REDUCED_UNET = {**SDXL_UNET, "transformer_layers_per_block": [1, 1, 2]}
REDUCED_TE1 = {**SDXL_TE1, "num_hidden_layers": 4}
REDUCED_TE2 = {**SDXL_TE2, "num_hidden_layers": 4}


def build_sdxl(dtype: torch.dtype, device: torch.device, reduced: bool = False) -> BenchModel:
    """Real-size SDXL UNet/TE1/TE2 (2.57 B + 123 M + 695 M params) plus a tiny VAE, no download.

    `reduced`: the SDXL-shaped reduced model above (0.85 B + 66 M + 144 M params; 240 kohya targets
    holding 597 M weights).
    """
    import time

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from diffusers import UNet2DConditionModel

    unet, te1, te2 = (REDUCED_UNET, REDUCED_TE1, REDUCED_TE2) if reduced else (SDXL_UNET, SDXL_TE1, SDXL_TE2)
    t0 = time.perf_counter()
    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel(**unet),
                  "text_encoder": CLIPTextModel(CLIPTextConfig(**te1)),
                  "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**te2))}
    longest = max(p.numel() for m in models.values() for p in m.parameters())
    pool = _Pool(max(longest + (1 << 20), MIN_POOL), dtype, device)
    for component, model in models.items():
        model.to(dtype)  # on meta: free, and to_empty then allocates in the final dtype only
        model.to_empty(device=device)
        _fill_(component, model, pool)
        model.eval().requires_grad_(False)
    pipe = assemble_pipeline(models, dtype, device)

    def pristine(component: str, param: str) -> torch.Tensor:
        live = models[component].get_parameter(param)
        return pool.slice(component, param, live.shape) if _is_random(live) else live

    def integrity() -> str:
        return hashlib.sha256(pool.data.cpu().view(torch.uint8).numpy()).hexdigest()

    # On CPU the pool stands in for the model cache's pristine RAM copy (DESIGN.md 3): it saves the
    # 5.9 GB the patcher would otherwise snapshot. On CUDA the patcher snapshots to pinned RAM itself.
    label = "reduced SDXL-shaped random weights" if reduced else "SDXL-shaped random weights"
    return BenchModel(pipe, models, pristine, lambda c, m: WEIGHT_STD, label,
                      time.perf_counter() - t0, pristine if device.type == "cpu" else None, integrity)


def assemble_pipeline(models: dict[str, nn.Module], dtype: torch.dtype,
                      device: torch.device) -> StableDiffusionXLPipeline:
    """A StableDiffusionXLPipeline around the components: real tokenizers, the tiny VAE (switching never decodes)."""
    from transformers import CLIPTokenizer

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from studio.paths import SDXL_BASE_CONFIG_DIR, TINY_MODEL_DIR

    vae = AutoencoderKL.from_pretrained(TINY_MODEL_DIR / "vae", torch_dtype=dtype, local_files_only=True).to(device)
    pipe = StableDiffusionXLPipeline(
        vae=vae, unet=models["unet"], text_encoder=models["text_encoder"], text_encoder_2=models["text_encoder_2"],
        tokenizer=CLIPTokenizer.from_pretrained(SDXL_BASE_CONFIG_DIR / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(SDXL_BASE_CONFIG_DIR / "tokenizer_2"),
        scheduler=EulerDiscreteScheduler.from_pretrained(SDXL_BASE_CONFIG_DIR / "scheduler"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_tiny(dtype: torch.dtype, device: torch.device) -> BenchModel:
    """The embedded tiny SDXL (same module names, small shapes); pristine = clones taken now."""
    import time

    from diffusers import StableDiffusionXLPipeline
    from studio.paths import TINY_MODEL_DIR

    t0 = time.perf_counter()
    pipe = StableDiffusionXLPipeline.from_pretrained(TINY_MODEL_DIR, torch_dtype=dtype, local_files_only=True)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    models = {c.value: getattr(pipe, c).eval().requires_grad_(False) for c in LORA_TARGETS}
    clones = {(c, n): p.detach().clone() for c, m in models.items() for n, p in m.named_parameters()}
    stds = {(c, n.rpartition(".")[0]): float(p.float().std()) for (c, n), p in clones.items()
            if n.endswith(".weight") and p.dim() >= 2}
    return BenchModel(pipe, models, lambda c, n: clones[(c, n)], lambda c, m: stds[(c, m)], "embedded tiny SDXL",
                      time.perf_counter() - t0)
