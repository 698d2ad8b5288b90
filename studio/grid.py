"""X/Y/Z grids (A1111's X/Y/Z plot) over LoRA weights, block weights, seeds, steps, CFG, samplers,
prompt search/replace and sizes; an A/B compare is a grid over two stacks.

Every cell is an ordinary request, prepared and checked before the first image, and generated
exactly as it would be alone (the patcher merges from pristine, so history never shows in a
pixel). Only the visiting order is the grid's own: `studio.grid_order` picks the one that
rewrites the fewest weight elements. The result: one PNG per cell with full metadata,
`grid.png` with labelled rows and columns, and `grid.json` with every cell's request and report
and what the LoRA work cost beside what row-by-row order would have cost.
"""

from __future__ import annotations

import csv
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from studio.errors import Cancelled, SettingsError
from studio.generation import GenerationResult, Job
from studio.grid_image import compose
from studio.grid_order import Cell, CostModel, best_order, row_major
from studio.jobs import CancelToken, StepCallback
from studio.lora.spec import LoraSpec, fmt, parse_args, parse_number, split_tags
from studio.lora.stack import merge_specs
from studio.request import GenerationRequest

AXES = ("lora", "lbw", "seed", "steps", "cfg", "sampler", "prompt_sr", "size", "stack")
NAMES = "xyz"


@dataclass(frozen=True)
class Axis:
    """One axis as written: `lora:NAME=0,0.5,1`, `lbw:NAME=INS,OUTD`, `seed=1,2`, `size=512x512,768x512`."""

    kind: str
    values: tuple[str, ...]
    target: str = ""  # the LoRA name of lora: and lbw:

    def label(self, i: int) -> str:
        value = self.values[i]
        if self.kind == "lora":
            return f"{self.target}: {value}"
        if self.kind == "lbw":
            return f"{self.target} lbw={value}"
        if self.kind == "stack":
            return value or "no LoRAs"
        if self.kind in ("sampler", "prompt_sr"):
            return value
        return f"{'CFG' if self.kind == 'cfg' else self.kind} {value}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "target": self.target, "values": list(self.values)}


def parse_axis(text: str) -> Axis:
    """`KIND[:NAME]=v1,v2,...`; values are CSV, so a 12-number vector is written in double quotes."""
    head, eq, rest = text.partition("=")
    kind, _, target = head.strip().partition(":")
    kind = kind.strip().lower()
    if not eq or kind not in AXES:
        raise SettingsError(f"grid axis {text!r}: expected KIND=v1,v2,... with KIND one of "
                            f"lora:NAME, lbw:NAME, {', '.join(a for a in AXES if a not in ('lora', 'lbw'))}")
    if kind in ("lora", "lbw") and not target.strip():
        raise SettingsError(f"grid axis {text!r}: {kind}: needs a LoRA name, as in {kind}:my-lora=...")
    values = tuple(v.strip() for row in csv.reader([rest], skipinitialspace=True) for v in row)
    if not values or any(v == "" for v in values) and kind != "stack":
        raise SettingsError(f"grid axis {text!r}: empty value; values are comma-separated")
    return Axis(kind, values, target.strip())


def _apply(axis: Axis, value: str, request: GenerationRequest, specs: list[LoraSpec], where: str
           ) -> tuple[GenerationRequest, list[LoraSpec]]:
    try:
        if axis.kind == "seed":
            seed = int(parse_number(value, "seed"))
            return replace(request, seed=seed), specs
        if axis.kind == "steps":
            return replace(request, steps=int(parse_number(value, "steps"))), specs
        if axis.kind == "cfg":
            return replace(request, cfg=parse_number(value, "cfg")), specs
        if axis.kind == "sampler":
            return replace(request, sampler=value), specs
        if axis.kind == "size":
            w, x, h = value.lower().partition("x")
            if not x:
                raise SettingsError(f"size must be WIDTHxHEIGHT, got {value!r}")
            return replace(request, width=int(parse_number(w, "width")), height=int(parse_number(h, "height"))), specs
        if axis.kind == "stack":
            return request, split_tags(value)[1]
        index = next((i for i, s in enumerate(specs) if s.name == axis.target), None)
        if axis.kind == "lora":
            new = parse_args(axis.target, value.split(":"))
            if index is not None and len(value.split(":")) == 1:  # a weight only: keep lbw/start/stop
                new = replace(specs[index], weight=new.weight, unet=None)
        else:
            old = specs[index] if index is not None else LoraSpec(axis.target)
            new = replace(old, lbw=parse_args(axis.target, [fmt(old.weight), f"lbw={value}"]).lbw)
        specs = list(specs)
        if index is None:
            specs.append(new)
        else:
            specs[index] = new
        return request, specs
    except SettingsError as err:
        raise SettingsError(f"{where} value {value!r}: {err}") from None


