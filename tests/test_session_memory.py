"""The memory engine through the session: the report, fp8 storage with LoRAs, and OOM recovery."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from studio.errors import OutOfMemory
from studio.request import GenerationRequest
from studio.session import Session
from studio.choices import Precision
from studio.settings import Settings


def _req(**kw) -> GenerationRequest:
    return GenerationRequest(**{"prompt": "a cat", "seed": 5, "steps": 2, "width": 64, "height": 64, **kw})


def _pixels(result) -> np.ndarray:
    return np.asarray(Image.open(result.paths[0]).convert("RGB")).astype(np.int16)


def test_every_report_says_where_the_weights_are(tiny_session, tmp_path):
    memory = tiny_session.generate(_req(), out_path=tmp_path / "a.png").report.memory
    assert memory["mode_requested"] == "auto" and memory["mode"] == "cpu"
    assert any("no GPU" in note for note in memory["notes"])
    assert set(memory["components"]) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert all(c["where"] == "cpu" and c["bytes"] > 0 for c in memory["components"].values())
    unet_params = sum(p.numel() * p.element_size() for p in tiny_session.warm.pipe.unet.parameters())
    assert memory["components"]["unet"]["bytes"] == unet_params
    assert memory["peak_rss"] >= memory["rss"] * 0.5 > 0 and memory["h2d_bytes"] == 0
    assert "lora_cache_bytes" in memory and "pinned_bytes" in memory


def test_fp8_storage_runs_loras_as_sidecars_and_halves_unet_bytes(session_dirs, tmp_path):
    plain = Session(Settings(device="cpu", precision=Precision.BF16), session_dirs)
    fp8 = Session(Settings(device="cpu", precision=Precision.BF16, fp8_storage=True), session_dirs)
    try:
        a = plain.generate(_req(loras=(("demo-kohya-warm", 1.0),)), out_path=tmp_path / "plain.png")
        b = fp8.generate(_req(loras=(("demo-kohya-warm", 1.0),)), out_path=tmp_path / "fp8.png")
        ratio = b.report.memory["components"]["unet"]["bytes"] / a.report.memory["components"]["unet"]["bytes"]
        assert 0.45 < ratio < 0.6
        assert b.report.lora["patch"]["sidecars_active"] > 0  # merged mode became sidecars on fp8 layers
        assert any("fp8" in note for note in b.report.lora["notes"])
        base = fp8.generate(_req(), out_path=tmp_path / "fp8-base.png")
        assert np.abs(_pixels(b) - _pixels(base)).mean() > 5  # the LoRA still shows
    finally:
        plain.close()
        fp8.close()


def test_an_out_of_memory_says_so_and_the_next_generation_works(tiny_session, tmp_path, monkeypatch):
    before = tiny_session.generate(_req(loras=(("demo-peft-cool", 0.8),)), out_path=tmp_path / "before.png")
    unet = tiny_session.warm.pipe.unet
    calls = {"n": 0}
    real_forward = unet.forward

    def failing_forward(*args, **kwargs):
        calls["n"] += 1
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

    monkeypatch.setattr(unet, "forward", failing_forward)
    with pytest.raises(OutOfMemory) as err:
        tiny_session.generate(_req(loras=(("demo-kohya-warm", 0.5),)), out_path=tmp_path / "oom.png")
    assert "out of memory during the generation" in str(err.value) and calls["n"] == 1
    assert not (tmp_path / "oom.png").exists()
    monkeypatch.setattr(unet, "forward", real_forward)
    assert tiny_session.status()["busy"] is False
    after = tiny_session.generate(_req(loras=(("demo-peft-cool", 0.8),)), out_path=tmp_path / "after.png")
    assert np.array_equal(_pixels(after), _pixels(before))


def test_an_out_of_memory_right_after_a_cold_load_frees_the_cache_that_load_made(session_dirs, tmp_path,
                                                                                monkeypatch):
    """The guard is entered before the first generation loads the model: it must ask for the cache
    when the OOM happens, not hold the None it saw on the way in (issue 11, item 12)."""
    import studio.session as session_module

    freed: list[str] = []

    class Cache:
        def drop_device_copies(self) -> int:
            freed.append("dropped")
            return 0

        def check(self) -> list[str]:
            return []

    class Warm:
        cache = Cache()
        native_size = 64

        def close(self) -> None:
            pass

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated, right after the load)")

    monkeypatch.setattr(session_module, "load_warm_pipeline", lambda *args, **kwargs: Warm())
    monkeypatch.setattr(session_module, "generate", oom)
    cold = Session(Settings(device="cpu", precision=Precision.BF16, live_preview=False), session_dirs)  # a fake model
    assert cold.warm is None
    with pytest.raises(OutOfMemory, match="out of memory during the generation"):
        cold.generate(_req(), out_path=tmp_path / "oom.png")
    assert freed == ["dropped"]
