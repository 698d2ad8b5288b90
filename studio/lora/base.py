"""What a parsed LoRA file is: per-layer patches that answer "what is your delta".

The patcher only talks to this interface; one module per format (kohya LoRA/LoCon,
LoHa, LoKr, DoRA, peft, full diff) builds these objects from a file. Conventions:

- A patch targets one module of one pipeline component: `component` is
  "unet", "text_encoder" or "text_encoder_2"; `module` is the diffusers/transformers
  module path inside it (e.g. "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q").
- `delta(base)` is the dense change of that module's `weight` at user weight 1.0, in
  float32, with the file's own scale (alpha / rank) already applied. `base` is the
  pristine weight (float32); only formats whose delta depends on it (DoRA) read it.
- `factors()` returns (up, down) in float32 with up @ down == delta(base).flatten(1)
  when the delta is low-rank and independent of the base weight; the patcher then
  fuses all LoRAs of a layer into one addmm, and sidecar mode runs x -> down -> up.
  It returns None for formats that are not (LoHa, LoKr, DoRA, full diff).
- `bias_delta` is the change of the module's bias, if the file has one (full diff).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import torch


class LayerPatch(ABC):
    """One layer's change, as stored in a LoRA file."""

    component: str
    module: str
    bias_delta: torch.Tensor | None = None

    @abstractmethod
    def delta(self, base: torch.Tensor) -> torch.Tensor:
        """Dense float32 delta of the weight at user weight 1.0 (file scale included)."""

    def factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(up [out, r], down [r, in*kh*kw]) in float32 when the delta is low-rank, else None."""
        return None

    @property
    def depends_on_base(self) -> bool:
        """True when delta() reads the base weight (DoRA): it cannot be summed blindly."""
        return False

    @abstractmethod
    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this patch holds (for byte accounting and device moves)."""

    @property
    def nbytes(self) -> int:
        extra = [self.bias_delta] if self.bias_delta is not None else []
        return sum(t.numel() * t.element_size() for t in self.tensors() + extra)


class LowRankPatch(LayerPatch):
    """delta = scale * up @ down (Linear, or conv with down carrying the kernel)."""

    def __init__(self, component: str, module: str, up: torch.Tensor, down: torch.Tensor, scale: float,
                 weight_shape: tuple[int, ...]):
        self.component = component
        self.module = module
        self.up = up.reshape(up.shape[0], -1)  # [out, r]
        self.down = down.reshape(down.shape[0], -1)  # [r, in*kh*kw]
        self.scale = float(scale)
        self.weight_shape = tuple(weight_shape)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.up.float() * self.scale, self.down.float()

    def delta(self, base: torch.Tensor) -> torch.Tensor:
        up, down = self.factors()
        return (up @ down).reshape(self.weight_shape)

    def tensors(self) -> list[torch.Tensor]:
        return [self.up, self.down]


@dataclass
class LoraFile:
    """A parsed LoRA file, bound to the module names of one model architecture."""

    path: Path
    name: str  # file stem, as used in <lora:name:weight>
    format: str  # "kohya", "locon", "loha", "lokr", "dora", "peft", "full"
    base_model: str  # "sdxl", or what the file says / looks like ("sd1", "sd2", "flux", ...)
    short_hash: str  # A1111 "Lora hashes" value: first 12 hex of the tensor-data sha256
    metadata: dict[str, str] = field(default_factory=dict)
    patches: list[LayerPatch] = field(default_factory=list)
    unmatched_keys: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.patches)
