"""What one generation asks for, checked before any work starts."""

from __future__ import annotations

import math
import secrets
import weakref
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from studio.errors import SettingsError
from studio.lora.spec import check_weight, spec_of
from studio.samplers import check_sampler

MAX_SEED = 2**32 - 1
# SDXL's text encoders read 77 tokens (diffusers' encode_prompt truncates the rest); A1111 chunks
# longer prompts in 75-token pieces, so its users write more. 8,000 characters is ~2,000 tokens,
# far past any prompt that helps; a 1 MB prompt took 27 s and 340 MB, stored whole in the PNG.
MAX_PROMPT_CHARS = 8_000
# One size limit for the UI's sliders, its API and the CLI (A1111's too): SDXL was trained near one
# megapixel, and a 2048 x 2048 decode already needs ~9 GB of working memory in fp16.
MIN_SIDE, MAX_SIDE, SIDE_STEP = 64, 2048, 8

# Requests that passed `validated()`. A request is frozen, so validity is a property of its
# values; the set lets each check run once on the way from a button (or a jobs line) to the
# pipeline, however many layers hand the request on.
_CHECKED: weakref.WeakSet[GenerationRequest] = weakref.WeakSet()


def size_message(name: str, value: object) -> str:
    """The one message for a width or height out of bounds, wherever it was typed."""
    return f"`{name}` must be a multiple of {SIDE_STEP} between {MIN_SIDE} and {MAX_SIDE}, got {value}"


def check_lora_weight(name: str, weight: float) -> float:
    return check_weight(name, weight)


def check_loras(loras) -> tuple[tuple, ...]:
    """Every entry (name, weight) or (name, weight, options) checked, in its canonical form."""
    return tuple(spec_of(entry).entry() for entry in loras)


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative: str = ""
    seed: int = -1  # -1: pick a random seed; the report and the PNG carry the one used
    steps: int = 20
    cfg: float = 5.0
    width: int = 0  # 0: the model's native size
    height: int = 0
    sampler: str = "Euler"
    # (name, weight) or (name, weight, options): options is the canonical `unet=..:lbw=..:start=..:stop=..`
    # text of studio.lora.spec, so a request stays plain JSON
    loras: tuple[tuple, ...] = field(default_factory=tuple)

    def validated(self) -> GenerationRequest:
        """Raise SettingsError naming the field, the value received and what is allowed.

        Checks once: a request that already passed (or an equal one) is returned as it is.
        """
        if _is_checked(self):
            return self
        check_text("prompt", self.prompt)
        check_text("negative", self.negative)
        for name in ("seed", "steps", "width", "height"):
            check_whole(name, getattr(self, name))
        if isinstance(self.cfg, bool) or not isinstance(self.cfg, (int, float)):
            raise SettingsError(f"`cfg` must be a number, got {self.cfg!r}")
        if not isinstance(self.sampler, str):
            raise SettingsError(f"`sampler` must be text, got {self.sampler!r}")
        if not -1 <= self.seed <= MAX_SEED:
            raise SettingsError(f"`seed` must be -1 (random) or between 0 and {MAX_SEED}, got {self.seed}")
        if not 1 <= self.steps <= 200:
            raise SettingsError(f"`steps` must be between 1 and 200, got {self.steps}")
        if not 0.0 <= self.cfg <= 30.0:
            raise SettingsError(f"`cfg` must be between 0 and 30, got {self.cfg}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value != 0 and (not MIN_SIDE <= value <= MAX_SIDE or value % SIDE_STEP):
                raise SettingsError(size_message(name, value))
        check_sampler(self.sampler)
        check_loras(self.loras)
        _CHECKED.add(self)
        return self

    def with_seed(self) -> GenerationRequest:
        """The same request with a concrete seed (a random one when seed is -1)."""
        if self.seed >= 0:
            return self
        return self.reseeded(secrets.randbelow(MAX_SEED + 1))

    def reseeded(self, seed: int) -> GenerationRequest:
        """The same request with `seed` (checked alone when the rest already was)."""
        if not 0 <= seed <= MAX_SEED:
            raise SettingsError(f"`seed` must be between 0 and {MAX_SEED}, got {seed}")
        return self._checked_copy(seed=seed)

    def with_stack(self, prompt: str, loras: tuple[tuple, ...]) -> GenerationRequest:
        """The prompt without its `<lora:...>` tags and the resolved stack (its weights checked here)."""
        return self._checked_copy(prompt=prompt, loras=check_loras(loras))

    def _checked_copy(self, **changes: Any) -> GenerationRequest:
        copy = replace(self, **changes)
        return _mark_checked(copy) if _is_checked(self) else copy.validated()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["loras"] = [list(pair) for pair in self.loras]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationRequest:
        """Build from JSON-like data (job lines, parsed PNG text), rejecting unknown keys."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise SettingsError(f"unknown request field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if "prompt" not in data:
            raise SettingsError("a request needs a `prompt`")
        values = dict(data)
        try:
            for key, kind in (("seed", int), ("steps", int), ("width", int), ("height", int), ("cfg", float)):
                if key in values:
                    values[key] = _number(key, values[key], kind)
            loras = values.get("loras", ())
            if isinstance(loras, (str, bytes)) or not all(isinstance(e, (list, tuple)) for e in loras):
                raise TypeError(f"got {loras!r}")
            values["loras"] = check_loras(loras)
        except (TypeError, ValueError) as err:
            raise SettingsError(f"`loras` must be a list of [name, weight] or [name, weight, options] "
                                f"({err})") from None
        return cls(**values).validated()


def check_text(name: str, value: Any) -> str:
    """A prompt field: text of at most MAX_PROMPT_CHARS characters."""
    if not isinstance(value, str):
        raise SettingsError(f"`{name}` must be text, got {value!r}")
    if len(value) > MAX_PROMPT_CHARS:
        raise SettingsError(f"`{name}` is {len(value):,} characters long; the limit is {MAX_PROMPT_CHARS:,} "
                            "(SDXL reads the first 77 tokens, about 300 characters)")
    return value


def check_whole(name: str, value: Any) -> int:
    """An int field holds an int: 2.5 steps would silently run 2 (issue 11)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingsError(f"`{name}` must be a whole number, got {value!r}")
    return value


def whole_number(name: str, value: Any) -> int:
    """What a form or an API sends for an int field (20, 20.0, "20") as an int; anything else is
    refused with the field's name: 2.5, NaN, inf, "abc", true. Never rounded (issue 11)."""
    return int(_number(name, value, int))


def real_number(name: str, value: Any) -> float:
    """A finite float from a form or an API value; NaN, inf, "abc" and true are refused by name."""
    return float(_number(name, value, float))


def _is_checked(request: GenerationRequest) -> bool:
    try:
        return request in _CHECKED
    except TypeError:  # an unhashable value (a list for a prompt): not checked, and the check will say why
        return False


def _mark_checked(request: GenerationRequest) -> GenerationRequest:
    _CHECKED.add(request)
    return request


def _number(key: str, value: Any, kind: type) -> int | float:
    what = "a whole number" if kind is int else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise SettingsError(f"`{key}` must be {what}, got {value!r}")
    if isinstance(value, int):
        return value
    try:
        number = float(value)
    except ValueError:
        raise SettingsError(f"`{key}` must be {what}, got {value!r}") from None
    if not math.isfinite(number) or (kind is int and not number.is_integer()):
        raise SettingsError(f"`{key}` must be {what}, got {value!r}")
    return int(number) if kind is int else number

