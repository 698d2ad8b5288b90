"""LoRA Block Weight: which block a layer is in, presets, and the patcher's per-layer weights.

The merged weights are checked against an independent float64 computation (each block's delta
scaled by its value), and moving one block value must recompute that block's tensors only.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import patch_fixtures as pf  # noqa: E402

from studio.errors import SettingsError  # noqa: E402
from studio.lora.block_weights import (BLOCKS_12, BLOCKS_20, PRESETS, LayerWeights, block_of, expand,  # noqa: E402
                                       layer_weights, parse_presets, resolve_lbw)
from studio.lora.keymap import ModelIndex, sdxl_index  # noqa: E402
from studio.lora.patcher import LoraPatcher  # noqa: E402
from studio.lora.spec import parse_tag  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def lookup_for(components):
    index = ModelIndex.from_modules(components)
    return lambda component, module: block_of(component, index.sgm_path(module) if component == "unet" else None)


@pytest.mark.parametrize("path, block", [
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "IN04"),
    ("down_blocks.1.attentions.1.proj_in", "IN05"),
    ("down_blocks.2.attentions.0.transformer_blocks.0.ff.net.2", "IN07"),
    ("down_blocks.2.attentions.1.proj_out", "IN08"),
    ("mid_block.attentions.0.transformer_blocks.0.attn2.to_k", "MID"),
    ("up_blocks.0.attentions.0.proj_in", "OUT00"),
    ("up_blocks.0.attentions.2.transformer_blocks.0.attn2.to_v", "OUT02"),
    ("up_blocks.1.attentions.0.proj_out", "OUT03"),
    ("up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0", "OUT05"),
    ("conv_in", "IN00"), ("down_blocks.0.resnets.1.conv1", "IN02"), ("down_blocks.0.downsamplers.0.conv", "IN03"),
    ("up_blocks.2.resnets.2.conv2", "OUT08"), ("mid_block.resnets.1.conv1", "MID"),
    ("time_embedding.linear_1", None), ("add_embedding.linear_2", None), ("conv_out", None),
])
def test_unet_layers_map_to_the_extensions_sgm_blocks(path, block):
    index = sdxl_index()
    found = block_of("unet", index.sgm_path(path))
    assert (BLOCKS_20[found] if found is not None else None) == block


def test_the_12_block_layout_holds_every_layer_a_kohya_sdxl_lora_trains():
    index = sdxl_index()
    blocks = {BLOCKS_20[block_of(i.component, index.sgm_path(i.path))] for i in index.kohya_targets()}
    assert blocks == set(BLOCKS_12)  # BASE = both text encoders; no transformer layer outside the 12


def test_presets_and_vectors():
    assert resolve_lbw(parse_tag("<lora:x:1:lbw=ALL>"), {}) == (1.0,) * 20
    ins = resolve_lbw(parse_tag("<lora:x:1:lbw=INS>"), {})
    assert [BLOCKS_20[i] for i, v in enumerate(ins) if v] == ["BASE", "IN04", "IN05"]
    twelve = resolve_lbw(parse_tag("<lora:x:1:lbw=1,0,0,0,0,0.5,0,0,0,0,0,1>"), {})
    assert twelve == expand((1, 0, 0, 0, 0, 0.5, 0, 0, 0, 0, 0, 1))
    assert twelve[BLOCKS_20.index("MID")] == 0.5 and twelve[BLOCKS_20.index("OUT05")] == 1.0
    assert twelve[BLOCKS_20.index("IN00")] == 0.0  # blocks a 12-vector leaves out weigh 0 (the extension's rule)
    twenty = ",".join(str(i / 10) for i in range(20))
    assert resolve_lbw(parse_tag(f"<lora:x:1:lbw={twenty}>"), {})[19] == 1.9
    user = parse_presets("# mine\nMYSTYLE:1,0,0,1,1,1,1,1,1,0,0,0\n\n")
    assert resolve_lbw(parse_tag("<lora:x:1:lbw=MYSTYLE>"), user)[BLOCKS_20.index("OUT02")] == 1.0
    assert set(PRESETS) >= {"ALL", "NONE", "INS", "IND", "INALL", "MIDD", "OUTD", "OUTS", "OUTALL"}


@pytest.mark.parametrize("tag, words", [
    ("<lora:warm:1:lbw=1,0,1>", ["`warm`", "12 values", "got 3"]),
    ("<lora:warm:1:lbw=NOPE>", ["`warm`", "unknown block-weight preset", "NOPE", "INS"]),
    ("<lora:warm:1:lbw=1,0,a,0,0,0,0,0,0,0,0,0>", ["`warm`", "must be a number", "'a'"]),
    ("<lora:warm:1:lbw=1,0,nan,0,0,0,0,0,0,0,0,0>", ["`warm`", "'nan'"]),
    ("<lora:warm:1:lbw=R,1,1,1,1,1,1,1,1,1,1,1>", ["`warm`", "not supported"]),
])
def test_bad_block_weights_are_one_clear_error_naming_the_lora(tag, words):
    with pytest.raises(SettingsError) as err:
        resolve_lbw(parse_tag(tag), {})
    assert all(w in str(err.value) for w in words), str(err.value)
    assert "\n" not in str(err.value)


def test_bad_user_preset_names_its_line():
    with pytest.raises(SettingsError, match="line 2"):
        parse_presets("OK:1,1,1,1,1,1,1,1,1,1,1,1\nBAD:1,2")


def test_uniform_weights_stay_a_plain_float():
    spec = parse_tag("<lora:x:0.8:lbw=ALL>")
    assert layer_weights(spec, resolve_lbw(spec, {}), None) == 0.8  # the patcher's fast path, bit-identical
    spec = parse_tag("<lora:x:0.8:0.5>")
    assert layer_weights(spec, None, None) == LayerWeights(0.8, 0.5, None)


def _blocks_lora(comps, lookup, seed=7):
    """A low-rank patch on every Linear of 12 sample layers spread over BASE and 8 UNet blocks."""
    gen = torch.Generator().manual_seed(seed)
    picks = ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
             "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k",
             "down_blocks.2.attentions.0.transformer_blocks.0.ff.net.2",
             "down_blocks.2.attentions.1.proj_out", "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
             "up_blocks.0.attentions.1.proj_in", "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0",
             "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_q", "time_embedding.linear_1"]
    patches = [pf.make_lowrank(comps, "unet", p, 4, gen) for p in picks]
    patches += [pf.make_lowrank(comps, "text_encoder", "encoder.layers.0.self_attn.q_proj", 4, gen),
                pf.make_lowrank(comps, "text_encoder_2", "text_model.encoder.layers.0.mlp.fc2", 4, gen)]
    return pf.make_lora("blocks", patches)


def _expected64(pristine, stack, lookup):
    """pristine + sum(per-layer weight * delta) in float64: the block math written out on its own."""
    out = {c: {k: v.double() for k, v in sd.items()} for c, sd in pristine.items()}
    for lora, weights in stack:
        for p in lora.patches:
            if p.component == "unet":
                block = lookup(p.component, p.module)
                w = weights["unet"] * (1.0 if block is None else weights["blocks"][block])
            else:
                w = weights["te"] * weights["blocks"][0]
            key = f"{p.module}.weight"
            out[p.component][key] = out[p.component][key] + w * p.delta(pristine[p.component][key].float()).double()
    return out


def test_block_weights_equal_each_blocks_delta_scaled_by_its_value():
    comps = pf.fresh_components()
    pristine = pf.snapshot(comps)
    lookup = lookup_for(comps)
    lora = _blocks_lora(comps, lookup)
    other = pf.random_lora(comps, "other", 3, n_layers=20)
    blocks = tuple(0.1 * i - 0.5 for i in range(20))
    with LoraPatcher(comps) as patcher:
        patcher.apply([(lora, LayerWeights(0.7, 1.3, blocks, lookup)), (other, 0.6)])
        expected = _expected64(pristine, [(lora, {"te": 0.7, "unet": 1.3, "blocks": blocks}),
                                          (other, {"te": 0.6, "unet": 0.6, "blocks": (1.0,) * 20})], lookup)
        assert pf.mismatches(comps, expected, atol=2e-6) == []
        # the test's own lookup must see the blocks the LoRA spans (or it proves nothing)
        assert len({lookup(p.component, p.module) for p in lora.patches}) >= 9


def test_moving_one_block_recomputes_only_that_blocks_tensors_and_is_exact():
    comps = pf.fresh_components()
    lookup = lookup_for(comps)
    lora = _blocks_lora(comps, lookup)
    mid = BLOCKS_20.index("MID")
    blocks = expand(PRESETS["MIDD"])
    moved = tuple(0.25 if i == mid else v for i, v in enumerate(blocks))
    in_mid = sum(1 for p in lora.patches if p.component == "unet" and lookup(p.component, p.module) == mid)
    assert in_mid == 1
    with LoraPatcher(comps) as patcher:
        first = patcher.apply([(lora, LayerWeights(1.0, 1.0, blocks, lookup))])
        assert first.tensors_touched == sum(1 for p in lora.patches
                                            if LayerWeights(1.0, 1.0, blocks, lookup).of(p) != 0.0)
        again = patcher.apply([(lora, LayerWeights(1.0, 1.0, blocks, lookup))])
        assert again.tensors_touched == 0
        step = patcher.apply([(lora, LayerWeights(1.0, 1.0, moved, lookup))])
        assert step.tensors_touched == in_mid
        after_move = pf.snapshot(comps)
    fresh = pf.fresh_components()
    with LoraPatcher(fresh) as patcher:
        patcher.apply([(lora, LayerWeights(1.0, 1.0, moved, lookup_for(fresh)))])
        assert pf.mismatches(fresh, after_move) == []  # the same bits as applying the moved vector at once


def test_a_block_at_zero_leaves_its_layers_pristine():
    comps = pf.fresh_components()
    pristine = pf.snapshot(comps)
    lookup = lookup_for(comps)
    lora = _blocks_lora(comps, lookup)
    with LoraPatcher(comps) as patcher:
        patcher.apply([(lora, LayerWeights(1.0, 1.0, expand(PRESETS["OUTD"]), lookup))])
        live = pf.state_of(comps)
        for p in lora.patches:
            block = lookup(p.component, p.module)
            off = p.component == "unet" and block is not None and BLOCKS_20[block] not in ("OUT00", "OUT01", "OUT02")
            same = torch.equal(live[p.component][f"{p.module}.weight"], pristine[p.component][f"{p.module}.weight"])
            assert same == off, p.module
