"""Test helpers for the LoRA engine: the tiny pipeline's real modules and small patches on them.

Imported by the test files through sys.path (there is deliberately no tests/lora/conftest.py).
Patches are built directly (LowRankPatch, plus dense test subclasses), so these tests do not
depend on the format readers.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
from torch import nn

from studio.lora.base import LayerPatch, LoraFile, LowRankPatch

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@functools.lru_cache(maxsize=1)
def _pipeline():
    from diffusers import StableDiffusionXLPipeline

    from studio.paths import TINY_MODEL_DIR

    return StableDiffusionXLPipeline.from_pretrained(TINY_MODEL_DIR, torch_dtype=torch.float32,
                                                     local_files_only=True)


def fresh_components(dtype: torch.dtype = torch.float32) -> dict[str, nn.Module]:
    """Private copies of the tiny UNet and text encoders (the loaded pipeline is never touched)."""
    pipe = _pipeline()
    return {name: copy.deepcopy(getattr(pipe, name)).to(dtype).eval() for name in COMPONENTS}


def snapshot(components: dict[str, nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    return {c: {k: v.detach().clone() for k, v in m.state_dict().items()} for c, m in components.items()}


def lowrank_targets(components: dict[str, nn.Module]) -> list[tuple[str, str]]:
    """Every Linear / Conv2d (groups 1) of the three components, as (component, module path)."""
    out = []
    for comp, root in components.items():
        for name, mod in root.named_modules():
            if isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.groups == 1):
                out.append((comp, name))
    return out


class DensePatch(LayerPatch):
    """Full-diff style: a dense delta (and optionally a bias delta), no factors."""

    def __init__(self, component: str, module: str, diff: torch.Tensor, bias: torch.Tensor | None = None):
        self.component, self.module, self.diff, self.bias_delta = component, module, diff, bias

    def delta(self, base: torch.Tensor) -> torch.Tensor:
        return self.diff.float()

    def tensors(self) -> list[torch.Tensor]:
        return [self.diff]


class DoraLikePatch(LayerPatch):
    """DoRA's math on a low-rank direction: delta = m * (W + s*BA) / ||W + s*BA||_row - W."""

    def __init__(self, component: str, module: str, up: torch.Tensor, down: torch.Tensor, magnitude: torch.Tensor,
                 scale: float):
        self.component, self.module = component, module
        self.up, self.down, self.magnitude, self.scale = up, down, magnitude, scale

    @property
    def depends_on_base(self) -> bool:
        return True

    def delta(self, base: torch.Tensor) -> torch.Tensor:
        w = base.float().flatten(1) + self.scale * self.up.float() @ self.down.float()
        new = self.magnitude.float()[:, None] * w / w.norm(dim=1, keepdim=True)
        return (new - base.float().flatten(1)).reshape(base.shape)

    def tensors(self) -> list[torch.Tensor]:
        return [self.up, self.down, self.magnitude]


class FailingPatch(LayerPatch):
    """Valid-looking (no factors, finite) but its delta raises: a failure in the middle of a write."""

    def __init__(self, component: str, module: str, error: BaseException | None = None):
        self.component, self.module = component, module
        self.error = error or RuntimeError("injected failure")

    def delta(self, base: torch.Tensor) -> torch.Tensor:
        raise self.error

    def tensors(self) -> list[torch.Tensor]:
        return []


def module_of(components: dict[str, nn.Module], comp: str, name: str) -> nn.Module:
    return components[comp].get_submodule(name)


def make_lowrank(components: dict[str, nn.Module], comp: str, name: str, rank: int, gen: torch.Generator,
                 amp: float = 0.05) -> LowRankPatch:
    w = module_of(components, comp, name).weight
    down = torch.randn((rank, *w.shape[1:]), generator=gen) * amp  # conv: down carries the kernel
    up = torch.randn((w.shape[0], rank), generator=gen) * amp
    return LowRankPatch(comp, name, up, down, scale=1.0 / rank * 2, weight_shape=tuple(w.shape))


def make_dense(components: dict[str, nn.Module], comp: str, name: str, gen: torch.Generator,
               with_bias: bool = True) -> DensePatch:
    mod = module_of(components, comp, name)
    bias = None
    if with_bias and getattr(mod, "bias", None) is not None:
        bias = torch.randn(mod.bias.shape, generator=gen) * 0.01
    return DensePatch(comp, name, torch.randn(mod.weight.shape, generator=gen) * 0.01, bias)


def make_dora(components: dict[str, nn.Module], comp: str, name: str, rank: int, gen: torch.Generator) -> DoraLikePatch:
    w = module_of(components, comp, name).weight.detach().cpu().float().flatten(1)
    up = torch.randn((w.shape[0], rank), generator=gen) * 0.05
    down = torch.randn((rank, w.shape[1]), generator=gen) * 0.05
    magnitude = w.norm(dim=1) * (1 + 0.1 * torch.randn(w.shape[0], generator=gen))
    return DoraLikePatch(comp, name, up, down, magnitude, scale=0.5)


def make_lora(name: str, patches: list[LayerPatch]) -> LoraFile:
    return LoraFile(path=Path(f"/loras/{name}.safetensors"), name=name, format="test", base_model="sdxl",
                    short_hash=name[:12], patches=patches)


