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
from typing import Any

from studio.lora.engine import AppliedStack, LoraEngine
from studio.models.architectures import SDXL_DEFAULT_SIZE, TINY_DEFAULT_SIZE
from studio.models.budget import Budgets
from studio.models.cache import ModelCache
from studio.models.fp8 import enable_fp8_storage, fp8_supported
from studio.models.hashing import model_sha256
from studio.models.loader import ModelSource, SourceKind, load_pipeline
from studio.models.placement import Placement, apply_memory_mode
from studio.phases import LORA_TARGETS, Phase
from studio.runtime import Runtime
from studio.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    source: ModelSource
    sha256: str
    load_seconds: float

    @property
    def short_hash(self) -> str:
        return self.sha256[:10]

    def to_dict(self) -> dict:
        return {"name": self.source.name, "kind": self.source.kind.value, "location": self.source.location,
                "hash": self.short_hash, "load_seconds": round(self.load_seconds, 4), "demo": self.source.is_demo}


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

    @property
    def native_size(self) -> int:
        return TINY_DEFAULT_SIZE if self.info.source.is_demo else SDXL_DEFAULT_SIZE

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

    def close(self) -> None:
        self.placement.close()


def load_warm_pipeline(source: ModelSource, runtime: Runtime, settings: Settings, *, budgets: Callable[[], Budgets],
                       loras: LoraEngine, hash_cache) -> WarmPipeline:
    """Load `source`, place it by the memory settings and bind the LoRA engine to it.

    `budgets()` is measured after the weights are in RAM, so what the model holds counts as ours.
    """
    start = time.perf_counter()
    device = runtime.device
    pipe = load_pipeline(source, runtime.dtype, device)
    sha = model_sha256(source.path, hash_cache) if source.kind is not SourceKind.HUB else ""
    notes: list[str] = []
    if settings.fp8_storage:
        fp8, why = fp8_supported(device)
        if fp8:
            enable_fp8_storage(pipe.unet, runtime.dtype)  # before caching: the pristine copy is fp8 too
        else:
            notes.append(f"fp8 storage is off: {why}")
    measured = budgets()
    cache = ModelCache(device, ram_budget=measured.ram or None, vram_budget=measured.vram or None)
    placement = apply_memory_mode(pipe, settings.memory_mode, device, budgets(), settings.stream_lookahead,
                                  cache=cache, key_prefix=f"{sha[:12]}:")
    try:
        loras.bind({part: getattr(pipe, part) for part in LORA_TARGETS}, pristine_source=placement.pristine,
                   merge_blocker=placement.merge_blocker)
    except BaseException:
        placement.close()
        raise
    info = ModelInfo(source, sha, time.perf_counter() - start)
    log.info("loaded %s (%s) in %.2fs on %s/%s, memory mode %s", source.name, source.kind.value, info.load_seconds,
             device, runtime.dtype_name, placement.mode)
    return WarmPipeline(pipe, placement, cache, info, runtime, dict(pipe.scheduler.config), notes)
