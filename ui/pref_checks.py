"""Every bad value in a Preferences save, each named by its label, so each can be shown at its control.

`Settings.replace` checks a whole set and stops at the first bad field, and its messages use
the field's internal name ("`default_steps` must be between 1 and 200"). The panel wants all of
them at once, in the words on the screen; so each changed field is checked on its own first,
then the whole set (for checks that span fields). Folders the app reads from (LoRA and model
folders) must exist: a typo there would otherwise be saved and silently list nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from studio.errors import SettingsError
from studio.settings import Settings, field_names
from ui.pref_fields import info_for

FOLDER_LISTS = ("lora_dirs", "model_dirs")  # folders that must exist when saved
WHOLE = ""  # the key of a problem no single field owns


def labelled(message: str) -> str:
    """`default_steps` -> **Default steps** in an engine message."""
    for name in field_names():
        message = message.replace(f"`{name}`", f"**{info_for(name).label}**")
    return message


def missing_folders(name: str, value: Any) -> str | None:
    folders = [value] if isinstance(value, str) else list(value or ())
    bad = []
    for folder in folders:
        path = Path(str(folder)).expanduser()
        if not path.exists():
            bad.append(f"{folder} does not exist")
        elif not path.is_dir():
            bad.append(f"{folder} is not a folder")
    if not bad:
        return None
    return f"`{name}`: " + "; ".join(bad) + " (create it, or remove the line)"


def problems(saved: Settings, changes: dict[str, Any]) -> dict[str, str]:
    """Field name -> what is wrong with its new value ({} when the whole set can be saved)."""
    found: dict[str, str] = {}
    for name, value in changes.items():
        if name not in field_names():
            found[WHOLE] = labelled(f"unknown setting `{name}`; known: {', '.join(field_names())}")
            continue
        try:
            saved.replace(**{name: value})
        except SettingsError as err:
            found[name] = labelled(str(err))
            continue
        if name in FOLDER_LISTS:
            missing = missing_folders(name, value)
            if missing:
                found[name] = labelled(missing)
    if not found:
        try:
            saved.replace(**changes)
        except SettingsError as err:
            found[WHOLE] = labelled(str(err))
    return found


def refusal(found: dict[str, str]) -> str:
    """One paragraph for the result line (and the API's error): every problem, labelled."""
    count = len(found)
    head = f"Nothing was saved: {count} value{'s' if count != 1 else ''} need{'s' if count == 1 else ''} fixing."
    return head + "\n\n" + "\n".join(f"- {message}" for message in found.values())


def check_folders(changes: dict[str, Any]) -> None:
    """The API's path: a folder list naming a folder that is not there is refused like a bad number."""
    for name in FOLDER_LISTS:
        if name in changes:
            missing = missing_folders(name, changes[name])
            if missing:
                raise SettingsError(missing)
