"""One LoRA as a prompt tag asks for it: `<lora:name:w[:unet][:lbw=...][:start=...][:stop=...]>`.

The syntax is A1111's (`<lora:name:te:unet>`, `te=`, `unet=`) with sd-webui-lora-block-weight's
arguments (`lbw=` a preset name or 12/20 numbers, `start=`/`stop=`, `step=a-b`; its README
"start, stop step"). Arguments other than the name may come in any order, as in the extension.
This module only reads and writes the text: which blocks a vector names is
`studio.lora.block_weights`', when a step range is active is `StepRange`'s.

A tag that starts `<lora:` but does not parse is an error naming the tag, never a string left in
the prompt (issue 11: `<lora:demo-kohya-warm:1e30>` and `:nan>` used to stay in the prompt unapplied).

In a request a LoRA is `(name, weight)` or, with more than a weight, `(name, weight, options)`
where `options` is the canonical `unet=...:lbw=...:start=...:stop=...` text (`LoraSpec.options`),
so job lines and JSON stay plain lists.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Sequence

from studio.errors import SettingsError

MAX_LORA_WEIGHT = 4.0
MAX_BLOCK_VALUE = 4.0
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")  # no nan/inf/1_000, which float() accepts
PRESET_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.+-]*")
TAG_START = "<lora:"
_CANDIDATE = re.compile(r"<lora:[^<>]*(?:>|(?=<)|$)")  # a tag, or an unclosed one up to the next < or the end

Entry = tuple  # (name, weight) or (name, weight, options): what GenerationRequest.loras holds


def fmt(value: float) -> str:
    """The shortest text that reads back as the same float: 1.0 -> "1", 0.75 -> "0.75".

    Lossless, so a tag in a PNG's parameters reproduces the weight bit for bit.
    """
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def parse_number(text: str, what: str) -> float:
    """A finite decimal number, or SettingsError saying what `what` received."""
    text = text.strip()
    if not NUMBER.fullmatch(text):
        raise SettingsError(f"{what} must be a number, got {text!r}")
    value = float(text)
    if not math.isfinite(value):
        raise SettingsError(f"{what} must be a finite number, got {text!r}")
    return value


def check_weight(name: str, weight: float, what: str = "weight") -> float:
    if not math.isfinite(weight) or not -MAX_LORA_WEIGHT <= weight <= MAX_LORA_WEIGHT:
        raise SettingsError(f"LoRA `{name}` {what} must be between -4 and 4, got {weight:g}")
    return weight


@dataclass(frozen=True)
class StepRange:
    """`start=`/`stop=` of the LBW extension: a whole step number, or a fraction of the steps (0 < f < 1).

    Steps count from 0: the LoRA's UNet part runs for denoise steps `start <= i < stop`, so
    `stop=10` runs it for the first 10 steps and `start=10` from the 11th on (Forge's reading of
    the extension's syntax). A fraction f means step round(f * steps).
    """

    start: float | None = None
    stop: float | None = None

    def bounds(self, steps: int) -> tuple[int, int]:
        return (_step(self.start, steps, 0), _step(self.stop, steps, steps))

    def active(self, index: int, steps: int) -> bool:
        first, end = self.bounds(steps)
        return first <= index < end

    @property
    def always(self) -> bool:
        return self.start is None and self.stop is None


def _step(value: float | None, steps: int, default: int) -> int:
    if value is None:
        return default
    if 0 < value < 1:
        return int(math.floor(value * steps + 0.5))
    return int(value)


def _step_value(name: str, key: str, text: str) -> float:
    value = parse_number(text, f"LoRA `{name}` {key}=")
    if value < 0 or (value >= 1 and value != int(value)):
        raise SettingsError(f"LoRA `{name}` {key}= must be a whole step number (0, 1, 2, ...) or a fraction "
                            f"between 0 and 1, got {text!r}")
    return value


@dataclass(frozen=True)
class LoraSpec:
    """What one LoRA entry asks for. `weight` is A1111's first number: the text encoders, and the
    UNet too unless `unet` is given. `lbw` is the block-weight argument as written (a preset name,
    or 12/20 comma-separated numbers); `start`/`stop` as written (steps or fractions)."""

    name: str
    weight: float = 1.0
    unet: float | None = None
    lbw: str = ""
    start: float | None = None
    stop: float | None = None

    @property
    def te_weight(self) -> float:
        return self.weight

    @property
    def unet_weight(self) -> float:
        return self.weight if self.unet is None else self.unet

    @property
    def steps(self) -> StepRange:
        return StepRange(self.start, self.stop)

    @property
    def plain(self) -> bool:
        """Only a weight: the whole LoRA at one strength for the whole image."""
        return self.unet is None and not self.lbw and self.start is None and self.stop is None

    @property
    def options(self) -> str:
        """The canonical text of everything but the name and weight ("" when plain)."""
        parts = []
        if self.unet is not None:
            parts.append(f"unet={fmt(self.unet)}")
        if self.lbw:
            parts.append(f"lbw={self.lbw}")
        if self.start is not None:
            parts.append(f"start={fmt(self.start)}")
        if self.stop is not None:
            parts.append(f"stop={fmt(self.stop)}")
        return ":".join(parts)

    def tag(self) -> str:
        """`<lora:name:w[:unet][:lbw=..][:start=..][:stop=..]>`: A1111's positional te:unet, then named."""
        parts = [self.name, fmt(self.weight)]
        if self.unet is not None:
            parts.append(fmt(self.unet))
        parts += [p for p in self.options.split(":") if p and not p.startswith("unet=")]
        return "<lora:" + ":".join(parts) + ">"

    def entry(self) -> Entry:
        """The request form: (name, weight) or (name, weight, options)."""
        return (self.name, self.weight, self.options) if self.options else (self.name, self.weight)

    def with_weight(self, weight: float) -> LoraSpec:
        """The same LoRA at another strength: both parts when they were one, the UNet's otherwise kept."""
        return replace(self, weight=check_weight(self.name, float(weight)))


def parse_args(name: str, args: Sequence[str], where: str = "") -> LoraSpec:
    """The arguments after the name (`["0.8", "lbw=INS", "stop=10"]`) as a checked LoraSpec."""
    name = name.strip()
    label = where or f"LoRA `{name}`"
    if not name:
        raise SettingsError(f"{label}: a LoRA tag needs a name, as in <lora:name:1>")
    positional: list[str] = []
    named: dict[str, str] = {}
    for arg in args:
        arg = arg.strip()
        key, eq, value = arg.partition("=")
        if not eq:
            positional.append(arg)
            continue
        key = key.strip().lower()
        if key not in ("te", "unet", "lbw", "start", "stop", "step"):
            raise SettingsError(f"{label}: unknown argument {key}=; known: te=, unet=, lbw=, start=, stop=, step=")
        if key in named:
            raise SettingsError(f"{label}: {key}= is given twice")
        named[key] = value.strip()
    te = named.get("te")
    unet = named.get("unet")
    lbw = named.get("lbw", "")
    if positional:
        te = _positional(label, "te", te, positional.pop(0))
    if positional:
        # second positional: A1111's UNet weight, or the LBW extension's older `<lora:name:1:INS>`
        second = positional.pop(0)
        if NUMBER.fullmatch(second) or not (PRESET_NAME.fullmatch(second) or "," in second):
            unet = _positional(label, "unet", unet, second)
        else:
            lbw = _positional(label, "lbw", lbw or None, second)
    if positional:
        raise SettingsError(f"{label}: too many numbers ({', '.join(positional)}); the form is "
                            "<lora:name:weight[:unet weight][:lbw=...][:start=...][:stop=...]>")
    weight = check_weight(name, parse_number(te, f"LoRA `{name}` weight")) if te is not None else 1.0
    unet_value = check_weight(name, parse_number(unet, f"LoRA `{name}` UNet weight"), "UNet weight") \
        if unet is not None else None
    if te is None and unet_value is not None:
        weight = unet_value  # `<lora:name:unet=0.5>`: A1111 then uses it for both
        unet_value = None
    start = _step_value(name, "start", named["start"]) if "start" in named else None
    stop = _step_value(name, "stop", named["stop"]) if "stop" in named else None
    if "step" in named:
        if start is not None or stop is not None:
            raise SettingsError(f"{label}: step= is start=/stop= in one; give one or the other")
        low, dash, high = named["step"].partition("-")
        if not dash:
            raise SettingsError(f"{label}: step= takes a range like step=5-10, got {named['step']!r}")
        start, stop = _step_value(name, "step", low), _step_value(name, "step", high)
    if start is not None and stop is not None and (start < 1) == (stop < 1) and start >= stop:
        raise SettingsError(f"{label}: start={fmt(start)} is not before stop={fmt(stop)}, so it would never run")
    if lbw:
        lbw = _check_lbw_text(name, lbw)
    return LoraSpec(name, weight, unet_value, lbw, start, stop)


def _positional(label: str, what: str, named: str | None, value: str) -> str:
    if named is not None:
        raise SettingsError(f"{label}: {what} is given twice (as a number and as {what}=)")
    return value


def _check_lbw_text(name: str, text: str) -> str:
    """Syntax only: a preset name, or comma-separated numbers (their count is checked with the layout)."""
    text = text.strip()
    if PRESET_NAME.fullmatch(text):
        return text
    values = [v.strip() for v in text.split(",")]
    for v in values:
        if v.upper() in ("R", "U") or v.upper().startswith("X"):
            raise SettingsError(f"LoRA `{name}` lbw=: the random/inherited values R, U and X of the extension "
                                f"are not supported (an image must be reproducible); write numbers, got {v!r}")
        value = parse_number(v, f"LoRA `{name}` lbw= value")
        if abs(value) > MAX_BLOCK_VALUE:
            raise SettingsError(f"LoRA `{name}` lbw= values must be between -4 and 4, got {v}")
    return ",".join(fmt(parse_number(v, "lbw")) for v in values)


def parse_tag(text: str) -> LoraSpec:
    """`<lora:name:...>` -> LoraSpec; SettingsError naming the tag when it does not parse."""
    if not text.startswith(TAG_START) or not text.endswith(">"):
        raise SettingsError(f"prompt tag {text!r} is not closed: a LoRA tag is <lora:name:weight>")
    name, *args = text[len(TAG_START):-1].split(":")
    try:
        return parse_args(name, args, where=f"prompt tag {text}")
    except SettingsError as err:
        if f"prompt tag {text}" in str(err):
            raise
        raise SettingsError(f"prompt tag {text}: {err}") from None


def find_tags(prompt: str, strict: bool = True) -> list[tuple[int, int, LoraSpec | None]]:
    """(start, end, spec) of every `<lora:...` in the prompt. strict: a tag that does not parse raises;
    otherwise its spec is None (the UI, while someone is still typing)."""
    found = []
    for m in _CANDIDATE.finditer(prompt or ""):
        try:
            spec: LoraSpec | None = parse_tag(m.group(0))
        except SettingsError:
            if strict:
                raise
            spec = None
        found.append((m.start(), m.end(), spec))
    return found


def split_tags(prompt: str) -> tuple[str, list[LoraSpec]]:
    """The prompt without its LoRA tags (doubled spaces closed) and the tags' specs, in order."""
    text, specs, pos = [], [], 0
    for start, end, spec in find_tags(prompt):
        text.append(prompt[pos:start])
        specs.append(spec)
        pos = end
    text.append(prompt[pos:])
    return re.sub(r"[ \t]{2,}", " ", "".join(text)).strip(), specs


def spec_of(entry: Sequence) -> LoraSpec:
    """A request's `(name, weight[, options])` as a checked LoraSpec."""
    if isinstance(entry, LoraSpec):
        return entry
    if not 2 <= len(entry) <= 3:
        raise SettingsError(f"a LoRA is [name, weight] or [name, weight, options], got {list(entry)!r}")
    name, weight = str(entry[0]), entry[1]
    if isinstance(weight, bool) or not isinstance(weight, (int, float, str)):
        raise SettingsError(f"LoRA `{name}` weight must be a number, got {weight!r}")
    weight_text = weight if isinstance(weight, str) else repr(float(weight))
    options = str(entry[2]) if len(entry) == 3 else ""
    args = [weight_text] + ([o for o in options.split(":") if o.strip()] if options else [])
    if any("=" not in a for a in args[1:]):
        raise SettingsError(f"LoRA `{name}` options must be key=value parts (unet=, lbw=, start=, stop=), "
                            f"got {options!r}")
    return parse_args(name, args)


def entry_of(spec: LoraSpec) -> Entry:
    return spec.entry()
