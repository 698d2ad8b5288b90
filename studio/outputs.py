"""Where generated images are saved (`<outputs>/<date>/<NNNNN>-<seed>.png`, the report JSON beside each),
and the list of what is there, for the output history."""

from __future__ import annotations

from datetime import date
from pathlib import Path


def next_output_path(root: Path, seed: int, today: date | None = None) -> Path:
    """The next free number in today's folder (created); the seed is part of the name."""
    folder = root / (today or date.today()).isoformat()
    folder.mkdir(parents=True, exist_ok=True)
    numbers = [int(p.name[:5]) for p in folder.glob("*.png") if p.name[:5].isdigit()]
    return folder / f"{max(numbers, default=0) + 1:05d}-{seed}.png"


def list_outputs(root: Path) -> list[Path]:
    """Every PNG under the outputs folder (any date folder), newest first; missing folder: none.

    Newest by modification time, then by name (the numbers of one day's folder), so a batch keeps
    its order however fast it was written.
    """
    if not root.is_dir():
        return []
    found = []
    for path in root.rglob("*.png"):
        try:
            found.append((path.stat().st_mtime_ns, path.name, path))
        except OSError:  # removed while listing
            continue
    return [path for _, _, path in sorted(found, key=lambda item: (item[0], item[1]), reverse=True)]
