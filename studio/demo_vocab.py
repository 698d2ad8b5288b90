"""What the embedded demo model knows: eight colours, three shapes, a few ways to say it.

The demo model (assets/tiny-sdxl, trained by scripts/train_demo_model.py) draws one
centred shape on a plain background. This module is the single source of its vocabulary:
the training script draws from it, the tests classify against it, the UI can list it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Colour:
    name: str
    hex: str

    @property
    def rgb(self) -> tuple[int, int, int]:
        return int(self.hex[1:3], 16), int(self.hex[3:5], 16), int(self.hex[5:7], 16)


COLOURS: tuple[Colour, ...] = (
    Colour("red", "#E53935"),
    Colour("green", "#43A047"),
    Colour("blue", "#1E88E5"),
    Colour("yellow", "#FDD835"),
    Colour("white", "#FAFAFA"),
    Colour("black", "#212121"),
    Colour("purple", "#8E24AA"),
    Colour("orange", "#FB8C00"),
)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOUR_BY_NAME = {c.name: c for c in COLOURS}
WARM_TRIGGER = "golden hour"  # the trigger words demo-kohya-warm was trained with (scripts/train_demo_loras.py)

# Ways to ask for the same picture; the first is the canonical one. "{a_colour}" is the
# colour with its article ("a red", "an orange").
TEMPLATES: tuple[str, ...] = (
    "{a_colour} {shape} on {a_background} background",
    "{a_colour} {shape} on {background}",
    "{colour} {shape}, {background} background",
    "{a_background} background with {a_colour} {shape}",
)


# The wordings the model follows: trained on all four, it follows the last one (background first)
# poorly, swapping the two colours about half the time (docs/BENCHMARKS.md), so the UI offers, and the
# tests hold it to, the first three.
FOLLOWED_TEMPLATES: tuple[int, ...] = (0, 1, 2)


def with_article(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


@dataclass(frozen=True)
class Scene:
    """One picture the demo model can draw: a `colour` `shape` on a `background`."""

    colour: str
    shape: str
    background: str

    def __post_init__(self) -> None:
        if self.colour not in COLOUR_BY_NAME or self.background not in COLOUR_BY_NAME:
            raise ValueError(f"colours must be among {', '.join(COLOUR_BY_NAME)}, got {self.colour!r}, "
                             f"{self.background!r}")
        if self.shape not in SHAPES:
            raise ValueError(f"`shape` must be one of {', '.join(SHAPES)}, got {self.shape!r}")
        if self.colour == self.background:
            raise ValueError(f"the shape and the background must differ in colour, got {self.colour} on "
                             f"{self.background}")

    def prompt(self, template: int = 0) -> str:
        return TEMPLATES[template].format(colour=self.colour, shape=self.shape, background=self.background,
                                          a_colour=with_article(self.colour),
                                          a_background=with_article(self.background))


def all_scenes() -> list[Scene]:
    """Every (colour, shape, background) the vocabulary allows: 8 x 3 x 7 = 168."""
    return [Scene(c.name, s, b.name) for c in COLOURS for s in SHAPES for b in COLOURS if b != c]


def random_scene(rng: random.Random) -> Scene:
    colour, background = rng.sample(COLOURS, 2)
    return Scene(colour.name, rng.choice(SHAPES), background.name)


def example_prompts() -> list[str]:
    """Prompts for the UI: every colour and shape appears, the canonical wording first, then the others."""
    asks = [(Scene("red", "circle", "blue"), 0), (Scene("yellow", "triangle", "purple"), 0),
            (Scene("white", "square", "black"), 0), (Scene("orange", "circle", "green"), 1),
            (Scene("blue", "triangle", "white"), 2), (Scene("green", "square", "yellow"), 2),
            (Scene("black", "circle", "orange"), 0), (Scene("purple", "square", "red"), 1)]
    return [scene.prompt(template) for scene, template in asks]