def cell_request(base: GenerationRequest, axes: Sequence[Axis | None], cell: Cell) -> GenerationRequest:
    """The request of one cell: the base with each axis' value applied, tags folded into `loras`."""
    prompt, negative = base.prompt, base.negative
    for axis, i, name in zip(axes, cell, NAMES):
        if axis is not None and axis.kind == "prompt_sr" and i > 0:
            prompt = prompt.replace(axis.values[0], axis.values[i])  # A1111: the first value is the search text
            negative = negative.replace(axis.values[0], axis.values[i])
    text, tags = split_tags(prompt)
    request = replace(base, prompt=text, negative=negative)
    specs = merge_specs(base.loras, tags)
    for axis, i, name in zip(axes, cell, NAMES):
        if axis is not None and axis.kind != "prompt_sr":
            request, specs = _apply(axis, axis.values[i], request, specs, f"grid --{name} {axis.kind}")
    return replace(request, loras=tuple(s.entry() for s in specs)).validated()


@dataclass
class GridPlan:
    axes: tuple[Axis | None, Axis | None, Axis | None]
    jobs: dict[Cell, Job]
    order: list[Cell]
    order_method: str
    planned_bytes: int  # weight bytes the patcher rewrites in `order` (cost model)
    naive_bytes: int  # ... and in row-by-row order

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(len(a.values) if a is not None else 1 for a in self.axes)  # type: ignore[return-value]

    def labels(self, axis: int) -> list[str]:
        a = self.axes[axis]
        return [a.label(i) for i in range(len(a.values))] if a is not None else [""]


def plan_grid(session, base: GenerationRequest, axes: Sequence[Axis | None]) -> GridPlan:
    """Every cell prepared (checked, LoRAs found) and the cheapest visiting order; no image yet."""
    axes = tuple(list(axes) + [None] * (3 - len(axes)))[:3]
    kinds = [(a.kind, a.target) for a in axes if a is not None]
    if len(set(kinds)) != len(kinds):
        raise SettingsError("grid: two axes vary the same thing; give each axis its own")
    for name, axis in zip(NAMES, axes):
        if axis is not None and axis.kind == "prompt_sr" and axis.values[0] not in base.prompt + base.negative:
            raise SettingsError(f"grid --{name} prompt_sr: the search text {axis.values[0]!r} (the first value) is "
                                "not in the prompt, so every cell would be the same")
    if not any(a is not None and a.kind == "seed" for a in axes):
        base = base.validated().with_seed()  # one seed for every cell, as A1111 does
    shape = tuple(len(a.values) if a is not None else 1 for a in axes)
    jobs: dict[Cell, Job] = {}
    for cell in row_major(shape):
        request = cell_request(base, axes, cell)
        if request.seed < 0:
            request = request.with_seed()
        jobs[cell] = session.prepare(request)
    model = CostModel({cell: job.stack for cell, job in jobs.items()}, session.lora_footprint)
    order, method = best_order(shape, model)
    return GridPlan(axes, jobs, order, method, model.total(order), model.total(row_major(shape)))


@dataclass
class GridResult:
    out_dir: Path
    image: Path
    json: Path
    cells: list[dict[str, Any]]
    lora: dict[str, Any]
    stopped: bool = False
    results: dict[Cell, GenerationResult] = field(default_factory=dict)


