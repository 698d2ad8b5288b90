"""Sampler names (as A1111 writes them in PNG metadata) and the diffusers scheduler behind each.

The names are the one list the request, the UI and PNG info read; diffusers is imported
only when a scheduler is built, so checking a request stays cheap.
"""

from __future__ import annotations

from typing import Any

from studio.errors import SettingsError

# name -> (diffusers scheduler class, config overrides)
_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler",
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "DDIM": ("DDIMScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
}
SAMPLERS: tuple[str, ...] = tuple(_SCHEDULERS)
# Keys a model's scheduler config may lack, with SDXL's values: a config saved from an Euler scheduler
# has no `clip_sample`, and DDIM's own default (True) clips its x0 estimate to [-1, 1], which SDXL
# latents exceed: the demo model then drew a blue circle on green for "a red circle on a blue background".
_MISSING_DEFAULTS: dict[str, dict[str, Any]] = {"DDIM": {"clip_sample": False, "set_alpha_to_one": False}}


def check_sampler(name: str) -> str:
    if name not in _SCHEDULERS:
        raise SettingsError(f"`sampler` must be one of {', '.join(SAMPLERS)}, got {name!r}")
    return name


def make_scheduler(name: str, base_config: dict[str, Any]):
    """A fresh scheduler per job: schedulers keep per-run state (step index, sigmas)."""
    import diffusers

    class_name, overrides = _SCHEDULERS[check_sampler(name)]
    config = {k: v for k, v in base_config.items() if not k.startswith("_")}
    config.pop("use_karras_sigmas", None)
    config = _MISSING_DEFAULTS.get(name, {}) | config
    return getattr(diffusers, class_name).from_config(config, **overrides)
