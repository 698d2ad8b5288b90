"""The report every generation returns: where the time and the memory went.

Filled with `with timer.phase("denoise"):` blocks and memory readings; the UI renders
it and the CLI writes it as JSON (`{"phases": {...}, "memory": {...}, "request": {...}}`).
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

PhaseCallback = Callable[[str], None]  # told a phase's name ("text_encode", "vae_decode", ...) as it starts


# What `model_load` is made of (ModelInfo.load_parts): the first load in a process also imports
# diffusers' and transformers' pipeline modules, later ones find them imported.
LOAD_PART_LABELS = {"imports": "imports", "read_build": "read + build", "vae": "separate VAE", "hash": "hash",
                    "placement": "placement + pristine copies", "lora_bind": "LoRA bind",
                    "preview": "live-preview fit"}


def load_breakdown(model: dict[str, Any]) -> str:
    """ "imports 2.91 s · read + build 0.95 s · ..." from a report's `model` dict; "" for older reports."""
    parts = model.get("load_parts") or {}
    return " · ".join(f"{LOAD_PART_LABELS.get(name, name)} {seconds:.2f} s" for name, seconds in parts.items())


class PhaseTimer:
    """Wall time per named phase; a phase entered twice accumulates.

    `on_enter` hears each phase as it starts: the report's phases are the progress a caller
    shows, so the two can never name different things.
    """

    def __init__(self, on_enter: PhaseCallback | None = None) -> None:
        self.phases: dict[str, float] = {}
        self._on_enter = on_enter

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self._on_enter is not None:
            self._on_enter(name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start


@dataclass
class Report:
    request: dict[str, Any]
    model: dict[str, Any]
    device: str
    dtype: str
    dtype_reason: str = ""  # why this dtype: "fp32: no native bf16 on this CPU (AVX2), probe bf16 60x slower ..."
    phases: dict[str, float] = field(default_factory=dict)
    step_seconds: list[float] = field(default_factory=list)
    memory: dict[str, Any] = field(default_factory=dict)
    lora: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    status: str = "ok"  # "ok" or "cancelled"
    notes: list[str] = field(default_factory=list)  # what the engine decided on its own (tiling, fp8 off, ...)
    created: float = field(default_factory=time.time)  # wall clock, for charts across a session
    preview: dict[str, Any] = field(default_factory=dict)  # live preview: on/off, how often, what it cost

    @property
    def it_per_s(self) -> float:
        total = sum(self.step_seconds)
        return len(self.step_seconds) / total if total > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["it_per_s"] = round(self.it_per_s, 3)
        return data

    def without_local_paths(self) -> Report:
        """The report as a visitor through the public link may read it: the model without its location,
        each LoRA and output by file name only (issue 11)."""
        lora = dict(self.lora)
        if "stack" in lora:
            lora["stack"] = [{**row, "path": Path(str(row.get("path", ""))).name} for row in lora["stack"]]
        model = {k: v for k, v in self.model.items() if k != "location"}
        return replace(self, model=model, lora=lora, outputs=[Path(p).name for p in self.outputs])

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """A report read back from its JSON (next to a PNG, or in the history file); unknown keys are ignored."""
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        for key in ("request", "model", "device", "dtype"):
            values.setdefault(key, {} if key in ("request", "model") else "")
        return cls(**values)

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    def summary(self) -> str:
        """A few lines for the terminal."""
        mb = 1024 * 1024
        order = [k for k in self.phases if k != "total"] + (["total"] if "total" in self.phases else [])
        lines = ["  ".join(f"{name} {self.phases[name]:.3f}s" for name in order)]
        if "model_load" in self.phases and load_breakdown(self.model):
            lines.append(f"model_load: {load_breakdown(self.model)}")
        mem = [f"peak RSS {self.memory.get('peak_rss', 0) / mb:.0f} MB"]
        if "cuda_peak_allocated" in self.memory:
            mem.append(f"VRAM peak {self.memory['cuda_peak_allocated'] / mb:.0f} MB allocated, "
                       f"{self.memory['cuda_peak_reserved'] / mb:.0f} MB reserved")
        if self.lora.get("stack"):
            loras = ", ".join(f"{r['name']}:{r['weight']:g}{':' + r['options'] if r.get('options') else ''} "
                              f"({r['cache']})" for r in self.lora["stack"])
            patch, unpatch = self.lora["patch"], self.lora["unpatch"]
            lines.append(f"LoRAs {loras}; {patch['tensors_touched']} tensors patched, {patch['tensors_skipped']} "
                         f"unchanged; unpatch: {unpatch['method']} ({unpatch['tensors']} tensors)")
            for switch in self.lora.get("step_switches", []):  # a start=/stop= boundary
                work = (f"{switch['tensors_touched']} tensors rewritten" if switch["method"] == "incremental"
                        else f"{switch['sidecars_gated']} sidecars gated")
                lines.append(f"  step {switch['step']}: LoRAs on {', '.join(switch['on']) or 'none'}; {work} in "
                             f"{switch['seconds']:.3f}s")
        lines.append(f"{len(self.step_seconds)} steps at {self.it_per_s:.2f} it/s on {self.device} ({self.dtype}); "
                     + "; ".join(mem))
        if self.dtype_reason:
            lines.append(f"precision {self.dtype_reason}")
        return "\n".join(lines)
