"""fp8 weight storage on the tiny UNet: runs on the CPU (torch 2.13), output close to bf16,
weight bytes halved, the LoRA predicate, and fp8 weights through the cache and the streamer."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from studio.models.cache import ModelCache
from studio.models.fp8 import enable_fp8_storage, fp8_layers, fp8_supported, is_fp8_stored, weight_bytes
from studio.models.stream import LayerStreamer, is_streamed

pytestmark = pytest.mark.skipif(not fp8_supported("cpu")[0], reason="this torch cannot cast fp8 on the CPU")


@pytest.fixture(scope="module")
def unet_bf16():
    from diffusers import UNet2DConditionModel

    from studio.paths import TINY_MODEL_DIR

    return UNet2DConditionModel.from_pretrained(TINY_MODEL_DIR / "unet", torch_dtype=torch.bfloat16).eval()


def inputs(dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    return dict(sample=torch.randn(2, 4, 16, 16, generator=g).to(dtype), timestep=torch.tensor([500, 500]),
                encoder_hidden_states=torch.randn(2, 77, 64, generator=g).to(dtype),
                added_cond_kwargs={"text_embeds": torch.randn(2, 32, generator=g).to(dtype),
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2).to(dtype)})


def run(unet: nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return unet(**inputs()).sample.float()


def test_fp8_storage_halves_the_weights_and_stays_close_to_bf16(unet_bf16):
    ref = run(unet_bf16)
    unet = copy.deepcopy(unet_bf16)
    before = weight_bytes(unet)
    saved = enable_fp8_storage(unet, torch.bfloat16)
    after = weight_bytes(unet)
    assert saved == before - after and after / before < 0.55  # measured 0.502: norms stay bf16
    out = run(unet)
    cosine = F.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert cosine > 0.98 and rel < 0.2, (cosine, rel)  # random weights: every layer rounds to 3 mantissa bits
    assert enable_fp8_storage(unet, torch.bfloat16) == 0  # already fp8: nothing to do
    with pytest.raises(ValueError, match="storage dtype"):
        enable_fp8_storage(copy.deepcopy(unet_bf16), torch.float8_e4m3fn)


def test_is_fp8_stored_marks_the_cast_layers_even_inside_their_forward(unet_bf16, monkeypatch):
    unet = copy.deepcopy(unet_bf16)
    assert not fp8_layers(unet)
    enable_fp8_storage(unet, torch.bfloat16)
    layers = fp8_layers(unet)
    linear = unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    norm = unet.get_submodule("down_blocks.1.attentions.0.norm")
    assert is_fp8_stored(linear) and not is_fp8_stored(norm) and len(layers) > 100
    seen, real_linear = [], F.linear

    def spy(x, weight, bias=None):
        if weight is linear.weight:
            seen.append((weight.dtype, is_fp8_stored(linear)))
        return real_linear(x, weight, bias)

    monkeypatch.setattr(F, "linear", spy)
    run(unet)
    monkeypatch.undo()
    assert seen == [(torch.bfloat16, True)]  # upcast for compute, still reported as fp8-stored
    assert linear.weight.dtype == torch.float8_e4m3fn  # back to storage after the forward


def test_fp8_weights_through_the_cache_and_the_streamer(unet_bf16):
    """The pristine copy holds fp8 (half the RAM); streamed fp8 units give the unstreamed fp8 output."""
    unet = copy.deepcopy(unet_bf16)
    enable_fp8_storage(unet, torch.bfloat16)
    ref = run(unet)
    cache = ModelCache("cpu")
    with cache.put("unet", unet) as handle:
        assert cache.lookup("unet").nbytes == weight_bytes(unet)
        assert cache.pristine("unet", "conv_in.weight").dtype == torch.float8_e4m3fn
        with cache.lock(handle) as live:
            assert torch.equal(run(live), ref)
        with cache.streamed(handle) as slots:
            streamer = LayerStreamer(unet, slots, "cpu", 2, max_unit_bytes=64 << 10, min_unit_bytes=4 << 10)
            streamer.install()
            try:
                assert torch.equal(run(unet), ref) and torch.equal(run(unet), ref)
                to_q = unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
                assert is_streamed(to_q) and is_fp8_stored(to_q)  # both say: LoRA as a sidecar here
            finally:
                streamer.close()
    assert cache.check() == []


def test_fp8_supported_reports_why_not_for_a_missing_device():
    ok, why = fp8_supported("cpu")
    assert ok and why == ""
