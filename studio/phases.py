"""The parts of an SDXL pipeline and the phases of a generation, defined once.

A phase is a step of one generation that needs some components on the device: the memory
engine places them for it (`Placement.phase`), the LoRA engine patches their LoRAs in it.
Adding a phase (a refiner, a ControlNet) means adding it here and one `with` in the
generation; nothing else keeps a list of phases.
"""

from __future__ import annotations

from enum import StrEnum


class Component(StrEnum):
    """A pipeline attribute holding an `nn.Module` (`pipe.unet`, ...)."""

    TEXT_ENCODER = "text_encoder"  # CLIP-L (LoRA prefix lora_te1_)
    TEXT_ENCODER_2 = "text_encoder_2"  # OpenCLIP bigG (lora_te2_)
    UNET = "unet"
    VAE = "vae"


class Phase(StrEnum):
    TEXT_ENCODE = "text_encode"
    DENOISE = "denoise"
    DECODE = "decode"


# What each phase holds on the device, in the order the generation runs them.
PHASE_COMPONENTS: dict[Phase, tuple[Component, ...]] = {
    Phase.TEXT_ENCODE: (Component.TEXT_ENCODER, Component.TEXT_ENCODER_2),
    Phase.DENOISE: (Component.UNET,),
    Phase.DECODE: (Component.VAE,),
}

# The components a LoRA file can patch (the VAE never is).
LORA_TARGETS: tuple[Component, ...] = (Component.UNET, Component.TEXT_ENCODER, Component.TEXT_ENCODER_2)


def phase_of(component: Component | str) -> Phase:
    """The phase that holds `component` on the device."""
    component = Component(component)
    return next(phase for phase, parts in PHASE_COMPONENTS.items() if component in parts)
