"""The session controller: one warm SDXL pipeline, one generation at a time.

Gradio's queue is not enough to serialise GPU work: a cancelled blocking handler
keeps running and frees its queue slot (measured, research/gradio.md §1.4), so the
pipeline is guarded by a real lock and stopped cooperatively from the step callback.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Callable, Iterator

import torch
from PIL import Image

from studio import __version__
from studio.errors import Cancelled, SettingsError
from studio.lora.engine import COMPONENT_ATTRS, LoraEngine, patcher_settings
from studio.lora.stack import StackItem, resolve_stack, search_dirs
from studio.lora.sidecar import needs_sidecar
from studio.memory import release_freed_memory, rss_bytes
from studio.models.budget import measure_budgets, oom_guard
from studio.models.cache import ModelCache
from studio.models.fp8 import enable_fp8_storage, fp8_supported
from studio.models.memory_report import MemoryWatch
from studio.models.placement import Placement, apply_memory_mode, must_run_lora_as_sidecar
from studio.models.vae_decode import decode as vae_decode, plan_decode
from studio.metadata import format_infotext, save_png
from studio.models.architectures import SDXL_DEFAULT_SIZE, TINY_DEFAULT_SIZE
from studio.models.hashing import model_sha256
from studio.models.loader import ModelSource, load_pipeline, resolve_source
from studio.paths import AppDirs, app_dirs
from studio.report import PhaseTimer, Report
from studio.request import GenerationRequest
from studio.runtime import Runtime, resolve_runtime
from studio.samplers import make_scheduler
from studio.settings import SETTING_INFO, Applies, Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepEvent:
    step: int  # 1-based
    total: int
    seconds: float  # this step's wall time


class CancelToken:
    """Set from any thread; the job stops at its next step boundary."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled("stopped by the user")


@dataclass(frozen=True)
class ModelInfo:
    source: ModelSource
    sha256: str
    load_seconds: float
    load_parts: dict[str, float] = field(default_factory=dict)  # seconds: imports, read_build, hash, ...

    @property
    def short_hash(self) -> str:
        return self.sha256[:10]

    def to_dict(self) -> dict:
        return {"name": self.source.name, "kind": self.source.kind.value, "location": self.source.location,
                "hash": self.short_hash, "load_seconds": round(self.load_seconds, 4), "demo": self.source.is_demo,
                "load_parts": {name: round(seconds, 4) for name, seconds in self.load_parts.items()}}


@dataclass
class GenerationResult:
    images: list[Image.Image]
    paths: list[Path]
    report: Report
    infotext: str = ""
    seeds: list[int] = field(default_factory=list)


StepCallback = Callable[[StepEvent], None]


