"""Which LoRA files a request asks for: picker rows plus `<lora:name:weight>` prompt tags.

A stack is data (a list of name, file, spec); applying it is the patcher's job. Each item
carries its whole `LoraSpec` (te/unet weights, block weights, step range) with its block
weights resolved against the presets here, so a bad vector or an unknown preset fails
before a model loads.
Names resolve against the configured LoRA folders, then the demo LoRAs in assets/. A path to
a .safetensors file works only where the caller says so (`allow_paths`: the local command
line): through the UI and its API, whoever types `<lora:/etc/shadow:1>` may be a visitor
through the public link, so there a LoRA is a name found in the folders (issue 11).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

from studio.errors import LoraError
from studio.lora.block_weights import resolve_lbw
from studio.lora.spec import LoraSpec, spec_of, split_tags
from studio.paths import DEMO_LORA_DIR


@dataclass(frozen=True)
class StackItem:
    name: str  # as written in <lora:name:weight> and `Lora hashes`
    path: Path
    spec: LoraSpec
    blocks: tuple[float, ...] | None = None  # the 20 block weights lbw= names; None without lbw

    @property
    def weight(self) -> float:
        """A1111's first number (text encoders, and the UNet unless the spec gives it apart)."""
        return self.spec.weight

    def entry(self) -> tuple:
        """The request form of this item: (name, weight) or (name, weight, options)."""
        return replace(self.spec, name=self.name).entry()


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


def find_lora(name: str, dirs: Sequence[Path], *, allow_paths: bool = False) -> Path:
    """A name found in the folders (exact, then case-insensitive), or with `allow_paths` a path to a file."""
    if allow_paths:
        candidate = Path(name).expanduser()
        if _is_path(name) or candidate.is_absolute():
            if candidate.is_file():
                return candidate.resolve()
            raise LoraError(f"{name}: no such LoRA file")
    elif _is_path(name) or name.startswith("~") or name in (".", ".."):
        raise LoraError(f"LoRA {name!r}: a LoRA is named by its file name in the LoRA folders, without folder or "
                        "`.safetensors` (paths work on the command line only)")
    known = list_loras(dirs)
    if name in known:
        return known[name].resolve()
    folded = {k.lower(): v for k, v in known.items()}
    if name.lower() in folded:
        return folded[name.lower()].resolve()
    # the folders' paths only for the command line: a visitor's error names no local path
    where = ", ".join(str(d) for d in dirs) if allow_paths else "the LoRA folders"
    hint = f"; known: {', '.join(sorted(known)[:8])}" if known else ""
    raise LoraError(f"no LoRA named {name!r} in {where}{hint}")


def merge_specs(rows: Sequence, tags: Sequence[LoraSpec]) -> list[LoraSpec]:
    """Rows first, then tags; a repeated name keeps its last mention (and takes its place)."""
    specs: dict[str, LoraSpec] = {}
    for spec in [*(spec_of(r) for r in rows), *tags]:
        specs.pop(spec.name, None)  # re-insert so the last mention also sets the order
        specs[spec.name] = spec
    return list(specs.values())


def resolve_stack(prompt: str, rows: Sequence, dirs: Sequence[Path],
                  presets: Mapping[str, tuple[float, ...]] | None = None, *,
                  allow_paths: bool = False) -> tuple[str, list[StackItem]]:
    """The prompt without tags, and the stack: rows first, then tags; a repeated name keeps its last weight.

    `rows` are request entries, (name, weight[, options]); `presets` the user's block-weight presets;
    `allow_paths`: a LoRA may also be a path to a file (the local command line only).
    """
    text, tags = split_tags(prompt)
    items = []
    for spec in merge_specs(rows, tags):
        blocks = resolve_lbw(spec, presets or {})
        path = find_lora(spec.name, dirs, allow_paths=allow_paths)
        # A path becomes its file name, as A1111 writes it in <lora:...> and `Lora hashes`.
        name = path.stem if _is_path(spec.name) else spec.name
        items.append(StackItem(name, path, replace(spec, name=name), blocks))
    return text, items


def _is_path(name: str) -> bool:
    return name.endswith(".safetensors") or "/" in name or "\\" in name
