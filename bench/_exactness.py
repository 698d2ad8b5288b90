"""Exactness checks for the switching benchmark, independent of the code under test.

After every step, a sample of touched weights (UNet and both text encoders) is compared
with `pristine + sum(w * scale * up @ down)` computed in float64 from the raw file factors
and rounded once to the weight dtype: the best any merge can do. Distances are counted in
units in the last place (ulp) of the weight dtype. An fp32-accumulated merge (ours) can
land one ulp off where the exact value sits within fp32 error of a rounding midpoint
(a few elements per million in bf16); more, or more than one ulp, means extra rounding
(diffusers rounds each delta to the weight dtype before adding it) or drift.
After a clear, every targeted weight is compared bit for bit with the pristine value.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from bench._kohya_files import RawFactors
from bench._sdxl_random import BenchModel
from studio.lora.keymap import ModelIndex, ModuleInfo

# once-rounded references kept for reuse (reduced SDXL, 50 samples: 0.3 GB a stack in bf16)
REFERENCE_CACHE_BYTES = 3 << 29
_INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


@dataclass
class SampleCheck:
    """A step's sampled weights against the exact reference."""

    tensors: int = 0
    tensors_equal: int = 0  # bit-identical to the once-rounded exact value
    elements: int = 0
    elements_off: int = 0
    max_ulp: int = 0
    max_abs: float = 0.0

    def text(self) -> str:
        if self.tensors_equal == self.tensors:
            return f"{self.tensors}/{self.tensors} bit-equal"
        return (f"{self.tensors_equal}/{self.tensors} bit-equal, {self.elements_off / max(self.elements, 1):.0e} of "
                f"elements off, max |dW| {self.max_abs:.1e}" + (" (1 ulp)" if self.max_ulp == 1 else ""))


@dataclass
class PristineCheck:
    """Every targeted weight against its pristine value (after a clear)."""

    tensors: int = 0
    differing: int = 0
    max_abs: float = 0.0

    def text(self) -> str:
        if not self.differing:
            return f"{self.tensors}/{self.tensors} bit-equal to pristine"
        return f"{self.differing}/{self.tensors} differ, max |dW| {self.max_abs:.1e}"


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """Float bits as integers that order like the floats (so a difference counts ulps)."""
    bits = t.contiguous().view(_INT_VIEW[t.dtype]).long()
    sign_bit = 1 << (8 * t.element_size() - 1)
    return torch.where(bits >= 0, bits, -(bits + sign_bit))


def choose_sample(index: ModelIndex, n: int) -> list[ModuleInfo]:
    """`n` targets spread evenly over the layers, about one in seven from each text encoder."""
    targets = index.kohya_targets()
    by_comp = {c: [i for i in targets if i.component == c] for c in ("unet", "text_encoder", "text_encoder_2")}
    n_te = max(1, n // 7)
    counts = {"text_encoder": n_te, "text_encoder_2": n_te, "unet": n - 2 * n_te}
    chosen: list[ModuleInfo] = []
    for comp, infos in by_comp.items():
        k = min(counts[comp], len(infos))
        chosen += [infos[round(j * (len(infos) - 1) / max(k - 1, 1))] for j in range(k)]
    return chosen


class Checker:
    """Holds the sampled modules (resolved before any LoRA wrapper exists) and the raw factors."""

    def __init__(self, model: BenchModel, index: ModelIndex, paths: list[Path], n: int):
        self.model = model
        self.sample = choose_sample(index, n)
        self.targets = index.kohya_targets()
        self.raw = {p: RawFactors(p, index, self.sample) for p in paths}
        # nn.Linear objects: diffusers wraps them (base_layer) but never replaces them
        self.modules: dict[tuple[str, str], nn.Module] = {
            (i.component, i.path): model.components[i.component].get_submodule(i.path) for i in self.targets}
        self._refs: dict[tuple, torch.Tensor] = {}
        self._ref_bytes = 0

    def _pristine(self, info: ModuleInfo) -> torch.Tensor:
        return self.model.pristine(info.component, f"{info.path}.weight")

    def live(self, info: ModuleInfo) -> torch.Tensor:
        return self.modules[(info.component, info.path)].weight.detach()

    def _reference(self, info: ModuleInfo, stack: list[tuple[Path, float]], dtype: torch.dtype) -> torch.Tensor:
        """pristine + sum(w * delta) in float64, rounded once to `dtype`; kept per (stack, module), since
        every peer and round asks for the same few stacks and the float64 GEMMs dominate a check."""
        key = (tuple((str(p), w) for p, w in stack), info.component, info.path, dtype)
        ref = self._refs.get(key)
        if ref is None:
            exact = self._pristine(info).double().flatten(1)
            for path, w in stack:
                d = self.raw[path].delta(info.component, info.path)
                if d is not None:
                    exact += w * d.to(exact.device)
            ref = exact.to(dtype).reshape(self.live(info).shape)
            if self._ref_bytes + ref.numel() * ref.element_size() <= REFERENCE_CACHE_BYTES:
                self._refs[key] = ref
                self._ref_bytes += ref.numel() * ref.element_size()
        return ref

    @torch.no_grad()
    def stack(self, stack: list[tuple[Path, float]]) -> SampleCheck:
        """Sampled live weights against pristine + sum(w * delta), exact then rounded once."""
        out = SampleCheck()
        for info in self.sample:
            live = self.live(info)
            ref = self._reference(info, stack, live.dtype)
            differ = live != ref
            off = int(differ.sum())
            out.tensors += 1
            out.tensors_equal += off == 0
            out.elements += live.numel()
            out.elements_off += off
            if off:  # distances of the differing elements only (int64 and float64 copies of all were slow)
                got, want = live[differ], ref[differ]
                out.max_ulp = max(out.max_ulp, int((_ordered(got) - _ordered(want)).abs().max()))
                out.max_abs = max(out.max_abs, float((got.double() - want.double()).abs().max()))
        return out

    @torch.no_grad()
    def pristine(self, restore: bool = False) -> PristineCheck:
        """Every targeted weight against pristine; `restore` copies pristine back where they differ."""
        out = PristineCheck()
        for info in self.targets:
            live, clean = self.live(info), self._pristine(info)
            out.tensors += 1
            if not torch.equal(live, clean):
                out.differing += 1
                out.max_abs = max(out.max_abs, float((live.float() - clean.float()).abs().max()))
                if restore:
                    self.modules[(info.component, info.path)].weight.copy_(clean)
        return out


def as_dict(check: SampleCheck | PristineCheck | None) -> dict | None:
    return None if check is None else {**asdict(check), "text": check.text()}
