"""Memory modes on the tiny SDXL pipeline: same images in every mode, switching without a reload,
CPU degradation, auto's choice, and the per-generation memory report."""

from __future__ import annotations

import pytest
import torch

from studio.models.budget import Budgets, measure_budgets
from studio.models.cache import ModelCache
from studio.models.memory_report import MemoryWatch, memory_report
from studio.models.placement import apply_memory_mode, choose_mode
from studio.models.stream import is_streamed
from studio.models.vae_decode import decode

SMALL_UNITS = {"min_unit_bytes": 16 << 10, "max_unit_bytes": 256 << 10}


@pytest.fixture(scope="module")
def pipe():
    from studio.models.loader import load_pipeline, resolve_source

    return load_pipeline(resolve_source(""), torch.bfloat16)


def generate(pipe, placement, steps: int = 2, cancel_at: int | None = None) -> torch.Tensor:
    """The session's three phases, each inside its placement phase."""
    device = placement.device

    def on_step(_p, index, _t, kwargs):
        if index == cancel_at:
            raise KeyboardInterrupt("cancelled")
        return kwargs

    with torch.inference_mode():
        with placement.phase("text_encode"):
            e, ne, p, np_ = pipe.encode_prompt(prompt="a lighthouse", device=device, num_images_per_prompt=1,
                                               do_classifier_free_guidance=True, negative_prompt="fog")
        with placement.phase("denoise"):
            latents = pipe(prompt_embeds=e, negative_prompt_embeds=ne, pooled_prompt_embeds=p,
                           negative_pooled_prompt_embeds=np_, num_inference_steps=steps, guidance_scale=5.0,
                           width=64, height=64, generator=torch.Generator("cpu").manual_seed(7),
                           output_type="latent", callback_on_step_end=on_step).images
        with placement.phase("decode"):
            return decode(pipe.vae, latents / pipe.vae.config.scaling_factor).float().cpu()


def test_every_mode_degrades_to_the_cpu_without_a_gpu(pipe):
    budgets = measure_budgets("cpu")
    cache = ModelCache("cpu")
    for mode in ("auto", "full", "offload", "stream"):
        placement = apply_memory_mode(pipe, mode, "cpu", budgets, 2, cache=cache)
        assert placement.mode == "cpu" and placement.requested == mode
        assert "no GPU" in placement.notes[0]
        components = placement.components()
        assert set(components) == {"text_encoder", "text_encoder_2", "unet", "vae"}
        assert all(c.where == "cpu" and c.bytes > 0 and c.device_bytes == 0 for c in components.values())
        placement.close()
    assert cache.stats.misses == 0 and len(cache.records()) == 4  # admitted once, reused by every mode


def test_offload_and_stream_give_the_same_images_as_full(pipe):
    budgets = measure_budgets("cpu")
    cache = ModelCache("cpu", keep_resident=False)  # offload really drops the copies between phases
    placement = apply_memory_mode(pipe, "full", "cpu", budgets, 2, cache=cache, emulate_on_cpu=True)
    reference = generate(pipe, placement)
    loads = cache.stats.loads
    for mode, lookahead in (("offload", 2), ("stream", 1), ("stream", 3)):
        placement = placement.switch(mode, budgets, lookahead, emulate_on_cpu=True, **SMALL_UNITS)
        assert placement.mode == mode
        assert torch.equal(generate(pipe, placement), reference), f"{mode} (lookahead {lookahead}) differs"
        assert torch.equal(generate(pipe, placement), reference)
        if mode == "offload":
            assert cache.stats.loads >= loads + 8  # four components copied in for each of two generations
        else:
            s = placement.streamer
            assert len(s.units) > 10 and s.stats.max_in_flight <= lookahead and s.stats.resyncs == 0
            assert placement.components()["unet"].where == "streamed"
    placement.close()
    assert cache.check() == [] and all(r.pins == 0 and r.locks == 0 for r in cache.records())


def test_switching_modes_reuses_the_cache_and_removes_hooks(pipe):
    budgets = measure_budgets("cpu")
    cache = ModelCache("cpu")
    placement = apply_memory_mode(pipe, "stream", "cpu", budgets, 2, cache=cache, emulate_on_cpu=True,
                                  **SMALL_UNITS)
    streamed = [m for m in pipe.unet.modules() if is_streamed(m)]
    assert streamed and any(isinstance(m, torch.nn.Linear) for m in streamed)  # LoRA sidecar predicate
    assert all(placement.merge_blocker(m) == "streamed" for m in streamed)
    assert placement.merge_blocker(pipe.text_encoder.get_submodule("final_layer_norm")) is None
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert torch.equal(placement.pristine("unet", name), pipe.unet.get_parameter(name))
    assert all(r.pins == 1 for r in cache.records()) and cache.lookup("unet").streamed
    placement = placement.switch("full", budgets, emulate_on_cpu=True)
    assert not any(is_streamed(m) for m in pipe.unet.modules())
    assert not any(m._forward_pre_hooks for m in pipe.unet.modules())
    assert not cache.lookup("unet").streamed and all(r.pins == 1 for r in cache.records())
    assert cache.stats.misses == 0
    placement.close()
    placement.close()  # idempotent
    assert all(r.pins == 0 for r in cache.records())
    with pytest.raises(RuntimeError, match="closed"):
        with placement.phase("denoise"):
            pass


