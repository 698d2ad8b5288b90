"""The session: one warm SDXL pipeline, its settings, and one job at a time on it.

The session owns lifetimes (the warm pipeline, the LoRA engine bound to it, the job slot)
and the settings; one generation itself is `studio.generation`'s, one phase step is
`WarmPipeline.phase`'s. Every public method may be called from any thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from studio.errors import SettingsError
from studio.generation import DecodeMemory, GenerationResult, Job, generate
from studio.history import ReportHistory
from studio.jobs import CancelToken, JobSlot, StepCallback, StepEvent
from studio.lora.block_weights import parse_presets
from studio.lora.engine import LoraEngine, patcher_settings
from studio.lora.stack import StackItem, resolve_stack, search_dirs
from studio.memory import cuda_now, release_freed_memory, rss_bytes
from studio.models.architectures import SDXL_DEFAULT_SIZE
from studio.models.budget import Budgets, measure_budgets, oom_guard
from studio.models.loader import resolve_source
from studio.outputs import OutputFolder, choose_outputs
from studio.paths import AppDirs, app_dirs
from studio.phases import Phase
from studio.report import PhaseCallback, PhaseTimer, Report
from studio.request import GenerationRequest
from studio.runtime import Runtime, resolve_runtime
from studio.settings import SETTING_INFO, Applies, Settings
from studio.warm_pipeline import LoadProgress, ModelInfo, WarmPipeline, load_warm_pipeline

log = logging.getLogger(__name__)
_BUDGET_FIELDS = frozenset({"ram_limit_mb", "vram_limit_mb", "working_memory_mb"})


class Session:
    """Owns the warm pipeline. Thread-safe: every public method may be called from any thread."""

    def __init__(self, settings: Settings | None = None, dirs: AppDirs | None = None) -> None:
        self.settings = settings or Settings()
        self.dirs = dirs or app_dirs()
        self.runtime: Runtime = resolve_runtime(self.settings.device, self.settings.precision, self.dirs.cache)
        self._slot = JobSlot()
        self._warm: WarmPipeline | None = None
        # the last reports, oldest first; kept on disk, so the charts survive a restart
        self.history = ReportHistory(self.dirs.data / "reports.jsonl")
        self.loras = LoraEngine(self.settings.lora_cache_mb,
                                patcher_settings(self.settings.lora_mode, self.settings.unpatch_lora_by_vram_offload))
        # What the person at this computer should know about this run (a setting that fell back):
        # logged when it happens, and shown on the status line to local visitors only (paths).
        self.notices: list[str] = []
        self._outputs: Path | None = None
        self._outputs_lock = threading.Lock()

    @property
    def outputs_root(self) -> Path:
        """The folder images are saved in (the outputs_dir setting, else the per-user data folder),
        chosen (and created) once: `outputs_dir` needs a restart.

        A refused or uncreatable `outputs_dir` falls back to the default folder with a notice.
        """
        with self._outputs_lock:
            if self._outputs is None:
                s = self.settings
                self._outputs, notice = choose_outputs(s.outputs_dir, self.dirs, model=s.model, lora_dirs=s.lora_dirs,
                                                       model_dirs=s.model_dirs, vae=s.vae)
                if notice:
                    self.notices.append(notice)
            return self._outputs

    # ---- settings ------------------------------------------------------------------------

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
            if changed.keys() & _BUDGET_FIELDS:
                self._apply_budgets()
            return changed
        with self._slot.exclusive():
            self.settings = live
            self.loras.configure(live.lora_cache_mb, lora_settings)
            self.runtime = runtime
            self._unload_locked()  # reloaded by the next generation
        return changed

    # ---- the warm pipeline ----------------------------------------------------------------

    @property
    def model(self) -> ModelInfo | None:
        warm = self._warm
        return warm.info if warm is not None else None

    @property
    def warm(self) -> WarmPipeline | None:
        """The loaded pipeline (None until the first generation or `load_model`); read it between jobs."""
        return self._warm

    @property
    def native_size(self) -> int:
        warm = self._warm  # read once: another thread may unload it
        return warm.native_size if warm is not None else SDXL_DEFAULT_SIZE

    def load_model(self, spec: str | None = None, vae: str | None = None,
                   on_progress: LoadProgress | None = None) -> ModelInfo:
        """Replace the warm pipeline (waits for a running generation to end).

        `spec`/`vae` None: the settings' model and VAE; given, they become the running settings'
        (the LoRA stack is the caller's, so it applies to the new model at the next generation).
        `on_progress(stage, fraction)` hears the load's stages (warm_pipeline.LOAD_STAGES).
        """
        source = resolve_source(spec if spec is not None else self.settings.model)
        with self._slot.exclusive():
            self._unload_locked()  # before loading the new one: peak RAM is one model
            self._warm = self._load(source, self.settings.vae if vae is None else vae, on_progress)
            changes = {k: v for k, v in (("model", spec), ("vae", vae)) if v is not None}
            if changes:
                self.settings = self.settings.replace(**changes)
            return self._warm.info

    def _ensure_model(self) -> WarmPipeline:
        if self._warm is None:
            self._warm = self._load(resolve_source(self.settings.model), self.settings.vae, None)
        return self._warm

    def _load(self, source, vae: str, on_progress: LoadProgress | None) -> WarmPipeline:
        warm = load_warm_pipeline(source, self.runtime, self.settings, budgets=self._budgets, loras=self.loras,
                                  hash_cache=self.dirs.cache / "model-hashes.json", vae=vae, on_progress=on_progress)
        if self.settings.live_preview:
            if on_progress is not None:
                on_progress("preview", None)
            took = warm.fit_preview(self.dirs.cache)  # part of the load: model_load is the sum of load_parts
            warm.info = replace(warm.info, load_seconds=warm.info.load_seconds + took,
                                load_parts=warm.info.load_parts | {"preview": took})
        return warm

    def _budgets(self) -> Budgets:
        s = self.settings
        warm = self._warm
        held_ram = warm.cache.used("cpu") if warm is not None else 0
        held_vram = warm.cache.used(self.runtime.device) if warm is not None and self.runtime.device.type != "cpu" \
            else 0
        return measure_budgets(self.runtime.device, ram_limit_mb=s.ram_limit_mb, vram_limit_mb=s.vram_limit_mb,
                               working_memory_mb=s.working_memory_mb, held_ram=held_ram, held_vram=held_vram)

    def _apply_budgets(self) -> None:
        """RAM/VRAM limits and the working reserve are "now" settings: the model cache takes its new
        budgets at once, dropping what no longer fits and is not in use (a running phase's weights
        are locked, so they stay). The memory mode chosen from the budgets at load stays until the
        model reloads."""
        warm = self._warm
        if warm is not None:
            budgets = self._budgets()
            warm.cache.set_budgets(budgets.ram or None, budgets.vram or None)

    def _unload_locked(self) -> None:
        """Restore LoRA'd weights, undo the placement, drop the pipeline and its cache (with no pipeline
        loaded, no gc pass: a full one cost 1.5-1.9 s before the first load on the 2-core machine)."""
        warm, self._warm = self._warm, None
        try:
            self.loras.unbind()  # restores the weights and forgets parses bound to its layer names
        finally:
            if warm is not None:
                try:
                    warm.close()
                finally:
                    release_freed_memory()

    def close(self) -> None:
        with self._slot.exclusive():
            self._unload_locked()

    # ---- jobs ----------------------------------------------------------------------------

    def status(self) -> dict:
        slot = self._slot.status()
        model = self.model
        return {"busy": slot.busy, "waiting": slot.waiting, "progress": slot.progress,
                "model": model.to_dict() if model else None, "rss": rss_bytes(), "notices": list(self.notices)
                } | cuda_now(self.runtime.device)

    def cancel_current(self) -> bool:
        """Stop the running job at its next step; returns whether one was running."""
        return self._slot.cancel_current()

    def prepare(self, request: GenerationRequest, *, allow_paths: bool = False) -> Job:
        """Move `<lora:...>` prompt tags into the stack, find every LoRA and validate: the one check.

        Unknown LoRA names and impossible values fail here, before a model is loaded or a
        weight touched; the CLI checks a whole jobs file this way first. A LoRA is a name from
        the LoRA folders; `allow_paths=True` (the local command line only) also takes a file path.
        """
        request = request.validated()  # returns at once when the caller (the UI's form) already checked it
        prompt, stack = resolve_stack(request.prompt, request.loras, search_dirs(self.settings.lora_dirs),
                                      self.lbw_presets(), allow_paths=allow_paths)
        return Job(request.with_stack(prompt, tuple(item.entry() for item in stack)), tuple(stack))

    def lora_footprint(self, item: StackItem) -> list[tuple[str, str, int | None, int]]:
        """(component, module, LBW block, weight bytes) of each layer `item`'s LoRA patches.

        Loads the model and parses the file (kept in the LoRA cache, so the first generation finds
        it there): a grid plans its order from this before its first cell.
        """
        with self._slot.exclusive():
            self._ensure_model()
            with self.loras.cache.pin(item.path) as pin:
                return self.loras.footprint(pin.lora)

    def lbw_presets(self) -> dict[str, tuple[float, ...]]:
        """The user's block-weight presets (Preferences); the extension's SDXL set is built in."""
        return parse_presets(self.settings.lbw_presets)

    def generate(self, request: GenerationRequest | Job, *, on_step: StepCallback | None = None,
                 on_phase: PhaseCallback | None = None, cancel: CancelToken | None = None,
                 out_path: Path | None = None, allow_paths: bool = False,
                 annotate: Callable[[Report], None] | None = None) -> GenerationResult:
        """Run one request to a saved PNG and a report. Raises Cancelled, OutOfMemory, InputError.

        A request is prepared here (`allow_paths` as in `prepare`); a Job was prepared already.
        `on_phase(name)` hears each phase as it starts (the report's phase names: "model_load",
        "lora_load", "lora_patch", "text_encode", "denoise", "vae_decode", "save", ...);
        `on_step` each denoising step, with a preview picture every few steps when live_preview is on;
        `annotate(report)` adds the caller's own measurements before the report is kept on disk.
        """
        job = request if isinstance(request, Job) else self.prepare(request, allow_paths=allow_paths)
        token = cancel or CancelToken()
        with self._slot.job(token):
            token.raise_if_cancelled()  # stopped while waiting in line
            # Outside every phase and lock, so they unwind (weights back at rest) before it frees memory.
            # A callable: a cold start creates the cache inside the guard, and an OOM then must free it.
            with oom_guard(lambda: self._warm.cache if self._warm else None, "the generation"):
                result = self._generate_locked(job, on_step, on_phase, token, out_path)
            if annotate is not None:
                annotate(result.report)
            self.history.append(result.report)
        return result

    def _generate_locked(self, job: Job, on_step: StepCallback | None, on_phase: PhaseCallback | None,
                         token: CancelToken, out_path: Path | None) -> GenerationResult:
        timer, started = PhaseTimer(on_phase), time.perf_counter()
        if self._warm is None:
            with timer.phase("model_load"):
                self._ensure_model()
        warm = self._warm
        preview = self.settings.live_preview
        if preview and warm.preview is None:  # switched on after the model loaded
            with timer.phase("preview_fit"):
                warm.fit_preview(self.dirs.cache)
        job = replace(job, request=job.request.with_seed())
        target = Path(out_path) if out_path is not None else OutputFolder(self.outputs_root)
        budgets = self._budgets() if self.runtime.device.type == "cuda" else None
        memory = DecodeMemory(self.settings.working_memory_mb, budgets.working if budgets else 0)

        def step(event: StepEvent) -> None:
            self._slot.report_progress(event.step, event.total)
            if on_step is not None:
                on_step(event)

        return generate(warm, self.loras, job, target, timer=timer, started=started, token=token, on_step=step,
                        decode_memory=memory, preview=preview)

    def bake(self, rows: list[tuple[str, float]], out_dir: Path, single_file: Path | None = None, *,
             allow_paths: bool = False):
        """Write the model with a LoRA stack merged in (diffusers folder, optionally one file too), between
        generations; the session's own LoRAs come off first and the live weights end bit-identical to pristine."""
        from studio.bake import bake

        _, stack = resolve_stack("", rows, search_dirs(self.settings.lora_dirs), self.lbw_presets(), allow_paths=allow_paths)
        if not stack:
            raise SettingsError("bake needs at least one --lora NAME_OR_PATH:WEIGHT")
        with self._slot.exclusive():
            warm = self._ensure_model()
            with self.loras.pinned(stack, PhaseTimer()) as applied, warm.phase(Phase.TEXT_ENCODE), \
                    warm.phase(Phase.DENOISE), warm.phase(Phase.DECODE), torch.inference_mode():
                self.loras.clear()
                return bake(warm.pipe, applied.full_stack(), out_dir, single_file)
