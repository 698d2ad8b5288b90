"""What each phase's patcher gets from a stack, step by step.

A stack item's spec gives the text encoders `te x BASE` and the UNet `unet x block value`
(studio.lora.block_weights); a step range (`start=`/`stop=`) turns the UNet part off outside
its steps. The text encoders run once, before the first step, so a step range never changes
them (as in sd-webui-lora-block-weight, whose step switch only re-patches the UNet).
"""

from __future__ import annotations

from collections.abc import Sequence

from studio.lora.block_weights import BlockLookup, LayerWeights, layer_weights
from studio.lora.stack import StackItem
from studio.phases import PHASE_COMPONENTS, Component, Phase

TEXT_ENCODERS = (Component.TEXT_ENCODER, Component.TEXT_ENCODER_2)


def phase_weight(item: StackItem, phase: Phase, lookup: BlockLookup | None, unet_on: bool = True
                 ) -> float | LayerWeights:
    """The weight the phase's patcher merges `item` with: a float wherever one number covers the
    phase's layers (the patcher's fast path), else per-layer weights."""
    w = layer_weights(item.spec, item.blocks, lookup, 1.0 if unet_on else 0.0)
    if isinstance(w, float):
        return w
    parts = PHASE_COMPONENTS[phase]
    unet, text = Component.UNET in parts, any(p in parts for p in TEXT_ENCODERS)
    if text and not unet:
        return w.text_encoders()
    if unet and not text and (w.unet == 0.0 or w.blocks is None):
        return w.unet
    return w


def has_ranges(items: Sequence[StackItem]) -> bool:
    return any(not item.spec.steps.always for item in items)


def active(item: StackItem, index: int, steps: int) -> bool:
    """Whether the item's UNet part runs in denoise step `index` (0-based) of `steps`."""
    return item.spec.steps.always or item.spec.steps.active(index, steps)


def ever_active(item: StackItem, steps: int) -> bool:
    first, end = item.spec.steps.bounds(steps)
    return item.spec.steps.always or min(end, steps) > max(first, 0)


def boundaries(items: Sequence[StackItem], steps: int) -> list[int]:
    """The steps (1..steps-1) before which the set of active LoRAs changes."""
    sets = [tuple(active(item, i, steps) for item in items) for i in range(steps)]
    return [i for i in range(1, steps) if sets[i] != sets[i - 1]]


def range_notes(items: Sequence[StackItem], steps: int) -> list[str]:
    """What the report says about step ranges that leave a LoRA's UNet part off altogether."""
    notes = []
    for item in items:
        if not item.spec.steps.always and not ever_active(item, steps):
            first, end = item.spec.steps.bounds(steps)
            notes.append(f"LoRA {item.name}: its step range ({first} to {end}) holds none of the {steps} steps, "
                         "so only its text-encoder part ran")
    return notes
