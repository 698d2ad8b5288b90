"""The key map on the real SDXL architecture (meta device): counts, every dialect, diffusers agrees."""

from __future__ import annotations

import re

import pytest

from studio.lora.keymap import KOHYA_CONV_BLOCKS, ModelIndex, sgm_block_map, to_sgm
from studio.lora.keymap import sdxl_index as _sdxl_index
from studio.lora.keymap import tiny_index


@pytest.fixture(scope="module")
def sdxl() -> ModelIndex:
    return _sdxl_index()


def test_kohya_target_counts_match_sd_scripts(sdxl):
    """722 UNet transformer Linears + 72 TE1 + 192 TE2 = 986; LoCon adds 66 (38 of them 3x3)."""
    targets = sdxl.kohya_targets()
    by_component = {c: sum(1 for i in targets if i.component == c) for c in ("unet", "text_encoder", "text_encoder_2")}
    assert by_component == {"unet": 722, "text_encoder": 72, "text_encoder_2": 192}
    assert all(not i.is_conv for i in targets)
    conv_extra = [i for i in sdxl.kohya_targets(conv=True) if i.block in KOHYA_CONV_BLOCKS]
    assert len(conv_extra) == 66
    assert sum(1 for i in conv_extra if i.is_conv and i.shape[2:] == (3, 3)) == 38
    assert len(sdxl.kohya_targets(conv=True)) == 1052
    # 2.21 B weights = 4.11 GiB in fp16 (research diffusers.md §6)
    assert sum(i.shape[0] * i.shape[1] for i in targets if i.component == "unet") == 2_207_744_000


def _all(sdxl):
    return sdxl.modules()


@pytest.mark.parametrize("dialect", ["kohya-sgm", "kohya-diffusers", "peft", "peft-te-alt", "sgm-dotted"])
def test_every_sdxl_module_resolves_in_every_dialect(sdxl, dialect):
    for info in _all(sdxl):
        if dialect == "kohya-sgm":
            key = sdxl.kohya_key(info, sgm=True)
        elif dialect == "kohya-diffusers":
            key = sdxl.kohya_key(info, sgm=False)
        elif dialect == "peft":
            key = f"{info.component}.{info.path}"
        elif dialect == "peft-te-alt":  # TE names with `text_model.` toggled (both spellings exist)
            if info.component == "unet":
                continue
            alt = info.path[len("text_model."):] if info.path.startswith("text_model.") else f"text_model.{info.path}"
            key = f"{info.component}.{alt}"
        else:
            if info.component != "unet":
                continue
            key = f"diffusion_model.{sdxl.sgm_path(info.path)}"
        assert sdxl.resolve(key) == info, key


@pytest.mark.parametrize("key,component,path", [
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "unet",
     "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
    ("lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_0_proj", "unet",
     "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.0.proj"),
    ("lora_unet_middle_block_1_transformer_blocks_9_attn2_to_out_0", "unet",
     "mid_block.attentions.0.transformer_blocks.9.attn2.to_out.0"),
    ("lora_unet_output_blocks_0_1_proj_out", "unet", "up_blocks.0.attentions.0.proj_out"),
    ("lora_unet_output_blocks_8_0_skip_connection", "unet", "up_blocks.2.resnets.2.conv_shortcut"),
    ("lora_unet_output_blocks_2_2_conv", "unet", "up_blocks.0.upsamplers.0.conv"),
    ("lora_unet_output_blocks_5_2_conv", "unet", "up_blocks.1.upsamplers.0.conv"),
    ("lora_unet_input_blocks_3_0_op", "unet", "down_blocks.0.downsamplers.0.conv"),
    ("lora_unet_input_blocks_6_0_op", "unet", "down_blocks.1.downsamplers.0.conv"),
    ("lora_unet_input_blocks_7_0_in_layers_2", "unet", "down_blocks.2.resnets.0.conv1"),
    ("lora_unet_middle_block_2_emb_layers_1", "unet", "mid_block.resnets.1.time_emb_proj"),
    ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k", "unet",
     "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"),
    ("lora_te1_text_model_encoder_layers_11_mlp_fc2", "text_encoder", "encoder.layers.11.mlp.fc2"),
    ("lora_te2_text_model_encoder_layers_31_self_attn_out_proj", "text_encoder_2",
     "text_model.encoder.layers.31.self_attn.out_proj"),
    ("unet.up_blocks.1.attentions.2.transformer_blocks.1.attn1.processor.to_out_lora", "unet",
     "up_blocks.1.attentions.2.transformer_blocks.1.attn1.to_out.0"),
    ("unet.down_blocks.2.attentions.0.transformer_blocks.3.attn1.processor.to_k_lora", "unet",
     "down_blocks.2.attentions.0.transformer_blocks.3.attn1.to_k"),
    ("down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v", "unet",  # no component prefix at all
     "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v"),
    ("base_model.model.text_model.encoder.layers.20.mlp.fc1", "text_encoder_2", "text_model.encoder.layers.20.mlp.fc1"),
])
def test_known_keys(sdxl, key, component, path):
    info = sdxl.resolve(key)
    assert info is not None and (info.component, info.path) == (component, path)


