"""What one generation asks for, checked before any work starts."""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass, field
from typing import Any

from studio.errors import SettingsError

SAMPLERS = ("Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "UniPC")
MAX_SEED = 2**32 - 1


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
    loras: tuple[tuple[str, float], ...] = field(default_factory=tuple)

    def validated(self) -> GenerationRequest:
        """Raise SettingsError naming the field, the value received and what is allowed."""
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
            if value != 0 and (not 64 <= value <= 4096 or value % 8):
                raise SettingsError(f"`{name}` must be a multiple of 8 between 64 and 4096, got {value}")
        if self.sampler not in SAMPLERS:
            raise SettingsError(f"`sampler` must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        for name, weight in self.loras:
            if not -4.0 <= weight <= 4.0:
                raise SettingsError(f"LoRA `{name}` weight must be between -4 and 4, got {weight}")
        return self

    def with_seed(self) -> GenerationRequest:
        """The same request with a concrete seed (a random one when seed is -1)."""
        if self.seed >= 0:
            return self
        return _replace(self, seed=secrets.randbelow(MAX_SEED + 1))

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
            values["loras"] = tuple((str(n), float(w)) for n, w in values.get("loras", ()))
        except (TypeError, ValueError) as err:
            raise SettingsError(f"`loras` must be a list of [name, weight] pairs ({err})") from None
        return cls(**values).validated()


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


def _replace(request: GenerationRequest, **changes: Any) -> GenerationRequest:
    from dataclasses import replace

    return replace(request, **changes)
