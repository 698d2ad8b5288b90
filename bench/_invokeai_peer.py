"""InvokeAI's own LoRA patcher as a peer in the switching benchmark, loaded from an installed wheel.

Nothing of InvokeAI is in this repository: `--invokeai-site PATH` (or `INVOKEAI_SITE`) names a
folder where `pip install --no-deps --target PATH invokeai==6.14.2` put it, and it is imported
from there at benchmark time only. Its `invokeai.backend.patches` package needs four things from
the app and the model manager; minimal stand-ins are put in `sys.modules` first (the model-load
lock, the CPU device constant, the logger, and the `load` and `util` packages without their
`__init__`, which import every model loader and the app config), so InvokeAI's own patch code
runs unchanged.

Driven the way a generation drives it (invocations/denoise_latents.py and compel.py, 6.14.2):
- a LoRA file is read with safetensors' `load_file`, PEFT adapter names normalised, SDXL keys
  converted (`convert_sdxl_keys_to_diffusers_format`), layers built (`lora_model_from_sd_state_dict`)
  and cast to the app dtype, as `LoRALoader._load_model` does for an SDXL LoRA; kept in RAM after;
- weights are patched inside `LayerPatcher.apply_smart_model_patches` (patch on enter, restore on
  exit), one context per component with its prefix (`lora_unet_`, `lora_te1_`, `lora_te2_`) and
  the model cache's read-only RAM copy as `cached_weights`, the same pristine copy our patcher gets;
- `force_direct_patching=True`: on a GPU InvokeAI patches weights directly; on a CPU its smart rule
  would pick sidecar layers (which need its custom modules). Direct is what we compare with.
InvokeAI has no patched state between generations: every generation patches on entry and
restores on exit, so a transition here is "exit the old contexts, enter the new ones".
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import time
import types
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench._exactness import Checker, as_dict
from bench._report import SCENARIO
from bench._timing import sync, timed

log = logging.getLogger(__name__)

VERSION = "6.14.2"
ENV = "INVOKEAI_SITE"
ENTRY_POINT = ("LayerPatcher.apply_smart_model_patches(model, patches, prefix, dtype, cached_weights, "
               "force_direct_patching=True), one per component")
PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def find_site(site: str | os.PathLike[str] | None = None) -> Path | None:
    """The folder holding the installed `invokeai` package: `site`, else $INVOKEAI_SITE, else None."""
    value = site if site is not None else os.environ.get(ENV)
    if not value:
        return None
    path = Path(value).expanduser()
    return path if (path / "invokeai" / "backend" / "patches" / "layer_patcher.py").is_file() else None


class _LoadLock:
    """Stand-in for the model manager's MODEL_LOAD_LOCK (a reader/writer lock): nothing to exclude here."""

    @contextlib.contextmanager
    def read_lock(self) -> Iterator[None]:
        yield

    write_lock = read_lock


class _TorchDevice:
    CPU_DEVICE = torch.device("cpu")


