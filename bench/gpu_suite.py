"""GPU benchmark of the memory engine: memory modes, stream lookahead, fp8 storage, app overhead.

    python bench/gpu_suite.py                  # CUDA: SDXL-shaped random fp16 weights, 1024x1024, 20 steps
    python bench/gpu_suite.py --dry-run        # the same flow on the embedded tiny model, on the CPU
    python bench/gpu_suite.py --out results.json --steps 20 --size 1024

Nothing is downloaded: the SDXL pipeline is built on the meta device from assets/sdxl-base's
configs, then `to_empty` on the GPU and filled with random weights (time and memory depend on
shapes, not values; DESIGN.md 5). Per configuration: one warm-up generation (cuDNN autotune,
the streamer's tracing forward), then one timed generation; seconds per step come from CUDA
events recorded in the step callback, so timing adds no host sync to the denoise loop.
Prints a markdown table and writes JSON. Without CUDA (and without --dry-run) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

MB = 1 << 20
PROMPT, NEGATIVE = "a lighthouse on a cliff at dusk, oil painting", "blurry"


def build_random_sdxl(device: torch.device, dtype: torch.dtype, unet_only: bool = False):
    """SDXL-shaped pipeline (or just its UNet) with random weights, built on meta and filled on `device`."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from studio.paths import SDXL_BASE_CONFIG_DIR as cfg

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cfg / "unet"))
        if not unet_only:
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(cfg / "vae"))
            te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(cfg / "text_encoder"))
            te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(cfg / "text_encoder_2"))
    models = [unet] if unet_only else [unet, vae, te1, te2]
    for model in models:
        model.to_empty(device=device)
        _random_init(model)
        model.to(dtype).eval()
    if unet_only:
        return unet
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, unet=unet,
        tokenizer=CLIPTokenizer.from_pretrained(cfg / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(cfg / "tokenizer_2"),
        scheduler=EulerDiscreteScheduler.from_pretrained(cfg / "scheduler"))


