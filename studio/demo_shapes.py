"""The demo vocabulary as pixels: draw a scene, and read one back from an image.

`draw` is what the demo model is trained on (scripts/train_demo_model.py): one shape,
centred, 40-70% of the image width, anti-aliased from its signed distance, on a plain
background. `read` is how the tests and the benchmark judge a generated image: the
nearest palette colour of the middle and of the border, and the shape from how much of
its bounding box the shape fills (square 1, circle pi/4, triangle 1/2). `warmth` and
`texture` measure what the demo LoRAs change (colour cast, grain).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from studio.demo_vocab import COLOUR_BY_NAME, COLOURS, SHAPES, Scene

MIN_WIDTH, MAX_WIDTH = 0.4, 0.7  # of the image width
_PALETTE = np.array([c.rgb for c in COLOURS], dtype=np.float64)
# Fill ratio of the bounding box between the shapes' ideal values (triangle 0.5, circle 0.785, square 1).
_TRIANGLE_BELOW, _CIRCLE_BELOW = 0.64, 0.89


def rgb01(name: str) -> torch.Tensor:
    return torch.tensor(COLOUR_BY_NAME[name].rgb, dtype=torch.float32) / 255.0


def coverage(shape: str, size: int, width: float, centre: tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:
    """[size, size] in [0, 1]: how much of each pixel the shape covers (`width` in pixels)."""
    axis = torch.arange(size, dtype=torch.float32) + 0.5 - size / 2
    y, x = axis[:, None] - centre[1], axis[None, :] - centre[0]
    half = width / 2
    if shape == "circle":
        distance = torch.sqrt(x * x + y * y) - half
    elif shape == "square":
        distance = torch.maximum(x.abs(), y.abs()) - half
    elif shape == "triangle":  # equilateral, point up, its bounding box centred
        height = width * math.sqrt(3) / 2
        slanted = (math.sqrt(3) * x.abs() - (y + height / 2)) / 2  # signed distance to the two sides
        distance = torch.maximum(slanted, y - height / 2)
    else:
        raise ValueError(f"`shape` must be one of {', '.join(SHAPES)}, got {shape!r}")
    return (0.5 - distance).clamp(0.0, 1.0)


def draw(scene: Scene, size: int, width_fraction: float = 0.55, centre: tuple[float, float] = (0.0, 0.0)
         ) -> torch.Tensor:
    """[3, size, size] float32 RGB in [0, 1]."""
    if not MIN_WIDTH <= width_fraction <= MAX_WIDTH:
        raise ValueError(f"`width_fraction` must be between {MIN_WIDTH} and {MAX_WIDTH}, got {width_fraction}")
    mask = coverage(scene.shape, size, width_fraction * size, centre)
    fg, bg = rgb01(scene.colour)[:, None, None], rgb01(scene.background)[:, None, None]
    return bg + (fg - bg) * mask


@dataclass(frozen=True)
class Reading:
    """What an image shows, in the vocabulary's terms (`shape` is "" when nothing stands out)."""

    colour: str
    shape: str
    background: str
    fill: float  # the shape's share of its bounding box
    width: float  # the bounding box width as a share of the image width

    def matches(self, scene: Scene) -> dict[str, bool]:
        return {"colour": self.colour == scene.colour, "background": self.background == scene.background,
                "shape": self.shape == scene.shape}


def nearest_colour(rgb: np.ndarray) -> str:
    return COLOURS[int(np.argmin(((_PALETTE - rgb) ** 2).sum(axis=1)))].name


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float64)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {array.shape}")
    return array


def read(image: Image.Image | np.ndarray) -> Reading:
    """Classify an RGB image (0-255) drawn like `draw` draws: centre colour, border colour, shape."""
    pixels = _as_array(image)
    h, w = pixels.shape[:2]
    ring = max(2, w // 20)
    border = np.concatenate([pixels[:ring].reshape(-1, 3), pixels[-ring:].reshape(-1, 3),
                             pixels[:, :ring].reshape(-1, 3), pixels[:, -ring:].reshape(-1, 3)])
    half = max(2, w // 16)
    middle = pixels[h // 2 - half:h // 2 + half, w // 2 - half:w // 2 + half].reshape(-1, 3)
    border_rgb, middle_rgb = np.median(border, axis=0), np.median(middle, axis=0)
    colour, background = nearest_colour(middle_rgb), nearest_colour(border_rgb)
    # the shape: pixels nearer the middle's colour than the border's
    to_middle = ((pixels - middle_rgb) ** 2).sum(axis=2)
    to_border = ((pixels - border_rgb) ** 2).sum(axis=2)
    mask = to_middle < to_border
    if colour == background or not mask.any() or mask.all():
        return Reading(colour, "", background, 0.0, 0.0)
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    box = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    fill = float(box.mean())
    shape = "triangle" if fill < _TRIANGLE_BELOW else "circle" if fill < _CIRCLE_BELOW else "square"
    return Reading(colour, shape, background, fill, float(box.shape[1] / w))


def warmth(image: Image.Image | np.ndarray) -> float:
    """Mean red minus mean blue (0-255 units): up for a warm cast, down for a cool one."""
    pixels = _as_array(image)
    return float(pixels[..., 0].mean() - pixels[..., 2].mean())


def texture(image: Image.Image | np.ndarray, window: int = 9) -> float:
    """Mean |pixel - the mean of its `window` x `window` neighbourhood| (0-255): about 0 inside flat colour,
    up with grain. The window is wider than the demo grain's 8 px cells (finer grain does not survive the
    demo VAE), so a cell is measured against its neighbours, not against itself."""
    pixels = _as_array(image)
    r = window // 2
    padded = np.pad(pixels, ((r + 1, r), (r + 1, r), (0, 0)), mode="edge")
    integral = padded.cumsum(0).cumsum(1)
    h, w = pixels.shape[:2]
    total = (integral[window:window + h, window:window + w] - integral[:h, window:window + w]
             - integral[window:window + h, :w] + integral[:h, :w])
    return float(np.abs(pixels - total / window ** 2).mean())
