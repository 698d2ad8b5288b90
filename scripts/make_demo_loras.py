"""Make the demo LoRAs for the embedded tiny SDXL (assets/loras), one per common format.

    python scripts/make_demo_loras.py           # (re)write assets/loras/*.safetensors
    python scripts/make_demo_loras.py --check   # also measure each LoRA's effect on a 256x256
                                                # image and cross-check the fused weights with diffusers

- demo-kohya-warm:  kohya LoRA, SGM block names, UNet + TE1 + TE2, ss_* metadata with
                    ss_tag_frequency (trigger words) and a modelspec.thumbnail cover, fp16.
- demo-peft-cool:   diffusers/peft LoRA named as `pipe.save_lora_weights` names it (TE1 without
                    `text_model.` in transformers 5), alpha in `lora_adapter_metadata` (scale 2).
- demo-locon-grain: LoCon: the kohya LoRA targets plus the resnet/sampler convs (3x3 included).

Everything is seeded and written in a fixed order, so the files (and their A1111 hashes) are
the same on every run. Deltas are sized relative to each layer's fan-in (the tiny weights are
~N(0, 1/fan_in)), which is what makes the effect on the image clearly visible.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import struct
import sys
import zlib
from pathlib import Path

import torch
from safetensors.torch import save

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from studio.lora.keymap import ModelIndex, ModuleInfo, tiny_index  # noqa: E402
from studio.paths import DEMO_LORA_DIR, TINY_MODEL_DIR  # noqa: E402

RANK = 4
PEFT_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
PEFT_TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _png(width: int, height: int, pixel) -> bytes:
    """A tiny RGB PNG with stored (level 0) deflate: byte-identical on every zlib."""
    rows = b"".join(b"\0" + bytes(c for x in range(width) for c in pixel(x, y)) for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows, 0)) + chunk(b"IEND", b"")


def _warm_cover() -> str:
    png = _png(48, 48, lambda x, y: (255, 120 + 2 * y, 40 + x))
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _factors(info: ModuleInfo, g: torch.Generator, gain: float) -> tuple[torch.Tensor, torch.Tensor]:
    """down ~ N(0, 1/fan_in), up ~ N(0, gain^2/rank): the delta moves a layer's output by ~gain."""
    fan_in = math.prod(info.shape[1:])
    down = torch.randn(RANK, *info.shape[1:], generator=g) / math.sqrt(fan_in)
    up = torch.randn(info.shape[0], RANK, *([1, 1] if info.is_conv else []), generator=g) * (gain / math.sqrt(RANK))
    return up, down


