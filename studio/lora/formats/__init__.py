"""From a file's tensors to layer patches: split keys, group them per module, build each.

A key is `<prefix>.<suffix>`; the suffix names the part (`lora_down.weight`,
`hada_w1_a`, `lora_A.weight`, `diff`, ...), the prefix names the module and is resolved
by the `ModelIndex`. The parts present in a group decide the algorithm; one module
per algorithm builds the patch (kohya LoRA/LoCon, peft, LoHa, LoKr, full diff), and
DoRA wraps any of them when a `dora_scale` / `lora_magnitude_vector` is present.
Keys with an unknown suffix or a prefix that names no module are returned as
unmatched so the caller can show them; nothing is skipped silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from studio.lora.base import LayerPatch
from studio.lora.formats import dora, full, kohya, loha, lokr, peft
from studio.lora.formats.common import LayerGroup, ParseContext
from studio.lora.keymap import ModelIndex

# key suffix -> canonical part name
SUFFIXES: dict[str, str] = {
    "lora_down.weight": "lora_down", "lora_up.weight": "lora_up", "lora_mid.weight": "lora_mid",
    "alpha": "alpha", "dora_scale": "dora_scale",
    "lora_A.weight": "lora_A", "lora_B.weight": "lora_B",
    "lora.down.weight": "lora_A", "lora.up.weight": "lora_B",
    "lora_linear_layer.down.weight": "lora_A", "lora_linear_layer.up.weight": "lora_B",
    "down.weight": "lora_A", "up.weight": "lora_B",  # attn-proc era: `to_q_lora.down.weight`
    "lora_magnitude_vector": "magnitude", "lora_magnitude_vector.weight": "magnitude",
    "diff": "diff", "diff_b": "diff_b",
    **{p: p for p in loha.PARTS + lokr.PARTS},
}
_BY_LENGTH = sorted(SUFFIXES, key=len, reverse=True)

ALGORITHMS = {"lora": kohya, "peft": peft, "loha": loha, "lokr": lokr, "full": full}
_ALGO_PARTS = {name: set(mod.PARTS) for name, mod in ALGORITHMS.items()}


def split_key(key: str) -> tuple[str, str] | None:
    """(prefix, canonical part) of a key, or None when the suffix is not a LoRA part."""
    for suffix in _BY_LENGTH:
        if key.endswith("." + suffix) and len(key) > len(suffix) + 1:
            return key[: -len(suffix) - 1], SUFFIXES[suffix]
    return None


def algorithm_of(parts: set[str]) -> str | None:
    """The one algorithm the parts belong to; ValueError when they mix two, None when none."""
    found = [name for name, names in _ALGO_PARTS.items() if parts & names]
    if len(found) > 1:
        raise ValueError(f"mixes {' and '.join(found)} tensors")
    return found[0] if found else None


@dataclass
class Parsed:
    """What the tensors of a file amount to."""

    format: str
    patches: list[LayerPatch] = field(default_factory=list)
    unmatched_keys: list[str] = field(default_factory=list)


def format_label(algorithms: set[str], has_dora: bool, has_conv: bool) -> str:
    """One word for the file, most specific first (LoraFile.format)."""
    if has_dora:
        return "dora"
    for name in ("lokr", "loha"):
        if name in algorithms:
            return name
    if "lora" in algorithms:
        return "locon" if has_conv else "kohya"
    if "peft" in algorithms:
        return "peft"
    return "full" if "full" in algorithms else "unknown"


def guess_format(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """The format label from the header alone (key names and shapes; no tensor read)."""
    parts: dict[str, tuple[int, ...]] = {}
    for key, shape in shapes.items():
        split = split_key(key)
        if split is not None:
            parts.setdefault(split[1], tuple(shape))
            if len(shape) == 4 and split[1] in ("lora_down", "lora_A", "hada_w1_b", "lokr_w2", "diff"):
                parts["conv"] = tuple(shape)
    algos = {name for name, names in _ALGO_PARTS.items() if parts.keys() & names}
    has_conv = "conv" in parts or "lora_mid" in parts
    return format_label(algos, bool(parts.keys() & {"dora_scale", "magnitude"}), has_conv)


def parse_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], index: ModelIndex) -> Parsed:
    """Group, resolve and build every layer. Raises ValueError for a broken layer (shapes, parts)."""
    groups: dict[str, LayerGroup] = {}
    unmatched: list[str] = []
    for key in sorted(tensors):
        split = split_key(key)
        target = index.resolve(split[0]) if split is not None else None
        if split is None or target is None:
            unmatched.append(key)
            continue
        prefix, part = split
        group = groups.setdefault(prefix, LayerGroup(prefix, target, {}))
        group.parts[part] = tensors[key]
        group.keys[part] = key

    ctx = ParseContext(dict(metadata))
    claimed: dict[tuple[str, str], str] = {}
    patches: list[LayerPatch] = []
    algorithms: set[str] = set()
    has_dora = has_conv = False
    for prefix, group in groups.items():
        try:
            algo = algorithm_of(set(group.parts))
        except ValueError as err:
            raise ValueError(f"{group.where} {err}") from None
        if algo is None:  # only alpha / dora_scale: nothing to apply
            raise ValueError(f"incomplete {group.where}: it has only {', '.join(sorted(group.keys.values()))}")
        where = (group.target.component, group.target.path)
        if where in claimed:  # e.g. SGM and diffusers names for the same layer in one file
            raise ValueError(f"{group.where} is also addressed by key {claimed[where]}; the file names it twice")
        claimed[where] = prefix
        patch = ALGORITHMS[algo].build(group, ctx)
        if "dora_scale" in group.parts:
            patch = dora.wrap_kohya(patch, group)
        elif "magnitude" in group.parts:
            patch = dora.wrap_peft(patch, group)
        has_dora |= patch.depends_on_base
        has_conv |= group.target.is_conv
        algorithms.add(algo)
        patches.append(patch)
    return Parsed(format_label(algorithms, has_dora, has_conv), patches, unmatched)
