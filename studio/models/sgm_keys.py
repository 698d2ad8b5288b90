"""Diffusers <-> original (Stability SGM, "A1111") names for SDXL checkpoints.

Single-file SDXL checkpoints keep the names of the code they were trained with:
`model.diffusion_model.input_blocks.4.1...` for the UNet, LDM names for the VAE,
the HF CLIP layout for TE1 and the OpenCLIP layout for TE2. The block maps are
derived from the model config (levels, resnets per level, which levels attend),
so one map serves the real SDXL UNet and the tiny one alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TE1_PREFIX = "conditioner.embedders.0.transformer."
TE2_PREFIX = "conditioner.embedders.1.model."

# Inside an SGM ResBlock: in_layers = [GroupNorm, SiLU, Conv], emb_layers = [SiLU, Linear],
# out_layers = [GroupNorm, SiLU, Dropout, Conv]; hence the odd indices.
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_TE2_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
              "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_TE2_TOP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
            "text_model.embeddings.position_embedding.weight": "positional_embedding",
            "text_model.final_layer_norm.weight": "ln_final.weight",
            "text_model.final_layer_norm.bias": "ln_final.bias"}
# OpenCLIP's trained temperature saturates at 100; diffusers never reads it, the original files carry it.
OPENCLIP_LOGIT_SCALE = math.log(100.0)
TE1_POSITION_IDS = TE1_PREFIX + "text_model.embeddings.position_ids"
TE2_LOGIT_SCALE = TE2_PREFIX + "logit_scale"
# Written by us and by Stability, read by nobody at inference; some community files lack them.
OPTIONAL_KEYS = frozenset({TE1_POSITION_IDS, TE2_LOGIT_SCALE})


@dataclass(frozen=True)
class BlockMap:
    """One module subtree: its diffusers prefix, its SGM prefix, and renames of its children."""

    diffusers: str
    sgm: str
    children: Mapping[str, str]


def _per_level(value: int | Sequence[int], levels: int) -> list[int]:
    return [value] * levels if isinstance(value, int) else list(value)


def unet_blocks(config: Mapping[str, Any]) -> list[BlockMap]:
    """The SGM UNet layout: input_blocks count resnets (+downsampler) level by level from 1,
    output_blocks count resnets (one more per level) from 0, the upsampler riding on the last one."""
    down_types, up_types = list(config["down_block_types"]), list(config["up_block_types"])
    levels = len(down_types)
    layers = _per_level(config["layers_per_block"], levels)
    blocks = [BlockMap("conv_in", "input_blocks.0.0", {}),
              BlockMap("time_embedding.linear_1", "time_embed.0", {}),
              BlockMap("time_embedding.linear_2", "time_embed.2", {}),
              BlockMap("add_embedding.linear_1", "label_emb.0.0", {}),
              BlockMap("add_embedding.linear_2", "label_emb.0.2", {}),
              BlockMap("conv_norm_out", "out.0", {}),
              BlockMap("conv_out", "out.2", {})]
    index = 1
    for level, block_type in enumerate(down_types):
        for j in range(layers[level]):
            blocks.append(BlockMap(f"down_blocks.{level}.resnets.{j}", f"input_blocks.{index}.0", _UNET_RESNET))
            if "CrossAttn" in block_type:
                blocks.append(BlockMap(f"down_blocks.{level}.attentions.{j}", f"input_blocks.{index}.1", {}))
            index += 1
        if level < levels - 1:
            blocks.append(BlockMap(f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{index}.0.op", {}))
            index += 1
    blocks += [BlockMap("mid_block.resnets.0", "middle_block.0", _UNET_RESNET),
               BlockMap("mid_block.attentions.0", "middle_block.1", {}),
               BlockMap("mid_block.resnets.1", "middle_block.2", _UNET_RESNET)]
    index = 0
    for level, block_type in enumerate(up_types):
        attends = "CrossAttn" in block_type
        for j in range(layers[levels - 1 - level] + 1):
            blocks.append(BlockMap(f"up_blocks.{level}.resnets.{j}", f"output_blocks.{index}.0", _UNET_RESNET))
            if attends:
                blocks.append(BlockMap(f"up_blocks.{level}.attentions.{j}", f"output_blocks.{index}.1", {}))
            if j == layers[levels - 1 - level] and level < levels - 1:
                slot = 2 if attends else 1  # after the resnet and, where there is one, the transformer
                blocks.append(BlockMap(f"up_blocks.{level}.upsamplers.0.conv",
                                       f"output_blocks.{index}.{slot}.conv", {}))
            index += 1
    return blocks


def vae_blocks(config: Mapping[str, Any]) -> list[BlockMap]:
    """LDM VAE layout; the decoder's `up` list is numbered from the lowest resolution up, diffusers' the other way."""
    levels = len(config["block_out_channels"])
    blocks = [BlockMap("quant_conv", "quant_conv", {}), BlockMap("post_quant_conv", "post_quant_conv", {})]
    for part in ("encoder", "decoder"):
        blocks += [BlockMap(f"{part}.conv_in", f"{part}.conv_in", {}),
                   BlockMap(f"{part}.conv_out", f"{part}.conv_out", {}),
                   BlockMap(f"{part}.conv_norm_out", f"{part}.norm_out", {}),
                   BlockMap(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", _VAE_RESNET),
                   BlockMap(f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTN),
                   BlockMap(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", _VAE_RESNET)]
    layers = config["layers_per_block"]
    for level in range(levels):
        blocks += [BlockMap(f"encoder.down_blocks.{level}.resnets.{j}", f"encoder.down.{level}.block.{j}",
                            _VAE_RESNET) for j in range(layers)]
        if level < levels - 1:
            blocks.append(BlockMap(f"encoder.down_blocks.{level}.downsamplers.0",
                                   f"encoder.down.{level}.downsample", {}))
        up = levels - 1 - level
        blocks += [BlockMap(f"decoder.up_blocks.{level}.resnets.{j}", f"decoder.up.{up}.block.{j}", _VAE_RESNET)
                   for j in range(layers + 1)]
        if level < levels - 1:
            blocks.append(BlockMap(f"decoder.up_blocks.{level}.upsamplers.0", f"decoder.up.{up}.upsample", {}))
    return blocks


def rename(key: str, blocks: Sequence[BlockMap]) -> str:
    """SGM name of one diffusers key (longest matching block prefix wins)."""
    best: BlockMap | None = None
    for block in blocks:
        if key.startswith(block.diffusers + ".") and (best is None or len(block.diffusers) > len(best.diffusers)):
            best = block
    if best is None:
        raise KeyError(f"no original-layout name for {key!r}")
    rest = key[len(best.diffusers) + 1:]
    for old, new in best.children.items():
        if rest.startswith(old + "."):
            rest = new + rest[len(old):]
            break
    return f"{best.sgm}.{rest}"


Slot = tuple[str, int | None]  # SGM key, and which third of a fused q/k/v tensor (None: the whole tensor)


def _te2_name(key: str) -> Slot:
    """OpenCLIP names: q/k/v fused into `attn.in_proj_*`, `ln_1/ln_2`, `mlp.c_fc/c_proj`, `ln_final`."""
    layer_prefix = "text_model.encoder.layers."
    if key in _TE2_TOP:
        return _TE2_TOP[key], None
    if key == "text_projection.weight":
        return "text_projection", None
    if key.startswith(layer_prefix):
        number, _, rest = key[len(layer_prefix):].partition(".")
        block = f"transformer.resblocks.{number}."
        for part, letter in enumerate("qkv"):
            head = f"self_attn.{letter}_proj."
            if rest.startswith(head):
                return f"{block}attn.in_proj_{rest[len(head):]}", part
        for old, new in _TE2_LAYER.items():
            if rest.startswith(old + "."):
                return block + new + rest[len(old):], None
    raise KeyError(f"no original-layout name for {key!r}")


def sgm_names(component: str, keys: Iterable[str], config: Mapping[str, Any]) -> dict[str, Slot]:
    """Diffusers key -> SGM slot for one pipeline component ("unet", "vae", "text_encoder", "text_encoder_2")."""
    if component == "unet":
        blocks = unet_blocks(config)
        return {k: (UNET_PREFIX + rename(k, blocks), None) for k in keys}
    if component == "vae":
        blocks = vae_blocks(config)
        return {k: (VAE_PREFIX + rename(k, blocks), None) for k in keys}
    if component == "text_encoder":
        # transformers >= 5.6 flattens CLIPTextModel; the original keeps `text_model.`
        return {k: (f"{TE1_PREFIX}text_model.{k.removeprefix('text_model.')}", None) for k in keys}
    if component == "text_encoder_2":
        return {k: (TE2_PREFIX + name, part) for k in keys for name, part in [_te2_name(k)]}
    raise ValueError(f"unknown SDXL component {component!r}")


def _is_vae_attention_projection(sgm_key: str) -> bool:
    """LDM VAE attention uses 1x1 convs where diffusers uses Linear: [C, C] <-> [C, C, 1, 1]."""
    return ".attn_1." in sgm_key and sgm_key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight"))


def to_sgm(component: str, state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """One component's state dict under original names and in original shapes (meta tensors welcome)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list[torch.Tensor | None]] = {}
    for key, (name, part) in sgm_names(component, state, config).items():
        tensor = state[key]
        if part is not None:
            fused.setdefault(name, [None, None, None])[part] = tensor
            continue
        if name == TE2_PREFIX + "text_projection":
            tensor = tensor.T.contiguous()  # OpenCLIP computes x @ P; Linear stores P.T
        elif _is_vae_attention_projection(name) and tensor.ndim == 2:
            tensor = tensor.reshape(*tensor.shape, 1, 1)
        out[name] = tensor
    for name, parts in fused.items():
        if any(p is None for p in parts):
            raise KeyError(f"{name} needs q, k and v")
        out[name] = torch.cat(parts, dim=0)  # type: ignore[arg-type]
    if component == "text_encoder":
        out[TE1_POSITION_IDS] = torch.arange(config["max_position_embeddings"]).unsqueeze(0)
    elif component == "text_encoder_2":
        ref = out[TE2_PREFIX + "positional_embedding"]
        out[TE2_LOGIT_SCALE] = torch.tensor(OPENCLIP_LOGIT_SCALE, dtype=ref.dtype, device=ref.device)
    return out


def from_sgm(component: str, get: Callable[[str], torch.Tensor], shapes: Mapping[str, Sequence[int]],
             config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """One component's diffusers state dict, reading each SGM tensor through `get` (shapes: the model's)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, tuple[torch.Tensor, int]] = {}  # in_proj read once, kept until q, k and v took their third
    for key, (name, part) in sgm_names(component, shapes, config).items():
        if part is not None:
            whole, taken = fused.pop(name, None) or (get(name), 0)
            if taken < 2:
                fused[name] = (whole, taken + 1)
            out[key] = whole.chunk(3, dim=0)[part].clone()  # own storage, not three views of one
            continue
        tensor = get(name)
        if name == TE2_PREFIX + "text_projection":
            tensor = tensor.T.contiguous()
        elif _is_vae_attention_projection(name):
            tensor = tensor.reshape(tuple(shapes[key]))
        out[key] = tensor
    return out
