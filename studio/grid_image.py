"""The grid picture: cells in rows and columns, the axis values written beside them.

Text must be readable offline and on any machine: DejaVu Sans when the system has it, else
PIL's own scalable font (`ImageFont.load_default(size=...)`, Pillow >= 10.1), which ships
inside Pillow. Small cells (the 64-px demo model) are scaled up without smoothing, so labels
and pixels stay legible; each cell's own PNG keeps its real size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

MIN_CELL = 192  # px: a grid of 64-px cells would have unreadable labels
FONT_FILES = ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
BACKGROUND, INK, MISSING = (255, 255, 255), (20, 20, 20), (225, 225, 225)


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    for name in FONT_FILES:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def _wrap(draw: ImageDraw.ImageDraw, text: str, face, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split(" "):
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=face) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


def compose(cells: Mapping[tuple[int, int, int], Path | None], x_labels: Sequence[str], y_labels: Sequence[str],
            z_labels: Sequence[str], title: str = "") -> Image.Image:
    """One picture of every (x, y, z) cell; a z axis stacks one labelled grid per value."""
    first = next((p for p in cells.values() if p is not None), None)
    if first is not None:
        with Image.open(first) as img:
            cw, ch = img.size
    else:
        cw, ch = MIN_CELL, MIN_CELL
    scale = max(1, math.ceil(MIN_CELL / min(cw, ch)))
    cw, ch = cw * scale, ch * scale
    size = max(14, min(28, cw // 11))
    face, small = font(size), font(max(12, size - 2))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(size * 1.3)
    x_lines = [_wrap(probe, t, face, cw - 8) for t in x_labels] or [[""]]
    head = (max(len(lines) for lines in x_lines) * line_h + 10) if any(x_labels) else 6
    left = int(max([probe.textlength(t, font=face) for t in y_labels] + [0])) + 20 if any(y_labels) else 6
    left = min(left, 3 * cw)
    y_wrapped = [_wrap(probe, t, face, left - 14) for t in y_labels] or [[""]]
    band = line_h + 12 if len(z_labels) > 1 or title else 0
    nx, ny, nz = max(1, len(x_labels)), max(1, len(y_labels)), max(1, len(z_labels))
    block_h = band + head + ny * (ch + 4)
    canvas = Image.new("RGB", (left + nx * (cw + 4) + 4, nz * block_h + 4), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for z in range(nz):
        top = z * block_h
        if band:
            text = " · ".join(t for t in (title, z_labels[z] if len(z_labels) > 1 else "") if t)
            draw.text((8, top + 6), text, fill=INK, font=face)
        for x, lines in enumerate(x_lines):
            for k, line in enumerate(lines):
                w = probe.textlength(line, font=face)
                draw.text((left + x * (cw + 4) + (cw - w) / 2, top + band + 4 + k * line_h), line, fill=INK, font=face)
        for y in range(ny):
            y0 = top + band + head + y * (ch + 4)
            lines = y_wrapped[y] if y < len(y_wrapped) else [""]
            for k, line in enumerate(lines):
                draw.text((8, y0 + (ch - len(lines) * line_h) / 2 + k * line_h), line, fill=INK, font=face)
            for x in range(nx):
                box = (left + x * (cw + 4), y0)
                path = cells.get((x, y, z))
                if path is None:
                    draw.rectangle([box, (box[0] + cw - 1, box[1] + ch - 1)], fill=MISSING)
                    draw.text((box[0] + 8, box[1] + 8), "not run", fill=INK, font=small)
                    continue
                with Image.open(path) as img:
                    canvas.paste(img.convert("RGB").resize((cw, ch), Image.NEAREST), box)
    return canvas