def random_lora(components: dict[str, nn.Module], name: str, seed: int, n_layers: int = 12, rank: int = 4,
                kinds: tuple[str, ...] = ("lowrank",)) -> LoraFile:
    """A LoRA on `n_layers` random layers (all three components), each patch of a random kind."""
    gen = torch.Generator().manual_seed(seed)
    targets = lowrank_targets(components)
    picks = torch.randperm(len(targets), generator=gen)[:n_layers].tolist()
    patches: list[LayerPatch] = []
    for i, idx in enumerate(picks):
        comp, mod = targets[idx]
        kind = kinds[i % len(kinds)]
        if kind == "lowrank":
            patches.append(make_lowrank(components, comp, mod, rank, gen))
        elif kind == "dense":
            patches.append(make_dense(components, comp, mod, gen))
        else:
            patches.append(make_dora(components, comp, mod, rank, gen))
    return make_lora(name, patches)


def expected_state(pristine: dict[str, dict[str, torch.Tensor]], stack: list[tuple[LoraFile, float]],
                   exact: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """pristine + sum(w * delta), written independently of the patcher.

    exact=True follows the patcher's operation order (ranks concatenated, one addmm, dense
    deltas added with alpha in stack order, one rounding) so results compare with torch.equal;
    exact=False sums in float64 per LoRA, for a tolerance check of the math itself.
    """
    out = {c: dict(sd) for c, sd in pristine.items()}
    per_layer: dict[tuple[str, str], list[tuple[float, LayerPatch]]] = {}
    for lora, w in stack:
        if w == 0:
            continue
        for p in lora.patches:
            per_layer.setdefault((p.component, p.module), []).append((float(w), p))
    for (comp, mod), items in per_layer.items():
        base = pristine[comp][f"{mod}.weight"]
        if exact:
            base32 = base.float().reshape(base.shape[0], -1)
            low = [(w, p.factors()) for w, p in items if not p.depends_on_base and p.factors() is not None]
            if low:
                up = torch.cat([f[0] * w for w, f in low], 1)
                acc = torch.addmm(base32, up, torch.cat([f[1] for _, f in low], 0))
            else:
                acc = base32.clone()
            for w, p in items:
                if p.depends_on_base or p.factors() is None:
                    acc.add_(p.delta(base.float()).float().reshape(acc.shape), alpha=w)
            out[comp][f"{mod}.weight"] = acc.reshape(base.shape).to(base.dtype)
        else:
            acc = base.double()
            for w, p in items:
                acc = acc + w * p.delta(base.float()).double().reshape(base.shape)
            out[comp][f"{mod}.weight"] = acc.to(base.dtype)
        biased = [(w, p) for w, p in items if p.bias_delta is not None]
        if biased:
            b = pristine[comp][f"{mod}.bias"]
            acc_b = b.float().clone() if exact else b.double()
            for w, p in biased:
                if exact:
                    acc_b.add_(p.bias_delta.float(), alpha=w)
                else:
                    acc_b = acc_b + w * p.bias_delta.double()
            out[comp][f"{mod}.bias"] = acc_b.to(b.dtype)
    return out


def state_of(components: dict[str, nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    return {c: dict(m.state_dict()) for c, m in components.items()}


def mismatches(components: dict[str, nn.Module], expected: dict[str, dict[str, torch.Tensor]],
               atol: float = 0.0) -> list[str]:
    """Names of tensors not equal to `expected` (torch.equal when atol == 0)."""
    bad = []
    for comp, sd in state_of(components).items():
        for k, v in sd.items():
            e = expected[comp][k]
            same = torch.equal(v, e) if atol == 0 else torch.allclose(v.double(), e.double(), rtol=0, atol=atol)
            if not same:
                bad.append(f"{comp}.{k}")
    return bad


def te_inputs(components: dict[str, nn.Module], seed: int = 0) -> torch.Tensor:
    vocab = components["text_encoder"].config.vocab_size
    return torch.randint(0, vocab, (1, 12), generator=torch.Generator().manual_seed(seed))


def unet_inputs(components: dict[str, nn.Module], seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    cfg = components["unet"].config
    gen = torch.Generator().manual_seed(seed)
    text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return {
        "sample": torch.randn((1, cfg.in_channels, 16, 16), generator=gen).to(dtype),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn((1, 8, cfg.cross_attention_dim), generator=gen).to(dtype),
        "added_cond_kwargs": {"text_embeds": torch.randn((1, text_dim), generator=gen).to(dtype),
                              "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]).to(dtype)},
    }


@torch.no_grad()
def forward_all(components: dict[str, nn.Module], seed: int = 0) -> dict[str, torch.Tensor]:
    """One forward of each component on fixed inputs (the outputs a generation depends on)."""
    device, dtype = components["unet"].device, components["unet"].dtype
    ids = te_inputs(components, seed).to(device)
    unet_in = unet_inputs(components, seed, dtype)
    unet_in = {k: v.to(device) if torch.is_tensor(v) else {n: t.to(device) for n, t in v.items()}
               for k, v in unet_in.items()}
    return {
        "text_encoder": components["text_encoder"](ids).last_hidden_state,
        "text_encoder_2": components["text_encoder_2"](ids).text_embeds,
        "unet": components["unet"](**unet_in).sample,
    }


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / max(b.double().abs().max(), 1e-12))