@pytest.mark.parametrize("key", [
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_x",  # no such layer
    "lora_unet_input_blocks_1_1_proj_in",  # SD1 has attention at level 0; SDXL does not
    "lora_te2_text_model_encoder_layers_32_mlp_fc1",  # TE2 has 32 layers: 0..31
    "encoder.layers.0.self_attn.q_proj",  # TE1 or TE2? no prefix to decide: refuse to guess
    "lora_unet_conv_in_weight",
])
def test_unknown_or_ambiguous_keys_do_not_resolve(sdxl, key):
    assert sdxl.resolve(key) is None


def test_sgm_map_agrees_with_diffusers_converter(sdxl):
    """diffusers' own kohya-SGM conversion lands on the same modules for all 788 UNet LoCon targets."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from diffusers.configuration_utils import FrozenDict

    from studio.models.architectures import SDXL_UNET

    one = torch.zeros(1, 1)
    state = {}
    for info in sdxl.kohya_targets(conv=True):
        state[f"{sdxl.kohya_key(info)}.lora_down.weight"] = one
        state[f"{sdxl.kohya_key(info)}.lora_up.weight"] = one
    converted, _ = StableDiffusionXLPipeline.lora_state_dict(state, unet_config=FrozenDict(SDXL_UNET))
    got = set()
    for key in converted:
        if key.startswith("unet."):  # the TE keys do not go through the SGM map
            name = re.sub(r"(\.lora|_lora)\.(down|up)\.weight$", "", key)
            got.add(name.replace(".processor.to_out", ".to_out.0").replace(".processor.", "."))
    expected = {f"unet.{i.path}" for i in sdxl.kohya_targets(conv=True) if i.component == "unet"}
    assert len(expected) == 788 and got == expected


def test_block_map_is_derived_from_the_config():
    m = sgm_block_map(levels=3, layers_per_block=2, up_has_attention=[True, True, False])
    assert m["down_blocks.2.attentions.1"] == "input_blocks.8.1"
    assert m["up_blocks.2.resnets.2"] == "output_blocks.8.0"
    assert "down_blocks.2.downsamplers.0.conv" not in m and "up_blocks.2.upsamplers.0.conv" not in m
    assert to_sgm("up_blocks.1.resnets.0.conv2", m) == "output_blocks.3.0.out_layers.3"
    # An SD1-like layout (4 levels, attention at the top of the decoder) numbers differently.
    sd1 = sgm_block_map(levels=4, layers_per_block=2, up_has_attention=[False, True, True, True])
    assert sd1["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.1.conv"
    assert sd1["up_blocks.1.upsamplers.0.conv"] == "output_blocks.5.2.conv"


def test_tiny_model_names_are_a_subset_of_sdxl(sdxl):
    tiny = tiny_index()
    for info in tiny.modules():
        big = sdxl.get(info.component, info.path)
        assert big is not None and big.block == info.block, info.path
        assert tiny.kohya_key(info) == sdxl.kohya_key(big)


def test_lora_compatible_layers_and_a_unet_without_config():
    """diffusers' LoRACompatible* are Linear/Conv2d; a bare module's SGM map comes from its names."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.lora import LoRACompatibleConv, LoRACompatibleLinear
    from torch import nn

    from studio.models.architectures import TINY_UNET

    with torch.device("meta"):
        unet = UNet2DConditionModel(**TINY_UNET)
        te = nn.Module()
        te.add_module("q_proj", LoRACompatibleLinear(8, 16))
        te.add_module("conv", LoRACompatibleConv(4, 6, 3))
    bare = nn.Module()  # same modules, no .config
    for name, child in unet.named_children():
        bare.add_module(name, child)
    index = ModelIndex.from_modules({"unet": bare, "text_encoder": te})
    assert index.get("text_encoder", "q_proj").shape == (16, 8)
    assert index.get("text_encoder", "conv").shape == (6, 4, 3, 3)
    tiny = tiny_index()
    for info in tiny.modules("unet"):
        assert index.sgm_path(info.path) == tiny.sgm_path(info.path)