CellCallback = Callable[[int, int, Cell], None]  # (1-based index, total, cell) before each cell


def lora_seconds(phases: dict[str, float]) -> float:
    """A generation's LoRA weight work: patching, dropped-weight reloads and step switches (not file parsing)."""
    return sum(v for k, v in phases.items() if k.startswith("lora_") and k != "lora_load")


def run_grid(session, plan: GridPlan, out_dir: Path, *, on_cell: CellCallback | None = None,
             on_step: StepCallback | None = None, stop: threading.Event | None = None,
             cancel: CancelToken | None = None) -> GridResult:
    """Generate the cells in the plan's order; `stop` ends the grid between cells (what ran is kept)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[Cell, GenerationResult] = {}
    stopped = False
    for index, cell in enumerate(plan.order, 1):
        if stop is not None and stop.is_set():
            stopped = True
            break
        if on_cell is not None:
            on_cell(index, len(plan.order), cell)
        path = out_dir / f"cell-x{cell[0]}-y{cell[1]}-z{cell[2]}.png"
        try:
            results[cell] = session.generate(plan.jobs[cell], out_path=path, on_step=on_step,
                                             cancel=cancel or CancelToken())
        except Cancelled:
            stopped = True
            break
    return _finish(plan, out_dir, results, stopped)


def _finish(plan: GridPlan, out_dir: Path, results: dict[Cell, GenerationResult], stopped: bool) -> GridResult:
    seconds = sum(lora_seconds(r.report.phases) for r in results.values())
    written = sum(r.report.lora.get("patch", {}).get("bytes_written", 0) for r in results.values())
    complete = len(results) == len(plan.order)
    lora: dict[str, Any] = {"seconds": round(seconds, 4), "bytes_written": written, "order": plan.order_method,
                            "planned_bytes": plan.planned_bytes, "row_by_row_bytes": plan.naive_bytes}
    if complete and written:
        # Estimated, not measured: this grid's measured seconds per byte written, times the bytes
        # row-by-row order would write (the cost model that chose the order).
        lora["row_by_row_seconds_estimate"] = round(seconds * plan.naive_bytes / written, 4)
    elif complete:
        lora["row_by_row_seconds_estimate"] = round(seconds, 4)
    cells = []
    for cell in row_major(plan.shape):
        result = results.get(cell)
        row: dict[str, Any] = {"file": result.paths[0].name if result else None, "x": cell[0], "y": cell[1],
                               "z": cell[2], "run_index": plan.order.index(cell) + 1,
                               "request": plan.jobs[cell].request.to_dict()}
        for axis, i, name in zip(plan.axes, cell, NAMES):
            if axis is not None:
                row[f"{name}_value"] = axis.values[i]
        row["report"] = result.report.to_dict() if result else None
        cells.append(row)
    image = out_dir / "grid.png"
    picture = compose({c: (r.paths[0] if r else None) for c in row_major(plan.shape) for r in [results.get(c)]},
                      *(plan.labels(a) if plan.axes[a] is not None else [] for a in range(3)))
    picture.save(image)
    data = {"axes": {n: a.to_dict() for n, a in zip(NAMES, plan.axes) if a is not None}, "grid": image.name,
            "order": [list(c) for c in plan.order], "stopped": stopped, "lora": lora, "cells": cells}
    path = out_dir / "grid.json"
    path.write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
    return GridResult(out_dir, image, path, cells, lora, stopped, results)


def summary(result: GridResult) -> str:
    """One line on the LoRA work: measured in the chosen order, estimated for row-by-row."""
    lora = result.lora
    mb = 1024 * 1024
    line = (f"LoRA work {lora['seconds']:.2f} s measured ({lora['bytes_written'] / mb:,.0f} MB of weights "
            f"rewritten, order: {lora['order']})")
    if "row_by_row_seconds_estimate" in lora:
        line += (f"; row by row would have been ~{lora['row_by_row_seconds_estimate']:.2f} s "
                 f"({lora['row_by_row_bytes'] / mb:,.0f} MB; an estimate from this grid's measured seconds per MB)")
    return line
