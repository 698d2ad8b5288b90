"""What a running generation tells its caller: each phase as it starts, each step, a live preview."""

from __future__ import annotations

import copy

import numpy as np
import torch
from PIL import Image

from studio.preview import PREVIEW_EVERY, fit_projection
from studio.request import GenerationRequest


def test_every_phase_is_announced_as_it_starts_in_the_reports_own_names(tiny_session, tmp_path):
    heard: list[str] = []
    steps: list[int] = []

    def on_step(event) -> None:
        steps.append(event.step)
        heard.append(f"step {event.step}")

    request = GenerationRequest(prompt="a cat", seed=3, steps=3, loras=(("demo-kohya-warm", 0.5),))
    result = tiny_session.generate(request, on_phase=heard.append, on_step=on_step, out_path=tmp_path / "p.png")
    # LoRA patching happens when a phase's components arrive, so it is announced before the phase itself
    assert heard[:3] == ["lora_load", "lora_patch", "text_encode"]
    denoise = heard.index("denoise")
    assert heard[denoise + 1:denoise + 4] == ["step 1", "step 2", "step 3"]
    assert heard[-2:] == ["vae_decode", "save"]  # the decode is a phase of its own, not "denoising 100%"
    assert set(heard) - {f"step {i}" for i in steps} <= set(result.report.phases)


def test_live_preview_every_few_steps_and_its_cost_in_the_report(tiny_session, tmp_path):
    pictures: dict[int, object] = {}
    result = tiny_session.generate(GenerationRequest(prompt="a cat", seed=3, steps=5),
                                   on_step=lambda e: pictures.update({e.step: e.preview}),
                                   out_path=tmp_path / "p.png")
    shown = sorted(step for step, picture in pictures.items() if picture is not None)
    assert shown == [2, 4, 5]  # every PREVIEW_EVERY steps, and the last one
    assert PREVIEW_EVERY == 2
    assert pictures[5].size == (256, 256) and pictures[5].mode == "RGB"  # 16 x 16 latents, 16 x 16 each (PREVIEW_SIDE)
    preview = result.report.preview
    assert preview["enabled"] is True and preview["images"] == 3 and preview["every_steps"] == 2
    assert 0 < preview["ms_per_step"] and 0 < preview["share_of_step"] < 0.5  # cheap next to a step
    assert preview["fit_seconds"] > 0 and "fit_rms_error" in preview


def test_live_preview_off_sends_no_pictures(tiny_session, tmp_path):
    original = tiny_session.settings
    request = GenerationRequest(prompt="a cat", seed=3, steps=2)
    with_preview = tiny_session.generate(request, out_path=tmp_path / "on.png")
    tiny_session.apply_settings(original.replace(live_preview=False))
    try:
        pictures = []
        result = tiny_session.generate(request, on_step=lambda e: pictures.append(e.preview), out_path=tmp_path / "p.png")
    finally:
        tiny_session.apply_settings(original)
    assert pictures == [None, None]
    # the preview reads the sampler's estimate and changes nothing it computes: the same pixels either way
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(with_preview.images[0]))
    assert result.report.preview == {"enabled": False, "every_steps": 2, "images": 0,
                                     "fit_seconds": tiny_session.warm.preview.fit_seconds,
                                     "fit_rms_error": tiny_session.warm.preview.rms_error}


def test_the_projection_is_fitted_to_the_vae_and_predicts_its_colours(tiny_session):
    vae = tiny_session.warm.pipe.vae
    projection = fit_projection(vae, seed=1)
    # fresh latents the fit never saw: the preview's colours against the decoded image's, per 8x8 patch
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    latents = torch.nn.functional.interpolate(latents, size=(16, 16), mode="bilinear")
    with torch.inference_mode():
        decoded = copy.deepcopy(vae).float().decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    target = torch.nn.functional.avg_pool2d(((decoded + 1) / 2).clamp(0, 1), 8)[0].permute(1, 2, 0).numpy()
    picture = np.asarray(projection.image(latents).resize((16, 16), Image.NEAREST)) / 255.0
    error = np.sqrt(((picture - target) ** 2).mean())
    mean_only = np.sqrt(((target - target.mean(axis=(0, 1))) ** 2).mean())  # a flat picture of the mean colour
    assert error < mean_only  # the map explains part of the colour, not just the average
    assert tiny_session.warm.preview is not None  # fitted when the model loaded (live_preview is on)


def test_a_preview_fit_that_fails_leaves_the_preview_off_with_a_note_and_the_model_working(
        studio_home, tmp_path, monkeypatch):
    from studio import warm_pipeline
    from studio.session import Session
    from studio.settings import Settings

    def broken_fit(*args, **kwargs):
        raise RuntimeError("the VAE decoded NaN")

    monkeypatch.setattr(warm_pipeline, "cached_projection", broken_fit)
    session = Session(Settings(device="cpu", precision="fp32"), studio_home)
    try:
        info = session.load_model()
        assert session.warm.preview is None and "preview" in info.load_parts
        pictures = []
        result = session.generate(GenerationRequest(prompt="a red circle on a blue background", seed=3, steps=2),
                                  on_step=lambda e: pictures.append(e.preview), out_path=tmp_path / "p.png")
    finally:
        session.close()
    assert pictures == [None, None] and (tmp_path / "p.png").is_file()
    assert "live preview off: fitting it to the VAE failed (the VAE decoded NaN)" in result.report.notes
