"""Train the demo LoRAs (assets/loras) against the demo model, one per common format. CPU, fixed seeds.

    python scripts/train_demo_loras.py                # train (resuming), write, measure
    python scripts/train_demo_loras.py --only demo-peft-cool
    python scripts/train_demo_loras.py --measure      # only measure the files in --out
    python scripts/train_demo_loras.py --check        # also cross-check our deltas with diffusers' fuse_lora

Each LoRA learns its effect from pictures, nothing is set by hand: the same vocabulary
pictures the demo model was trained on, changed the way the LoRA's name says, encoded by
the demo VAE, with the demo model's own diffusion loss (scripts/demo_training.py):

- demo-kohya-warm:  pictures blended towards amber; captions with the trigger word
                    "golden hour" get a strong cast, captions without it a mild one, so
                    the word matters. kohya LoRA (UNet transformer Linears + both text
                    encoders' attention/MLP), SGM names, ss_* metadata, cover image, fp16.
- demo-peft-cool:   pictures blended towards sky blue. diffusers/peft LoRA on the
                    attention projections, alpha only in `lora_adapter_metadata` (scale 2).
- demo-locon-grain: film grain added. LoCon: the kohya targets plus the resnet and
                    sampler convolutions (3x3 included), lycoris.kohya metadata.

The trained factors are written by studio.lora.writers; training is seeded per step and
the files' metadata sorted, so the same CPU and thread count give the same bytes.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

import demo_training as dt
from studio.demo_shapes import texture, warmth
from studio.demo_vocab import WARM_TRIGGER, Scene, random_scene
from studio.lora import writers
from studio.lora.keymap import ModelIndex, ModuleInfo, tiny_index
from studio.paths import DEMO_LORA_DIR, TINY_MODEL_DIR

log = logging.getLogger("demo-training")
SEED = 20261202
RANK, STEPS, BATCH, LR, TARGETS = 4, 400, 16, 2e-3, 384
TRIGGER = WARM_TRIGGER
AMBER, SKY = (1.0, 0.62, 0.12), (0.12, 0.45, 1.0)
GRAIN_CELL, GRAIN_AMOUNT = 8, 0.15
PEFT_UNET, PEFT_TE = ("to_q", "to_k", "to_v", "to_out.0"), ("q_proj", "k_proj", "v_proj", "out_proj")
MEASURE_PROMPTS = (Scene("red", "circle", "blue"), Scene("white", "square", "green"),
                   Scene("yellow", "triangle", "purple"), Scene("black", "circle", "orange"))
MEASURE_WEIGHTS = (0.0, 0.5, 1.0, 1.5)


@dataclass(frozen=True)
class Spec:
    format: str  # "kohya", "peft", "locon"
    alpha: float
    target: Callable[[torch.Tensor, torch.Generator, bool], torch.Tensor]  # (pictures, g, triggered) -> targets
    trigger: str = ""


def _warm(images: torch.Tensor, g: torch.Generator, triggered: bool) -> torch.Tensor:
    # 0.2 without the trigger was learnt as "warm only with the trigger" (R-B +15, -0.2, +5 at weights
    # 0.5, 1, 1.5): the plain cast has to be a clear one of its own
    return dt.tint(images, AMBER, 0.5 if triggered else 0.3)


def _cool(images: torch.Tensor, g: torch.Generator, triggered: bool) -> torch.Tensor:
    return dt.tint(images, SKY, 0.35)


def _grain(images: torch.Tensor, g: torch.Generator, triggered: bool) -> torch.Tensor:
    # Grains of 8 px, one latent pixel each: the demo VAE carries about 70% of such a pattern through
    # encode and decode, but erases 2 px grain entirely (measured: texture +12.6 in, +0.1 out), so a
    # LoRA trained on fine grain learns nothing it can show.
    return dt.grain(images, g, GRAIN_AMOUNT, cell=GRAIN_CELL)


SPECS = {
    "demo-kohya-warm": Spec("kohya", alpha=2.0, target=_warm, trigger=TRIGGER),
    "demo-peft-cool": Spec("peft", alpha=8.0, target=_cool),
    "demo-locon-grain": Spec("locon", alpha=4.0, target=_grain),
}


def targets(index: ModelIndex, fmt: str) -> list[ModuleInfo]:
    if fmt == "peft":
        return [i for i in index.modules()
                if any(i.path.endswith("." + t) for t in (PEFT_UNET if i.component == "unet" else PEFT_TE))]
    return index.kohya_targets(conv=fmt == "locon")


class LowRankHooks:
    """Trainable x -> down -> up (scaled) added to each target module's output by a forward hook."""

    def __init__(self, pipe, infos: list[ModuleInfo], alpha: float, g: torch.Generator):
        self.scale = alpha / RANK
        self.factors: dict[ModuleInfo, tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}
        self._handles = []
        for info in infos:
            module = getattr(pipe, info.component).get_submodule(info.path)
            fan_in = int(torch.tensor(info.shape[1:]).prod())
            down = torch.nn.Parameter(torch.randn(RANK, *info.shape[1:], generator=g) / fan_in ** 0.5)
            up = torch.nn.Parameter(torch.zeros(info.shape[0], RANK))  # starts as no change
            self.factors[info] = (up, down)
            self._handles.append(module.register_forward_hook(self._hook(module, up, down)))

    def _hook(self, module, up, down):
        def add(_module, inputs, output):
            x = inputs[0]
            if isinstance(module, torch.nn.Conv2d):
                h = F.conv2d(x, down, stride=module.stride, padding=module.padding, dilation=module.dilation)
                return output + self.scale * F.conv2d(h, up[:, :, None, None])
            return output + self.scale * F.linear(F.linear(x, down), up)
        return add

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for pair in self.factors.values() for p in pair]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def load_pipe(model: Path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model, dtype=torch.float32, local_files_only=True)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        part.eval().requires_grad_(False)
    return pipe