class WarningCount(logging.Handler):
    """Counts InvokeAI's warnings: it logs a LoRA layer it cannot place and carries on, so a run that
    skipped layers would look fast; the benchmark reports the count (and the tests require 0)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.examples: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(record.getMessage())


class _Logger:
    @staticmethod
    def get_logger(name: str = "InvokeAI", **_: Any) -> logging.Logger:
        return logging.getLogger(f"invokeai.{name}")


def _stub(name: str, **attrs: Any) -> types.ModuleType:
    """A stand-in module, also set as an attribute of its (real) parent package."""
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    parent, _, leaf = name.rpartition(".")
    setattr(importlib.import_module(parent), leaf, module)
    return module


_IMPORTED: dict[Path, types.SimpleNamespace] = {}


def import_invokeai(site: Path) -> types.SimpleNamespace:
    """InvokeAI's patcher and SDXL LoRA conversion, imported from `site` behind the stand-ins (once)."""
    if site in _IMPORTED:
        api = _IMPORTED[site]
        api.warnings.count, api.warnings.examples = 0, []
        return api
    if "invokeai" in sys.modules:
        raise RuntimeError(f"InvokeAI is already imported from elsewhere; cannot load it from {site}")
    if str(site) not in sys.path:
        sys.path.append(str(site))  # after our own packages: only `invokeai` comes from there
    ilog = logging.getLogger("invokeai")
    warnings = WarningCount()
    ilog.addHandler(warnings)
    ilog.propagate = False  # counted, not printed per layer
    load_dir = site / "invokeai" / "backend" / "model_manager" / "load"
    _stub("invokeai.backend.model_manager.load", __path__=[str(load_dir)])
    _stub("invokeai.backend.model_manager.load.model_cache.model_cache", MODEL_LOAD_LOCK=_LoadLock())
    # the util package's own __init__ imports its logging module (and so the app config): replaced
    util = types.ModuleType("invokeai.backend.util")
    util.__path__ = [str(site / "invokeai" / "backend" / "util")]
    util.InvokeAILogger = _Logger  # what its __init__ exports that the patcher uses
    sys.modules["invokeai.backend.util"] = util
    _stub("invokeai.backend.util.devices", TorchDevice=_TorchDevice)
    _stub("invokeai.backend.util.logging", InvokeAILogger=_Logger, warning=ilog.warning, info=ilog.info,
          debug=ilog.debug, error=ilog.error)
    importlib.import_module("invokeai.backend").util = util
    from invokeai.backend.patches.layer_patcher import LayerPatcher
    from invokeai.backend.patches.lora_conversions.peft_adapter_utils import normalize_peft_adapter_names
    from invokeai.backend.patches.lora_conversions.sd_lora_conversion_utils import lora_model_from_sd_state_dict
    from invokeai.backend.patches.lora_conversions.sdxl_lora_conversion_utils import (
        convert_sdxl_keys_to_diffusers_format)

    version = "unknown"
    for dist in site.glob("invokeai-*.dist-info"):
        version = dist.name.removeprefix("invokeai-").removesuffix(".dist-info")
    api = types.SimpleNamespace(LayerPatcher=LayerPatcher, normalize=normalize_peft_adapter_names,
                                from_sd=lora_model_from_sd_state_dict, convert=convert_sdxl_keys_to_diffusers_format,
                                version=version, warnings=warnings)
    _IMPORTED[site] = api
    return api


class _TextModel(nn.Module):
    """`text_model` parent for a CLIPTextModel that has none. This venv's transformers (5.24) builds
    CLIPTextModel without that level; InvokeAI 6.14.2 (which pins transformers 5.5) looks TE1's kohya
    layers up as `text_model.encoder...` and, not finding them, warns and skips all 72 of them."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.text_model = inner


def as_invokeai_sees_it(components: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The components with the module tree InvokeAI's kohya TE keys expect (same Parameter objects)."""
    return {c: m if c == "unet" or hasattr(m, "text_model") else _TextModel(m) for c, m in components.items()}


class InvokeAIPeer:
    """InvokeAI's LoRA loading and LayerPatcher over our bench components; `enter`/`exit` one generation."""

    def __init__(self, api: types.SimpleNamespace, components: dict[str, nn.Module], dtype: torch.dtype,
                 cached_weights: dict[str, dict[str, torch.Tensor]] | None):
        self.api = api
        self.components = as_invokeai_sees_it(components)
        self.dtype = dtype
        self.cached_weights = cached_weights  # per component: InvokeAI's keep_ram_copy state dict
        self._stack: ExitStack | None = None
        self.entered: tuple[tuple[Any, float], ...] = ()

    def load(self, path: Path) -> Any:
        """One SDXL LoRA file as InvokeAI's LoRALoader builds it (ModelPatchRaw in the app dtype)."""
        from safetensors.torch import load_file

        state = load_file(Path(path).absolute().as_posix(), device="cpu")
        state = {k: v for k, v in state.items() if not k.startswith("bundle_emb")}
        state = self.api.normalize(state)
        model = self.api.from_sd(state_dict=self.api.convert(state))
        model.to(dtype=self.dtype)
        return model

    @torch.no_grad()
    def enter(self, stack: list[tuple[Any, float]]) -> None:
        """Patch: enter one apply_smart_model_patches context per component (as the nodes do)."""
        if self._stack is not None:
            raise RuntimeError("InvokeAIPeer.enter() while patched; exit() first")
        contexts = ExitStack()
        try:
            for component, module in self.components.items():
                cached = self.cached_weights.get(component) if self.cached_weights else None
                contexts.enter_context(self.api.LayerPatcher.apply_smart_model_patches(
                    model=module, patches=list(stack), prefix=PREFIXES[component], dtype=self.dtype,
                    cached_weights=cached, force_direct_patching=True))
        except BaseException:
            contexts.close()
            raise
        self._stack = contexts
        self.entered = tuple(stack)

    def exit(self) -> None:
        """Unpatch: leave the contexts (InvokeAI copies each changed weight back from its saved original)."""
        stack, self._stack, self.entered = self._stack, None, ()
        if stack is not None:
            stack.close()

    @property
    def patched(self) -> bool:
        return self._stack is not None


