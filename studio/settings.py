"""Typed preferences, saved as TOML in the config folder.

Writes are atomic (temp file + rename) so a crash never leaves half a file. A file
that cannot be parsed is moved aside (`settings.toml.corrupt-<time>`) with a warning
and defaults are used; a single bad value falls back to its default alone, with a
warning naming it, and is written back as it was unless the user changes that field.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
import tomllib
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

import tomli_w

from studio.choices import Device, LoraMode, MemoryMode, Precision
from studio.errors import SettingsError
from studio.lora.block_weights import parse_presets

log = logging.getLogger(__name__)
TEMP_PREFIX = ".settings-"  # the atomic write's temp file, beside settings.toml


@dataclass(frozen=True)
class Settings:
    """Every preference the engine and the UI read. Empty strings mean "the default"."""

    model: str = ""  # empty: the embedded tiny SDXL
    vae: str = ""  # empty: the model's own VAE; else a VAE .safetensors file or diffusers folder
    model_dirs: tuple[str, ...] = ()  # folders the model picker lists checkpoints and VAEs from
    lora_dirs: tuple[str, ...] = ()
    outputs_dir: str = ""  # empty: <data dir>/outputs
    device: Device = Device.AUTO
    precision: Precision = Precision.AUTO
    lora_mode: LoraMode = LoraMode.MERGED
    unpatch_lora_by_vram_offload: bool = False
    lora_cache_mb: int = 2048
    memory_mode: MemoryMode = MemoryMode.AUTO
    stream_lookahead: int = 2
    fp8_storage: bool = False
    ram_limit_mb: int = 0  # 0: measured free RAM
    vram_limit_mb: int = 0  # 0: measured free VRAM
    working_memory_mb: int = 0  # 0: estimated from the image size before each VAE decode
    default_steps: int = 20
    default_cfg: float = 5.0
    live_preview: bool = True  # a small picture of the latents every few steps while denoising
    port: int = 7860
    share: bool = False
    auth_user: str = "studio"
    auth_password: str = ""  # empty: generated when a public link is opened
    lbw_presets: str = ""  # LoRA block-weight presets, `NAME:v1,...,v12` per line (the LBW extension's file format)
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def validated(self) -> Settings:
        """Return self or raise SettingsError naming the field, the value and what is allowed."""
        for name in field_names():
            check_field(name, getattr(self, name))
        return self

    def replace(self, **changes: Any) -> Settings:
        return from_dict({**to_dict(self), **changes}, strict=True)


_ENUMS = {"device": Device, "precision": Precision, "lora_mode": LoraMode, "memory_mode": MemoryMode}


class Applies(StrEnum):
    NOW = "applies now"
    MODEL_RELOAD = "applies when the model reloads"
    RESTART = "needs a restart"


@dataclass(frozen=True)
class SettingInfo:
    label: str
    help: str
    applies: Applies


# What the preferences panel shows for each setting, and when a change takes effect.
SETTING_INFO: dict[str, SettingInfo] = {
    "model": SettingInfo("Model", "diffusers folder or SDXL .safetensors file; empty = built-in demo model",
                         Applies.MODEL_RELOAD),
    "vae": SettingInfo("VAE", "a separate VAE (.safetensors file or diffusers folder); empty = the model's own",
                       Applies.MODEL_RELOAD),
    "model_dirs": SettingInfo("Model folders", "folders the model picker lists SDXL checkpoints and VAEs from",
                              Applies.NOW),
    "lora_dirs": SettingInfo("LoRA folders", "folders searched for .safetensors LoRAs", Applies.NOW),
    "outputs_dir": SettingInfo("Output folder", "where PNGs are saved; empty = the per-user data folder",
                               Applies.RESTART),
    "device": SettingInfo("Device", "auto = CUDA when present", Applies.MODEL_RELOAD),
    "precision": SettingInfo("Precision", "auto = fp16 on CUDA; on a CPU bf16 where it has native bf16 "
                             "(checked by a short probe), else fp32", Applies.MODEL_RELOAD),
    "lora_mode": SettingInfo("LoRA mode", "merged = full speed; sidecar = instant switching; auto = per layer",
                             Applies.NOW),
    "unpatch_lora_by_vram_offload": SettingInfo(
        "unpatch_lora_by_vram_offload",
        "on: drop patched weights and reload clean ones from RAM; off: restore touched weights in place",
        Applies.NOW),
    "lora_cache_mb": SettingInfo("LoRA cache (MB)", "parsed LoRAs kept in RAM", Applies.NOW),
    "memory_mode": SettingInfo("Memory mode", "full, offload, stream (low VRAM), or auto from the budgets",
                               Applies.MODEL_RELOAD),
    "stream_lookahead": SettingInfo("Stream lookahead", "layers copied ahead of compute in stream mode",
                                    Applies.MODEL_RELOAD),
    "fp8_storage": SettingInfo("fp8 weight storage", "halves UNet weight memory; LoRAs run as sidecars",
                               Applies.MODEL_RELOAD),
    "ram_limit_mb": SettingInfo("RAM limit (MB)", "0 = measured free RAM", Applies.NOW),
    "vram_limit_mb": SettingInfo("VRAM limit (MB)", "0 = measured free VRAM", Applies.NOW),
    "working_memory_mb": SettingInfo("Working memory (MB)", "kept free for activations; 0 = estimated per image",
                                     Applies.NOW),
    "default_steps": SettingInfo("Default steps", "", Applies.NOW),
    "default_cfg": SettingInfo("Default CFG", "", Applies.NOW),
    "live_preview": SettingInfo("Live preview", "a small picture of the image every few denoising steps "
                                "(a linear map fitted to the VAE; its cost per step is in the report)", Applies.NOW),
    "port": SettingInfo("Port", "local port of the UI", Applies.RESTART),
    "share": SettingInfo("Public link", "share through a Gradio link; login required", Applies.RESTART),
    "auth_user": SettingInfo("Login user", "for the public link", Applies.RESTART),
    "auth_password": SettingInfo("Login password", "never shown once saved: type a new one to replace it, leave "
                                 "the box empty to keep it; none saved = generated per run, shown locally",
                                 Applies.RESTART),
    "lbw_presets": SettingInfo("LoRA block presets",
                               "one per line, NAME:12 values (BASE IN04 IN05 IN07 IN08 MID OUT0-OUT5) or 20 "
                               "(LyCORIS); used as <lora:name:1:lbw=NAME>; built in: ALL NONE INS IND INALL MID "
                               "MIDD OUTD OUTS OUTALL ALL0.5", Applies.NOW),
}


def _coerce(name: str, value: Any, default: Any) -> Any:
    if name in _ENUMS:
        try:
            return _ENUMS[name](value)
        except ValueError:
            allowed = ", ".join(m.value for m in _ENUMS[name])
            raise SettingsError(f"`{name}` must be one of {allowed}, got {value!r}") from None
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise SettingsError(f"`{name}` must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingsError(f"`{name}` must be a whole number, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SettingsError(f"`{name}` must be a number, got {value!r}")
        return float(value)
    if isinstance(default, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise SettingsError(f"`{name}` must be a list of folder paths, got {value!r}")
        return tuple(value)
    if not isinstance(value, str):
        raise SettingsError(f"`{name}` must be text, got {value!r}")
    return value


_MB_LIMIT = 1 << 22
_RANGES: dict[str, tuple[float, float, str]] = {  # name -> (low, high, what the allowed range is called)
    "default_steps": (1, 200, "between 1 and 200"),
    "default_cfg": (0.0, 30.0, "between 0 and 30"),
    "port": (0, 65535, "between 0 and 65535"),
    "stream_lookahead": (1, 16, "between 1 and 16 layers"),
    **{name: (0, _MB_LIMIT, f"between 0 and {_MB_LIMIT} (MB)")
       for name in ("lora_cache_mb", "ram_limit_mb", "vram_limit_mb", "working_memory_mb")},
}


def check_field(name: str, value: Any) -> None:
    """Raise SettingsError when one (already typed) value is outside what its field allows.

    Each field is checked alone, so one bad value in the file falls back alone (issue 11).
    NaN is outside every range (`0 <= nan` is False).
    """
    if name in _RANGES:
        low, high, allowed = _RANGES[name]
        if not low <= value <= high:
            raise SettingsError(f"`{name}` must be {allowed}, got {value}")
    if name == "lbw_presets":
        parse_presets(value)  # raises naming the line that does not read


@dataclass(frozen=True)
class Fallback:
    """A value from the file that could not be used: what it was, why, and the default used instead."""

    raw: Any
    reason: str
    default: Any

    def describe(self) -> str:
        """E.g. "`default_steps` must be between 1 and 200, got 0; using the default 20"."""
        default = self.default
        plain = default.value if isinstance(default, StrEnum) else list(default) if isinstance(default, tuple) \
            else default
        return f"{self.reason}; using the default {plain!r}"


@dataclass(frozen=True)
class SettingsFile:
    """What `settings.toml` gave: the settings, and each value that fell back to its default."""

    settings: Settings
    fallbacks: dict[str, Fallback] = field(default_factory=dict)

    def warnings(self) -> list[str]:
        return [f.describe() for f in self.fallbacks.values()]


def _typed(name: str, value: Any, default: Any) -> Any:
    typed = _coerce(name, value, default)
    check_field(name, typed)
    return typed


def from_dict(data: dict[str, Any], strict: bool = False) -> Settings:
    """Build Settings from plain values. strict: raise on a bad value; else it falls back to its default
    alone (`read_settings` says which, and why)."""
    return _from_dict(data, strict).settings


def _from_dict(data: dict[str, Any], strict: bool) -> SettingsFile:
    defaults = Settings()
    known = {f.name for f in fields(Settings) if f.name != "extra"}
    values: dict[str, Any] = {}
    fallbacks: dict[str, Fallback] = {}
    for name in sorted(known & data.keys(), key=field_names().index):
        try:
            values[name] = _typed(name, data[name], getattr(defaults, name))
        except SettingsError as err:
            if strict:
                raise
            fallbacks[name] = Fallback(data[name], str(err), getattr(defaults, name))
    extra = {k: v for k, v in data.items() if k not in known}
    return SettingsFile(Settings(**values, extra=extra), fallbacks)


def to_dict(settings: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(Settings):
        if f.name == "extra":
            continue
        value = getattr(settings, f.name)
        out[f.name] = value.value if isinstance(value, StrEnum) else list(value) if isinstance(value, tuple) else value
    return {**settings.extra, **out}


def load_settings(path: Path) -> Settings:
    """Read the file; a missing file gives defaults, a corrupt one is moved aside."""
    return read_settings(path).settings


def read_settings(path: Path, warn: bool = True) -> SettingsFile:
    """Read the file and say which values fell back: each bad value alone, with a warning naming it
    (`warn=False` for the preferences panel, which reads the file at every page load)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return SettingsFile(Settings())
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(path, aside)
        log.warning("settings file %s could not be read (%s); moved it to %s and using defaults", path, err, aside)
        return SettingsFile(Settings())
    loaded = _from_dict(data, strict=False)
    for fallback in loaded.fallbacks.values() if warn else ():
        log.warning("%s: %s", path, fallback.describe())
    return loaded


