"""Write the SDXL base configs under assets/, and build the tiny SDXL with random weights (no download).

- assets/sdxl-base/: the real SDXL base 1.0 configs (no weights), used to load a
  single-file SDXL checkpoint offline, with the CLIP tokenizers written by
  scripts/make_tokenizers.py (run that first).
- `build_tiny`: a tiny SDXL-architecture pipeline with deterministic random weights,
  built from the real diffusers and transformers classes. It is where
  scripts/train_demo_model.py starts (its text encoders are these random CLIP weights);
  the trained result is what assets/tiny-sdxl holds. `--random-tiny DIR` writes the
  untrained pipeline to DIR (fp16, diffusers layout), e.g. to compare against.

Usage: python scripts/make_tiny_sdxl.py [--random-tiny DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402

from studio.models import architectures as arch  # noqa: E402

SEED = 20261121


def randomize_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Deterministic weights that give a lively (not flat) image through the random VAE."""
    for name, param in module.named_parameters():
        with torch.no_grad():
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
            elif "norm" in name and param.ndim == 1:
                param.copy_(1.0 + torch.randn(param.shape, generator=generator) * 0.05)
            else:
                fan_in = param[0].numel() if param.ndim > 1 else param.numel()
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)


def build_tiny(tokenizer_dir: Path) -> StableDiffusionXLPipeline:
    generator = torch.Generator().manual_seed(SEED)
    unet = UNet2DConditionModel(**arch.TINY_UNET)
    vae = AutoencoderKL(**arch.TINY_VAE)
    te1 = CLIPTextModel(CLIPTextConfig(**arch.TINY_TE1))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**arch.TINY_TE2))
    for module in (unet, vae, te1, te2):
        randomize_(module, generator)
    # position_ids are buffers, left as built (arange)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(tokenizer_dir / "tokenizer_2"),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**arch.SDXL_SCHEDULER),
    )


def write_sdxl_base_configs(out: Path) -> None:
    """Real SDXL configs, built on the meta device so no weights are allocated."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**arch.SDXL_UNET)
        vae = AutoencoderKL(**arch.SDXL_VAE)
    unet.save_config(out / "unet")
    vae.save_config(out / "vae")
    CLIPTextConfig(**arch.SDXL_TE1, architectures=["CLIPTextModel"]).save_pretrained(out / "text_encoder")
    CLIPTextConfig(**arch.SDXL_TE2, architectures=["CLIPTextModelWithProjection"]).save_pretrained(
        out / "text_encoder_2"
    )
    EulerDiscreteScheduler(**arch.SDXL_SCHEDULER).save_config(out / "scheduler")
    # model_index.json: the pipeline's component map, as a full SDXL repo has it
    import json

    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": "0.42.1",
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--random-tiny", type=Path, help="also write the untrained tiny pipeline here")
    args = parser.parse_args()
    base = REPO / "assets" / "sdxl-base"
    if not (base / "tokenizer" / "vocab.json").exists():
        sys.exit("run scripts/make_tokenizers.py first")
    write_sdxl_base_configs(base)
    print(f"wrote the SDXL base configs in {base}")
    if args.random_tiny is None:
        return
    tiny_dir = args.random_tiny
    if tiny_dir.exists():
        shutil.rmtree(tiny_dir)
    pipe = build_tiny(base)
    pipe.to(torch.float16)
    pipe.save_pretrained(tiny_dir, safe_serialization=True)
    # save_pretrained writes the fast-tokenizer files; keep the same slow files as sdxl-base
    for name in ("tokenizer", "tokenizer_2"):
        shutil.rmtree(tiny_dir / name)
        shutil.copytree(base / name, tiny_dir / name)
    size = sum(f.stat().st_size for f in tiny_dir.rglob("*") if f.is_file())
    print(f"wrote {tiny_dir} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
