"""Open a LoRA file: refuse what is unsafe or wrong with one clear line, parse the rest.

`read_lora` gives a `LoraFile` bound to a `ModelIndex`; `inspect_lora` reads only the
header (names, shapes, metadata) for the LoRA browser. Checks run before any tensor is
used, in the order a user would want to hear about them: missing / directory / empty,
pickle (never unpickled: .ckpt/.pt/.bin or pickle/zip magic bytes), corrupt or
truncated header, not a LoRA at all (a checkpoint: plain weights), wrong base model, NaN/Inf,
keys that match nothing, shape mismatch. Reading changes nothing, so a refused file leaves the
model as it was. No message echoes a file's bytes (its header length, its size): an error can
reach a visitor through the public link.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from studio.errors import LoraError
from studio.file_formats import MAX_HEADER_BYTES, PICKLE_SUFFIXES, SAFETENSORS_DTYPE_BYTES
from studio.lora import file_metadata as md
from studio.lora.base import LoraFile
from studio.lora.formats import guess_format, parse_tensors, split_key
from studio.lora.formats.common import all_finite
from studio.lora.keymap import ModelIndex

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class Header:
    """A validated safetensors header: where each tensor's bytes are, and the metadata."""

    length: int  # bytes of JSON after the 8-byte length
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    metadata: dict[str, str]


@dataclass(frozen=True)
class LoraInfo:
    """What the browser shows about a LoRA file, from its header alone."""

    path: Path
    name: str
    size_bytes: int
    format: str
    base_model: str
    base_model_evidence: str
    n_tensors: int
    components: tuple[str, ...]
    title: str
    trigger_words: list[str] = field(default_factory=list)
    thumbnail: tuple[str, bytes] | None = None
    short_hash: str | None = None  # from `sshs_model_hash`, or computed when asked for
    metadata: dict[str, str] = field(default_factory=dict)


def _fail(path: Path, reason: str) -> LoraError:
    return LoraError(f"LoRA {path.name}: {reason}")


