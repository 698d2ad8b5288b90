"""A separate VAE: a `.safetensors` file (original or diffusers key layout) or a diffusers folder.

People swap the VAE of a checkpoint (the fp16-fixed SDXL VAE, a sharper fine-tune) without
swapping the model. The file's header is read first and every key and shape checked against
the loaded model's own VAE, so a VAE of another family (SD 1.x, Flux) is refused in one line
before a tensor is read; nothing is unpickled.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch

from studio.errors import ModelLoadError
from studio.file_formats import PICKLE_SUFFIXES
from studio.models import sgm_keys
from studio.models.sgm_keys import VAE_PREFIX

log = logging.getLogger(__name__)


class VaeLayout(StrEnum):
    ORIGINAL = "original"  # encoder.down.0.block.0..., as A1111/ComfyUI VAE files (optionally first_stage_model.)
    DIFFUSERS = "diffusers"  # encoder.down_blocks.0.resnets.0...


def vae_layout(keys: Sequence[str], name: str) -> VaeLayout:
    """Which key layout a VAE file uses, or one line saying it is not a VAE."""
    bare = [k.removeprefix(VAE_PREFIX) for k in keys]
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in bare):
        return VaeLayout.DIFFUSERS
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in bare):
        return VaeLayout.ORIGINAL
    if any(k.startswith("model.diffusion_model.") for k in keys):
        raise ModelLoadError(f"{name}: is a whole checkpoint, not a VAE; choose it as the model")
    example = keys[0] if keys else "none"
    raise ModelLoadError(f"{name}: is not a VAE (no encoder/decoder keys; e.g. {example})")


def _config(vae: Any) -> dict[str, Any]:
    config = vae.config
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def _fresh(like: Any):
    """An empty VAE of the loaded one's architecture (meta device: shapes and config for free)."""
    with torch.device("meta"):
        return type(like).from_config(like.config)


def check_vae(shapes: Mapping[str, Sequence[int]], like: Any, name: str) -> VaeLayout:
    """Refuse a VAE whose keys or shapes differ from the model's own; returns its layout."""
    layout = vae_layout(list(shapes), name)
    expected = {k: tuple(t.shape) for k, t in _fresh(like).state_dict().items()}
    if layout is VaeLayout.ORIGINAL:
        prefixed = any(k.startswith(VAE_PREFIX) for k in shapes)
        expected = {(k if prefixed else k.removeprefix(VAE_PREFIX)): tuple(t.shape) for k, t in
                    sgm_keys.to_sgm("vae", _fresh(like).state_dict(), _config(like)).items()}
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise ModelLoadError(f"{name}: does not fit this model's VAE: {len(missing)} tensors are missing, "
                             f"e.g. {missing[0]}")
    wrong = sorted(k for k in expected if tuple(shapes[k]) != expected[k])
    if wrong:
        k = wrong[0]
        raise ModelLoadError(f"{name}: does not fit this model's VAE: {k} is {list(shapes[k])}, "
                             f"the model's VAE has {list(expected[k])} (a VAE for another model family?)")
    return layout


def load_vae(spec: str | Path, like: Any, dtype: torch.dtype):
    """The VAE at `spec` in `dtype`, built like the loaded model's VAE `like`."""
    path = Path(spec).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(f"{path.name}: pickle files are never loaded (they can run code); "
                             "use the .safetensors VAE")
    if path.is_dir():
        return _load_folder(path, like, dtype)
    from safetensors import safe_open

    from studio.models.single_file import read_header

    shapes, _ = read_header(path)
    layout = check_vae(shapes, like, path.name)
    prefixed = any(k.startswith(VAE_PREFIX) for k in shapes)
    vae = _fresh(like)
    with safe_open(str(path), framework="pt") as f:
        def get(key: str) -> torch.Tensor:
            tensor = f.get_tensor(key if prefixed else key.removeprefix(VAE_PREFIX))
            return tensor.to(dtype) if tensor.is_floating_point() else tensor

        if layout is VaeLayout.ORIGINAL:
            shapes_here = {k: tuple(t.shape) for k, t in vae.state_dict().items()}
            state = sgm_keys.from_sgm("vae", get, shapes_here, _config(like))
        else:
            state = {k: get(k) for k in shapes}
    vae.load_state_dict(state, strict=True, assign=True)
    log.info("VAE %s loaded (%s layout)", path.name, layout.value)
    return vae.eval()


def _load_folder(path: Path, like: Any, dtype: torch.dtype):
    folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{path}: not a diffusers VAE folder (no config.json)")
    try:
        vae = type(like).from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelLoadError(f"{path.name}: could not be loaded as a VAE ({first})") from err
    shapes = {k: tuple(t.shape) for k, t in vae.state_dict().items()}
    check_vae(shapes, like, path.name)
    return vae.eval()
