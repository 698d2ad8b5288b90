"""Train the embedded demo model (assets/tiny-sdxl) to draw the demo vocabulary. CPU, fixed seeds.

    python scripts/train_demo_model.py                 # all stages, resuming where a run stopped
    python scripts/train_demo_model.py --threads 2     # results are bit-identical per thread count and CPU
    python scripts/train_demo_model.py --stages write  # only write assets/tiny-sdxl from the checkpoints

The pipeline keeps the tiny SDXL architecture of studio.models.architectures (the same
diffusers/transformers classes and the shipped tokenizers); only its weights are trained,
on pictures drawn on the fly by studio.demo_shapes (no data files):

1. vae:     the VAE on 64 px crops of 128 px pictures (vocabulary colours, random colours,
            tints and grain too, so the LoRAs' targets can be decoded); L1 + MSE through the
            encoder's mean (sampling a learnt variance only slowed it down), a small pull on
            the latents' size; residual branches start at zero and learn at a tenth of the
            rate (see demo_training.zero_residual_branches). Its scaling factor is then set
            so the latents have unit variance.
2. latents: a fixed set of vocabulary pictures, encoded once (the VAE's mean).
3. unet:    the UNet (residual branches starting at zero) and both text encoders
            (starting from the shipped random CLIP weights) on those latents: epsilon loss on the pipeline's own noise schedule,
            min-SNR weights, offset noise, 10% of prompts dropped to the pipeline's
            unconditional input (zeros) so CFG works; an EMA of the weights is what ships.
4. write:   assets/tiny-sdxl in diffusers layout, fp16, as scripts/make_tiny_sdxl.py writes it.

Checkpoints and logs go to --work (outside the repository); every stage resumes from its
last checkpoint, and each batch has its own seed, so a resumed run equals an unbroken one.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import random
import shutil
import time
from pathlib import Path

import torch

import demo_training as dt
from studio.demo_shapes import MAX_WIDTH, MIN_WIDTH, coverage
from studio.demo_vocab import COLOURS, SHAPES, Scene
from studio.models import architectures as arch
from studio.paths import SDXL_BASE_CONFIG_DIR, TINY_MODEL_DIR

log = logging.getLogger("demo-training")
SEED = 20261201

VAE_STEPS, VAE_BATCH, VAE_CROP, VAE_LR, VAE_BRANCH_LR = 1000, 8, 64, 1e-3, 1e-4
VAE_SIZE = 1e-3  # a pull on the latents' size, so their scale stays put
LATENT_COUNT = 4096
UNET_STEPS, UNET_BATCH, UNET_LR, TE_LR, EMA_DECAY = 3000, 32, 5e-4, 2e-4, 0.999
DROP_CONDITION, EXTRA_TOKENS = 0.1, 0.15  # share of prompts dropped / given 1-3 random extra tokens


def _tiny_script():
    spec = importlib.util.spec_from_file_location("make_tiny_sdxl", dt.REPO / "scripts" / "make_tiny_sdxl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fresh_pipeline():
    """The starting point: the shipped random text encoders, a default-initialised UNet and VAE."""
    pipe = _tiny_script().build_tiny(SDXL_BASE_CONFIG_DIR)  # deterministic random weights, every component
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(SEED)
    pipe.vae = AutoencoderKL(**arch.TINY_VAE)
    pipe.unet = UNet2DConditionModel(**arch.TINY_UNET)
    dt.zero_residual_branches(pipe.vae)
    dt.zero_residual_branches(pipe.unet)
    return pipe


# ---- 1. VAE -------------------------------------------------------------------------------

def vae_batch(step: int) -> torch.Tensor:
    """Crops of varied pictures: half vocabulary colours, half any colours; some tinted, some grainy."""
    rng = random.Random(dt.stage_seed(SEED, "vae", step))
    g = dt.generator(SEED, "vae-noise", step)
    scenes, images = dt.scene_images(rng, VAE_BATCH)
    out = []
    for scene, image in zip(scenes, images):
        if rng.random() < 0.5:  # the same shape in any two colours
            mask = coverage(scene.shape, dt.SIZE, rng.uniform(MIN_WIDTH, MAX_WIDTH) * dt.SIZE)
            fg, bg = torch.rand(3, 1, 1, generator=g), torch.rand(3, 1, 1, generator=g)
            image = bg + (fg - bg) * mask
        if rng.random() < 0.25:
            image = dt.tint(image[None], tuple(torch.rand(3, generator=g).tolist()), rng.uniform(0.1, 0.4))[0]
        if rng.random() < 0.3:
            image = dt.grain(image[None], g, rng.uniform(0.02, 0.15), cell=rng.choice((2, 4)))[0]
        y, x = rng.randrange(0, dt.SIZE - VAE_CROP + 1, 8), rng.randrange(0, dt.SIZE - VAE_CROP + 1, 8)
        out.append(image[:, y:y + VAE_CROP, x:x + VAE_CROP])
    return dt.to_model(torch.stack(out))


def train_vae(pipe, work: Path, steps: int) -> None:
    vae = pipe.vae.train()
    branch = dt.branch_parameters(vae)
    opt = torch.optim.AdamW([{"params": [p for p in vae.parameters() if id(p) not in branch], "peak": VAE_LR},
                             {"params": [p for p in vae.parameters() if id(p) in branch], "peak": VAE_BRANCH_LR}])
    path = work / "vae.pt"
    state = dt.load_checkpoint(path)
    start = 0
    if state is not None:
        vae.load_state_dict(state["vae"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    if start >= steps:
        return

    def step_fn(step: int) -> dict[str, float]:
        for group in opt.param_groups:
            group["lr"] = dt.cosine_lr(step, steps, group["peak"], warmup=50)
        x = vae_batch(step)
        mean = vae.encode(x).latent_dist.mean
        recon = vae.decode(mean).sample
        l1, l2 = (recon - x).abs().mean(), ((recon - x) ** 2).mean()
        size = (mean ** 2).mean()
        loss = l1 + l2 + VAE_SIZE * size
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        return {"l1": float(l1.detach()), "latent_rms": float(size.detach().sqrt())}

    dt.run_steps("vae", steps, start, step_fn,
                 lambda step: dt.save_checkpoint(path, {"vae": vae.state_dict(), "opt": opt.state_dict(),
                                                        "step": step}))


@torch.no_grad()
def set_scaling_factor(vae) -> float:
    """1 / std of the latents of vocabulary pictures, to 4 significant digits (SDXL's is 0.13025)."""
    rng = random.Random(dt.stage_seed(SEED, "scale", 0))
    _, images = dt.scene_images(rng, 256)
    latents = torch.cat([vae.encode(dt.to_model(chunk)).latent_dist.mean for chunk in images.split(64)])
    factor = float(f"{1.0 / float(latents.std()):.4g}")
    vae.register_to_config(scaling_factor=factor)
    return factor


# ---- 2. latents ---------------------------------------------------------------------------

@torch.no_grad()
def cache_latents(pipe, work: Path) -> dict[str, torch.Tensor]:
    path = work / "latents.pt"
    cached = dt.load_checkpoint(path)
    if cached is not None and cached["latents"].shape[0] == LATENT_COUNT:
        return cached
    vae = pipe.vae.eval()
    rng = random.Random(dt.stage_seed(SEED, "latents", 0))
    latents, labels = [], []
    for start in range(0, LATENT_COUNT, 64):
        scenes, images = dt.scene_images(rng, min(64, LATENT_COUNT - start))
        latents.append(vae.encode(dt.to_model(images)).latent_dist.mean * vae.config.scaling_factor)
        names = [c.name for c in COLOURS]
        labels += [[names.index(s.colour), SHAPES.index(s.shape), names.index(s.background)] for s in scenes]
    cached = {"latents": torch.cat(latents), "labels": torch.tensor(labels)}
    dt.save_checkpoint(path, cached)
    log.info("cached %d latents, std %.3f", LATENT_COUNT, float(cached["latents"].std()))
    return cached


# ---- 3. UNet + text encoders -------------------------------------------------------------

def train_unet(pipe, data: dict[str, torch.Tensor], work: Path, steps: int) -> dict[str, torch.Tensor]:
    modules = {"unet": pipe.unet.train(), "text_encoder": pipe.text_encoder.train(),
               "text_encoder_2": pipe.text_encoder_2.train()}
    te_params = [*pipe.text_encoder.parameters(), *pipe.text_encoder_2.parameters()]
    opt = torch.optim.AdamW([{"params": pipe.unet.parameters(), "lr": UNET_LR, "peak": UNET_LR},
                             {"params": te_params, "lr": TE_LR, "peak": TE_LR}], betas=(0.9, 0.99), weight_decay=0.0)
    ema = dt.Ema(modules, EMA_DECAY)
    encoder = dt.PromptEncoder([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2])
    schedule = dt.alphas_cumprod(dict(pipe.scheduler.config))
    path = work / "unet.pt"
    state = dt.load_checkpoint(path)
    start = 0
    if state is not None:
        for name, module in modules.items():
            module.load_state_dict(state[name])
        opt.load_state_dict(state["opt"])
        ema.shadow = state["ema"]
        start = state["step"]
    vocab_ids = set()
    for words in [c.name for c in COLOURS] + list(SHAPES) + ["background", "on", "a", "an", "with", ","]:
        vocab_ids.update(pipe.tokenizer(words).input_ids[1:-1])

    def step_fn(step: int) -> dict[str, float]:
        rng = random.Random(dt.stage_seed(SEED, "unet", step))
        g = dt.generator(SEED, "unet-noise", step)
        for group in opt.param_groups:
            group["lr"] = dt.cosine_lr(step, steps, group["peak"], warmup=200)
        index = torch.randint(0, data["latents"].shape[0], (UNET_BATCH,), generator=g)
        ids = [[], []]
        for label in data["labels"][index].tolist():
            scene = Scene(COLOURS[label[0]].name, SHAPES[label[1]], COLOURS[label[2]].name)
            extra = []
            if rng.random() < EXTRA_TOKENS:  # robustness to words it does not know (a LoRA's trigger word)
                extra = [t for t in (rng.randrange(400, 49400) for _ in range(rng.randint(1, 3))) if t not in vocab_ids]
            for k, tensor in enumerate(encoder.ids(dt.prompt_for(scene, rng), extra)):
                ids[k].append(tensor)
        embeds, pooled = encoder.encode([torch.stack(batch) for batch in ids])
        keep = (torch.rand(UNET_BATCH, generator=g) >= DROP_CONDITION).float()
        loss = dt.diffusion_loss(pipe.unet, data["latents"][index], embeds * keep.view(-1, 1, 1),
                                 pooled * keep.view(-1, 1), schedule, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for m in modules.values() for p in m.parameters()], 1.0)
        opt.step()
        ema.update(modules, step)
        return {"loss": float(loss.detach())}

    def checkpoint(step: int) -> None:
        dt.save_checkpoint(path, {**{n: m.state_dict() for n, m in modules.items()}, "opt": opt.state_dict(),
                                  "ema": ema.shadow, "step": step})

    if start < steps:
        dt.run_steps("unet", steps, start, step_fn, checkpoint)
    return ema.shadow


