"""fp8 weight storage: weights kept as float8_e4m3fn, upcast layer by layer to the compute dtype.

Built on diffusers' layerwise casting (`enable_layerwise_casting`, hooks/layerwise_casting.py):
each Linear/Conv/Embedding is stored in fp8 and cast to the compute dtype in its pre-forward,
back to fp8 after; norms stay in the model dtype. It halves the UNet's weight memory
(SDXL: 4.78 -> 2.39 GiB; measured here on the tiny UNet: 0.502x the bf16 bytes) at some cost in
speed (diffusers PR #9177: AnimateDiff 16.66 -> 18.89 s) and precision (tiny UNet, one forward:
relative L2 error ~0.1 vs bf16 with random weights). It runs on the CPU with torch 2.13.

LoRAs on fp8 layers must run as sidecars in the compute dtype: merging raises in diffusers
("Promotion for Float8 Types is not supported"), re-rounding a merged weight to fp8 loses
~85% of a typical delta, and peft casts adapters to the base dtype (fp8) and crashes
(research/diffusers.md 0.5). `is_fp8_stored(module)` is the predicate the LoRA engine asks.
The casting cannot be undone (diffusers raises): turning fp8 off reloads the model.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from studio.dtypes import FP8_DTYPES

log = logging.getLogger(__name__)
STORAGE_DTYPE = torch.float8_e4m3fn
_HOOK = "layerwise_casting"  # diffusers' hook name (hooks/layerwise_casting.py)


def fp8_supported(device: torch.device | str) -> tuple[bool, str]:
    """(supported, why not): casting to and from fp8 works on `device` with this torch."""
    device = torch.device(device)
    if not hasattr(torch, "float8_e4m3fn"):
        return False, f"torch {torch.__version__} has no float8_e4m3fn"
    try:
        probe = torch.linspace(-2, 2, 8, device=device, dtype=torch.float32)
        back = probe.to(STORAGE_DTYPE).to(torch.bfloat16).float()
    except (RuntimeError, TypeError, NotImplementedError) as err:
        return False, f"fp8 casts fail on {device}: {err}"
    if not torch.allclose(back, probe, atol=0.13):
        return False, f"fp8 casts on {device} give wrong values"
    return True, ""


def enable_fp8_storage(module: nn.Module, compute_dtype: torch.dtype) -> int:
    """Store `module`'s weights in fp8 from now on (before it is cached); returns the bytes saved.

    Call it on the UNet right after loading and before `ModelCache.put`, so the pristine copy is
    fp8 too. Raises RuntimeError when the device cannot cast fp8, ValueError for fp8 compute.
    """
    if compute_dtype in FP8_DTYPES:
        raise ValueError("fp8 is a storage dtype here; compute in bf16, fp16 or fp32")
    if fp8_layers(module):
        return 0  # already stored in fp8 (diffusers would refuse a second hook)
    device = next(module.parameters()).device
    ok, why = fp8_supported(device)
    if not ok:
        raise RuntimeError(f"fp8 weight storage is not available: {why}")
    before = weight_bytes(module)
    module.enable_layerwise_casting(storage_dtype=STORAGE_DTYPE, compute_dtype=compute_dtype)
    saved = before - weight_bytes(module)
    log.info("fp8 storage: %s weights %.1f -> %.1f MB", type(module).__name__, before / 2**20,
             (before - saved) / 2**20)
    return saved


def is_fp8_stored(module: nn.Module) -> bool:
    """True when `module`'s own weight is stored in fp8 (even while it is upcast inside its forward).

    Merging a LoRA into such a layer is wrong: run it as a sidecar in the compute dtype.
    """
    registry = getattr(module, "_diffusers_hook", None)
    hook = registry.get_hook(_HOOK) if registry is not None else None
    if hook is not None and getattr(hook, "storage_dtype", None) in FP8_DTYPES:
        return True
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dtype in FP8_DTYPES


def fp8_layers(root: nn.Module) -> list[str]:
    """Names of the modules under `root` whose weights are fp8-stored (for reports and tests)."""
    return [name for name, m in root.named_modules() if is_fp8_stored(m) and hasattr(m, "weight")]


def weight_bytes(module: nn.Module) -> int:
    """Bytes of every unique parameter and buffer, in their storage dtypes."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