def _looks_pickled(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _check_path(path: Path) -> int:
    if not path.exists():
        raise LoraError(f"LoRA file not found: {path}")
    if path.is_dir():
        raise LoraError(f"LoRA path is a directory, not a file: {path}")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _fail(path, f"{path.suffix} files are Python pickles, which can run code when loaded; "
                          "LoRA Studio never unpickles. Use the .safetensors version of this LoRA")
    size = path.stat().st_size
    if size == 0:
        raise _fail(path, "the file is empty (0 bytes)")
    return size


def _parse_header(path: Path, size: int) -> Header:
    """Validate the header against the file size (truncation shows here, before any tensor read)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8).ljust(8, b"\0"), "little")
        if size < 8 or n == 0 or n > MAX_HEADER_BYTES or 8 + n > size:
            # No numbers: the "length" is the file's first 8 bytes, whatever the file is (issue 11).
            raise ValueError("not a safetensors file, or a truncated one (its header does not fit the file)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"corrupt header (not valid JSON: {err.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise ValueError("corrupt header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise ValueError("corrupt header (__metadata__ is not an object)")
    data_size = size - 8 - n
    shapes, dtypes, end_max = {}, {}, 0
    for key, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"corrupt header entry for tensor {key}") from None
        if dtype not in SAFETENSORS_DTYPE_BYTES or any(s < 0 for s in shape) or not 0 <= start <= end:
            raise ValueError(f"corrupt header entry for tensor {key} ({dtype}, {list(shape)})")
        if end - start != math.prod(shape) * SAFETENSORS_DTYPE_BYTES[dtype]:
            raise ValueError(f"corrupt header: tensor {key} {dtype}{list(shape)} does not fit its byte range")
        if end > data_size:
            raise ValueError(f"truncated: tensor {key} ends past the end of the file")
        shapes[key], dtypes[key], end_max = shape, dtype, max(end_max, end)
    return Header(n, shapes, dtypes, {str(k): str(v) for k, v in meta.items()})


def read_header(path: str | Path) -> Header:
    """The validated header of a safetensors LoRA file; LoraError for anything unreadable."""
    path = Path(path)
    size = _check_path(path)
    try:
        return _parse_header(path, size)
    except ValueError as err:
        if _looks_pickled(path):
            raise _fail(path, "this is a pickle (zip/pickle magic bytes) under a safetensors name; "
                              "LoRA Studio never unpickles") from None
        raise _fail(path, str(err)) from None


# A LoRA's tensors are parts of patches (`lora_down`, `hada_w1_a`, `diff`, `alpha`, ...); a checkpoint's
# are plain weights. A few plain tensors ride along in real LoRAs (bundled embeddings); an SDXL
# checkpoint has ~2,500 of them. The largest LoRA layouts (LoKr/DoRA over every SDXL layer, both
# text encoders) stay under ~8,000 tensors.
MAX_PLAIN_TENSORS = 64
MAX_LORA_TENSORS = 20_000
CHECKPOINT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.",
                       "cond_stage_model.")


def _check_is_lora(path: Path, header: Header) -> None:
    """Refuse a checkpoint (or any plain weights file) from its header, before a tensor is read."""
    count = len(header.shapes)
    if count > MAX_LORA_TENSORS:
        raise _fail(path, f"{count} tensors is more than any LoRA has; is this a model checkpoint?")
    plain = [key for key in header.shapes if split_key(key) is None]
    if len(plain) > MAX_PLAIN_TENSORS and 2 * len(plain) > count:
        example = next((k for k in plain if k.startswith(CHECKPOINT_PREFIXES)), plain[0])
        raise _fail(path, f"not a LoRA: {len(plain)} of its {count} tensors are plain model weights (e.g. {example}), "
                          "as in a checkpoint. A model goes in the `model` setting; a LoRA folder holds LoRAs")


def _check_base(path: Path, header: Header) -> tuple[str, str]:
    base, evidence = md.detect_base_model(header.metadata, header.shapes)
    if base not in ("sdxl", "unknown"):
        raise _fail(path, f"this LoRA is for {md.BASE_MODEL_NAMES.get(base, base)}, not SDXL ({evidence}); "
                          "use an SDXL LoRA")
    return base, evidence


def _load_tensors(path: Path, header: Header) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in header.shapes:
                tensors[key] = f.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError) as err:  # offsets our header check allows but the format not
        raise _fail(path, f"corrupt tensor data ({err})") from None
    if not all_finite(tensors.values()):  # one min/max per dtype, not two ops per tensor
        for key, t in tensors.items():  # only for a broken file: name the first bad tensor
            if t.is_floating_point():
                finite = torch.isfinite(t.float())
                if not bool(finite.all()):
                    what = "NaN" if bool(torch.isnan(t.float()).any()) else "Inf"
                    raise _fail(path, f"tensor {key} contains {what} values ({int((~finite).sum())} of {t.numel()}); "
                                      "the file is broken")
    return tensors


def read_lora(path: str | Path, index: ModelIndex) -> LoraFile:
    """Parse a LoRA file into per-layer patches for the model `index` describes."""
    path = Path(path)
    header = read_header(path)
    _check_is_lora(path, header)
    base, _ = _check_base(path, header)
    tensors = _load_tensors(path, header)
    try:
        parsed = parse_tensors(tensors, header.metadata, index)
    except ValueError as err:
        raise _fail(path, str(err)) from None
    if not parsed.patches:
        examples = ", ".join(parsed.unmatched_keys[:3])
        raise _fail(path, f"none of its {len(tensors)} keys matches a layer of this SDXL model (e.g. {examples})")
    if parsed.unmatched_keys:
        logger.info("%s: %d of %d keys match no layer (e.g. %s)", path.name, len(parsed.unmatched_keys),
                    len(tensors), ", ".join(parsed.unmatched_keys[:3]))
    metadata = {k: v for k, v in header.metadata.items() if k not in md.THUMBNAIL_KEYS}
    return LoraFile(path=path, name=path.stem, format=parsed.format, base_model="sdxl" if base == "unknown" else base,
                    short_hash=md.short_hash(path, header.length, header.metadata), metadata=metadata,
                    patches=parsed.patches, unmatched_keys=parsed.unmatched_keys)


def inspect_lora(path: str | Path, with_hash: bool = False) -> LoraInfo:
    """Header-only summary for the browser; `with_hash` also reads the tensor bytes for the hash.

    A file for another base model is reported (base_model says which), not refused:
    the browser shows it greyed out rather than hiding it.
    """
    path = Path(path)
    header = read_header(path)
    _check_is_lora(path, header)  # a checkpoint in a LoRA folder shows as not usable, with the reason
    base, evidence = md.detect_base_model(header.metadata, header.shapes)
    components = sorted({c for k in header.shapes for c, heads in _COMPONENT_HEADS.items() if k.startswith(heads)})
    meta = header.metadata
    stored = md.short_hash(path, header.length, meta) if with_hash or "sshs_model_hash" in meta else None
    return LoraInfo(path=path, name=path.stem, size_bytes=path.stat().st_size, format=guess_format(header.shapes),
                    base_model=base, base_model_evidence=evidence, n_tensors=len(header.shapes),
                    components=tuple(components),
                    title=meta.get("modelspec.title") or meta.get("ss_output_name") or path.stem,
                    trigger_words=md.trigger_words(meta), thumbnail=md.thumbnail(meta), short_hash=stored,
                    metadata={k: v for k, v in meta.items() if k not in md.THUMBNAIL_KEYS})


_COMPONENT_HEADS = {"unet": ("lora_unet_", "unet.", "diffusion_model.", "model.diffusion_model."),
                    "text_encoder": ("lora_te1_", "lora_te_", "text_encoder."),
                    "text_encoder_2": ("lora_te2_", "text_encoder_2.")}