# ---- 4. write -----------------------------------------------------------------------------

def write(pipe, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    pipe.to(torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):  # the same slow-tokenizer files as sdxl-base
        shutil.rmtree(out / name)
        shutil.copytree(SDXL_BASE_CONFIG_DIR / name, out / name)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log.info("wrote %s (%.1f MB)", out, size / 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=dt.DEFAULT_WORK, help="checkpoints and log (default %(default)s)")
    parser.add_argument("--out", type=Path, default=TINY_MODEL_DIR)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--stages", default="vae,latents,unet,write")
    parser.add_argument("--vae-steps", type=int, default=VAE_STEPS)
    parser.add_argument("--unet-steps", type=int, default=UNET_STEPS)
    args = parser.parse_args()
    dt.setup(args.threads, args.work / "train_demo_model.log")
    stages = set(args.stages.split(","))
    began, cpu = time.perf_counter(), time.process_time()
    pipe = fresh_pipeline()
    if "vae" in stages or not (args.work / "vae.pt").exists():
        train_vae(pipe, args.work, args.vae_steps)
    state = dt.load_checkpoint(args.work / "vae.pt")
    pipe.vae.load_state_dict(state["vae"])
    pipe.vae.eval()
    factor = set_scaling_factor(pipe.vae)
    log.info("VAE scaling factor %s", factor)
    data = cache_latents(pipe, args.work)
    if "unet" in stages or "write" in stages:
        shadow = train_unet(pipe, data, args.work, args.unet_steps)
        dt.load_shadow(shadow, {"unet": pipe.unet, "text_encoder": pipe.text_encoder,
                                "text_encoder_2": pipe.text_encoder_2})
    if "write" in stages:
        pipe.unet.eval(), pipe.text_encoder.eval(), pipe.text_encoder_2.eval()
        write(pipe, args.out)
    log.info("done in %.1f min wall, %.1f min CPU (this run)", (time.perf_counter() - began) / 60,
             (time.process_time() - cpu) / 60)


if __name__ == "__main__":
    main()
