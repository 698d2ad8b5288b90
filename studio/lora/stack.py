"""Which LoRA files a request asks for: picker rows plus `<lora:name:weight>` prompt tags.

A stack is data (a list of name, file, weight); applying it is the patcher's job.
Names resolve against the configured LoRA folders, then the demo LoRAs in assets/;
a path to a .safetensors file works too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from studio.errors import LoraError
from studio.infotext import split_lora_tags
from studio.paths import DEMO_LORA_DIR


@dataclass(frozen=True)
class StackItem:
    name: str  # as written in <lora:name:weight> and `Lora hashes`
    path: Path
    weight: float


def search_dirs(lora_dirs: Iterable[str]) -> list[Path]:
    """The user's folders first, then the shipped demo LoRAs."""
    return [Path(d).expanduser() for d in lora_dirs if d] + [DEMO_LORA_DIR]


def list_loras(dirs: Sequence[Path]) -> dict[str, Path]:
    """name -> file for every .safetensors under the folders; an earlier folder wins a name clash."""
    found: dict[str, Path] = {}
    for folder in dirs:
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*.safetensors")):
            found.setdefault(path.stem, path)
    return found


def find_lora(name: str, dirs: Sequence[Path]) -> Path:
    """A path to a file, or a name found in the folders (exact, then case-insensitive)."""
    candidate = Path(name).expanduser()
    if _is_path(name) or candidate.is_absolute():
        if candidate.is_file():
            return candidate.resolve()
        raise LoraError(f"{name}: no such LoRA file")
    known = list_loras(dirs)
    if name in known:
        return known[name].resolve()
    folded = {k.lower(): v for k, v in known.items()}
    if name.lower() in folded:
        return folded[name.lower()].resolve()
    where = ", ".join(str(d) for d in dirs)
    hint = f"; known: {', '.join(sorted(known)[:8])}" if known else ""
    raise LoraError(f"no LoRA named {name!r} in {where}{hint}")


def resolve_stack(prompt: str, rows: Sequence[tuple[str, float]], dirs: Sequence[Path]) -> tuple[str, list[StackItem]]:
    """The prompt without tags, and the stack: rows first, then tags; a repeated name keeps its last weight."""
    text, tags = split_lora_tags(prompt)
    weights: dict[str, float] = {}
    for name, weight in [*rows, *tags]:
        weights.pop(name, None)  # re-insert so the last mention also sets the order
        weights[name] = float(weight)
    items = []
    for name, weight in weights.items():
        path = find_lora(name, dirs)
        # A path becomes its file name, as A1111 writes it in <lora:...> and `Lora hashes`.
        items.append(StackItem(path.stem if _is_path(name) else name, path, weight))
    return text, items


def _is_path(name: str) -> bool:
    return name.endswith(".safetensors") or "/" in name or "\\" in name
