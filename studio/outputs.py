"""Where generated images are saved (`<outputs>/<date>/<NNNNN>-<seed>.png`, the report JSON beside each),
which folder may hold them, and the list of what is there, for the output history.

The outputs folder is served to every visitor of the app (Gradio's `allowed_paths`), so it
must be a folder of its own: `check_outputs_dir` refuses the filesystem root, the home
folder, the app's config/data/cache folders, a folder holding the model or a LoRA folder,
and anything above those (issue 11: `outputs_dir = "/"` served `/etc/passwd`).

A file is created exclusively (`open(..., "xb")`): two processes that pick the same name
cannot both write it; the one that loses takes the next number.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, BinaryIO

from studio.errors import SettingsError
from studio.lora.stack import search_dirs
from studio.paths import TINY_MODEL_DIR, AppDirs

log = logging.getLogger(__name__)
MAX_TRIES = 1000  # names taken under our feet before we give up (another process saving as fast as we do)


def _highest_number(folder: Path) -> int:
    return max((int(p.name[:5]) for p in folder.glob("*.png") if p.name[:5].isdigit()), default=0)


@dataclass(frozen=True)
class OutputFolder:
    """The outputs folder: each image gets the next free number in today's subfolder."""

    root: Path

    def save(self, seed: int, write: Callable[[BinaryIO], None], today: date | None = None) -> Path:
        """Create the next `<NNNNN>-<seed>.png` exclusively, let `write` fill it, return its path.

        A failed write removes its own file, so a cancelled or failed save leaves nothing behind.
        """
        folder = self.root / (today or date.today()).isoformat()
        folder.mkdir(parents=True, exist_ok=True)
        number = _highest_number(folder) + 1
        for _ in range(MAX_TRIES):
            path = folder / f"{number:05d}-{seed}.png"
            try:
                fh = open(path, "xb")
            except FileExistsError:  # taken since we listed the folder: by another process, or a seed twin
                number = max(number + 1, _highest_number(folder) + 1)
                continue
            try:
                with fh:
                    write(fh)
            except BaseException:
                path.unlink(missing_ok=True)
                raise
            return path
        raise OSError(f"no free file name in {folder} after {MAX_TRIES} tries")


def _is_at_or_above(folder: Path, other: Path) -> bool:
    """`folder` is `other` or one of its parents: serving it would serve `other`."""
    return other == folder or other.is_relative_to(folder)


def protected_folders(dirs: AppDirs, model: str = "", lora_dirs: Iterable[str | Path] = (), *,
                      model_dirs: Iterable[str | Path] = (), vae: str = "") -> list[tuple[Path, str]]:
    """(folder, what it is): folders the outputs folder may neither be nor contain."""
    found = [(Path.home(), "your home folder"), (dirs.config, "the config folder (it holds settings.toml)"),
             (dirs.data, "the app's data folder"), (dirs.cache, "the app's cache folder")]
    for path, what in ((Path(model).expanduser() if model else TINY_MODEL_DIR, "the model's folder"),
                       (Path(vae).expanduser() if vae else None, "the VAE's folder")):
        if path is not None and path.exists():
            found.append((path if path.is_dir() else path.parent, what))
    found += [(folder, "a LoRA folder") for folder in search_dirs([str(d) for d in lora_dirs])]
    found += [(Path(folder).expanduser(), "a model folder (the model picker's)") for folder in model_dirs]
    return [(_resolved(folder), what) for folder, what in found]


def _resolved(path: Path) -> Path:
    return path.expanduser().resolve(strict=False)


def _refusal(folder: Path, dirs: AppDirs, model: str, lora_dirs: Iterable[str | Path], **more: Any) -> str | None:
    """Why `folder` may not be the outputs folder, or None (`more`: protected_folders' model_dirs, vae)."""
    if folder == Path(folder.anchor):
        return "it is the filesystem root"
    for protected, what in protected_folders(dirs, model, lora_dirs, **more):
        if _is_at_or_above(folder, protected):
            return f"it is {what}" if folder == protected else f"it holds {what} ({protected})"
    if folder.exists() and not folder.is_dir():
        return "it is a file, not a folder"
    return None


def check_outputs_dir(value: str, dirs: AppDirs, *, model: str = "", lora_dirs: Iterable[str | Path] = (),
                      **more: Any) -> Path:
    """The folder `outputs_dir` names (the default for an empty value), or SettingsError saying why not."""
    if not value:
        return dirs.default_outputs
    folder = _resolved(Path(value))
    why = _refusal(folder, dirs, model, lora_dirs, **more)
    if why:
        raise SettingsError(f"`outputs_dir` {value!r} is refused: {why}, and the outputs folder is served to the "
                            "app's visitors. Choose a folder of its own, e.g. ~/Pictures/lora-studio")
    return folder


def choose_outputs(value: str, dirs: AppDirs, *, model: str = "", lora_dirs: Iterable[str | Path] = (),
                   **more: Any) -> tuple[Path, str | None]:
    """The folder to save into for this run, created, and a notice when `value` could not be used.

    At start a refused or uncreatable `outputs_dir` (`/proc/x`) falls back to the default outputs
    folder instead of stopping the app (issue 11); the notice says so, and is logged.
    """
    default = dirs.default_outputs
    folder = _resolved(Path(value)) if value else default
    why = _refusal(folder, dirs, model, lora_dirs, **more) if value else None
    if why is None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return folder, None
        except OSError as err:
            why = f"it cannot be created ({err.strerror or err})"
    default.mkdir(parents=True, exist_ok=True)
    notice = f"`outputs_dir` {value!r} is not used: {why}; images go to the default folder {default} for this run"
    log.warning("%s", notice)
    return default, notice


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