def _kohya(index: ModelIndex, conv: bool, seed: int, gain: float, alpha: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for info in index.kohya_targets(conv=conv):
        up, down = _factors(info, g, gain * RANK / alpha)  # undo the file's alpha/rank scale
        prefix = index.kohya_key(info, sgm=True)
        tensors[f"{prefix}.lora_down.weight"] = down.half()
        tensors[f"{prefix}.lora_up.weight"] = up.half()
        tensors[f"{prefix}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
    return tensors


def _kohya_metadata(name: str, module: str, tags: dict[str, int], extra: dict[str, str]) -> dict[str, str]:
    return {"ss_output_name": name, "ss_network_module": module, "ss_network_dim": str(RANK),
            "ss_base_model_version": "sdxl_base_v1-0", "ss_sd_model_name": "tiny-sdxl",
            "ss_tag_frequency": json.dumps({f"10_{name}": tags}), "ss_training_comment": "LoRA Studio demo",
            "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
            "modelspec.title": name, **extra}


def build_demo_loras(index: ModelIndex | None = None) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]:
    """{name: (tensors, metadata)} for the three demo LoRAs, deterministic."""
    index = index or tiny_index()
    warm = _kohya(index, conv=False, seed=1, gain=0.5, alpha=2.0)
    warm_meta = _kohya_metadata("demo-kohya-warm", "networks.lora",
                                {"warm light": 14, "golden hour": 9, "amber glow": 6, "sunset": 3},
                                {"ss_network_alpha": "2.0", "modelspec.thumbnail": _warm_cover()})

    grain = _kohya(index, conv=True, seed=3, gain=0.4, alpha=4.0)
    grain_meta = _kohya_metadata("demo-locon-grain", "lycoris.kohya", {"film grain": 8, "analog": 5, "noisy": 2},
                                 {"ss_network_alpha": "4.0",
                                  "ss_network_args": json.dumps({"algo": "locon", "conv_dim": str(RANK),
                                                                 "conv_alpha": "4"})})

    g = torch.Generator().manual_seed(2)
    cool: dict[str, torch.Tensor] = {}
    lora_alpha = 2.0 * RANK  # scale alpha/r = 2, stated only in the metadata
    for info in index.modules():
        targets = PEFT_UNET_TARGETS if info.component == "unet" else PEFT_TE_TARGETS
        if not any(info.path.endswith("." + t) for t in targets):
            continue
        up, down = _factors(info, g, 0.6 * RANK / lora_alpha)
        cool[f"{info.component}.{info.path}.lora_A.weight"] = down
        cool[f"{info.component}.{info.path}.lora_B.weight"] = up
    adapter = {}
    for component, targets in (("unet", PEFT_UNET_TARGETS), ("text_encoder", PEFT_TE_TARGETS),
                               ("text_encoder_2", PEFT_TE_TARGETS)):
        adapter |= {f"{component}.r": RANK, f"{component}.lora_alpha": lora_alpha,
                    f"{component}.target_modules": sorted(targets), f"{component}.alpha_pattern": {},
                    f"{component}.rank_pattern": {}, f"{component}.use_dora": False, f"{component}.use_rslora": False}
    cool_meta = {"format": "pt", "lora_adapter_metadata": json.dumps(adapter, indent=2, sort_keys=True)}
    return {"demo-kohya-warm": (warm, warm_meta), "demo-peft-cool": (cool, cool_meta),
            "demo-locon-grain": (grain, grain_meta)}


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes with the metadata keys sorted: the writer emits them in hash-map order."""
    raw = save(tensors, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n, "re-serialised header grew"
    return raw[:8] + text.ljust(n, b" ") + raw[8 + n:]


def write_demo_loras(out_dir: Path = DEMO_LORA_DIR) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (tensors, metadata) in build_demo_loras().items():
        path = out_dir / f"{name}.safetensors"
        path.write_bytes(serialize(tensors, metadata))
        paths.append(path)
    return paths


def check(paths: list[Path], steps: int = 4, seed: int = 0) -> None:
    """Measure mean |pixel difference| at weight 1 and compare our deltas with diffusers' fuse."""
    from diffusers import StableDiffusionXLPipeline

    from studio.lora.reader import read_lora

    pipe = StableDiffusionXLPipeline.from_pretrained(TINY_MODEL_DIR, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def generate():
        return pipe("a photo of a lighthouse", num_inference_steps=steps, height=256, width=256, guidance_scale=5.0,
                    generator=torch.Generator().manual_seed(seed), output_type="np").images[0]

    base_image = generate()
    index = tiny_index()
    for path in paths:
        lora = read_lora(path, index)
        pristine = {}
        for patch in lora.patches:
            module = getattr(pipe, patch.component).get_submodule(patch.module)
            pristine[(patch.component, patch.module)] = w = module.weight.detach().clone()
            module.weight.data = w + patch.delta(w)
        diff = float(abs(generate() - base_image).mean() * 255)
        ours = {k: getattr(pipe, k[0]).get_submodule(k[1]).weight.detach().clone() for k in pristine}
        for (component, module_path), w in pristine.items():
            getattr(pipe, component).get_submodule(module_path).weight.data = w
        pipe.load_lora_weights(str(path), adapter_name="check")
        pipe.fuse_lora(lora_scale=1.0)
        worst = 0.0
        for (component, module_path), w in ours.items():
            module = getattr(pipe, component).get_submodule(module_path)
            fused = module.base_layer.weight if hasattr(module, "base_layer") else module.weight
            change = (w - pristine[(component, module_path)]).abs().max()
            worst = max(worst, float((fused.detach() - w).abs().max() / change))
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
        for (component, module_path), w in pristine.items():  # unfuse subtracts; restore exactly
            getattr(pipe, component).get_submodule(module_path).weight.data = w
        print(f"{path.name}: {path.stat().st_size / 1024:.0f} KiB, {lora.format}, {len(lora.patches)} layers, "
              f"hash {lora.short_hash}; mean |pixel diff| at weight 1 = {diff:.1f}/255; "
              f"diffusers fuse vs ours: max rel err {worst:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEMO_LORA_DIR)
    parser.add_argument("--check", action="store_true", help="measure the effect on an image (slow, ~1 min)")
    args = parser.parse_args()
    paths = write_demo_loras(args.out)
    for path in paths:
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    if args.check:
        check(paths)


if __name__ == "__main__":
    main()
