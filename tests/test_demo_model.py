"""The demo model draws what it is asked, and the demo LoRAs do what their names say.

Judged from the pixels (studio.demo_shapes.read): the nearest palette colour of the middle
and of the border, and the shape from how much of its bounding box it fills. Generated
through the app's own session in fp32 (bf16 is slow on CPUs without native support), with
the app's default sampler, steps and CFG. The whole vocabulary is measured by
scripts/measure_demo_model.py (docs/BENCHMARKS.md); these are a spread of it.
"""

from __future__ import annotations

import numpy as np
import pytest

from studio.demo_shapes import read, texture, warmth
from studio.demo_vocab import COLOURS, SHAPES, Scene, example_prompts
from studio.models.architectures import TINY_DEFAULT_SIZE
from studio.request import GenerationRequest
from studio.settings import Precision, Settings

# Every colour as shape and as background, every shape, every wording.
CASES = [
    (Scene("red", "circle", "blue"), 0),
    (Scene("yellow", "triangle", "purple"), 0),
    (Scene("white", "square", "black"), 1),
    (Scene("green", "circle", "orange"), 2),
    (Scene("black", "triangle", "white"), 3),
    (Scene("purple", "square", "yellow"), 0),
    (Scene("orange", "square", "green"), 0),
    (Scene("blue", "triangle", "red"), 1),
]
LORA_PROMPT = Scene("white", "square", "green").prompt()
WEIGHTS = (0.0, 0.5, 1.0, 1.5)


@pytest.fixture(scope="module")
def fp32_session(tmp_path_factory):
    from studio.paths import AppDirs
    from studio.session import Session

    root = tmp_path_factory.mktemp("demo-home")
    dirs = AppDirs(config=root / "config", data=root / "data", cache=root / "cache")
    for folder in (dirs.config, dirs.data, dirs.cache):
        folder.mkdir(parents=True)
    session = Session(Settings(device="cpu", precision=Precision.FP32), dirs)
    session.load_model()
    yield session
    session.close()


def _image(session, prompt: str, seed: int = 0, loras=()) -> np.ndarray:
    result = session.generate(GenerationRequest(prompt=prompt, seed=seed, loras=tuple(loras)))
    return np.asarray(result.images[0].convert("RGB"))


def test_the_cases_cover_the_vocabulary():
    assert {s.colour for s, _ in CASES} | {s.background for s, _ in CASES} == {c.name for c in COLOURS}
    assert {s.shape for s, _ in CASES} == set(SHAPES)
    assert {t for _, t in CASES} == {0, 1, 2, 3}


@pytest.mark.parametrize("scene,template", CASES, ids=[s.prompt(t) for s, t in CASES])
def test_draws_the_colours_and_the_shape_it_is_asked_for(fp32_session, scene, template):
    image = _image(fp32_session, scene.prompt(template), seed=3)
    assert image.shape == (TINY_DEFAULT_SIZE, TINY_DEFAULT_SIZE, 3)
    reading = read(image)
    assert (reading.colour, reading.shape, reading.background) == (scene.colour, scene.shape, scene.background)
    assert 0.3 < reading.width < 0.8  # trained on 40-70% of the width


def test_the_default_size_is_the_size_it_was_trained_at(fp32_session):
    result = fp32_session.generate(GenerationRequest(prompt=example_prompts()[0], seed=1))
    assert result.images[0].size == (128, 128) and result.report.request["width"] == 128


def test_example_prompts_are_in_the_vocabulary():
    prompts = example_prompts()
    assert len(prompts) >= 5 and len(set(prompts)) == len(prompts)
    assert prompts[0] == "a red circle on a blue background"


@pytest.mark.parametrize("name,measure,sign", [("demo-kohya-warm", warmth, 1), ("demo-peft-cool", warmth, -1),
                                               ("demo-locon-grain", texture, 1)])
def test_each_demo_lora_does_what_its_name_says_more_with_weight(fp32_session, name, measure, sign):
    base = _image(fp32_session, LORA_PROMPT)
    images = {w: _image(fp32_session, LORA_PROMPT, loras=[(name, w)]) for w in WEIGHTS}
    assert np.array_equal(images[0.0], base)  # weight 0 is no LoRA, pixel for pixel
    effect = [sign * (measure(images[w]) - measure(base)) for w in WEIGHTS]
    assert effect[1] < effect[2] < effect[3], effect
    assert effect[2] > (8.0 if measure is warmth else 1.0), effect  # visible at weight 1
    # and it is still the picture that was asked for
    assert (read(images[1.0]).shape, read(images[1.0]).background) == ("square", "green")


def test_the_warm_lora_learnt_its_trigger_word(fp32_session):
    plain = _image(fp32_session, LORA_PROMPT, loras=[("demo-kohya-warm", 1.0)])
    triggered = _image(fp32_session, LORA_PROMPT + ", golden hour", loras=[("demo-kohya-warm", 1.0)])
    base = _image(fp32_session, LORA_PROMPT)
    assert warmth(triggered) - warmth(base) > 1.3 * (warmth(plain) - warmth(base))


def test_the_base_model_ignores_the_trigger_word(fp32_session):
    reading = read(_image(fp32_session, LORA_PROMPT + ", golden hour"))
    assert (reading.colour, reading.shape, reading.background) == ("white", "square", "green")
