"""Where generated images are saved: `<outputs>/<date>/<NNNNN>-<seed>.png`."""

from __future__ import annotations

from datetime import date
from pathlib import Path


def next_output_path(root: Path, seed: int, today: date | None = None) -> Path:
    """The next free number in today's folder (created); the seed is part of the name."""
    folder = root / (today or date.today()).isoformat()
    folder.mkdir(parents=True, exist_ok=True)
    numbers = [int(p.name[:5]) for p in folder.glob("*.png") if p.name[:5].isdigit()]
    return folder / f"{max(numbers, default=0) + 1:05d}-{seed}.png"
