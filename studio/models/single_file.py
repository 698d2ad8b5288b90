"""Single-file SDXL checkpoints in the original (Stability SGM, "A1111") key layout.

Most people download SDXL as one `.safetensors` file with SGM names. We read its
header first (never a tensor, never a pickle) to say what it is and check every key
and shape against the architecture, then convert the keys ourselves (`sgm_keys`)
and build the pipeline offline from the configs and tokenizers shipped in assets/.
Saving is the exact inverse, checked against diffusers' own converters in the tests,
so a save/load round trip is bit-exact.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType, SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

from studio.errors import ModelLoadError, OutOfMemory
from studio.file_formats import MAX_HEADER_BYTES, PICKLE_SUFFIXES, SAFETENSORS_DTYPE_BYTES
from studio.models import sgm_keys
from studio.models.sgm_keys import TE1_PREFIX, TE2_PREFIX, UNET_PREFIX, VAE_PREFIX
from studio.paths import SDXL_BASE_CONFIG_DIR, TINY_MODEL_DIR
from studio.phases import Component

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLPipeline

log = logging.getLogger(__name__)

_PICKLE_ADVICE = "pickle checkpoints are never loaded, for safety (they can run code); convert it to .safetensors"
# Training bookkeeping that real SDXL files carry and no inference component reads.
_IGNORABLE_PREFIXES = ("model_ema.", "denoiser.", "alphas_cumprod", "betas", "posterior_", "log_one_minus",
                       "sqrt_", "logvar")
_LORA_MARKERS = ("lora_", ".lora.", "hada_w", "lokr_w", "dora_scale")
SAFETENSORS_METADATA = {"format": "pt", "modelspec.sai_model_spec": "1.0.0",
                        "modelspec.architecture": "stable-diffusion-xl-v1-base", "modelspec.implementation": "sgm"}


class Architecture(StrEnum):
    """What a checkpoint holds, by the config folder that describes it."""

    SDXL_BASE = "sdxl-base"
    TINY_SDXL = "tiny-sdxl"

    @property
    def config_dir(self) -> Path:
        return SDXL_BASE_CONFIG_DIR if self is Architecture.SDXL_BASE else TINY_MODEL_DIR


def _refuse(path: Path, reason: str) -> ModelLoadError:
    return ModelLoadError(f"{path.name}: {reason}")


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Key -> shape and the metadata from a safetensors header, validated against the file size."""
    path = Path(path)
    if not path.is_file():
        raise _refuse(path, "no such file" if not path.exists() else "is not a file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _refuse(path, f"is a {path.suffix} pickle; {_PICKLE_ADVICE}")
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            # torch.save writes a zip (PK\3\4) or, before 1.6, a bare pickle (0x80 + protocol 2..5)
            if head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
                raise _refuse(path, f"holds a pickle, not safetensors data; {_PICKLE_ADVICE}")
            if path.suffix.lower() != ".safetensors":
                raise _refuse(path, f"is not a .safetensors file (suffix {path.suffix or 'none'!r})")
            if size == 0:
                raise _refuse(path, "is empty (0 bytes)")
            if len(head) < 8:
                raise _refuse(path, f"is truncated ({size} bytes, too short for a safetensors header)")
            (length,) = struct.unpack("<Q", head)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise _refuse(path, f"has a truncated or corrupt header (says {length} bytes, file has {size})")
            raw = f.read(length)
    except OSError as err:
        raise _refuse(path, f"cannot be read ({err.strerror or err.__class__.__name__})") from err
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _refuse(path, f"has a corrupt safetensors header ({err.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise _refuse(path, "has a corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    shapes: dict[str, tuple[int, ...]] = {}
    end = 0
    for key, info in header.items():
        try:
            shape = tuple(int(n) for n in info["shape"])
            begin, stop = (int(n) for n in info["data_offsets"])
            width = SAFETENSORS_DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise _refuse(path, f"has a corrupt safetensors header (entry {key!r})") from None
        if stop - begin != width * _numel(shape) or begin < 0:
            raise _refuse(path, f"has a corrupt safetensors header (entry {key!r} has the wrong byte size)")
        shapes[key] = shape
        end = max(end, stop)
    if 8 + length + end > size:
        raise _refuse(path, f"is truncated ({size} bytes, its header needs {8 + length + end})")
    return shapes, {str(k): str(v) for k, v in metadata.items()}


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for n in shape:
        count *= n
    return count


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


@lru_cache(maxsize=None)
def signature(arch: Architecture) -> Mapping[str, tuple[int, ...]]:
    """A few keys whose shapes tell the architectures apart, from the config JSON alone (no torch models)."""
    unet = _json(arch.config_dir / "unet" / "config.json")
    te1 = _json(arch.config_dir / "text_encoder" / "config.json")
    te2 = _json(arch.config_dir / "text_encoder_2" / "config.json")
    width = unet["block_out_channels"][0]
    return MappingProxyType({
        UNET_PREFIX + "input_blocks.0.0.weight": (width, unet["in_channels"], 3, 3),
        UNET_PREFIX + "label_emb.0.0.weight": (4 * width, unet["projection_class_embeddings_input_dim"]),
        UNET_PREFIX + "middle_block.1.transformer_blocks.0.attn2.to_k.weight":
            (unet["block_out_channels"][-1], unet["cross_attention_dim"]),
        TE1_PREFIX + "text_model.embeddings.token_embedding.weight": (te1["vocab_size"], te1["hidden_size"]),
        TE2_PREFIX + "positional_embedding": (te2["max_position_embeddings"], te2["hidden_size"]),
        TE2_PREFIX + "text_projection": (te2["hidden_size"], te2["projection_dim"]),
    })


def classify(shapes: Mapping[str, Sequence[int]], name: str = "checkpoint") -> Architecture:
    """Name the architecture of a key -> shape map, or say in one line what it is instead."""
    keys = list(shapes)

    def has(fragment: str) -> bool:
        return any(fragment in key for key in keys)

    def refuse(what: str) -> ModelLoadError:
        return ModelLoadError(f"{name}: {what}, not an SDXL base checkpoint")

    if not keys:
        raise ModelLoadError(f"{name}: holds no tensors")
    marker = next((m for m in _LORA_MARKERS if has(m)), None)
    if marker:
        raise refuse(f"looks like a LoRA file (keys with {marker!r}); add it as a LoRA")
    if has("double_blocks.") or has("single_blocks."):
        raise refuse("looks like a Flux model (double_blocks/single_blocks)")
    if has("joint_blocks."):
        raise refuse("looks like a Stable Diffusion 3 model (joint_blocks)")
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        raise refuse("looks like Stable Diffusion 1.x (cond_stage_model.transformer)")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise refuse("looks like Stable Diffusion 2.x (cond_stage_model.model)")
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        part = next((k for k in keys if k.startswith(("down_blocks.", "text_model.", "encoder.", "decoder."))), None)
        if part:
            raise refuse(f"holds a single component (keys like {part}), not a whole checkpoint")
        raise refuse("has no model.diffusion_model UNet; it is not a Stable Diffusion checkpoint")
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys) and not has("conditioner.embedders.1."):
        raise refuse(f"looks like an SDXL refiner (OpenCLIP only, UNet conv_in {list(conv_in)})")
    for part, prefix in (("CLIP-L text encoder", TE1_PREFIX), ("OpenCLIP text encoder", TE2_PREFIX),
                         ("VAE", VAE_PREFIX)):
        if not any(k.startswith(prefix) for k in keys):
            raise refuse(f"has an SDXL-like UNet but no {part} ({prefix}*)")
    for arch in Architecture:
        if all(tuple(shapes.get(k, ())) == shape for k, shape in signature(arch).items()):
            return arch
    if len(conv_in) == 4 and conv_in[1] != 4:
        raise refuse(f"looks like an SDXL inpainting/edit model (UNet takes {conv_in[1]} channels)")
    raise refuse(f"has the SDXL layout but unknown sizes (UNet conv_in {list(conv_in)})")


def inspect_checkpoint(path: str | os.PathLike[str]) -> Architecture:
    """Say which architecture a single-file checkpoint is, reading only its header."""
    shapes, _ = read_header(path)
    return classify(shapes, Path(path).name)


# The parts of a single-file SDXL checkpoint, in the order their keys are written.
CHECKPOINT_PARTS = (Component.UNET, Component.VAE, Component.TEXT_ENCODER, Component.TEXT_ENCODER_2)


def _config(model: torch.nn.Module) -> dict[str, Any]:
    config = model.config
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def to_sgm_state_dict(pipe: Any) -> dict[str, torch.Tensor]:
    """All four components of an SDXL pipeline under their original names (meta tensors welcome)."""
    state: dict[str, torch.Tensor] = {}
    for component in CHECKPOINT_PARTS:
        model = getattr(pipe, component)
        state.update(sgm_keys.to_sgm(component, model.state_dict(), _config(model)))
    return state


def _meta_components(arch: Architecture) -> SimpleNamespace:
    """The four models of `arch` with no storage behind them: names, shapes and configs for free."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = arch.config_dir
    with torch.device("meta"):
        return SimpleNamespace(
            unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
            vae=AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
            text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2")),
        )


@lru_cache(maxsize=None)
def expected_shapes(arch: Architecture) -> Mapping[str, tuple[int, ...]]:
    """Every key and shape a checkpoint of `arch` has, from its config folder on the meta device."""
    return MappingProxyType({key: tuple(t.shape) for key, t in to_sgm_state_dict(_meta_components(arch)).items()})


def check_keys(shapes: Mapping[str, Sequence[int]], arch: Architecture, name: str) -> None:
    """Refuse missing, misshapen or unknown keys before any tensor is read (diffusers would skip them)."""
    expected = expected_shapes(arch)
    missing = sorted(set(expected) - set(shapes) - sgm_keys.OPTIONAL_KEYS)
    if missing:
        raise ModelLoadError(f"{name}: {len(missing)} {arch.value} tensors are missing, e.g. {missing[0]}")
    wrong = sorted(k for k in expected if k in shapes and tuple(shapes[k]) != expected[k])
    if wrong:
        k = wrong[0]
        raise ModelLoadError(f"{name}: {len(wrong)} tensors have the wrong shape for {arch.value}, "
                             f"e.g. {k} is {list(shapes[k])}, expected {list(expected[k])}")
    unknown = sorted(k for k in set(shapes) - set(expected) if not k.startswith(_IGNORABLE_PREFIXES))
    if unknown:
        raise ModelLoadError(f"{name}: {len(unknown)} tensors are not part of {arch.value}, e.g. {unknown[0]}")


def _build(arch: Architecture, get: Callable[[str], torch.Tensor], dtype: torch.dtype) -> dict[str, Any]:
    """Fill the meta-built models from `get`; transformers rebuilds the CLIP position_ids buffers itself."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    def read(name: str) -> torch.Tensor:
        tensor = get(name)
        return tensor.to(dtype) if tensor.is_floating_point() else tensor

    meta = _meta_components(arch)
    models: dict[str, Any] = {}
    for component in CHECKPOINT_PARTS:
        model = getattr(meta, component)
        shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()}
        state = sgm_keys.from_sgm(component, read, shapes, _config(model))
        if component in ("unet", "vae"):
            model.load_state_dict(state, strict=True, assign=True)
            models[component] = model.eval()
        else:
            cls = CLIPTextModel if component == "text_encoder" else CLIPTextModelWithProjection
            models[component] = cls.from_pretrained(None, config=model.config, state_dict=state, dtype=dtype)
        left = [n for n, t in [*models[component].named_parameters(), *models[component].named_buffers()]
                if t.is_meta]
        if left:
            raise ModelLoadError(f"{component} was left without weights for {left[0]}")
    return models


