"""LoRA Block Weight (sd-webui-lora-block-weight's conventions) for SDXL: which block a layer is in,
the presets, and the per-layer weight the patcher merges with.

Blocks are named by the original (SGM) UNet layout, as the extension names them from kohya keys
(`diffusion_model_input_blocks_4_` -> IN04; `middle_block` -> MID; `output_blocks_0_` -> OUT00;
text encoders -> BASE; scripts/lora_block_weight.py `BLOCKS`/`ratiodealer`):
- 20 values, its "SDXL - LyCORIS/LoCon" layout: BASE IN00..IN08 MID OUT00..OUT08 (every SDXL block);
- 12 values, its "SDXL LoRA" layout: BASE IN04 IN05 IN07 IN08 MID OUT0..OUT5, the blocks holding
  SDXL's transformer layers (all a kohya LoRA trains). Blocks a 12-value vector does not list
  weigh 0, the extension's rule (`to26`: "any layers not provided will be treated as having a
  weight of 0"); they only hold LoCon/LyCORIS conv layers.
- A layer in no block (time/label embedding, conv_out) keeps the plain UNet weight (the extension's
  `ratiodealer` default ratio of 1).
Text-encoder layers weigh `te x BASE`, UNet layers `unet x block value`: the patcher sees that
product as the layer's weight, so its per-tensor signature changes exactly where a value moved.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from studio.errors import SettingsError
from studio.lora.spec import PRESET_NAME, LoraSpec, fmt, parse_number

BLOCKS_20 = ("BASE", *(f"IN{i:02d}" for i in range(9)), "MID", *(f"OUT{i:02d}" for i in range(9)))
BLOCKS_12 = ("BASE", "IN04", "IN05", "IN07", "IN08", "MID", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05")
# How the extension's README labels the 12 SDXL sliders.
LABELS_12 = ("BASE", "IN04", "IN05", "IN07", "IN08", "MID", "OUT0", "OUT1", "OUT2", "OUT3", "OUT4", "OUT5")
BASE = 0
_ORDER = {name: i for i, name in enumerate(BLOCKS_20)}


def _v12(*values: float) -> tuple[float, ...]:
    assert len(values) == 12
    return tuple(float(v) for v in values)


# The extension ships its presets for SD1.x's 17 blocks (DEF_WEIGHT_PRESET) and gives SDXL ones in its
# README (INS, MID, OUTD as 12 values); the others here are its names with the same meaning on SDXL's
# 12 blocks (IN04/05 shallow, IN07/08 deep; OUT0-2 deep, OUT3-5 shallow). ALL, NONE and ALL0.5 are
# uniform over all 20 blocks, so `lbw=ALL` means "as without lbw" for LoCon files too.
PRESETS: dict[str, tuple[float, ...]] = {
    "NONE": (0.0,) * 20,
    "ALL": (1.0,) * 20,
    "ALL0.5": (0.5,) * 20,
    "INS": _v12(1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "IND": _v12(1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0),
    "INALL": _v12(1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0),
    "MID": _v12(1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0),
    "MIDD": _v12(1, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0),
    "OUTD": _v12(1, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0),
    "OUTS": _v12(1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1),
    "OUTALL": _v12(1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1),
}


def expand(values: tuple[float, ...]) -> tuple[float, ...]:
    """12 or 20 values -> the 20-block vector (blocks a 12-vector leaves out weigh 0)."""
    if len(values) == 20:
        return tuple(values)
    out = [0.0] * 20
    for name, value in zip(BLOCKS_12, values):
        out[_ORDER[name]] = value
    return tuple(out)


def compact(values: tuple[float, ...]) -> tuple[float, ...]:
    """The 12-value form when the 8 blocks it leaves out are all 0, else the 20 values."""
    values = expand(values)
    if all(values[i] == 0.0 for i, n in enumerate(BLOCKS_20) if n not in BLOCKS_12):
        return tuple(values[_ORDER[n]] for n in BLOCKS_12)
    return values


def vector_text(values: tuple[float, ...]) -> str:
    return ",".join(fmt(v) for v in values)


def parse_presets(text: str) -> dict[str, tuple[float, ...]]:
    """User presets in the extension's preset-file format: `NAME:v1,v2,...` per line (12 or 20 values).

    Blank lines and lines starting with `#` are comments. A bad line is an error naming it (the
    extension silently skips lines it cannot read).
    """
    presets: dict[str, tuple[float, ...]] = {}
    for number, line in enumerate((text or "").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, colon, values = line.partition(":")
        name = name.strip()
        if not colon or not PRESET_NAME.fullmatch(name):
            raise SettingsError(f"`lbw_presets` line {number}: expected NAME:v1,v2,... (12 or 20 numbers), "
                                f"got {line!r}")
        try:
            presets[name] = _values(values, f"`lbw_presets` line {number} ({name})")
        except SettingsError as err:
            raise SettingsError(str(err)) from None
    return presets


def _values(text: str, what: str) -> tuple[float, ...]:
    values = tuple(parse_number(v, f"{what} value") for v in text.split(","))
    if len(values) not in (12, 20):
        raise SettingsError(f"{what}: a block-weight vector has 12 values (SDXL LoRA: {' '.join(LABELS_12)}) or "
                            f"20 (LyCORIS: BASE IN00..IN08 MID OUT00..OUT08), got {len(values)}")
    return values


def resolve_lbw(spec: LoraSpec, presets: Mapping[str, tuple[float, ...]]) -> tuple[float, ...] | None:
    """The 20-block vector `spec.lbw` names (None without lbw); an error naming the LoRA otherwise."""
    if not spec.lbw:
        return None
    if PRESET_NAME.fullmatch(spec.lbw):
        known = {**PRESETS, **presets}
        if spec.lbw not in known:
            raise SettingsError(f"LoRA `{spec.name}`: unknown block-weight preset lbw={spec.lbw}; known: "
                                f"{', '.join(sorted(known))} (add your own under Preferences -> LoRA block presets)")
        return expand(known[spec.lbw])
    return expand(_values(spec.lbw, f"LoRA `{spec.name}` lbw="))


_SGM_BLOCK = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.|middle_block\.")


def block_of(component: str, sgm_path: str | None) -> int | None:
    """Index into BLOCKS_20 of a layer: BASE for the text encoders, the SGM block for the UNet, None
    for UNet layers in no block (or beyond SDXL's 9 input/output blocks)."""
    if component != "unet":
        return BASE
    m = _SGM_BLOCK.match(sgm_path or "")
    if m is None:
        return None
    if m.group(1) is None:
        return _ORDER["MID"]
    kind, n = m.group(1), int(m.group(2))
    if n > 8:
        return None
    return _ORDER[f"{'IN' if kind == 'input_blocks' else 'OUT'}{n:02d}"]


BlockLookup = Callable[[str, str], "int | None"]  # (component, module path) -> block index or None


@dataclass(frozen=True)
class LayerWeights:
    """Per-layer LoRA weights: `of(patch)` is what the patcher multiplies that layer's delta by.

    Equal objects mean equal weights on every layer (the lookup is the model's, not compared).
    """

    te: float
    unet: float
    blocks: tuple[float, ...] | None = None  # 20 values, or None: no block weights
    lookup: BlockLookup | None = field(default=None, compare=False, repr=False)

    def of(self, patch) -> float:
        if patch.component != "unet":
            return self.te * (self.blocks[BASE] if self.blocks else 1.0)
        if not self.blocks or self.lookup is None:
            return self.unet
        index = self.lookup(patch.component, patch.module)
        return self.unet if index is None else self.unet * self.blocks[index]

    def text_encoders(self) -> float:
        """The one weight every text-encoder layer gets."""
        return self.te * (self.blocks[BASE] if self.blocks else 1.0)


def layer_weights(spec: LoraSpec, blocks: tuple[float, ...] | None, lookup: BlockLookup | None,
                  unet_scale: float = 1.0) -> float | LayerWeights:
    """What the patcher gets for this LoRA: a plain float when every layer weighs the same (the
    fast path, bit-identical to before block weights), else a LayerWeights. `unet_scale` is 0
    while a step range keeps the LoRA's UNet part off."""
    te, unet = spec.te_weight, spec.unet_weight * unet_scale
    if blocks is None and te == unet:
        return te
    if blocks is not None and all(v == 1.0 for v in blocks) and te == unet:
        return te
    return LayerWeights(te, unet, blocks, lookup)