@torch.no_grad()
def _random_init(model: torch.nn.Module) -> None:
    """Weights ~ N(0, 1/fan_in) so fp16 activations stay finite; norms 1, biases 0, CLIP positions arange."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            fan_in = p[0].numel()
            p.normal_(0.0, fan_in ** -0.5 if "embedding" not in name else 0.02, generator=gen)
        elif "norm" in name and name.endswith("weight"):
            p.fill_(1.0)
        else:
            p.zero_()
    for name, b in model.named_buffers():
        if name.endswith("position_ids"):
            b.copy_(torch.arange(b.shape[-1], device=b.device).expand_as(b))


def build_tiny(dtype: torch.dtype):
    from studio.models.loader import load_pipeline, resolve_source

    return load_pipeline(resolve_source(""), dtype)


class StepClock:
    """Per-step seconds from events recorded in the step callback (CUDA) or wall time (CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def generate(pipe, placement, size: int, steps: int) -> tuple[list[float], float]:
    """The session's phases through `placement`; returns (seconds per step, total seconds)."""
    from studio.models.vae_decode import decode
    from studio.phases import Phase

    clock, device = StepClock(placement.device), placement.device
    start = time.perf_counter()
    with torch.inference_mode():
        with placement.phase(Phase.TEXT_ENCODE):
            e, ne, p, np_ = pipe.encode_prompt(prompt=PROMPT, device=device, num_images_per_prompt=1,
                                               do_classifier_free_guidance=True, negative_prompt=NEGATIVE)
        with placement.phase(Phase.DENOISE):
            clock.mark()
            latents = pipe(prompt_embeds=e, negative_prompt_embeds=ne, pooled_prompt_embeds=p,
                           negative_pooled_prompt_embeds=np_, num_inference_steps=steps, guidance_scale=5.0,
                           width=size, height=size, generator=torch.Generator("cpu").manual_seed(1),
                           output_type="latent",
                           callback_on_step_end=lambda _p, _i, _t, kw: clock.mark() or kw).images
        with placement.phase(Phase.DECODE):
            vae = pipe.vae
            image = decode(vae, latents.to(vae.dtype) / vae.config.scaling_factor)
            pipe.image_processor.postprocess(image, output_type="pil")
    seconds = clock.seconds()
    return seconds, time.perf_counter() - start


def configurations(dry: bool) -> list[dict]:
    fp8 = [{"name": "fp8 full", "mode": "full", "fp8": True}, {"name": "fp8 stream N=4", "mode": "stream",
                                                               "lookahead": 4, "fp8": True}]
    rows = [{"name": "full", "mode": "full"}, {"name": "offload", "mode": "offload", "tight": True},
            {"name": "auto", "mode": "auto"}]
    rows += [{"name": f"stream N={n}", "mode": "stream", "lookahead": n} for n in (1, 2, 4, 8)]
    if not dry:
        rows += [{"name": "stream diffusers leaf", "mode": "stream", "impl": "diffusers_leaf"},
                 {"name": "stream diffusers block", "mode": "stream", "impl": "diffusers_block"}]
    return rows + fp8


def run_modes(pipe, device, dtype, args, dry: bool) -> list[dict]:
    """Every configuration on one cache; fp8 runs swap in a second, fp8-stored UNet."""
    from studio.models.budget import measure_budgets
    from studio.models.cache import ModelCache
    from studio.models.fp8 import enable_fp8_storage, weight_bytes
    from studio.models.memory_report import MemoryWatch
    from studio.models.placement import apply_memory_mode

    cache, rows, fp16_unet, fp8_unet = ModelCache(device), [], pipe.unet, None
    unit_sizes = {"min_unit_bytes": 16 << 10, "max_unit_bytes": 256 << 10} if dry else {}
    wanted = {name.strip() for name in args.configs.split(",") if name.strip()}
    specs = [c for c in configurations(dry) if not wanted or c["name"] in wanted]
    if wanted - {c["name"] for c in specs}:
        raise SystemExit(f"unknown configuration(s): {sorted(wanted - {c['name'] for c in specs})}; known: "
                         f"{[c['name'] for c in configurations(dry)]}")
    for spec in specs:
        if spec.get("fp8") and fp8_unet is None:
            fp8_unet = build_tiny(dtype).unet if dry else build_random_sdxl(device, dtype, unet_only=True)
            enable_fp8_storage(fp8_unet, dtype)
        pipe.unet = fp8_unet if spec.get("fp8") else fp16_unet
        budgets = measure_budgets(device, held_vram=cache.used(device) if device.type == "cuda" else 0)
        if spec.get("tight") and device.type == "cuda":  # a card where only the UNet fits: offload must evict
            from dataclasses import replace
            budgets = replace(budgets, vram=weight_bytes(pipe.unet) + 64 * MB)
        placement = apply_memory_mode(pipe, spec["mode"], device, budgets, spec.get("lookahead", 2), cache=cache,
                                      stream_impl=spec.get("impl", "ring"), emulate_on_cpu=dry,
                                      keys={"unet": "unet-fp8" if spec.get("fp8") else "unet"}, **unit_sizes)
        try:
            generate(pipe, placement, args.size, 2)  # warm-up: autotune, stream trace
            with MemoryWatch(placement) as watch:
                seconds, total = generate(pipe, placement, args.size, args.steps)
            report = watch.report()
        finally:
            placement.close(to_rest=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append({"name": spec["name"], "mode": report["mode"], "requested": spec["mode"],
                     "lookahead": spec.get("lookahead"), "impl": spec.get("impl", "ring"),
                     "fp8": bool(spec.get("fp8")), "s_per_step": statistics.median(seconds), "total_s": total,
                     "peak_allocated": report.get("cuda_peak_allocated", 0),
                     "peak_reserved": report.get("cuda_peak_reserved", 0), "peak_rss": report.get("peak_rss", 0),
                     "unet_weight_bytes": weight_bytes(pipe.unet), "h2d_bytes": report["h2d_bytes"],
                     "pinned_bytes": report["pinned_bytes"], "stream": report.get("stream"),
                     "notes": report["notes"]})
        print(f"  {spec['name']:<24} {rows[-1]['s_per_step']:.4f} s/step", flush=True)
    pipe.unet = fp16_unet
    full = next((r for r in rows if r["name"] == "full"), None)
    for r in rows:
        r["step_ratio_to_full"] = r["s_per_step"] / full["s_per_step"] if full and full["s_per_step"] else None
        r["vram_ratio_to_full"] = r["peak_allocated"] / full["peak_allocated"] if full and full["peak_allocated"] \
            else None
    return rows


def app_overhead(pipe, device, dtype, args, dry: bool) -> dict:
    """Session.generate (the app: phases, report, PNG with metadata) against calling the pipeline."""
    import studio.session as session_mod
    import studio.warm_pipeline as warm_mod
    from studio.paths import AppDirs
    from studio.request import GenerationRequest
    from studio.settings import Settings

    for component in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        component.to(device)
    kwargs = dict(num_inference_steps=args.steps, guidance_scale=5.0, width=args.size, height=args.size)
    clock = StepClock(device)
    with torch.inference_mode():
        pipe(prompt=PROMPT, negative_prompt=NEGATIVE, **{**kwargs, "num_inference_steps": 2})  # warm-up
        start = time.perf_counter()
        clock.mark()
        pipe(prompt=PROMPT, negative_prompt=NEGATIVE, generator=torch.Generator("cpu").manual_seed(1),
             callback_on_step_end=lambda _p, _i, _t, kw: clock.mark() or kw, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        direct = time.perf_counter() - start
    direct_steps = clock.seconds()
    home = Path(tempfile.mkdtemp(prefix="gpu-suite-"))
    dirs = AppDirs(config=home / "config", data=home / "data", cache=home / "cache")
    for folder in (dirs.config, dirs.data, dirs.cache):
        folder.mkdir(parents=True)
    original = warm_mod.load_pipeline
    if not dry:
        warm_mod.load_pipeline = lambda *_args, **_kw: pipe  # the random SDXL stands in for a loaded model
    try:
        precision = "bf16" if dtype == torch.bfloat16 else "fp16" if dtype == torch.float16 else "fp32"
        session = session_mod.Session(Settings(device=device.type, precision=precision), dirs)
        session.load_model()
        request = GenerationRequest(prompt=PROMPT, negative=NEGATIVE, seed=1, steps=args.steps, cfg=5.0,
                                    width=args.size, height=args.size)
        session.generate(GenerationRequest(**{**request.to_dict(), "steps": 2}))  # warm-up
        start = time.perf_counter()
        result = session.generate(request)
        app = time.perf_counter() - start
        session.close()
    finally:
        warm_mod.load_pipeline = original
    app_step = statistics.median(result.report.step_seconds)
    return {"direct_total_s": direct, "app_total_s": app, "overhead_s": app - direct,
            "overhead_ratio": app / direct if direct else None, "direct_s_per_step": statistics.median(direct_steps),
            "app_s_per_step": app_step, "app_phases": result.report.phases}


def vae_calibration(pipe, device) -> list[dict]:
    """Peak VRAM of a VAE decode per pixel and element: the constant behind the working reserve (2200)."""
    vae = pipe.vae.to(device)
    rows = []
    for dtype in (torch.float16, torch.float32):
        vae.to(dtype)
        for size in (512, 1024):
            latents = torch.randn(1, 4, size // 8, size // 8, device=device, dtype=dtype)
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            with torch.inference_mode():
                vae.decode(latents)
            used = torch.cuda.max_memory_allocated(device) - base
            rows.append({"dtype": str(dtype).removeprefix("torch."), "size": size, "peak_bytes": used,
                         "bytes_per_pixel_element": used / (size * size * dtype.itemsize)})
    vae.to(pipe.unet.dtype)
    return rows


def markdown(result: dict) -> str:
    lines = [f"Device: {result['device']}; {result['config']['size']}x{result['config']['size']}, "
             f"{result['config']['steps']} steps, {result['config']['dtype']}", "",
             "| configuration | mode run | s/step | x full | peak VRAM alloc (MB) | x full | UNet weights (MB) "
             "| H2D (MB) | pinned (MB) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["modes"]:
        ratio = f"{r['step_ratio_to_full']:.2f}" if r["step_ratio_to_full"] else "-"
        vram = f"{r['vram_ratio_to_full']:.2f}" if r["vram_ratio_to_full"] else "-"
        lines.append(f"| {r['name']} | {r['mode']} | {r['s_per_step']:.4f} | {ratio} | {r['peak_allocated'] / MB:.0f} "
                     f"| {vram} | {r['unet_weight_bytes'] / MB:.0f} | {r['h2d_bytes'] / MB:.0f} "
                     f"| {r['pinned_bytes'] / MB:.0f} |")
    o = result.get("overhead")
    if o:
        lines += ["", f"App overhead: Session.generate {o['app_total_s']:.3f} s vs pipeline call "
                  f"{o['direct_total_s']:.3f} s (x{o['overhead_ratio']:.3f}); s/step {o['app_s_per_step']:.4f} vs "
                  f"{o['direct_s_per_step']:.4f}"]
    for v in result.get("vae_decode", []):
        lines.append(f"VAE decode {v['dtype']} {v['size']}px: {v['peak_bytes'] / MB:.0f} MB = "
                     f"{v['bytes_per_pixel_element']:.0f} bytes per pixel-element (estimate uses 2200)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU: exercise the code path")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--configs", default="", help="comma-separated configuration names (default: all)")
    args = parser.parse_args(argv)
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu_suite: no CUDA GPU here, nothing to measure. Run it on a CUDA machine, or use --dry-run to "
              "exercise the flow on the tiny model on the CPU.")
        return 0
    device = torch.device("cpu") if dry else torch.device("cuda", torch.cuda.current_device())
    dtype = torch.bfloat16 if dry else torch.float16
    args.steps = args.steps or (2 if dry else 20)
    args.size = args.size or (64 if dry else 1024)
    out = args.out or (Path(tempfile.gettempdir()) / "gpu_suite-dry-run.json" if dry
                       else ROOT / "bench" / "results" / "gpu_suite.json")
    print(f"gpu_suite: building {'the tiny model' if dry else 'a random SDXL (fp16)'} on {device}", flush=True)
    pipe = build_tiny(dtype) if dry else build_random_sdxl(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    import diffusers

    result = {"device": "cpu (dry run)" if dry else torch.cuda.get_device_name(device), "torch": torch.__version__,
              "diffusers": diffusers.__version__, "python": platform.python_version(),
              "config": {"steps": args.steps, "size": args.size, "dtype": str(dtype).removeprefix("torch."),
                         "dry_run": dry}}
    result["modes"] = run_modes(pipe, device, dtype, args, dry)
    if not args.skip_overhead:
        result["overhead"] = app_overhead(pipe, device, dtype, args, dry)
    if not dry:
        result["vae_decode"] = vae_calibration(pipe, device)
    print(markdown(result))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
