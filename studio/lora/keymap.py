"""Which module of which component a LoRA key prefix means.

LoRA files name their target layers in several dialects: kohya flattens the path
with underscores and uses either SGM block names (`lora_unet_input_blocks_4_1_...`)
or diffusers names (`lora_unet_down_blocks_1_attentions_0_...`); peft/diffusers keep
dots (`unet.down_blocks.1...`, `text_encoder.text_model.encoder...`, TE1 also without
`text_model.` since transformers 5 flattened CLIPTextModel). Splitting kohya names
on underscores is fragile (`to_out_0`, `ff_net_0_proj`, `self_attn`), so instead every
real module path is flattened in every dialect and looked up: the model says what
exists, the file only has to name it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from studio.phases import LORA_TARGETS

logger = logging.getLogger(__name__)

# Containers whose Linear/Conv2d children kohya's sd-scripts targets (networks/lora.py).
KOHYA_UNET_BLOCKS = ("Transformer2DModel",)
KOHYA_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")  # LoCon ("conv_dim") only
KOHYA_TE_BLOCKS = ("CLIPAttention", "CLIPMLP")
_BLOCK_NAMES = KOHYA_UNET_BLOCKS + KOHYA_CONV_BLOCKS + KOHYA_TE_BLOCKS

KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}

# (key prefix, components it may address); longest first where one prefixes another.
_KEY_PREFIXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("lora_unet_", ("unet",)),
    ("lora_te1_", ("text_encoder",)),
    ("lora_te2_", ("text_encoder_2",)),
    ("lora_te_", ("text_encoder",)),  # SD1-style single TE; SDXL's TE1 is the same CLIP-L
    ("unet.", ("unet",)),
    ("text_encoder_2.", ("text_encoder_2",)),
    ("text_encoder.", ("text_encoder",)),
    ("model.diffusion_model.", ("unet",)),
    ("diffusion_model.", ("unet",)),
    ("base_model.model.", LORA_TARGETS),  # raw peft save of one model
)

# ResnetBlock2D children, diffusers -> SGM (ldm/modules/diffusionmodules/openaimodel.py).
_RESNET_SGM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}


@dataclass(frozen=True)
class ModuleInfo:
    """One patchable module: where it lives and the shape of its weight."""

    component: str
    path: str  # the real module path inside the component (what get_submodule takes)
    shape: tuple[int, ...]
    block: str  # class of the nearest enclosing kohya target block, "" when none

    @property
    def is_conv(self) -> bool:
        return len(self.shape) == 4


def sgm_block_map(levels: int, layers_per_block: int, up_has_attention: Sequence[bool]) -> dict[str, str]:
    """diffusers block prefix -> SGM (original Stability) prefix for an SDXL-style UNet.

    SGM numbers the encoder as one flat list: input_blocks.0 is conv_in, then per level
    `layers_per_block` (resnet, attention) pairs and one downsampler; the decoder has
    `layers_per_block + 1` pairs per level with the upsampler appended to the last one.
    """
    step = layers_per_block + 1
    m = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
         "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
         "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2",
         "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
         "mid_block.resnets.1": "middle_block.2"}
    for i in range(levels):
        for j in range(layers_per_block):
            m[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{1 + i * step + j}.0"
            m[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{1 + i * step + j}.1"
        for j in range(step):
            m[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{i * step + j}.0"
            m[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{i * step + j}.1"
        if i < levels - 1:
            m[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * step}.0.op"
            upsampler_slot = 2 if up_has_attention[i] else 1
            m[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{i * step + layers_per_block}.{upsampler_slot}.conv"
    return m


def to_sgm(path: str, block_map: Mapping[str, str]) -> str | None:
    """The SGM name of a diffusers UNet module path, or None when it has none."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in block_map:
            rest = parts[cut:]
            if ".resnets." in f".{head}." and rest and rest[0] in _RESNET_SGM:
                rest = [_RESNET_SGM[rest[0]], *rest[1:]]
            return ".".join([block_map[head], *rest])
    return None


def _unet_block_map(unet: nn.Module) -> dict[str, str]:
    """Read levels / resnets per level / which up blocks attend from the UNet config."""
    config = getattr(unet, "config", None)
    if config is not None and "down_block_types" in config:
        up_types = list(config["up_block_types"])
        return sgm_block_map(len(config["down_block_types"]), int(config["layers_per_block"]),
                             ["CrossAttn" in t for t in up_types])
    # A bare nn.Module: infer the same three facts from its module names.
    names = {n for n, _ in unet.named_modules()}
    levels = sum(1 for i in range(16) if f"down_blocks.{i}" in names)
    layers = sum(1 for j in range(16) if f"down_blocks.0.resnets.{j}" in names)
    return sgm_block_map(levels, layers, [f"up_blocks.{i}.attentions" in names for i in range(levels)])


def _flat(name: str) -> str:
    return name.replace(".", "_")


def _normalise(rest: str) -> str:
    """Flatten a key's module part and undo old diffusers attention-processor naming."""
    flat = _flat(rest).replace("_processor_", "_")
    if flat.endswith("_to_out_lora"):  # attn-proc era: to_out_lora means to_out.0
        return flat[: -len("_lora")] + "_0"
    if flat.endswith("_lora"):  # to_q_lora / to_k_lora / to_v_lora
        return flat[: -len("_lora")]
    return flat


