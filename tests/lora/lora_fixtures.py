"""Key -> tensor fixtures for the LoRA format tests, on the tiny SDXL's real module names.

Imported by the test files through sys.path. Every builder returns {key: tensor} for one
layer in one format, from seeded random tensors, so a test can write a file, read it
back, and recompute the delta from the same tensors its own way.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from studio.lora.keymap import ModelIndex, ModuleInfo, tiny_index

# A spread of layer kinds: attention/MLP Linears in the UNet and both TEs, a 3x3 resnet conv,
# a 1x1 shortcut conv, a strided downsampler conv, a resnet time-embedding Linear.
SAMPLE_PATHS = (
    ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
    ("unet", "down_blocks.2.attentions.1.proj_in"),
    ("unet", "mid_block.attentions.0.transformer_blocks.1.ff.net.0.proj"),
    ("unet", "up_blocks.0.attentions.2.transformer_blocks.0.attn2.to_k"),
    ("text_encoder", "encoder.layers.1.self_attn.out_proj"),
    ("text_encoder_2", "text_model.encoder.layers.0.mlp.fc1"),
    ("unet", "down_blocks.0.resnets.1.conv1"),
    ("unet", "up_blocks.0.resnets.0.conv_shortcut"),
    ("unet", "down_blocks.0.downsamplers.0.conv"),
    ("unet", "up_blocks.1.resnets.2.time_emb_proj"),
)


def index() -> ModelIndex:
    return tiny_index()


def samples(convs: bool = True) -> list[ModuleInfo]:
    ix = index()
    infos = [ix.get(c, p) for c, p in SAMPLE_PATHS]
    assert all(i is not None for i in infos), "tiny model lost a sample module"
    return [i for i in infos if convs or not i.is_conv]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(g: torch.Generator, *shape: int, std: float = 0.1) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * std


def base_weight(info: ModuleInfo, seed: int = 99) -> torch.Tensor:
    return rand(gen(seed), *info.shape, std=0.2)


def peft_prefix(info: ModuleInfo) -> str:
    """How diffusers' save_lora_weights names a module (TE1 without `text_model.` in transformers 5)."""
    return f"{info.component}.{info.path}"


def kohya_layer(info: ModuleInfo, g: torch.Generator, rank: int, alpha: float | None,
                tucker: bool = False) -> dict[str, torch.Tensor]:
    out, fan = info.shape[0], info.shape[1:]
    if info.is_conv and tucker:
        d = {"lora_down.weight": rand(g, rank, fan[0], 1, 1), "lora_mid.weight": rand(g, rank, rank, *fan[1:]),
             "lora_up.weight": rand(g, out, rank, 1, 1)}
    elif info.is_conv:
        d = {"lora_down.weight": rand(g, rank, *fan), "lora_up.weight": rand(g, out, rank, 1, 1)}
    else:
        d = {"lora_down.weight": rand(g, rank, fan[0]), "lora_up.weight": rand(g, out, rank)}
    if alpha is not None:
        d["alpha"] = torch.tensor(float(alpha))
    return d


def peft_layer(info: ModuleInfo, g: torch.Generator, rank: int) -> dict[str, torch.Tensor]:
    out, fan = info.shape[0], info.shape[1:]
    if info.is_conv:
        return {"lora_A.weight": rand(g, rank, *fan), "lora_B.weight": rand(g, out, rank, 1, 1)}
    return {"lora_A.weight": rand(g, rank, fan[0]), "lora_B.weight": rand(g, out, rank)}


def loha_layer(info: ModuleInfo, g: torch.Generator, rank: int, alpha: float | None,
               tucker: bool = False) -> dict[str, torch.Tensor]:
    out, fan = info.shape[0], info.shape[1:]
    d: dict[str, torch.Tensor] = {}
    for n in (1, 2):
        if info.is_conv and tucker:
            d[f"hada_t{n}"] = rand(g, rank, rank, *fan[1:])
            d[f"hada_w{n}_a"] = rand(g, rank, out)
            d[f"hada_w{n}_b"] = rand(g, rank, fan[0])
        else:
            d[f"hada_w{n}_a"] = rand(g, out, rank)
            d[f"hada_w{n}_b"] = rand(g, rank, math.prod(fan))
    if alpha is not None:
        d["alpha"] = torch.tensor(float(alpha))
    return d


def split_dim(n: int) -> tuple[int, int]:
    """n = a * b with a the largest divisor <= sqrt(n) (LyCORIS factorization, factor -1)."""
    a = max(d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0)
    return a, n // a


def lokr_layer(info: ModuleInfo, g: torch.Generator, w1: str, w2: str, rank: int,
               alpha: float | None) -> dict[str, torch.Tensor]:
    """w1 in ("full", "lowrank"); w2 in ("full", "lowrank", "tucker")."""
    (a, b), (c, d) = split_dim(info.shape[0]), split_dim(info.shape[1])
    kernel = info.shape[2:]
    t: dict[str, torch.Tensor] = {}
    if w1 == "full":
        t["lokr_w1"] = rand(g, a, c)
    else:
        t["lokr_w1_a"], t["lokr_w1_b"] = rand(g, a, rank), rand(g, rank, c)
    if w2 == "full":
        t["lokr_w2"] = rand(g, b, d, *kernel)
    elif w2 == "tucker":
        t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"] = rand(g, rank, rank, *kernel), rand(g, rank, b), rand(g, rank, d)
    else:
        t["lokr_w2_a"], t["lokr_w2_b"] = rand(g, b, rank), rand(g, rank, d * math.prod(kernel))
    if alpha is not None:
        t["alpha"] = torch.tensor(float(alpha))
    return t


def full_layer(info: ModuleInfo, g: torch.Generator, bias: bool) -> dict[str, torch.Tensor]:
    d = {"diff": rand(g, *info.shape)}
    if bias:
        d["diff_b"] = rand(g, info.shape[0])
    return d


def with_prefix(prefix: str, layer: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{suffix}": t for suffix, t in layer.items()}


def write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path