def save_settings(settings: Settings, path: Path, keep_raw: dict[str, Any] | None = None) -> None:
    """Atomic write: a reader sees the old file or the new one, never half of one.

    `keep_raw`: values to write as the file had them (bad ones the user did not touch): a Save
    must not replace what the user wrote by hand with defaults they never chose (issue 11).
    """
    settings.validated()
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = tomli_w.dumps({**to_dict(settings), **(keep_raw or {})}).encode("utf-8")
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".toml", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def update_settings_file(path: Path, **changes: Any) -> bool:
    """Write `changes` into the file and keep every other line as the file has it, a bad value that
    fell back included (the model picker remembering a choice must not reset a hand-written value,
    issue 11). Returns False when the file already holds these values (nothing written)."""
    loaded = read_settings(path, warn=False)
    new = loaded.settings.replace(**changes)
    if new == loaded.settings and not changes.keys() & loaded.fallbacks.keys():
        return False
    keep_raw = {name: fallback.raw for name, fallback in loaded.fallbacks.items() if name not in changes}
    save_settings(new, path, keep_raw=keep_raw)
    return True


def remove_temp_leftovers(path: Path) -> list[Path]:
    """Delete the atomic write's temp files beside `path` that a killed save left behind (they hold the
    whole file, password included); returns what was removed. Call it at start, before any save."""
    removed = []
    for leftover in path.parent.glob(f"{TEMP_PREFIX}*.toml"):
        try:
            leftover.unlink()
            removed.append(leftover)
        except FileNotFoundError:
            pass
    return removed


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Settings) if f.name != "extra"]
