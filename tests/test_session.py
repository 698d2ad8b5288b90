"""The session on the embedded model: determinism, reports, cancel, one job at a time, model switches."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image

from studio.errors import Cancelled
from studio.models.architectures import TINY_DEFAULT_SIZE
from studio.memory import release_freed_memory, rss_bytes
from studio.infotext import read_png_infotext
from studio.request import GenerationRequest
from studio.jobs import CancelToken
from studio.session import Session
from studio.choices import Precision
from studio.settings import Settings


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_same_seed_gives_identical_pixels_and_a_full_report(tiny_session, tmp_path):
    request = GenerationRequest(prompt="a cat", seed=7, steps=4)
    first = tiny_session.generate(request, out_path=tmp_path / "a.png")
    second = tiny_session.generate(request, out_path=tmp_path / "b.png")
    assert np.array_equal(_pixels(first.paths[0]), _pixels(second.paths[0]))
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    report = second.report
    assert {"text_encode", "denoise", "vae_decode", "save", "total"} <= report.phases.keys()
    assert "model_load" not in report.phases  # warm: nothing loaded
    assert len(report.step_seconds) == 4 and report.it_per_s > 0
    parts = sum(v for k, v in report.phases.items() if k != "total")
    assert parts <= report.phases["total"] + 1e-3
    assert report.memory["peak_rss"] >= report.memory["rss"] * 0.5 > 0
    assert read_png_infotext(first.paths[0]).to_request() == GenerationRequest(
        prompt="a cat", seed=7, steps=4, width=TINY_DEFAULT_SIZE, height=TINY_DEFAULT_SIZE)


def test_other_seed_gives_other_pixels(tiny_session, tmp_path):
    a = tiny_session.generate(GenerationRequest(prompt="a cat", seed=1, steps=2), out_path=tmp_path / "1.png")
    b = tiny_session.generate(GenerationRequest(prompt="a cat", seed=2, steps=2), out_path=tmp_path / "2.png")
    assert np.abs(_pixels(a.paths[0]).astype(int) - _pixels(b.paths[0])).mean() > 5


def test_random_seed_is_reported_and_outputs_are_numbered(tiny_session):
    result = tiny_session.generate(GenerationRequest(prompt="x", steps=1))
    path = result.paths[0]
    assert path.parent.parent == tiny_session.dirs.default_outputs
    assert path.name.endswith(f"-{result.seeds[0]}.png") and result.report.request["seed"] == result.seeds[0]
    again = tiny_session.generate(GenerationRequest(prompt="x", steps=1))
    assert int(again.paths[0].name[:5]) == int(path.name[:5]) + 1


@pytest.mark.parametrize("cancel_after", [1, 3])
def test_cancel_lands_within_one_step(tiny_session, tmp_path, cancel_after):
    before = tiny_session.generate(GenerationRequest(prompt="x", seed=1, steps=2), out_path=tmp_path / "before.png")
    token = CancelToken()
    seen: list[int] = []

    def on_step(event) -> None:
        seen.append(event.step)
        if event.step == cancel_after:
            threading.Timer(0.0, token.cancel).start()  # from another thread, as the Stop button does
            time.sleep(0.05)

    with pytest.raises(Cancelled):
        tiny_session.generate(GenerationRequest(prompt="x", seed=1, steps=30), on_step=on_step, cancel=token,
                              out_path=tmp_path / "never.png")
    assert seen[-1] <= cancel_after + 1
    assert not (tmp_path / "never.png").exists()
    # the session is usable right after, and gives the same image as before the cancel
    ok = tiny_session.generate(GenerationRequest(prompt="x", seed=1, steps=2), out_path=tmp_path / "after.png")
    assert ok.report.status == "ok"
    assert (tmp_path / "after.png").read_bytes() == before.paths[0].read_bytes()


def test_stop_button_path_cancels_the_running_job(tiny_session):
    started = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            tiny_session.generate(GenerationRequest(prompt="x", steps=200), on_step=lambda e: started.set())
        except BaseException as err:  # noqa: BLE001 - collected for the assertion
            errors.append(err)

    worker = threading.Thread(target=run)
    worker.start()
    assert started.wait(30)
    assert tiny_session.cancel_current() is True
    worker.join(30)
    assert len(errors) == 1 and isinstance(errors[0], Cancelled)
    assert tiny_session.cancel_current() is False


def test_one_generation_at_a_time_under_concurrent_callers(tiny_session, tmp_path):
    unet = tiny_session.warm.pipe.unet
    active, peak, waiting_seen = [0], [0], []
    lock = threading.Lock()

    def enter(_module, _args):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        waiting_seen.append(tiny_session.status()["waiting"])
        time.sleep(0.01)

    def leave(_module, _args, _out):
        with lock:
            active[0] -= 1

    hooks = [unet.register_forward_pre_hook(enter), unet.register_forward_hook(leave)]
    results: list = []
    try:
        threads = [threading.Thread(target=lambda i=i: results.append(tiny_session.generate(
            GenerationRequest(prompt=f"job {i}", seed=i, steps=3), out_path=tmp_path / f"{i}.png")))
            for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        for h in hooks:
            h.remove()
    assert len(results) == 4 and peak[0] == 1
    assert max(waiting_seen) >= 1  # the others were seen queueing behind the lock
    status = tiny_session.status()
    assert status["busy"] is False and status["waiting"] == 0


def test_switching_models_does_not_leak(session_dirs):
    session = Session(Settings(device="cpu", precision=Precision.FP32), session_dirs)
    readings = []
    for _ in range(6):
        session.load_model("")
        session.generate(GenerationRequest(prompt="x", seed=1, steps=1))
        release_freed_memory()
        readings.append(rss_bytes())
    session.close()
    growth_mb = (readings[-1] - readings[1]) / 2**20
    # one tiny model in fp32 is ~30 MB of weights: a leak of one copy per switch would add ~120 MB here
    assert growth_mb < 40, f"RSS grew {growth_mb:.0f} MB over 4 switches: {[r >> 20 for r in readings]}"
