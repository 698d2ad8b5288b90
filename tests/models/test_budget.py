"""Budgets from measured memory or settings, the VAE working-memory estimate, and OOM recovery."""

from __future__ import annotations

import psutil
import pytest
import torch
from torch import nn

from studio.errors import OutOfMemory
from studio.memory import PeakRss, release_freed_memory, rss_bytes
from studio.models.budget import (DEFAULT_WORKING, MB, measure_budgets, oom_guard, vae_decode_bytes,
                                  working_reserve)
from studio.models.cache import ModelCache

CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))


def test_cpu_budgets_come_from_free_ram_or_the_setting():
    measured = measure_budgets("cpu")
    assert measured.ram_source == "measured" and measured.vram == 0 and measured.working == 0
    assert 0 < measured.ram <= psutil.virtual_memory().available + 1
    assert "no GPU" in measured.notes[0]
    held = measure_budgets("cpu", held_ram=512 * MB)
    assert abs(held.ram - measured.ram - 512 * MB) < 256 * MB  # what we already hold counts as ours
    limited = measure_budgets("cpu", ram_limit_mb=1234)
    assert limited.ram == 1234 * MB and limited.ram_source == "setting"


@pytest.mark.parametrize("device", [CUDA])
def test_cuda_budgets_take_the_working_reserve_off(device):
    free, total = torch.cuda.mem_get_info()
    b = measure_budgets(device)
    assert b.working == DEFAULT_WORKING and b.vram_total == total
    assert abs(b.vram - (free - DEFAULT_WORKING)) < 256 * MB
    s = measure_budgets(device, vram_limit_mb=4096, working_memory_mb=1024)
    assert s.vram == 3072 * MB and s.vram_source == "setting"


def test_vae_estimate_scales_with_the_image_and_covers_the_measured_sdxl_peak():
    base = vae_decode_bytes(512, 512, torch.float16)
    assert vae_decode_bytes(1024, 1024, torch.float16) == 4 * base  # activations grow with the pixels
    assert vae_decode_bytes(512, 512, torch.float32) == 2 * base  # and with the element size
    assert vae_decode_bytes(512, 512, torch.bfloat16, batch=3) == 3 * base
    assert vae_decode_bytes(512, 512, torch.float16, tiled=True) > base  # overlapping tiles never need less
    # The largest per-pixel peak measured on the CPU with the real-size SDXL VAE (budget.py's doc:
    # 1,738 bytes per pixel and element, fp32 at 128 px) must fit the estimate.
    assert base / (512 * 512 * 2) >= 1738


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vae_estimate_covers_a_measured_cpu_decode(dtype):
    """Peak RSS over a real decode of the tiny VAE stays under the estimate (measured ~210-300 B/px/elem)."""
    from diffusers import AutoencoderKL

    from studio.models.architectures import TINY_VAE

    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_VAE).to(dtype).eval()
    latents = torch.randn(1, 4, 24, 24, dtype=dtype)
    with torch.inference_mode():
        vae.decode(latents[..., :8, :8])  # warm-up allocations are not the decode's
        release_freed_memory()
        base = rss_bytes()
        with PeakRss() as peak:
            vae.decode(latents)
    used = peak.peak - base
    estimate = vae_decode_bytes(192, 192, dtype)
    assert 0 < used <= estimate, f"decode used {used / MB:.0f} MB, estimate {estimate / MB:.0f} MB"


def test_working_reserve_on_cpu_always_fits():
    cache = ModelCache("cpu", ram_budget=1)
    with working_reserve(cache, "cpu", 10 * 1024**3) as fits:
        assert fits


@pytest.mark.parametrize("device", [CUDA])
def test_working_reserve_drops_unlocked_weights_first(device):
    torch.manual_seed(0)
    module = nn.Linear(1024, 1024).to(device)
    size = 1024 * 1024 * 4 + 4096
    cache = ModelCache(device, vram_budget=2 * size)
    handle = cache.put("m", module)
    with cache.lock(handle):
        pass
    assert cache.lookup("m").device is not None
    with working_reserve(cache, device, 2 * size - 1000) as fits:
        assert fits and cache.lookup("m").device is None
    with cache.lock(handle), working_reserve(cache, device, 2 * size) as fits:
        assert not fits  # locked weights are never dropped for working memory
    handle.release()


# -- OOM ---------------------------------------------------------------------------------------------
def model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   MemoryError()])
def test_oom_guard_turns_an_oom_into_out_of_memory_and_leaves_the_cache_consistent(error):
    m = model()
    x = torch.randn(2, 16)
    ref = m(x).detach()
    cache = ModelCache("cpu", keep_resident=True)
    handle = cache.put("m", m)
    with pytest.raises(OutOfMemory, match="out of memory during the denoise") as info:
        with oom_guard(cache, "the denoise"):
            with cache.lock(handle) as live:
                live(x)
                raise error  # what a CUDA allocation failure inside the UNet looks like
    assert info.value.__cause__ is error
    record = cache.lookup("m")
    assert record.locks == 0 and record.pins == 1 and cache.check() == []
    assert cache.stats.locks == cache.stats.unlocks
    with cache.lock(handle) as live:  # the next use works and is exact
        assert torch.equal(live(x), ref)
    handle.release()


def test_oom_guard_passes_other_errors_and_cancellation_through():
    cache = ModelCache("cpu")
    with pytest.raises(ValueError):
        with oom_guard(cache):
            raise ValueError("not memory")
    with pytest.raises(KeyboardInterrupt):
        with oom_guard(cache):
            raise KeyboardInterrupt
    with oom_guard(cache):
        pass