@torch.no_grad()
def target_set(pipe, name: str, spec: Spec) -> tuple[torch.Tensor, list[str]]:
    """Latents of the changed pictures and their captions (the trigger word on half of them)."""
    rng = random.Random(dt.stage_seed(SEED, f"{name}-targets", 0))
    g = dt.generator(SEED, f"{name}-grain", 0)
    latents, captions = [], []
    for start in range(0, TARGETS, 64):
        scenes, images = dt.scene_images(rng, 64)
        flags = [bool(spec.trigger) and rng.random() < 0.5 for _ in scenes]
        changed = torch.cat([spec.target(image[None], g, flag) for image, flag in zip(images, flags)])
        latents.append(pipe.vae.encode(dt.to_model(changed)).latent_dist.mean * pipe.vae.config.scaling_factor)
        captions += [dt.prompt_for(s, rng) + (f", {spec.trigger}" if flag else "") for s, flag in zip(scenes, flags)]
    return torch.cat(latents), captions


def train_one(pipe, name: str, spec: Spec, work: Path, steps: int) -> tuple[dict, dict[str, int]]:
    latents, captions = target_set(pipe, name, spec)
    hooks = LowRankHooks(pipe, targets(tiny_index(), spec.format), spec.alpha, dt.generator(SEED, f"{name}-init", 0))
    opt = torch.optim.AdamW(hooks.parameters(), lr=LR, betas=(0.9, 0.99), weight_decay=0.0)
    encoder = dt.PromptEncoder([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2])
    schedule = dt.alphas_cumprod(dict(pipe.scheduler.config))
    path = work / f"{name}.pt"
    state = dt.load_checkpoint(path)
    start = 0
    if state is not None:
        for param, saved in zip(hooks.parameters(), state["params"]):
            param.data.copy_(saved)
        opt.load_state_dict(state["opt"])
        start = state["step"]

    def step_fn(step: int) -> dict[str, float]:
        g = dt.generator(SEED, name, step)
        for group in opt.param_groups:
            group["lr"] = dt.cosine_lr(step, steps, LR, warmup=20)
        index = torch.randint(0, latents.shape[0], (BATCH,), generator=g)
        ids = [encoder.ids(captions[i]) for i in index.tolist()]
        embeds, pooled = encoder.encode([torch.stack([row[k] for row in ids]) for k in range(2)])
        loss = dt.diffusion_loss(pipe.unet, latents[index], embeds, pooled, schedule, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hooks.parameters(), 1.0)
        opt.step()
        return {"loss": float(loss.detach())}

    if start < steps:
        dt.run_steps(name, steps, start, step_fn, lambda step: dt.save_checkpoint(
            path, {"params": [p.detach() for p in hooks.parameters()], "opt": opt.state_dict(), "step": step}))
    hooks.remove()
    factors = {info: (up.detach().clone(), down.detach().clone()) for info, (up, down) in hooks.factors.items()}
    tags = {spec.trigger: sum(spec.trigger in c for c in captions)} if spec.trigger else {}
    return factors, tags


