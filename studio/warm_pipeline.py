"""The warm pipeline: a loaded SDXL model, where its weights are, and the one phase step.

`WarmPipeline.phase(Phase.DENOISE, applied)` is the only place that pairs placing a phase's
components on the device with patching that phase's LoRAs, so a new phase (a refiner, a
ControlNet) is one `with` in the generation and one line in `studio.phases`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.lora.engine import AppliedStack, LoraEngine
from studio.models.architectures import SDXL_DEFAULT_SIZE
from studio.models.budget import Budgets
from studio.models.cache import ModelCache
from studio.models.fp8 import enable_fp8_storage, fp8_supported
from studio.models.hashing import model_sha256
from studio.models.loader import ModelSource, SourceKind, load_pipeline
from studio.models.placement import Placement, apply_memory_mode
from studio.models.vae_file import load_vae
from studio.phases import LORA_TARGETS, Phase
from studio.preview import LatentProjection, cached_projection
from studio.report import PhaseTimer
from studio.runtime import Runtime
from studio.settings import Settings

log = logging.getLogger(__name__)


LoadProgress = Callable[[str, "float | None"], None]  # (stage, fraction done or None) while a model loads
LOAD_STAGES = {"read": "reading the weights", "vae": "reading the VAE", "hash": "hashing the weights (once per file)",
               "place": "placing the weights (memory mode)", "preview": "fitting the live preview to the VAE"}


@dataclass(frozen=True)
class ModelInfo:
    source: ModelSource
    sha256: str
    load_seconds: float
    vae: str = ""  # a separate VAE's path; empty: the model's own
    native_size: int = SDXL_DEFAULT_SIZE  # the side the UNet was made for (its sample_size x the VAE's scale)
    # seconds per part of load_seconds (report.LOAD_PART_LABELS): what a slow load was spent on
    load_parts: dict[str, float] = field(default_factory=dict)

    @property
    def short_hash(self) -> str:
        return self.sha256[:10]

    @property
    def vae_name(self) -> str:
        return Path(self.vae).name if self.vae else ""

    def to_dict(self) -> dict:
        out = {"name": self.source.name, "kind": self.source.kind.value, "location": self.source.location,
               "hash": self.short_hash, "load_seconds": round(self.load_seconds, 4), "demo": self.source.is_demo,
               "native_size": self.native_size,
               "load_parts": {name: round(seconds, 4) for name, seconds in self.load_parts.items()}}
        return out | ({"vae": self.vae_name, "vae_location": self.vae} if self.vae else {})


@dataclass
class WarmPipeline:
    """One loaded model with its placement; the LoRA engine is bound to its components."""

    pipe: Any  # a StableDiffusionXLPipeline
    placement: Placement
    cache: ModelCache
    info: ModelInfo
    runtime: Runtime
    scheduler_config: dict[str, Any]  # the model's own; each job builds a fresh scheduler from it
    notes: list[str] = field(default_factory=list)  # what loading decided on its own (fp8 off, ...)
    preview: LatentProjection | None = None  # the live preview's latent -> RGB map, fitted to this VAE

    @property
    def native_size(self) -> int:
        return self.info.native_size

    @contextmanager
    def phase(self, phase: Phase, loras: AppliedStack | None = None) -> Iterator[None]:
        """The phase's components on the device and, when `loras` is given, its LoRAs patched in.

        Patching inside the placement's phase is what keeps a LoRA out of the pristine RAM copy a
        component rests on between phases (offload mode); merged or sidecar per layer is the LoRA
        engine's choice from the placement's `merge_blocker`, made once when it was bound.
        """
        with self.placement.phase(phase):
            if loras is not None:
                loras.apply(phase)
            yield

    def fit_preview(self, cache_dir: Path) -> float:
        """Fit the live preview's latent -> RGB map to this VAE (cached on disk by the weights' hash);
        returns the seconds it took.

        A fit that fails leaves the preview off with a note in every report; the model still works.
        """
        start = time.perf_counter()
        hashes = cache_dir / "model-hashes.json"
        try:
            vae_key = model_sha256(Path(self.info.vae), hashes) if self.info.vae else ""
            with self.phase(Phase.DECODE):
                self.preview = cached_projection(self.pipe.vae, f"{self.info.sha256}|{vae_key}",
                                                 cache_dir / "preview-fits.json")
        except (RuntimeError, ValueError, OSError) as err:
            log.warning("live preview unavailable: %s", err)
            self.notes.append(f"live preview off: fitting it to the VAE failed ({err})")
        return time.perf_counter() - start

    def close(self) -> None:
        self.placement.close()


def native_size(pipe: Any) -> int:
    """The image side a model was trained at: its UNet's latent sample size times the VAE's scale.

    Read from the model, not from where it came from: a demo model baked into a folder is still
    a 256 px model (a 1024 px image from it is mostly noise at the wrong scale).
    """
    sample = getattr(pipe.unet.config, "sample_size", None)
    scale = getattr(pipe, "vae_scale_factor", 8)
    if isinstance(sample, (list, tuple)):
        sample = sample[0]
    return int(sample) * int(scale) if sample else SDXL_DEFAULT_SIZE


def load_warm_pipeline(source: ModelSource, runtime: Runtime, settings: Settings, *, budgets: Callable[[], Budgets],
                       loras: LoraEngine, hash_cache, vae: str = "",
                       on_progress: LoadProgress | None = None) -> WarmPipeline:
    """Load `source` (with a separate `vae` when given), place it by the memory settings and bind the
    LoRA engine to it; `on_progress(stage, fraction)` hears each LOAD_STAGES stage as it goes.

    `budgets()` is measured after the weights are in RAM, so what the model holds counts as ours.
    """
    def stage(name: str) -> Callable[[float | None], None]:
        if on_progress is None:
            return lambda fraction: None
        on_progress(name, 0.0)
        return lambda fraction: on_progress(name, fraction)

    start, parts = time.perf_counter(), PhaseTimer()  # parts: imports, read_build, vae, hash, placement, lora_bind
    device = runtime.device
    pipe = load_pipeline(source, runtime.dtype, device, on_progress=stage("read"), timer=parts)
    if vae:
        stage("vae")
        with parts.phase("vae"):
            pipe.vae = load_vae(vae, pipe.vae, runtime.dtype)
    with parts.phase("hash"):
        sha = model_sha256(source.path, hash_cache, stage("hash")) if source.kind is not SourceKind.HUB else ""
    stage("place")
    notes: list[str] = []
    if settings.fp8_storage:
        fp8, why = fp8_supported(device)
        if fp8:
            enable_fp8_storage(pipe.unet, runtime.dtype)  # before caching: the pristine copy is fp8 too
        else:
            notes.append(f"fp8 storage is off: {why}")
    with parts.phase("placement"):  # the pristine RAM copies are made here
        measured = budgets()
        cache = ModelCache(device, ram_budget=measured.ram or None, vram_budget=measured.vram or None)
        placement = apply_memory_mode(pipe, settings.memory_mode, device, budgets(), settings.stream_lookahead,
                                      cache=cache, key_prefix=f"{sha[:12]}:")
    try:
        with parts.phase("lora_bind"):
            loras.bind({part: getattr(pipe, part) for part in LORA_TARGETS}, pristine_source=placement.pristine,
                       merge_blocker=placement.merge_blocker)
    except BaseException:
        placement.close()
        raise
    info = ModelInfo(source, sha, time.perf_counter() - start, vae=str(vae), native_size=native_size(pipe),
                     load_parts=parts.phases)
    log.info("loaded %s (%s) in %.2fs on %s/%s, memory mode %s", source.name, source.kind.value, info.load_seconds,
             device, runtime.dtype_name, placement.mode)
    return WarmPipeline(pipe, placement, cache, info, runtime, dict(pipe.scheduler.config), notes)