def cached_state(components: dict[str, nn.Module], pristine: Any) -> dict[str, dict[str, torch.Tensor]]:
    """Per component, the read-only RAM copy InvokeAI's model cache hands the patcher (keep_ram_copy),
    keyed as InvokeAI names the parameters of `as_invokeai_sees_it(components)`."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for c, m in components.items():
        wrapped = not (c == "unet" or hasattr(m, "text_model"))
        out[c] = {("text_model." if wrapped else "") + name: pristine(c, name) for name, _ in m.named_parameters()}
    return out


# -- the benchmark's InvokeAI side ----------------------------------------------------------------
def run_invokeai(peer: InvokeAIPeer, loras: list[Any], paths: list[Path], checker: Checker, checks: bool,
                 device: torch.device) -> dict[str, dict[str, Any]]:
    """The scenario as InvokeAI generations: each step leaves the last patch context and enters the next."""
    out: dict[str, dict[str, Any]] = {}
    for name, stack in SCENARIO:
        def step(stack: tuple[tuple[int, float], ...] = stack) -> float:
            t0 = time.perf_counter()
            peer.exit()
            sync(device)
            unpatched = time.perf_counter() - t0
            if stack:
                peer.enter([(loras[i], w) for i, w in stack])
            return unpatched

        seconds, unpatch = timed(step, device)
        row: dict[str, Any] = {"seconds": seconds, "unpatch_seconds": unpatch, "patch_seconds": seconds - unpatch}
        if checks:
            row["exact"] = as_dict(checker.stack([(paths[i], w) for i, w in stack]))
            if not stack:
                row["pristine"] = as_dict(checker.pristine(restore=True))  # its restore copies its saved originals
        out[name] = row
    return out


def cold_invokeai(peer: InvokeAIPeer, paths: list[Path], with_cached: bool, device: torch.device) -> dict[str, float]:
    """The two files loaded as InvokeAI's LoRALoader does, then one patch context entered (and left)."""
    cached, peer.cached_weights = peer.cached_weights, (peer.cached_weights if with_cached else None)
    try:
        t0 = time.perf_counter()
        fresh = [peer.load(p) for p in paths[:2]]
        t1 = time.perf_counter()
        sync(device)
        peer.enter([(fresh[0], 0.8), (fresh[1], 0.6)])
        sync(device)
        t2 = time.perf_counter()
        return {"seconds": t2 - t0, "read": t1 - t0, "apply": t2 - t1}
    finally:
        peer.exit()
        peer.cached_weights = cached


def setup_invokeai(site_option: str | None, model: Any, paths: list[Path], dtype: torch.dtype,
                   device: torch.device) -> tuple[InvokeAIPeer | None, list[Any], dict[str, Any]]:
    """(peer, its four loaded LoRAs, the JSON `invokeai` entry); (None, [], entry) when not measured.

    `site_option`: the --invokeai-site value; None falls back to $INVOKEAI_SITE, "" turns it off.
    """
    given = site_option if site_option is not None else os.environ.get(ENV)
    site = find_site(given) if given else None
    if site is None:
        why = (f"not measured: no InvokeAI package under {given!r}" if given
               else f"not measured: give --invokeai-site or ${ENV}")
        return None, [], {"measured": False, "reason": why}
    api = import_invokeai(site)
    # On the CPU the pool is the model cache's RAM copy (as for ours); on CUDA it is on the device,
    # so InvokeAI saves originals to RAM at each patch (its keep_ram_copy_of_weights=False path).
    cached = cached_state(model.components, model.pristine) if model.pristine_source else None
    peer = InvokeAIPeer(api, model.components, dtype, cached)
    loads, loras = [], []
    for p in paths:
        seconds, lora = timed(lambda p=p: peer.load(p), device)
        loads.append(seconds)
        loras.append(lora)
    return peer, loras, {"measured": True, "version": api.version, "site": str(site), "load_seconds": loads,
                         "cached_weights": cached is not None, "entry_point": ENTRY_POINT,
                         "lora_mb_loaded": [lora.calc_size() / 1e6 for lora in loras]}
