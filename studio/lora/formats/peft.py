"""diffusers/peft LoRA: `lora_A.weight` (down) and `lora_B.weight` (up).

Convention (peft tuners/lora/layer.py, diffusers loaders/lora_base.py):

- lora_A [r, in(, kh, kw)], lora_B [out, r(, 1, 1)]; delta = scaling * B @ A.
- scaling = lora_alpha / r (or / sqrt(r) with use_rslora). The alpha comes from the
  `lora_adapter_metadata` JSON that diffusers writes into the safetensors header:
  per component with a prefix ("unet.lora_alpha", "text_encoder.alpha_pattern", ...) from
  `pipe.save_lora_weights`, or unprefixed from `model.save_lora_adapter`. An
  `alpha_pattern` entry whose regex matches the module path wins over `lora_alpha`,
  as in peft. r is read from the tensors. Without metadata the scale is 1 (diffusers'
  behaviour); a per-layer `.alpha` tensor, when a converter left one, is honoured.
- Older diffusers spellings are the same math: `lora.down/up.weight`,
  `lora_linear_layer.down/up.weight`, attention-processor `to_q_lora.down/up.weight`.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from studio.lora.base import LayerPatch, LowRankPatch
from studio.lora.formats.common import LayerGroup, ParseContext, alpha_scale, check_low_rank, scalar

logger = logging.getLogger(__name__)

PARTS = ("lora_A", "lora_B")
METADATA_KEY = "lora_adapter_metadata"


def adapter_configs(metadata: dict[str, str]) -> dict[str, dict[str, Any]]:
    """{component or "": LoraConfig fields} from the diffusers metadata JSON ({} when absent)."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        logger.info("ignoring unreadable %s metadata", METADATA_KEY)
        return {}
    if not isinstance(data, dict):
        return {}
    configs: dict[str, dict[str, Any]] = {}
    for key, value in data.items():
        component, _, field = key.rpartition(".")
        configs.setdefault(component, {})[field] = value
    return configs


def _pattern_alpha(patterns: dict[str, Any], paths: list[str]) -> float | None:
    """peft's rule: a pattern key matches a module path that ends with it (regex allowed)."""
    for pattern, value in patterns.items():
        for path in paths:
            try:
                if re.match(rf"(.*\.)?({pattern})$", path):
                    return float(value)
            except re.error:
                if path == pattern or path.endswith(f".{pattern}"):
                    return float(value)
    return None


def layer_scale(group: LayerGroup, ctx: ParseContext, rank: int) -> float:
    """alpha / r for this layer: per-layer .alpha tensor, else metadata, else 1."""
    alpha = scalar(group, "alpha")
    if alpha is not None:
        return alpha_scale(alpha, rank)
    configs = ctx.cache.get("peft_configs")
    if configs is None:
        configs = ctx.cache["peft_configs"] = adapter_configs(ctx.metadata)
    config = configs.get(group.target.component) or configs.get("") or {}
    if "lora_alpha" not in config and "alpha_pattern" not in config:
        return 1.0
    file_path = group.prefix.split(".", 1)[1] if group.prefix.startswith(group.target.component + ".") else group.prefix
    alpha = _pattern_alpha(config.get("alpha_pattern") or {}, [file_path, group.target.path])
    if alpha is None:
        alpha = float(config.get("lora_alpha", rank))
    return alpha_scale(alpha, rank, rs_lora=bool(config.get("use_rslora", False)))


def build(group: LayerGroup, ctx: ParseContext) -> LayerPatch:
    down, up = group.get("lora_A"), group.get("lora_B")
    if down is None or up is None:
        raise ValueError(f"incomplete {group.where}: {'lora_A' if down is None else 'lora_B'} is missing")
    check_low_rank(group, up, down, "lora_B x lora_A")
    scale = layer_scale(group, ctx, down.shape[0])
    return LowRankPatch(group.target.component, group.target.path, up, down, scale, group.target.shape)
