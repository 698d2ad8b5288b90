"""Realistic kohya SDXL LoRA files for the benchmark, and an independent reader of their factors.

The files look like what sd-scripts writes for SDXL: SGM block names, UNet transformer
Linears + both text encoders' attention/MLP (986 modules on SDXL), one `alpha` per module,
fp16 factors, ss_* metadata. Deltas are ~4% of each weight's magnitude, a typical size.
`RawFactors` reads up/down/alpha straight from the safetensors file, sharing no code with
`studio.lora`, so the reference weights it builds check our reader as well as our patcher.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from studio.lora.keymap import ModelIndex, ModuleInfo

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class LoraSpec:
    """What a generated file holds; stored in its metadata so a cached file is reused only if equal."""

    model: str  # "sdxl" or "tiny"
    rank: int
    alpha: float
    dtype: str  # file tensor dtype
    seed: int
    relative_delta: float = 0.04  # std(delta) / std(weight)

    @property
    def filename(self) -> str:
        return f"bench-{self.model}-r{self.rank}-a{self.alpha:g}-{self.dtype}-s{self.seed}.safetensors"


def _tensors(index: ModelIndex, spec: LoraSpec, weight_std: Callable[[str, str], float]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(spec.seed)
    scale = spec.alpha / spec.rank
    out: dict[str, torch.Tensor] = {}
    for info in index.kohya_targets():
        fan_in = math.prod(info.shape[1:])
        down = torch.randn(spec.rank, fan_in, generator=g) / math.sqrt(fan_in)
        # std(delta) = scale * sqrt(rank) * std(up) * std(down) * sqrt(fan_in)
        up_std = spec.relative_delta * weight_std(info.component, info.path) / (scale * math.sqrt(spec.rank))
        up = torch.randn(info.shape[0], spec.rank, generator=g) * up_std
        prefix = index.kohya_key(info, sgm=True)
        out[f"{prefix}.lora_down.weight"] = down.to(DTYPES[spec.dtype])
        out[f"{prefix}.lora_up.weight"] = up.to(DTYPES[spec.dtype])
        out[f"{prefix}.alpha"] = torch.tensor(spec.alpha, dtype=DTYPES[spec.dtype])
    return out


def _matches(path: Path, spec: LoraSpec, n_keys: int) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata().get("bench_spec") == json.dumps(asdict(spec)) and len(f.keys()) == n_keys
    except Exception:  # noqa: BLE001 - any unreadable file is simply regenerated
        return False


def ensure_loras(folder: Path, index: ModelIndex, specs: list[LoraSpec],
                 weight_std: Callable[[str, str], float]) -> tuple[list[Path], float]:
    """Write the files that are missing or differ; returns their paths and the seconds spent writing."""
    import time

    folder.mkdir(parents=True, exist_ok=True)
    n_keys = 3 * len(index.kohya_targets())
    paths, spent = [], 0.0
    for spec in specs:
        path = folder / spec.filename
        if not _matches(path, spec, n_keys):
            t0 = time.perf_counter()
            meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(spec.rank),
                    "ss_network_alpha": str(spec.alpha), "ss_base_model_version": "sdxl_base_v1-0",
                    "ss_output_name": path.stem, "bench_spec": json.dumps(asdict(spec))}
            partial = path.with_name(path.name + ".partial")
            save_file(_tensors(index, spec, weight_std), str(partial), metadata=meta)
            os.replace(partial, path)
            spent += time.perf_counter() - t0
        paths.append(path)
    return paths, spent


class RawFactors:
    """(up, down, alpha/rank) of chosen modules, read from the file with safetensors only."""

    def __init__(self, path: Path, index: ModelIndex, modules: list[ModuleInfo]):
        self.factors: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor, float]] = {}
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            for info in modules:
                prefix = index.kohya_key(info, sgm=True)
                if f"{prefix}.lora_down.weight" not in keys:
                    continue
                down = f.get_tensor(f"{prefix}.lora_down.weight").flatten(1)  # file dtype: float64 only when used
                up = f.get_tensor(f"{prefix}.lora_up.weight").flatten(1)
                alpha = float(f.get_tensor(f"{prefix}.alpha").double()) if f"{prefix}.alpha" in keys else down.shape[0]
                self.factors[(info.component, info.path)] = (up, down, alpha / down.shape[0])

    def delta(self, component: str, module: str) -> torch.Tensor | None:
        """float64 delta at weight 1, or None when this file does not touch the module."""
        found = self.factors.get((component, module))
        if found is None:
            return None
        up, down, scale = found
        return scale * (up.double() @ down.double())