def test_cancel_inside_a_streamed_denoise_leaves_everything_consistent(pipe):
    budgets = measure_budgets("cpu")
    cache = ModelCache("cpu")
    placement = apply_memory_mode(pipe, "stream", "cpu", budgets, 2, cache=cache, emulate_on_cpu=True,
                                  **SMALL_UNITS)
    reference = generate(pipe, placement, steps=3)
    with pytest.raises(KeyboardInterrupt):
        generate(pipe, placement, steps=3, cancel_at=1)
    assert placement.streamer.in_flight == 0
    assert torch.equal(generate(pipe, placement, steps=3), reference)
    placement.close()
    assert cache.check() == []


def test_auto_picks_full_offload_or_stream_from_the_budget():
    sizes = {"text_encoder": 250, "text_encoder_2": 1400, "unet": 5000, "vae": 170}
    def budget(vram: int) -> Budgets:
        return Budgets(ram=10**9, vram=vram, working=0)
    assert choose_mode(sizes, budget(7000))[0] == "full"
    assert choose_mode(sizes, budget(5000))[0] == "offload"
    mode, why = choose_mode(sizes, budget(3000))
    assert mode == "stream" and "UNet" in why


def test_bad_arguments_are_refused(pipe):
    budgets = measure_budgets("cpu")
    with pytest.raises(ValueError, match="memory_mode"):
        apply_memory_mode(pipe, "turbo", "cpu", budgets)
    with pytest.raises(ValueError, match="stream_impl"):
        apply_memory_mode(pipe, "stream", "cpu", budgets, stream_impl="magic")


def test_memory_report_for_a_generation(pipe):
    budgets = measure_budgets("cpu")
    placement = apply_memory_mode(pipe, "stream", "cpu", budgets, 2, emulate_on_cpu=True, **SMALL_UNITS)
    with MemoryWatch(placement) as watch:
        generate(pipe, placement)
    report = watch.report(lora_cache_bytes=12345)
    assert report["mode"] == "stream" and report["mode_requested"] == "stream"
    assert report["lora_cache_bytes"] == 12345 and report["peak_rss"] >= report["rss"] // 2
    assert report["components"]["unet"]["where"] == "streamed"
    assert report["stream"]["max_in_flight"] <= 2 and report["stream"]["copied_bytes"] > 0
    assert report["h2d_bytes"] == 0  # nothing crosses to a GPU on the CPU
    assert report["weights_bytes"] == sum(c["bytes"] for c in report["components"].values())
    assert report["cache_ram_bytes"] >= report["weights_bytes"]
    assert memory_report(placement)["mode"] == "stream"
    placement.close()


def test_gpu_suite_dry_run_keeps_working(tmp_path):
    """bench/gpu_suite.py --dry-run: the benchmark's whole flow on the tiny model, on the CPU."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "gpu_suite.py"
    spec = importlib.util.spec_from_file_location("gpu_suite", path)
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    out = tmp_path / "suite.json"
    assert suite.main(["--dry-run", "--skip-overhead", "--configs", "full,stream N=2,fp8 stream N=4",
                       "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {r["name"]: r for r in result["modes"]}
    assert [rows[n]["mode"] for n in ("full", "stream N=2", "fp8 stream N=4")] == ["full", "stream", "stream"]
    assert rows["fp8 stream N=4"]["unet_weight_bytes"] < 0.55 * rows["full"]["unet_weight_bytes"]
    assert all(r["s_per_step"] > 0 for r in rows.values()) and rows["full"]["step_ratio_to_full"] == 1.0


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_cuda_modes_match_and_stream_uses_less_vram(device, pipe):
    budgets = measure_budgets(device)
    cache = ModelCache(device, keep_resident=False)
    results, peaks = {}, {}
    placement = None
    for mode in ("full", "offload", "stream"):
        placement = placement.switch(mode, budgets, 2, **SMALL_UNITS) if placement else \
            apply_memory_mode(pipe, mode, device, budgets, 2, cache=cache, **SMALL_UNITS)
        generate(pipe, placement)  # warm-up (the stream trace)
        with MemoryWatch(placement) as watch:
            results[mode] = generate(pipe, placement)
        peaks[mode] = watch.cuda["cuda_peak_allocated"]
        assert watch.h2d_bytes > 0 or mode == "full"
    placement.close()
    torch.testing.assert_close(results["offload"], results["full"], atol=0, rtol=0)
    torch.testing.assert_close(results["stream"], results["full"], atol=1e-3, rtol=0)
    assert peaks["stream"] < peaks["full"]


@pytest.mark.parametrize("impl", [pytest.param(i, marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")) for i in ("diffusers_leaf", "diffusers_block")])
def test_cuda_diffusers_group_offloading_matches(impl, pipe):
    budgets = measure_budgets("cuda")
    placement = apply_memory_mode(pipe, "full", "cuda", budgets, 2)
    reference = generate(pipe, placement)
    placement = placement.switch("stream", budgets, 2, stream_impl=impl)
    assert placement.streamer is None and impl in placement.notes[-1]
    torch.testing.assert_close(generate(pipe, placement), reference, atol=1e-3, rtol=0)
    placement = placement.switch("full", budgets)
    torch.testing.assert_close(generate(pipe, placement), reference, atol=0, rtol=0)
    placement.close()