def lora_file(name: str, spec: Spec, factors: dict, tags: dict[str, int], cover: bytes | None) -> tuple[dict, dict]:
    index = tiny_index()
    if spec.format == "peft":
        components: dict[str, set[str]] = {}
        for info in factors:
            suffixes = PEFT_UNET if info.component == "unet" else PEFT_TE
            components.setdefault(info.component, set()).update(t for t in suffixes if info.path.endswith("." + t))
        return writers.peft_tensors(factors), writers.peft_metadata(RANK, spec.alpha, components)
    extra = {"ss_training_comment": "LoRA Studio demo, trained by scripts/train_demo_loras.py"}
    if spec.trigger:
        extra["modelspec.trigger_phrase"] = spec.trigger
    meta = writers.kohya_metadata(name, rank=RANK, alpha=spec.alpha, tag_frequency=tags,
                                  conv=spec.format == "locon", cover_png=cover, extra=extra)
    return writers.kohya_tensors(factors, index, spec.alpha), meta


# ---- measuring, through the app's own engine ------------------------------------------------

def session(model: Path, lora_dir: Path):
    from studio.session import Session
    from studio.settings import Precision, Settings

    spec = "" if model.resolve() == TINY_MODEL_DIR.resolve() else str(model)
    s = Session(Settings(model=spec, device="cpu", precision=Precision.FP32, lora_dirs=(str(lora_dir),)))
    s.load_model()
    return s


def generate(s, prompt: str, seed: int, loras: tuple[tuple[str, float], ...] = ()):
    from studio.request import GenerationRequest

    request = GenerationRequest(prompt=prompt, seed=seed, loras=loras, width=dt.SIZE, height=dt.SIZE)
    result = s.generate(request, out_path=_scratch_png())
    return result.images[0]


def _scratch_png() -> Path:
    """One file overwritten by every measuring generation (the session always saves a PNG)."""
    import tempfile

    return Path(tempfile.gettempdir()) / "train-demo-loras-scratch.png"


def measure(s, names: list[str], prompts: int = len(MEASURE_PROMPTS)) -> dict:
    """Per LoRA and weight: mean warmth (R-B) and texture shift against no LoRA, over MEASURE_PROMPTS."""
    report: dict = {}
    for name in names:
        spec = SPECS[name]
        variants = [("", "")] + ([("trigger", f", {spec.trigger}")] if spec.trigger else [])
        for label, suffix in variants:
            rows = {}
            for seed, scene in enumerate(MEASURE_PROMPTS[:prompts]):
                prompt = scene.prompt() + suffix
                base = generate(s, prompt, seed)
                for weight in MEASURE_WEIGHTS:
                    image = generate(s, prompt, seed, ((name, weight),))
                    row = rows.setdefault(weight, {"warmth": [], "texture": [], "identical": []})
                    row["warmth"].append(warmth(image) - warmth(base))
                    row["texture"].append(texture(image) - texture(base))
                    row["identical"].append(bool(np.array_equal(np.asarray(image), np.asarray(base))))
            key = name + (f" +{label}" if label else "")
            report[key] = {str(w): {"warmth": round(float(np.mean(r["warmth"])), 2),
                                    "texture": round(float(np.mean(r["texture"])), 2),
                                    "identical_to_no_lora": all(r["identical"])} for w, r in rows.items()}
            log.info("%s: %s", key, json.dumps(report[key]))
    return report


