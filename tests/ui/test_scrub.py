"""The live weight scrub without a browser: debounce, a newer value cancels the stale job, only
the moved LoRA's tensors are re-merged, and the picture is exactly what Generate makes."""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest
from PIL import Image

from studio.errors import Cancelled
from studio.request import GenerationRequest
from ui.scrub import Scrubber

KOHYA, PEFT = "demo-kohya-warm", "demo-peft-cool"
FORM = {"negative": "", "seed": 5, "cfg": 5.0, "width": 64, "height": 64, "sampler": "Euler"}
OWNER = "local"


class Watched:
    """The session, counting the scrub's generations and how each ended."""

    def __init__(self, session) -> None:
        self.session = session
        self.started = threading.Event()
        self.calls: list[GenerationRequest] = []
        self.cancelled = 0

    def generate(self, request, **kwargs):
        self.calls.append(request)
        steps = []
        kwargs["on_step"] = lambda event: (steps.append(event), self.started.set())
        try:
            return self.session.generate(request, **kwargs)
        except Cancelled:
            self.cancelled += 1
            raise


def _rows(kohya: float, preview_steps: int) -> list[dict]:
    return [{"name": KOHYA, "weight": kohya, "enabled": True, "scrub": True, "preview_steps": preview_steps},
            {"name": PEFT, "weight": 0.5, "enabled": True}]


def _request(kohya: float, steps: int) -> GenerationRequest:
    return GenerationRequest(prompt="a lighthouse", seed=FORM["seed"], steps=steps, width=64, height=64,
                             loras=((KOHYA, kohya), (PEFT, 0.5)))


@pytest.fixture
def watched(tiny_session, tmp_path):
    tiny_session.generate(_request(0.5, 1), out_path=tmp_path / "warm.png")  # the stack at the rows' weights
    yield Watched(tiny_session)
    tiny_session.generate(GenerationRequest(prompt="x", steps=1, width=64, height=64), out_path=tmp_path / "z.png")


def test_values_inside_the_debounce_start_one_job(watched):
    scrubber = Scrubber(watched)
    out: dict[float, tuple] = {}
    first = threading.Thread(target=lambda: out.setdefault(0.6, scrubber.run(OWNER, KOHYA, 0.6, _rows(0.5, 2),
                                                                             "a lighthouse", FORM)))
    first.start()
    out[0.7] = scrubber.run(OWNER, KOHYA, 0.7, _rows(0.5, 2), "a lighthouse", FORM)  # well within 150 ms
    first.join()
    assert out[0.6] == (None, None)
    assert out[0.7][0] is not None
    assert [r.loras[0][1] for r in watched.calls] == [0.7]


def test_a_newer_value_cancels_the_stale_job_and_only_that_lora_is_remerged(watched, tiny_session, tmp_path):
    scrubber = Scrubber(watched)
    stale: list[tuple] = []
    slow = threading.Thread(target=lambda: stale.append(scrubber.run(OWNER, KOHYA, 0.9, _rows(0.5, 60),
                                                                     "a lighthouse", FORM)))
    slow.start()
    assert watched.started.wait(120), "the first scrub never reached its first step"
    picture, note = scrubber.run(OWNER, KOHYA, 0.3, _rows(0.5, 2), "a lighthouse", FORM)
    slow.join(120)
    assert stale == [(None, None)] and watched.cancelled == 1  # ended at its next step, no picture
    kohya_layers = len(tiny_session.lora_footprint(tiny_session.prepare(_request(0.3, 2)).stack[0]))
    assert f"{kohya_layers} tensors re-merged" in note, note
    assert re.search(r"image \*\*\d+\.\d\d s\*\* after the last slider change", note), note
    alone = tiny_session.generate(_request(0.3, 2), out_path=tmp_path / "alone.png")
    expected = np.asarray(Image.open(alone.paths[0]).convert("RGB"))
    assert np.array_equal(np.asarray(picture.convert("RGB")), expected)
    scrubbed = list(tiny_session.history)[-2].lora["scrub"]  # the Report tab shows it (ui/report_view.py)
    assert scrubbed["lora"] == KOHYA and scrubbed["weight"] == 0.3 and scrubbed["latency_seconds"] > 0
    # and so does the history kept on disk for the next start
    from studio.history import ReportHistory

    kept = list(ReportHistory(tiny_session.history.path))[-2]
    assert kept.lora["scrub"] == scrubbed and any(n.startswith("live scrub: ") for n in kept.notes)
