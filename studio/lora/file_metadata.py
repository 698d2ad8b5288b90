"""What a LoRA file says about itself: base model, trigger words, cover image, A1111 hash.

All of it comes from the safetensors header (names, shapes, `__metadata__`), so a
browser can show it without reading tensors; only the hash reads the tensor bytes.

- Base model: kohya's `ss_base_model_version` / `ss_v2` and the modelspec
  `modelspec.architecture` first; without them, key and shape evidence (SD1/SD2 have a
  4th UNet level and attention at level 0, Flux/SD3 are transformers with their own block
  names). "unknown" means no evidence either way; the key match then decides.
- Trigger words: `ss_tag_frequency` ({dataset folder: {tag: count}}) summed over folders and
  sorted by count (ties alphabetical), after `modelspec.trigger_phrase` when present.
- Cover: `modelspec.thumbnail` (a data URI) or the first of kohya's `ssmd_cover_images`.
- Hash: A1111 `Lora hashes` uses `sshs_model_hash` from the metadata when present, else
  the "addnet" hash: sha256 of everything after the header (8-byte length + JSON), so
  editing metadata keeps the hash. The short hash is its first 12 hex characters
  (A1111 extensions-builtin/Lora/network.py `set_hash`; kohya train_util `addnet_hash_safetensors`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path

BASE_MODEL_NAMES = {"sdxl": "SDXL", "sdxl_refiner": "the SDXL refiner", "sd1": "SD 1.x", "sd2": "SD 2.x",
                    "sd3": "SD3", "flux": "Flux", "dit": "a diffusion-transformer model (SD3/Flux family)",
                    "unknown": "an unknown model"}
THUMBNAIL_KEYS = ("modelspec.thumbnail", "ssmd_cover_images")
_DATA_URI = re.compile(r"^data:(image/[\w.+-]+);base64,(.*)$", re.S)
_HEX12 = re.compile(r"^[0-9a-fA-F]{12,}$")


def _classify(text: str) -> str | None:
    t = text.lower()
    if "refiner" in t:
        return "sdxl_refiner"
    if "xl" in t:
        return "sdxl"
    if "flux" in t:
        return "flux"
    if "sd3" in t or "v3" in t or "sd_3" in t:
        return "sd3"
    if "v2" in t or "sd2" in t:
        return "sd2"
    if "v1" in t or "sd1" in t:
        return "sd1"
    return None


def _from_metadata(metadata: Mapping[str, str]) -> tuple[str, str] | None:
    for key in ("ss_base_model_version", "modelspec.architecture"):
        value = str(metadata.get(key, "")).strip()
        if value and (base := _classify(value)) is not None:
            return base, f"metadata {key}={value}"
    if str(metadata.get("ss_v2", "")) == "True":
        return "sd2", "metadata ss_v2=True"
    return None


def _from_keys(shapes: Mapping[str, tuple[int, ...]]) -> tuple[str, str] | None:
    keys = list(shapes)

    def first(*needles: str) -> str | None:
        return next((k for k in keys if any(n in k for n in needles)), None)

    if k := first("double_blocks", "single_blocks", "single_transformer_blocks"):
        return "flux", f"Flux block names (key {k})"
    if k := first("joint_blocks", "context_block", "add_q_proj"):
        return "sd3", f"SD3 block names (key {k})"
    if k := next((k for k in keys if k.startswith(("transformer.", "lora_transformer_"))), None):
        return "dit", f"transformer key names (key {k})"
    if k := first("lora_te1_", "lora_te2_", "text_encoder_2.", "input_blocks_7_1_transformer_blocks_1_",
                  "input_blocks.7.1.transformer_blocks.1."):
        return "sdxl", f"SDXL key names (key {k})"
    sd12 = first("down_blocks_0_attentions", "down_blocks.0.attentions", "down_blocks_3", "down_blocks.3.",
                 "input_blocks_1_1_", "input_blocks.1.1.", "input_blocks_10_", "output_blocks_11_")
    if sd12 is None:
        return None
    # SD1 and SD2 share the layout; SD2's OpenCLIP-H text side is 1024 wide, SD1's CLIP-L 768.
    for key, shape in shapes.items():
        if "attn2" in key and "to_k" in key and key.endswith(("lora_down.weight", "lora_A.weight")):
            if len(shape) == 2 and shape[1] in (768, 1024):
                base = "sd1" if shape[1] == 768 else "sd2"
                return base, f"SD1/SD2 block names and {shape[1]}-wide cross-attention (key {key})"
    return "sd1", f"SD1/SD2 block names (key {sd12})"


def detect_base_model(metadata: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]]) -> tuple[str, str]:
    """(base model id, the evidence in words); ("unknown", "") when the file gives none."""
    return _from_metadata(metadata) or _from_keys(shapes) or ("unknown", "")


def trigger_words(metadata: Mapping[str, str], limit: int | None = None) -> list[str]:
    """Training tags by frequency (the words that trigger the LoRA), most frequent first."""
    words: list[str] = [w.strip() for w in str(metadata.get("modelspec.trigger_phrase", "")).split(",") if w.strip()]
    counts: dict[str, int] = {}
    try:
        folders = json.loads(metadata.get("ss_tag_frequency", "") or "{}")
    except json.JSONDecodeError:
        folders = {}
    if isinstance(folders, dict):
        for tags in folders.values():
            if isinstance(tags, dict):
                for tag, count in tags.items():
                    tag = str(tag).strip()
                    if tag and isinstance(count, (int, float)):
                        counts[tag] = counts.get(tag, 0) + int(count)
    words += [t for t, _ in sorted(counts.items(), key=lambda tc: (-tc[1], tc[0])) if t not in words]
    return words[:limit] if limit is not None else words


def thumbnail(metadata: Mapping[str, str]) -> tuple[str, bytes] | None:
    """(mime type, image bytes) of the embedded cover image, or None."""
    uri = metadata.get("modelspec.thumbnail", "")
    try:
        if m := _DATA_URI.match(uri.strip()):
            return m.group(1), base64.b64decode(m.group(2), validate=False)
        covers = json.loads(metadata.get("ssmd_cover_images", "") or "[]")
        if isinstance(covers, list) and covers and isinstance(covers[0], str):
            return "image/png", base64.b64decode(covers[0])
    except (binascii.Error, ValueError):
        return None
    return None


def addnet_hash(path: Path, header_length: int) -> str:
    """sha256 hex of the tensor bytes (everything after the 8-byte length and the JSON header)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(8 + header_length)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def short_hash(path: Path, header_length: int, metadata: Mapping[str, str]) -> str:
    """A1111's `Lora hashes` value: `sshs_model_hash` when the trainer stored one, else the addnet hash."""
    stored = str(metadata.get("sshs_model_hash", "")).strip()
    if _HEX12.match(stored):
        return stored[:12].lower()
    return addnet_hash(path, header_length)[:12]