def cover(s, name: str, spec: Spec) -> bytes:
    """The LoRA's own picture at weight 1, 64 px."""
    from PIL import Image

    prompt = MEASURE_PROMPTS[0].prompt() + (f", {spec.trigger}" if spec.trigger else "")
    image = generate(s, prompt, 0, ((name, 1.0),)).resize((64, 64), Image.Resampling.BOX)
    return writers.png_bytes(torch.from_numpy(np.asarray(image).copy()))


def check(model: Path, paths: list[Path]) -> None:
    """Our reader's deltas against diffusers' own loader: fuse each file and compare the weights."""
    from studio.lora.reader import read_lora

    pipe = load_pipe(model)
    for path in paths:
        lora = read_lora(path, tiny_index())
        pristine = {(p.component, p.module): getattr(pipe, p.component).get_submodule(p.module).weight.detach().clone()
                    for p in lora.patches}
        pipe.load_lora_weights(str(path), adapter_name="check")
        pipe.fuse_lora(lora_scale=1.0)
        worst = 0.0
        for patch in lora.patches:
            module = getattr(pipe, patch.component).get_submodule(patch.module)
            fused = (module.base_layer if hasattr(module, "base_layer") else module).weight.detach()
            base = pristine[(patch.component, patch.module)]
            ours = patch.delta(base)
            worst = max(worst, float((fused - base - ours).abs().max() / ours.abs().max().clamp_min(1e-12)))
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
        for (component, module_path), weight in pristine.items():  # unfuse subtracts; restore exactly
            getattr(pipe, component).get_submodule(module_path).weight.data.copy_(weight)
        log.info("%s: %s, %d layers; diffusers fuse vs our delta: max error %.1e of the largest change",
                 path.name, lora.format, len(lora.patches), worst)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=dt.DEFAULT_WORK / "loras")
    parser.add_argument("--model", type=Path, default=TINY_MODEL_DIR)
    parser.add_argument("--out", type=Path, default=DEMO_LORA_DIR)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--only", action="append", choices=list(SPECS))
    parser.add_argument("--measure", action="store_true", help="only measure the files in --out")
    parser.add_argument("--prompts", type=int, default=len(MEASURE_PROMPTS), help="how many prompts to measure on")
    parser.add_argument("--report", type=Path, help="write the measurements as JSON here")
    parser.add_argument("--check", action="store_true", help="cross-check the files with diffusers' loader")
    args = parser.parse_args()
    dt.setup(args.threads, args.work / "train_demo_loras.log")
    names = args.only or list(SPECS)
    began, cpu = time.perf_counter(), time.process_time()
    if not args.measure:
        pipe = load_pipe(args.model)
        trained = {name: train_one(pipe, name, SPECS[name], args.work, args.steps) for name in names}
        del pipe
        log.info("trained %s in %.1f min", ", ".join(names), (time.perf_counter() - began) / 60)
        for name, (factors, tags) in trained.items():  # first without covers, so the engine can load them
            writers.write_lora(args.out / f"{name}.safetensors", *lora_file(name, SPECS[name], factors, tags, None))
        s = session(args.model, args.out)
        covers = {n: cover(s, n, SPECS[n]) if SPECS[n].format != "peft" else None for n in names}
        s.close()
        for name, (factors, tags) in trained.items():
            path = writers.write_lora(args.out / f"{name}.safetensors",
                                      *lora_file(name, SPECS[name], factors, tags, covers[name]))
            log.info("wrote %s (%.0f KiB)", path, path.stat().st_size / 1024)
    s = session(args.model, args.out)
    report = measure(s, names, args.prompts)
    s.close()
    if args.report:
        args.report.write_text(json.dumps(report, indent=2) + "\n")
    if args.check:
        check(args.model, [args.out / f"{name}.safetensors" for name in names])
    log.info("done in %.1f min wall, %.1f min CPU (this run)", (time.perf_counter() - began) / 60,
             (time.process_time() - cpu) / 60)


if __name__ == "__main__":
    main()