class Session:
    """Owns the warm pipeline. Thread-safe: every public method may be called from any thread."""

    def __init__(self, settings: Settings | None = None, dirs: AppDirs | None = None) -> None:
        self.settings = settings or Settings()
        self.dirs = dirs or app_dirs()
        self.runtime: Runtime = resolve_runtime(self.settings.device, self.settings.precision, self.dirs.cache)
        self._lock = threading.Lock()  # held for the whole of a generation or a model switch
        self._state_lock = threading.Lock()  # guards the counters below
        self._waiting = 0
        self._current: CancelToken | None = None
        self._progress: tuple[int, int] | None = None  # (step, total) of the running job
        self._pipe = None
        self._cache: ModelCache | None = None
        self._placement: Placement | None = None
        self._load_notes: list[str] = []
        self.model: ModelInfo | None = None
        self.history: deque[Report] = deque(maxlen=200)  # this session's reports, oldest first
        self.loras = LoraEngine(self.settings.lora_cache_mb,
                                patcher_settings(self.settings.lora_mode, self.settings.unpatch_lora_by_vram_offload))

    def apply_settings(self, settings: Settings) -> dict[str, Applies]:
        """Take new settings; returns the changed fields and when each takes effect.

        "Now" fields apply at once, without waiting for a running generation (LoRA settings
        take effect at the next apply). Model-reload fields wait for the pipeline lock and
        drop the pipeline; the next generation loads it again. Restart-only fields (port,
        outputs folder, public link) keep their running values: the caller saves the file.
        """
        settings = settings.validated()
        changed = {name: SETTING_INFO[name].applies for name in SETTING_INFO
                   if getattr(settings, name) != getattr(self.settings, name)}
        runtime = resolve_runtime(settings.device, settings.precision, self.dirs.cache)  # raises first
        keep = {name: getattr(self.settings, name) for name, applies in changed.items() if applies is Applies.RESTART}
        live = settings.replace(**keep) if keep else settings
        lora_settings = patcher_settings(live.lora_mode, live.unpatch_lora_by_vram_offload)
        if not any(applies is Applies.MODEL_RELOAD for applies in changed.values()):
            self.settings = live
            self.loras.configure(live.lora_cache_mb, lora_settings)
            return changed
        with self._lock:
            self.settings = live
            self.loras.configure(live.lora_cache_mb, lora_settings)
            self.runtime = runtime
            self._unload_locked()  # reloaded by the next generation
        return changed

    # ---- model ---------------------------------------------------------------------------

    def load_model(self, spec: str | None = None) -> ModelInfo:
        """Replace the warm pipeline (waits for a running generation to end)."""
        source = resolve_source(spec if spec is not None else self.settings.model)
        with self._lock:
            return self._load_locked(source)

    def _load_locked(self, source: ModelSource) -> ModelInfo:
        self._unload_locked()  # before loading the new one: peak RAM is one model
        start, parts = time.perf_counter(), PhaseTimer()  # parts: imports, read_build, hash, placement, lora_bind
        pipe = load_pipeline(source, self.runtime.dtype, self.runtime.device, parts)
        with parts.phase("hash"):
            sha = model_sha256(source.path, self.dirs.cache / "model-hashes.json") if source.kind.value != "hub" else ""
        device, settings = self.runtime.device, self.settings
        self._load_notes = []
        fp8 = False
        if settings.fp8_storage:
            fp8, why = fp8_supported(device)
            if fp8:
                enable_fp8_storage(pipe.unet, self.runtime.dtype)  # before caching: the pristine copy is fp8 too
            else:
                self._load_notes.append(f"fp8 storage is off: {why}")
        with parts.phase("placement"):  # the pristine RAM copies are made here
            self._cache = ModelCache(device, ram_budget=self._budgets().ram or None,
                                     vram_budget=self._budgets().vram or None)
            self._placement = apply_memory_mode(pipe, settings.memory_mode, device, self._budgets(),
                                                settings.stream_lookahead, cache=self._cache,
                                                key_prefix=f"{sha[:12]}:")
        not_mergeable = "streamed" if self._placement.mode == "stream" else "stored in fp8" if fp8 else ""
        with parts.phase("lora_bind"):
            self.loras.bind({attr: getattr(pipe, attr) for attr in COMPONENT_ATTRS},
                            pristine_source=self._placement.pristine,
                            sidecar_predicate=lambda m: needs_sidecar(m) or must_run_lora_as_sidecar(m),
                            unet_must_not_merge=not_mergeable)
        self._pipe = pipe
        self._default_scheduler_config = dict(pipe.scheduler.config)
        self.model = ModelInfo(source, sha, time.perf_counter() - start, parts.phases)
        log.info("loaded %s (%s) in %.2fs on %s/%s, memory mode %s", source.name, source.kind.value,
                 self.model.load_seconds, device, self.runtime.dtype_name, self._placement.mode)
        return self.model

    def _budgets(self):
        s = self.settings
        held = self._cache.used(self.runtime.device) if self._cache is not None else 0
        return measure_budgets(self.runtime.device, ram_limit_mb=s.ram_limit_mb, vram_limit_mb=s.vram_limit_mb,
                               working_memory_mb=s.working_memory_mb, held_vram=held)

    def _unload_locked(self) -> None:
        """Restore LoRA'd weights, undo the placement, drop the pipeline and its cache."""
        loaded = self._pipe is not None or self._placement is not None  # else nothing to free: no gc pass
        try:
            self.loras.unbind()  # restores the weights and forgets parses bound to its layer names
        finally:
            if self._placement is not None:
                self._placement.close()
            self._placement = None
            self._cache = None
            self._pipe = None
            self.model = None
            if loaded:
                release_freed_memory()

    def _ensure_model(self) -> None:
        if self._pipe is None:
            self._load_locked(resolve_source(self.settings.model))

    @property
    def native_size(self) -> int:
        if self.model is not None and self.model.source.is_demo:
            return TINY_DEFAULT_SIZE
        return SDXL_DEFAULT_SIZE

    # ---- jobs ----------------------------------------------------------------------------

    @contextmanager
    def _job_slot(self, token: CancelToken) -> Iterator[None]:
        """Wait for the pipeline (counted in `waiting`), then hold it for the whole job."""
        with self._state_lock:
            self._waiting += 1
        acquired = False
        try:
            self._lock.acquire()
            acquired = True
        finally:
            with self._state_lock:
                self._waiting -= 1
                if acquired:
                    self._current = token
        try:
            yield
        finally:
            with self._state_lock:
                self._current = None
                self._progress = None
            self._lock.release()

    def status(self) -> dict:
        with self._state_lock:
            status = {"busy": self._current is not None, "waiting": self._waiting, "progress": self._progress,
                      "model": self.model.to_dict() if self.model else None, "rss": rss_bytes()}
        if self.runtime.device.type == "cuda":
            status["cuda_allocated"] = torch.cuda.memory_allocated(self.runtime.device)
            status["cuda_reserved"] = torch.cuda.memory_reserved(self.runtime.device)
        return status

    def cancel_current(self) -> bool:
        """Stop the running job at its next step; returns whether one was running."""
        with self._state_lock:
            token = self._current
        if token is None:
            return False
        token.cancel()
        return True

    def generate(self, request: GenerationRequest, *, on_step: StepCallback | None = None,
                 cancel: CancelToken | None = None, out_path: Path | None = None) -> GenerationResult:
        """Run one request to a saved PNG and a report. Raises Cancelled, OutOfMemory, InputError."""
        request, stack = self.resolve(request)
        token = cancel or CancelToken()
        with self._job_slot(token):
            token.raise_if_cancelled()  # stopped while waiting in line
            # Outside every phase and lock, so they unwind (weights back at rest) before it frees memory.
            with oom_guard(self._cache, "the generation"):
                return self._generate_locked(request, stack, on_step, token, out_path)

    def resolve(self, request: GenerationRequest) -> tuple[GenerationRequest, list[StackItem]]:
        """Validate and move `<lora:...>` prompt tags into the stack; unknown LoRA names fail here."""
        request = request.validated()
        prompt, stack = resolve_stack(request.prompt, request.loras, search_dirs(self.settings.lora_dirs))
        from dataclasses import replace

        request = replace(request, prompt=prompt, loras=tuple((item.name, item.weight) for item in stack))
        return request.validated(), stack

    def _generate_locked(self, request: GenerationRequest, stack: list[StackItem], on_step: StepCallback | None,
                         token: CancelToken, out_path: Path | None) -> GenerationResult:
        timer = PhaseTimer()
        started = time.perf_counter()
        if self._pipe is None:
            with timer.phase("model_load"):
                self._ensure_model()
        pipe, device = self._pipe, self.runtime.device
        assert self.model is not None
        request = request.with_seed()
        width = request.width or self.native_size
        height = request.height or self.native_size
        report = Report(request=request.to_dict() | {"width": width, "height": height}, model=self.model.to_dict(),
                        device=str(device), dtype=self.runtime.dtype_name, dtype_reason=self.runtime.reason)
        placement = self._placement
        with MemoryWatch(placement) as watch, torch.inference_mode():
            try:
                with self.loras.pinned(stack, timer) as loras:
                    report.lora = loras.report
                    image = self._run(pipe, placement, loras, request, width, height, timer, report, on_step, token)
                with timer.phase("save"):
                    path = out_path or self._next_output_path(request.seed)
                    hashes = {row["name"]: row["hash"] for row in report.lora["stack"]}
                    infotext = format_infotext(request, width=width, height=height, model_name=self.model.source.name,
                                               model_hash=self.model.short_hash, lora_hashes=hashes,
                                               version=f"lora-studio {__version__}")
                    save_png(image, Path(path), infotext)
            except Cancelled:
                report.status = "cancelled"
                raise
            finally:
                timer.phases["total"] = time.perf_counter() - started  # includes a cold model load
                report.phases = {k: round(v, 5) for k, v in timer.phases.items()}
        report.memory = watch.report(lora_cache_bytes=self.loras.cache.bytes_used)
        report.notes.extend(self._load_notes)
        report.outputs = [str(path)]
        self.history.append(report)
        return GenerationResult(images=[image], paths=[Path(path)], report=report, infotext=infotext,
                                seeds=[request.seed])

    def _run(self, pipe, placement: Placement, loras, request: GenerationRequest, width: int, height: int,
             timer: PhaseTimer, report: Report, on_step: StepCallback | None, token: CancelToken) -> Image.Image:
        """Encode, denoise, decode; each phase holds its components on the device and patches its LoRAs."""
        device = self.runtime.device
        guided = request.cfg > 1.0
        with placement.phase("text_encode"):
            loras.apply("text_encode")
            with timer.phase("text_encode"):
                embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
                    prompt=request.prompt, device=device, num_images_per_prompt=1,
                    do_classifier_free_guidance=guided, negative_prompt=request.negative or None)
        token.raise_if_cancelled()
        pipe.scheduler = make_scheduler(request.sampler, self._default_scheduler_config)
        last = [time.perf_counter()]

        def step_end(_pipe, index: int, _timestep, kwargs: dict) -> dict:
            now = time.perf_counter()
            report.step_seconds.append(round(now - last[0], 5))
            last[0] = now
            self._progress = (index + 1, request.steps)
            if on_step is not None:
                on_step(StepEvent(index + 1, request.steps, report.step_seconds[-1]))
            token.raise_if_cancelled()  # lands within one step of the click
            return kwargs

        with placement.phase("denoise"):
            loras.apply("denoise")
            with timer.phase("denoise"):
                last[0] = time.perf_counter()
                latents = pipe(
                    prompt_embeds=embeds, negative_prompt_embeds=neg_embeds, pooled_prompt_embeds=pooled,
                    negative_pooled_prompt_embeds=neg_pooled, num_inference_steps=request.steps,
                    guidance_scale=request.cfg, width=width, height=height,
                    generator=torch.Generator("cpu").manual_seed(request.seed), output_type="latent",
                    callback_on_step_end=step_end).images
        token.raise_if_cancelled()
        with plan_decode(self._cache, device, width, height, pipe.vae, self.settings.working_memory_mb,
                         self._placement_budget_working()) as plan, placement.phase("decode"):
            if plan is not None:
                report.notes.append(f"VAE decode tiled ({plan}): the working memory did not fit")
            with timer.phase("vae_decode"):
                return decode_latents(pipe, latents, plan)

    def _placement_budget_working(self) -> int:
        return self._budgets().working if self.runtime.device.type == "cuda" else 0

    def bake(self, rows: list[tuple[str, float]], out_dir: Path, single_file: Path | None = None):
        """Write the model with a LoRA stack merged in (diffusers folder, optionally one file too).

        Runs between generations with every component on the device; the session's own LoRAs
        are taken off first, and the live weights are bit-identical to pristine afterwards.
        """
        from studio.bake import bake

        _, stack = resolve_stack("", rows, search_dirs(self.settings.lora_dirs))
        if not stack:
            raise SettingsError("bake needs at least one --lora NAME_OR_PATH:WEIGHT")
        with self._lock:
            self._ensure_model()
            placement = self._placement
            with self.loras.pinned(stack, PhaseTimer()) as applied, placement.phase("text_encode"), \
                    placement.phase("denoise"), placement.phase("decode"), torch.inference_mode():
                self.loras.clear()
                return bake(self._pipe, [(pin.lora, item.weight) for item, pin in applied.pinned], out_dir,
                            single_file)

    def _next_output_path(self, seed: int) -> Path:
        root = Path(self.settings.outputs_dir).expanduser() if self.settings.outputs_dir else self.dirs.default_outputs
        folder = root / date.today().isoformat()
        folder.mkdir(parents=True, exist_ok=True)
        numbers = [int(p.name[:5]) for p in folder.glob("*.png") if p.name[:5].isdigit()]
        return folder / f"{max(numbers, default=0) + 1:05d}-{seed}.png"

    def close(self) -> None:
        with self._lock:
            self._unload_locked()


def decode_latents(pipe, latents: torch.Tensor, plan=None) -> Image.Image:
    """VAE decode as the SDXL pipeline does it (fp16 VAEs with force_upcast run in fp32); tiled by `plan`."""
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and vae.config.force_upcast
    if upcast:
        vae.to(torch.float32)
    try:
        latents = latents.to(vae.dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean_t = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
            std_t = torch.tensor(std).view(1, -1, 1, 1).to(latents)
            latents = latents * std_t / vae.config.scaling_factor + mean_t
        else:
            latents = latents / vae.config.scaling_factor
        image = vae_decode(vae, latents, plan)
    finally:
        if upcast:
            vae.to(torch.float16)
    return pipe.image_processor.postprocess(image, output_type="pil")[0]
