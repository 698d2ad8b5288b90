"""Write low-rank LoRA factors as files other tools read: kohya (LoRA and LoCon) and diffusers/peft.

The inverse of the readers in studio/lora/formats, for what we train ourselves (the demo
LoRAs, scripts/train_demo_loras.py). Each writer takes {module: (up, down)} with the
training's own scale, so `read_lora` gives back exactly delta = scale * up @ down:

- kohya / LoCon: `{prefix}.lora_down.weight` [r, in(, kh, kw)], `.lora_up.weight`
  [out, r(, 1, 1)], `.alpha`; scale alpha / r. Prefixes as sd-scripts writes them
  (`lora_unet_` + SGM block names, `lora_te1_`/`lora_te2_` + `text_model.` paths).
  Metadata: the `ss_*` fields sd-scripts writes (incl. `ss_tag_frequency`, from which
  browsers read trigger words) and a modelspec cover image.
- peft: `{component}.{module path}.lora_A.weight` / `.lora_B.weight`, named as
  `pipe.save_lora_weights` names them; scale lora_alpha / r, stated only in the
  `lora_adapter_metadata` JSON, as diffusers writes it.

`serialize` sorts the metadata keys (the safetensors writer emits them in hash-map order),
so the same tensors and metadata always give the same bytes and the same A1111 hash.
"""

from __future__ import annotations

import base64
import json
import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save

from studio.lora.keymap import ModelIndex, ModuleInfo

Factors = Mapping[ModuleInfo, tuple[torch.Tensor, torch.Tensor]]  # module -> (up [out, r], down [r, in...])


def _check(info: ModuleInfo, up: torch.Tensor, down: torch.Tensor) -> int:
    rank = down.shape[0]
    if tuple(down.shape) != (rank, *info.shape[1:]) or tuple(up.reshape(up.shape[0], -1).shape) != (info.shape[0], rank):
        raise ValueError(f"factors for {info.component}.{info.path} do not fit its weight {tuple(info.shape)}: "
                         f"up {tuple(up.shape)}, down {tuple(down.shape)}")
    return rank


def kohya_tensors(factors: Factors, index: ModelIndex, alpha: float, dtype: torch.dtype = torch.float16
                  ) -> dict[str, torch.Tensor]:
    """kohya keys (SGM UNet names); conv layers (LoCon) keep their kernel in lora_down."""
    tensors: dict[str, torch.Tensor] = {}
    for info, (up, down) in factors.items():
        _check(info, up, down)
        prefix = index.kohya_key(info, sgm=True)
        tensors[f"{prefix}.lora_down.weight"] = down.detach().to(dtype).contiguous()
        up = up.detach().reshape(info.shape[0], -1)
        tensors[f"{prefix}.lora_up.weight"] = (up[:, :, None, None] if info.is_conv else up).to(dtype).contiguous()
        tensors[f"{prefix}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return tensors


def kohya_metadata(name: str, *, rank: int, alpha: float, tag_frequency: Mapping[str, int], conv: bool = False,
                   cover_png: bytes | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The `ss_*` and modelspec fields sd-scripts writes for an SDXL LoRA (LoCon: lycoris.kohya)."""
    meta = {"ss_output_name": name, "ss_network_module": "lycoris.kohya" if conv else "networks.lora",
            "ss_network_dim": str(rank), "ss_network_alpha": str(float(alpha)),
            "ss_base_model_version": "sdxl_base_v1-0", "ss_sd_model_name": "tiny-sdxl",
            "ss_tag_frequency": json.dumps({f"1_{name}": dict(tag_frequency)}),
            "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
            "modelspec.title": name}
    if conv:
        meta["ss_network_args"] = json.dumps({"algo": "locon", "conv_dim": str(rank), "conv_alpha": str(float(alpha))})
    if cover_png is not None:
        meta["modelspec.thumbnail"] = "data:image/png;base64," + base64.b64encode(cover_png).decode()
    return {**meta, **(extra or {})}


def peft_tensors(factors: Factors, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for info, (up, down) in factors.items():
        _check(info, up, down)
        prefix = f"{info.component}.{info.path}"
        tensors[f"{prefix}.lora_A.weight"] = down.detach().to(dtype).contiguous()
        up = up.detach().reshape(info.shape[0], -1)
        tensors[f"{prefix}.lora_B.weight"] = (up[:, :, None, None] if info.is_conv else up).to(dtype).contiguous()
    return tensors


def peft_metadata(rank: int, lora_alpha: float, targets: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """`lora_adapter_metadata` as `pipe.save_lora_weights` writes it: per component, prefixed."""
    adapter: dict[str, object] = {}
    for component, modules in targets.items():
        adapter |= {f"{component}.r": rank, f"{component}.lora_alpha": lora_alpha,
                    f"{component}.target_modules": sorted(modules), f"{component}.alpha_pattern": {},
                    f"{component}.rank_pattern": {}, f"{component}.use_dora": False,
                    f"{component}.use_rslora": False}
    return {"format": "pt", "lora_adapter_metadata": json.dumps(adapter, indent=2, sort_keys=True)}


def serialize(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """safetensors bytes with the metadata keys sorted (the tensor keys already are)."""
    raw = save(dict(tensors), metadata=dict(metadata))
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    if len(text) > n:  # cannot happen: the same JSON, compact, in another key order
        raise RuntimeError("re-serialised safetensors header grew")
    return raw[:8] + text.ljust(n, b" ") + raw[8 + n:]


def write_lora(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(serialize(tensors, metadata))
    return path


def png_bytes(pixels: torch.Tensor) -> bytes:
    """An RGB PNG of a uint8 [H, W, 3] tensor with stored (level 0) deflate: the same bytes on every zlib."""
    if pixels.dtype != torch.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected uint8 [H, W, 3] pixels, got {pixels.dtype} {tuple(pixels.shape)}")
    height, width = pixels.shape[:2]
    rows = b"".join(b"\0" + bytes(row.flatten().tolist()) for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows, 0)) + chunk(b"IEND", b"")
