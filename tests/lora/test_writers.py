"""Our LoRA writers: what they write reads back through our reader as exactly the trained delta."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from lora_fixtures import samples
from studio.lora import writers
from studio.lora.keymap import tiny_index
from studio.lora.reader import inspect_lora, read_lora

RANK = 3


def _factors(convs: bool, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {info: (torch.randn(info.shape[0], RANK, generator=g), torch.randn(RANK, *info.shape[1:], generator=g) / 8)
            for info in samples(convs=convs)}


def _expected(up: torch.Tensor, down: torch.Tensor, scale: float, shape) -> torch.Tensor:
    """scale * up @ down in float64, from the factors as stored."""
    return (up.double().reshape(up.shape[0], -1) @ down.double().reshape(down.shape[0], -1) * scale).reshape(shape)


@pytest.mark.parametrize("conv", [False, True], ids=["kohya", "locon"])
def test_kohya_file_reads_back_as_alpha_over_rank_times_up_down(tmp_path, conv):
    factors = _factors(conv)
    tensors = writers.kohya_tensors(factors, tiny_index(), alpha=1.5)
    meta = writers.kohya_metadata("t", rank=RANK, alpha=1.5, tag_frequency={"tag": 2}, conv=conv)
    path = writers.write_lora(tmp_path / "t.safetensors", tensors, meta)
    lora = read_lora(path, tiny_index())
    assert (lora.format, lora.unmatched_keys, lora.base_model) == ("locon" if conv else "kohya", [], "sdxl")
    by_module = {(p.component, p.module): p for p in lora.patches}
    assert len(by_module) == len(factors)
    for info, (up, down) in factors.items():
        patch = by_module[(info.component, info.path)]
        stored_up, stored_down = up.half(), down.half()
        assert torch.equal(patch.down.reshape(down.shape), stored_down)  # fp16 on disk, bit for bit
        assert torch.equal(patch.up.reshape(up.shape), stored_up)
        delta = patch.delta(torch.empty(0)).double()
        expected = _expected(stored_up, stored_down, 1.5 / RANK, info.shape)
        assert delta.shape == info.shape
        torch.testing.assert_close(delta, expected, rtol=1e-6, atol=1e-7)  # fp32 rounding of float64 math


def test_kohya_uses_sgm_unet_names_and_text_model_paths():
    tensors = writers.kohya_tensors(_factors(True), tiny_index(), alpha=RANK)
    prefixes = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in prefixes  # down_blocks.1.attentions.0
    assert "lora_te1_text_model_encoder_layers_1_self_attn_out_proj" in prefixes
    assert "lora_te2_text_model_encoder_layers_0_mlp_fc1" in prefixes
    conv = next(k for k in tensors if k.endswith("lora_up.weight") and "in_layers_2" in k)
    assert tensors[conv].ndim == 4 and tensors[conv].shape[2:] == (1, 1)  # LoCon: the kernel is in lora_down


def test_peft_file_takes_its_scale_from_the_adapter_metadata(tmp_path):
    factors = _factors(False, seed=1)
    targets = {"unet": ["to_q"], "text_encoder": ["out_proj"], "text_encoder_2": ["fc1"]}
    path = writers.write_lora(tmp_path / "p.safetensors", writers.peft_tensors(factors),
                              writers.peft_metadata(RANK, lora_alpha=4 * RANK, targets=targets))
    lora = read_lora(path, tiny_index())
    assert (lora.format, lora.unmatched_keys) == ("peft", [])
    adapter = json.loads(lora.metadata["lora_adapter_metadata"])
    assert adapter["unet.lora_alpha"] == 4 * RANK and adapter["unet.r"] == RANK
    by_module = {(p.component, p.module): p for p in lora.patches}
    for info, (up, down) in factors.items():
        patch = by_module[(info.component, info.path)]
        assert torch.equal(patch.up, up) and torch.equal(patch.down, down.reshape(RANK, -1))
        torch.testing.assert_close(patch.delta(torch.empty(0)).double(), _expected(up, down, 4.0, info.shape),
                                   rtol=1e-6, atol=1e-7)


def test_bytes_do_not_depend_on_the_order_metadata_was_given_in():
    tensors = writers.kohya_tensors(_factors(False), tiny_index(), alpha=2.0)
    meta = writers.kohya_metadata("t", rank=RANK, alpha=2.0, tag_frequency={"b": 1, "a": 3})
    forwards, backwards = writers.serialize(tensors, meta), writers.serialize(tensors, dict(reversed(meta.items())))
    assert forwards == backwards
    n = int.from_bytes(forwards[:8], "little")
    keys = list(json.loads(forwards[8:8 + n])["__metadata__"])
    assert keys == sorted(keys)


def test_kohya_metadata_gives_the_browser_trigger_words_and_a_cover(tmp_path):
    pixels = torch.arange(4 * 5 * 3, dtype=torch.uint8).reshape(4, 5, 3)
    meta = writers.kohya_metadata("cover", rank=RANK, alpha=1.0, tag_frequency={"golden hour": 9, "amber": 2},
                                  cover_png=writers.png_bytes(pixels))
    path = writers.write_lora(tmp_path / "cover.safetensors",
                              writers.kohya_tensors(_factors(False), tiny_index(), 1.0), meta)
    info = inspect_lora(path)
    assert info.trigger_words == ["golden hour", "amber"]
    mime, png = info.thumbnail
    assert mime == "image/png"
    assert torch.equal(torch.from_numpy(np.array(Image.open(io.BytesIO(png)))), pixels)


def test_factors_that_do_not_fit_the_layer_are_refused():
    info = samples(convs=False)[0]
    with pytest.raises(ValueError, match=r"do not fit its weight"):
        writers.kohya_tensors({info: (torch.zeros(info.shape[0] + 1, RANK), torch.zeros(RANK, info.shape[1]))},
                              tiny_index(), alpha=1.0)
