"""Settings fields <-> Gradio widgets: which widget shows a field, and how its value comes back.

Driven by the Settings dataclass and SETTING_INFO, so a field added to the engine shows
up in the panel without UI changes (with a conservative "needs a restart" note when it
has no SETTING_INFO entry yet).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import gradio as gr

from studio.settings import SETTING_INFO, Applies, SettingInfo, Settings, field_names

APPLIES_BADGE = {Applies.NOW: "⚡ applies now", Applies.MODEL_RELOAD: "⟳ applies when the model reloads",
                 Applies.RESTART: "⚙ needs a restart"}
SECTIONS: dict[str, tuple[str, ...]] = {
    "Model and files": ("model", "vae", "model_dirs", "device", "precision", "outputs_dir"),
    "LoRAs": ("lora_dirs", "lora_mode", "unpatch_lora_by_vram_offload", "lora_cache_mb", "lbw_presets"),
    "Memory": ("memory_mode", "stream_lookahead", "fp8_storage", "ram_limit_mb", "vram_limit_mb",
               "working_memory_mb"),
    "Generation defaults": ("default_steps", "default_cfg", "live_preview"),
    "Server and public link": ("port", "share", "auth_user", "auth_password"),
}
SECRET_FIELDS = frozenset({"auth_password"})
PATH_FIELDS = frozenset({"model", "vae", "model_dirs", "lora_dirs", "outputs_dir"})
HIDDEN_PATH = "(a folder on the computer running LoRA Studio)"
MULTILINE_FIELDS = {"lbw_presets": "MYSTYLE:1,0,0,1,1,1,1,1,1,0,0,0"}


def info_for(name: str) -> SettingInfo:
    return SETTING_INFO.get(name) or SettingInfo(name, "", Applies.RESTART)


def sections() -> dict[str, list[str]]:
    """Section title -> field names; fields no section names go to "Other"."""
    known = set(field_names())
    out = {title: [n for n in names if n in known] for title, names in SECTIONS.items()}
    placed = {n for names in out.values() for n in names}
    other = [n for n in field_names() if n not in placed and _editable(getattr(Settings(), n))]
    if other:
        out["Other"] = other
    return {title: names for title, names in out.items() if names}


def _editable(default: Any) -> bool:
    return isinstance(default, (StrEnum, bool, int, float, str, tuple))


def widget_info(name: str, running: str | None = None) -> str:
    """The help line under a field: when a change applies, what it does, and the running value when the
    app runs with another one than the file holds (a command-line flag, a change waiting for a restart)."""
    info = info_for(name)
    note = f"{APPLIES_BADGE[info.applies]}" + (f" · {info.help}" if info.help else "")
    return note + (f" · running now: {running}" if running is not None else "")


def describe_value(name: str, value: Any, local: bool = True) -> str:
    """A value in words: on/off for switches, "(empty)" for nothing, a secret only as "(set)", local
    paths only for the person at this computer ("Login password: (set) → (empty)")."""
    if name in SECRET_FIELDS:
        return "(set)" if value else "(empty)"
    if isinstance(value, bool):
        return "on" if value else "off"
    text = shown(name, to_widget(value), local)
    return str(text).replace("\n", ", ") if text not in ("", None) else "(empty)"


def make_widget(name: str) -> gr.components.Component:
    """The widget for one field, labelled from SETTING_INFO with when a change applies."""
    info = info_for(name)
    default = getattr(Settings(), name)
    common: dict[str, Any] = {"label": info.label, "info": widget_info(name), "elem_id": f"pref-{name}",
                              "value": to_widget(default)}
    if isinstance(default, StrEnum):
        return gr.Dropdown([m.value for m in type(default)], **common)
    if isinstance(default, bool):
        return gr.Checkbox(**common)
    if isinstance(default, int):
        return gr.Number(precision=0, **common)
    if isinstance(default, float):
        return gr.Number(**common)
    if isinstance(default, tuple):
        return gr.Textbox(lines=2, placeholder="one folder per line", **common)
    if name in MULTILINE_FIELDS:
        return gr.Textbox(lines=3, placeholder=MULTILINE_FIELDS[name], **common)
    return gr.Textbox(type="password" if name in SECRET_FIELDS else "text", **common)


def to_widget(value: Any) -> Any:
    """A settings value as its widget shows it."""
    if isinstance(value, StrEnum):
        return value.value
    if isinstance(value, tuple):
        return "\n".join(value)
    return value


def from_widget(name: str, value: Any) -> Any:
    """A widget value as Settings.replace takes it; Settings.replace does the checking."""
    default = getattr(Settings(), name)
    if isinstance(default, tuple):
        return [line.strip() for line in str(value or "").splitlines() if line.strip()]
    if isinstance(default, bool):
        return value
    if isinstance(default, int) and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(default, str) and not isinstance(default, StrEnum) and value is None:
        return ""
    return value


def shown(name: str, value: Any, local: bool) -> Any:
    """What a visitor may see of a saved value. A secret is never sent, to anyone (its widget stays
    empty; whether one is set is said apart): "local" is decided from the Host header, and behind a
    proxy that rewrites it every visitor looks local (ui/access.py). A local path (model, LoRA and
    outputs folders) only to the person at this computer (issue 11)."""
    if name in SECRET_FIELDS:
        return ""
    if name in PATH_FIELDS and not local and value:
        return HIDDEN_PATH
    return value