class ModelIndex:
    """Every patchable module (Linear, Conv2d) of the pipeline components, by path and alias."""

    def __init__(self, infos: Sequence[ModuleInfo], aliases: Mapping[str, Mapping[str, str]],
                 sgm_names: Mapping[str, str]):
        self._infos = {(i.component, i.path): i for i in infos}
        self._aliases = {c: dict(a) for c, a in aliases.items()}  # component -> flat alias -> path
        self._sgm = dict(sgm_names)  # unet path -> SGM path

    @classmethod
    def from_modules(cls, components: Mapping[str, nn.Module]) -> ModelIndex:
        """Index {component name: module}; meta-device modules work (only shapes are read)."""
        infos: list[ModuleInfo] = []
        aliases: dict[str, dict[str, str]] = {}
        sgm_names: dict[str, str] = {}
        for component, root in components.items():
            if component not in LORA_TARGETS:
                raise ValueError(f"unknown component {component!r}; expected one of "
                                 f"{', '.join(c.value for c in LORA_TARGETS)}")
            classes = {name: type(mod).__name__ for name, mod in root.named_modules()}
            block_map = _unet_block_map(root) if component == "unet" else {}
            table: dict[str, str] = {}
            clashes: set[str] = set()
            for path, mod in root.named_modules():
                if not isinstance(mod, (nn.Linear, nn.Conv2d)):
                    continue
                infos.append(ModuleInfo(component, path, tuple(mod.weight.shape), _enclosing_block(path, classes)))
                names = [path]
                if component == "unet":
                    sgm = to_sgm(path, block_map)
                    if sgm is not None:
                        sgm_names[path] = sgm
                        names.append(sgm)
                else:
                    names.append(path[len("text_model."):] if path.startswith("text_model.") else f"text_model.{path}")
                for alias in {_flat(n) for n in names}:
                    if table.get(alias, path) != path:
                        clashes.add(alias)
                    table[alias] = path
            for alias in clashes:  # never guess between two real modules
                logger.warning("LoRA key alias %s is ambiguous in %s; it will not match", alias, component)
                del table[alias]
            aliases[component] = table
        return cls(infos, aliases, sgm_names)

    def get(self, component: str, path: str) -> ModuleInfo | None:
        return self._infos.get((component, path))

    def modules(self, component: str | None = None) -> list[ModuleInfo]:
        return [i for i in self._infos.values() if component is None or i.component == component]

    def sgm_path(self, path: str) -> str | None:
        """SGM name of a UNet module path (None for modules SGM does not name)."""
        return self._sgm.get(path)

    def resolve(self, prefix: str) -> ModuleInfo | None:
        """The module a key prefix (key minus its `.lora_down.weight`-like suffix) addresses."""
        candidates: tuple[str, ...] = LORA_TARGETS
        rest = prefix
        for head, comps in _KEY_PREFIXES:
            if prefix.startswith(head):
                candidates, rest = comps, prefix[len(head):]
                break
        flat = _normalise(rest)
        found = [(c, self._aliases[c][flat]) for c in candidates if flat in self._aliases.get(c, {})]
        if len(found) != 1:  # none, or the same name in two components without a prefix to decide
            return None
        return self._infos[found[0]]

    def kohya_targets(self, conv: bool = False, text_encoders: bool = True) -> list[ModuleInfo]:
        """The modules kohya's sd-scripts trains: UNet transformer Linears (+ LoCon convs), TE attn/MLP."""
        blocks = set(KOHYA_UNET_BLOCKS) | (set(KOHYA_CONV_BLOCKS) if conv else set())
        if text_encoders:
            blocks |= set(KOHYA_TE_BLOCKS)
        return [i for i in self._infos.values() if i.block in blocks]

    def kohya_key(self, info: ModuleInfo, sgm: bool = True) -> str:
        """The kohya key prefix for a module (SGM block names for the UNet by default)."""
        path = info.path
        if info.component == "unet" and sgm:
            path = self._sgm.get(path) or path
        elif info.component != "unet" and not path.startswith("text_model."):
            path = f"text_model.{path}"
        return KOHYA_PREFIX[info.component] + _flat(path)


def _enclosing_block(path: str, classes: Mapping[str, str]) -> str:
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        name = classes.get(".".join(parts[:cut]), "")
        if name in _BLOCK_NAMES:
            return name
    return ""


def build_meta_index(unet_config: Mapping, te1_config: Mapping, te2_config: Mapping) -> ModelIndex:
    """Index a UNet + two CLIP text encoders built on the meta device (no memory, no weights)."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        te1 = CLIPTextModel(CLIPTextConfig(**te1_config))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**te2_config))
    return ModelIndex.from_modules({"unet": unet, "text_encoder": te1, "text_encoder_2": te2})


@functools.cache
def sdxl_index() -> ModelIndex:
    """The real SDXL base 1.0 module index (built once, on the meta device)."""
    from studio.models.architectures import SDXL_TE1, SDXL_TE2, SDXL_UNET
    return build_meta_index(SDXL_UNET, SDXL_TE1, SDXL_TE2)


@functools.cache
def tiny_index() -> ModelIndex:
    """The embedded tiny SDXL's module index (same names as SDXL, small shapes)."""
    from studio.models.architectures import TINY_TE1, TINY_TE2, TINY_UNET
    return build_meta_index(TINY_UNET, TINY_TE1, TINY_TE2)
