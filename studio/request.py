"""What one generation asks for, checked before any work starts."""

from __future__ import annotations

import secrets
import weakref
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from studio.errors import SettingsError
from studio.lora.spec import check_weight, spec_of
from studio.samplers import check_sampler

MAX_SEED = 2**32 - 1
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
        if not isinstance(self.prompt, str):
            raise SettingsError(f"`prompt` must be text, got {self.prompt!r}")
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


def _is_checked(request: GenerationRequest) -> bool:
    try:
        return request in _CHECKED
    except TypeError:  # an unhashable value (a list for a prompt): not checked, and the check will say why
        return False


def _mark_checked(request: GenerationRequest) -> GenerationRequest:
    _CHECKED.add(request)
    return request


def _number(key: str, value: Any, kind: type) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise SettingsError(f"`{key}` must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise SettingsError(f"`{key}` must be a number, got {value!r}") from None
    if kind is int:
        if number != int(number):
            raise SettingsError(f"`{key}` must be a whole number, got {value!r}")
        return int(number)
    return number

