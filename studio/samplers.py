"""Sampler names (as A1111 writes them in PNG metadata) to diffusers schedulers."""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from studio.errors import SettingsError

_SAMPLERS: dict[str, tuple[type, dict[str, Any]]] = {
    "Euler": (EulerDiscreteScheduler, {}),
    "Euler a": (EulerAncestralDiscreteScheduler, {}),
    "DPM++ 2M": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ 2M Karras": (DPMSolverMultistepScheduler,
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "DDIM": (DDIMScheduler, {}),
    "UniPC": (UniPCMultistepScheduler, {}),
}


def make_scheduler(name: str, base_config: dict[str, Any]):
    """A fresh scheduler per job: schedulers keep per-run state (step index, sigmas)."""
    try:
        cls, overrides = _SAMPLERS[name]
    except KeyError:
        raise SettingsError(f"`sampler` must be one of {', '.join(_SAMPLERS)}, got {name!r}") from None
    config = {k: v for k, v in base_config.items() if not k.startswith("_")}
    config.pop("use_karras_sigmas", None)
    return cls.from_config(config, **overrides)
