"""One generation on the warm pipeline: text encode, denoise, VAE decode, save, report.

The session holds the pipeline's lock and hands in what this needs; nothing here outlives
the call. Each phase goes through `WarmPipeline.phase`, which places its components and
patches its LoRAs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from studio import __version__
from studio.errors import Cancelled
from studio.infotext import format_infotext, save_png
from studio.jobs import CancelToken, StepCallback, StepEvent
from studio.lora.engine import AppliedStack, LoraEngine
from studio.lora.stack import StackItem
from studio.models.memory_report import MemoryWatch
from studio.models.vae_decode import decode_latents, plan_decode
from studio.outputs import OutputFolder
from studio.phases import Phase
from studio.preview import CleanEstimate, PreviewMeter
from studio.report import PhaseTimer, Report
from studio.request import GenerationRequest
from studio.samplers import make_scheduler
from studio.warm_pipeline import WarmPipeline


@dataclass(frozen=True)
class Job:
    """A validated request (LoRA tags moved out of the prompt) and its resolved LoRA stack."""

    request: GenerationRequest
    stack: tuple[StackItem, ...]


@dataclass(frozen=True)
class DecodeMemory:
    """What the VAE decode may reserve on the device: the setting (0 = estimate) and the budgets' reserve."""

    working_memory_mb: int = 0
    baseline: int = 0


@dataclass
class GenerationResult:
    images: list[Image.Image]
    paths: list[Path]
    report: Report
    infotext: str = ""
    seeds: list[int] = field(default_factory=list)


def generate(warm: WarmPipeline, loras: LoraEngine, job: Job, out: Path | OutputFolder, *, timer: PhaseTimer,
             started: float, token: CancelToken, on_step: StepCallback | None = None,
             decode_memory: DecodeMemory = DecodeMemory(), preview: bool = False) -> GenerationResult:
    """Run `job` to a saved PNG and its report: at the path `out`, or under the next free number of the
    outputs folder (created exclusively when the image is saved). Raises Cancelled, OutOfMemory, LoraError.

    `timer` announces each phase as it starts (its `on_enter`); with `preview`, every few steps'
    StepEvent carries a small picture of the latents (warm.preview, fitted when the model loaded).
    """
    request = job.request  # its seed is concrete: the caller chose the file name from it
    width, height = request.width or warm.native_size, request.height or warm.native_size
    report = Report(request=request.to_dict() | {"width": width, "height": height}, model=warm.info.to_dict(),
                    device=str(warm.runtime.device), dtype=warm.runtime.dtype_name, dtype_reason=warm.runtime.reason)
    meter = PreviewMeter(preview and warm.preview is not None)
    with MemoryWatch(warm.placement) as watch, torch.inference_mode():
        try:
            with loras.pinned(job.stack, timer, steps=request.steps) as applied:
                report.lora = applied.report
                image = render(warm, applied, request, width, height, timer=timer, report=report, token=token,
                               on_step=on_step, decode_memory=decode_memory, meter=meter)
            with timer.phase("save"):
                hashes = {row["name"]: row["hash"] for row in report.lora["stack"]}
                infotext = format_infotext(request, width=width, height=height, model_name=warm.info.source.name,
                                           model_hash=warm.info.short_hash, lora_hashes=hashes,
                                           version=f"lora-studio {__version__}", vae=warm.info.vae_name)
                if isinstance(out, OutputFolder):
                    out_path = out.save(request.seed, lambda fh: save_png(image, fh, infotext))
                else:
                    out_path = out
                    save_png(image, out_path, infotext)
        except Cancelled:
            report.status = "cancelled"
            raise
        finally:
            timer.phases["total"] = time.perf_counter() - started  # includes a cold model load
            report.phases = {k: round(v, 5) for k, v in timer.phases.items()}
            steps = report.step_seconds
            report.preview = meter.report(len(steps), sum(steps) / len(steps) if steps else 0.0, warm.preview)
    report.memory = watch.report(lora_cache_bytes=loras.cache.bytes_used)
    report.notes.extend(warm.notes)
    report.outputs = [str(out_path)]
    return GenerationResult(images=[image], paths=[out_path], report=report, infotext=infotext, seeds=[request.seed])


def render(warm: WarmPipeline, loras: AppliedStack, request: GenerationRequest, width: int, height: int, *,
           timer: PhaseTimer, report: Report, token: CancelToken, on_step: StepCallback | None,
           decode_memory: DecodeMemory, meter: PreviewMeter) -> Image.Image:
    """Encode, denoise, decode: each phase with its components on the device and its LoRAs patched."""
    pipe, device = warm.pipe, warm.runtime.device
    with warm.phase(Phase.TEXT_ENCODE, loras), timer.phase("text_encode"):
        embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
            prompt=request.prompt, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=request.cfg > 1.0, negative_prompt=request.negative or None)
    token.raise_if_cancelled()
    pipe.scheduler = make_scheduler(request.sampler, warm.scheduler_config)
    estimate = CleanEstimate(pipe.scheduler) if meter.enabled else None
    last = [time.perf_counter()]

    def step_end(_pipe, index: int, _timestep, kwargs: dict) -> dict:
        now = time.perf_counter()
        report.step_seconds.append(round(now - last[0], 5))
        picture = None
        if meter.due(index + 1, request.steps):
            clean = estimate.latest  # a preview is due only when the meter is on, and then there is an estimate
            picture = warm.preview.image(clean if clean is not None else kwargs["latents"])
            meter.images += 1
            meter.denoised += clean is not None
            meter.seconds += time.perf_counter() - now
        if on_step is not None:
            on_step(StepEvent(index + 1, request.steps, report.step_seconds[-1], picture))
        token.raise_if_cancelled()  # lands within one step of the click
        if index + 1 < request.steps:
            loras.step(Phase.DENOISE, index + 1)  # a LoRA's start=/stop= switches here, before that step
        # The next step's time leaves out the preview, the caller's work and a step-range switch
        # (reported on its own, in the report's step_switches).
        last[0] = time.perf_counter()
        return kwargs

    with warm.phase(Phase.DENOISE, loras):
        with timer.phase("denoise"):
            last[0] = time.perf_counter()
            latents = pipe(
                prompt_embeds=embeds, negative_prompt_embeds=neg_embeds, pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=neg_pooled, num_inference_steps=request.steps,
                guidance_scale=request.cfg, width=width, height=height,
                generator=torch.Generator("cpu").manual_seed(request.seed), output_type="latent",
                callback_on_step_end=step_end).images
    token.raise_if_cancelled()
    with plan_decode(warm.cache, device, width, height, pipe.vae, decode_memory.working_memory_mb,
                     decode_memory.baseline) as plan, warm.phase(Phase.DECODE, loras):
        if plan is not None:
            report.notes.append(f"VAE decode tiled ({plan}): the working memory did not fit")
        with timer.phase("vae_decode"):
            return decode_latents(pipe, latents, plan)