def load_single_file(path: str | os.PathLike[str], torch_dtype: torch.dtype,
                     on_progress: Callable[[float], None] | None = None) -> StableDiffusionXLPipeline:
    """An SDXL pipeline from a single-file checkpoint, offline: configs and tokenizers come from assets/.

    `on_progress(fraction)` hears how much of the file's weights has been read.

    We convert the keys ourselves: diffusers 0.42.1's `from_single_file` picks the text encoder by
    width, so when TE1 and TE2 are equally wide (the tiny model) it loads TE1's weights into TE2.
    """
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    path = Path(path)
    shapes, _ = read_header(path)
    arch = classify(shapes, path.name)
    check_keys(shapes, arch, path.name)
    log.info("loading %s as %s in %s", path.name, arch.value, torch_dtype)
    try:
        total = sum(_numel(shape) for shape in shapes.values()) or 1
        done = [0]

        with safe_open(str(path), framework="pt") as f:
            def get(name: str) -> torch.Tensor:
                tensor = f.get_tensor(name)
                if on_progress is not None:
                    done[0] += tensor.numel()
                    on_progress(min(1.0, done[0] / total))
                return tensor

            models = _build(arch, get, torch_dtype)
        pipe = StableDiffusionXLPipeline.from_pretrained(str(arch.config_dir), local_files_only=True, **models)
    except ModelLoadError as err:
        raise ModelLoadError(f"{path.name}: {err}") from err
    except MemoryError as err:
        raise OutOfMemory(f"{path.name}: not enough RAM to load it as {arch.value} in {torch_dtype}") from err
    except Exception as err:  # whatever broke inside diffusers/transformers, the user gets one line naming the file
        first = (str(err).strip().splitlines() or [err.__class__.__name__])[0]
        raise ModelLoadError(f"{path.name}: could not be loaded as {arch.value}: {first}") from err
    return pipe


def save_single_file(pipe: StableDiffusionXLPipeline, path: str | os.PathLike[str],
                     dtype: torch.dtype | None = None) -> None:
    """Write the pipeline as one SGM-layout safetensors file, atomically: a crash leaves no half file."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"{path.name}: a single-file checkpoint must end in .safetensors")
    state = to_sgm_state_dict(pipe)
    if dtype is not None:
        state = {k: t.to(dtype) if t.is_floating_point() else t for k, t in state.items()}
    state = {k: t.detach().to("cpu").contiguous() for k, t in state.items()}
    partial = path.with_name(path.name + ".partial")
    try:
        save_file(state, str(partial), metadata=dict(SAFETENSORS_METADATA))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    log.info("saved %s (%d tensors)", path.name, len(state))
