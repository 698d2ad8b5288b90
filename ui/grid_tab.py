"""The Grid tab: X/Y/Z grids over LoRA weights (and the other axes of `launch.py grid`), and A/B compare.

The base request is the Generate tab's: its prompt, settings and LoRA rows; each axis is picked
from the same kinds as the CLI (`lora:NAME`, `lbw:NAME`, seed, steps, cfg, sampler, prompt_sr,
size). The engine plans the grid (every cell checked first, the cheapest LoRA order) and runs
it; progress says `cell i/N`, Stop ends the grid between cells and what ran is saved (cells,
grid.png, grid.json). A/B compare is a two-cell grid over whole stacks on one seed, shown with
a slider overlay.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from studio.grid import AXES, Axis, GridResult, parse_axis, plan_grid, run_grid, summary
from studio.session import Session
from ui.access import ServerInfo, is_local, owner_of
from ui.errors import engine_call
from ui.generate_tab import GPU, GenerateForm, GenerateTab
from ui.lora_sync import Row, prompt_from_rows, rows_from_prompt, stack_of

NONE = "—"
KINDS = [NONE, *[k for k in AXES if k != "stack"]]
EXAMPLES = {"lora": "0, 0.5, 1", "lbw": 'ALL, INS, OUTD, "1,0,0,0,0,1,1,1,1,0,0,0"', "seed": "1, 2, 3",
            "steps": "10, 20", "cfg": "3, 5, 7", "sampler": "Euler, DPM++ 2M", "prompt_sr": "cat, dog, fox",
            "size": "256x256, 320x256"}


@dataclass
class AxisInputs:
    kind: gr.Dropdown
    target: gr.Dropdown
    values: gr.Textbox


@dataclass
class GridTab:
    axes: list[AxisInputs]
    run: gr.Button
    halt: gr.Button
    status: gr.Markdown
    image: gr.Image
    summary: gr.Markdown
    cells: gr.Gallery
    json: gr.File
    stack_a: gr.Textbox
    stack_b: gr.Textbox
    take_a: gr.Button
    compare: gr.Button
    slider: gr.ImageSlider
    ab_summary: gr.Markdown


class GridRuns:
    """Per visitor, the stop flag of a running grid (Stop acts between cells)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flags: dict[str, threading.Event] = {}

    def start(self, owner: str) -> threading.Event:
        with self._lock:
            flag = self._flags[owner] = threading.Event()
            return flag

    def stop(self, owner: str) -> bool:
        with self._lock:
            flag = self._flags.get(owner)
        if flag is None or flag.is_set():
            return False
        flag.set()
        return True

    def end(self, owner: str, flag: threading.Event) -> None:
        with self._lock:
            if self._flags.get(owner) is flag:
                del self._flags[owner]


def axis_text(kind: str, target: str, values: str) -> str | None:
    """The CLI form of one axis (`lora:NAME=0,0.5,1`), or None when the axis is unused."""
    if not kind or kind == NONE or not (values or "").strip():
        return None
    head = f"{kind}:{(target or '').strip()}" if kind in ("lora", "lbw") else kind
    return f"{head}={values.strip()}"


def build_grid_tab(session: Session) -> GridTab:
    gr.Markdown("Sweep up to three axes with the **Generate** tab's prompt, settings and LoRA stack as the "
                "base. Cells run in the order that rewrites the fewest LoRA weights, and each is exactly the "
                "image its own request gives (`launch.py grid` runs the same axes headless).", elem_id="grid-intro")
    axes = []
    for name, kind in (("X", "lora"), ("Y", NONE), ("Z", NONE)):
        with gr.Row(equal_height=True):
            k = gr.Dropdown(KINDS, value=kind, label=f"{name} axis", elem_id=f"grid-{name.lower()}-kind", scale=1)
            t = gr.Dropdown([], value=None, label="LoRA (lora: and lbw: axes)", allow_custom_value=True,
                            elem_id=f"grid-{name.lower()}-target", scale=2)
            v = gr.Textbox(label="values (comma-separated; quote a block vector)",
                           elem_id=f"grid-{name.lower()}-values",
                           placeholder=EXAMPLES.get(kind, ""), value="0, 0.5, 1" if kind == "lora" else "", scale=3)
        axes.append(AxisInputs(k, t, v))
    with gr.Row():
        run = gr.Button("Run grid", variant="primary", elem_id="grid-run")
        halt = gr.Button("Stop grid (after this cell)", variant="stop", elem_id="grid-stop")
    status = gr.Markdown(elem_id="grid-status")
    image = gr.Image(label="Grid", type="filepath", interactive=False, elem_id="grid-image", format="png")
    result_line = gr.Markdown(elem_id="grid-summary")
    cells = gr.Gallery(label="Cells (each PNG carries its full parameters)", columns=6, height=260,
                       type="filepath", format="png", elem_id="grid-cells")
    json_file = gr.File(label="grid.json", elem_id="grid-json")
    gr.Markdown("### A/B compare\nTwo stacks (or a stack and none) on the same seed, with the Generate tab's "
                "prompt and settings; drag the slider over the picture to compare.", elem_id="ab-intro")
    with gr.Row(equal_height=True):
        stack_a = gr.Textbox(label="Stack A (LoRA tags)", placeholder="<lora:demo-kohya-warm:1>", elem_id="ab-a",
                             scale=3)
        stack_b = gr.Textbox(label="Stack B (empty = no LoRAs)", placeholder="<lora:demo-kohya-warm:1:lbw=OUTD>",
                             elem_id="ab-b", scale=3)
        take_a = gr.Button("A = Generate's stack", elem_id="ab-take", scale=1, size="sm")
    compare = gr.Button("Compare A / B", variant="primary", elem_id="ab-run")
    slider = gr.ImageSlider(label="A | B", type="filepath", elem_id="ab-slider", interactive=False)
    ab_summary = gr.Markdown(elem_id="ab-summary")
    return GridTab(axes, run, halt, status, image, result_line, cells, json_file, stack_a, stack_b, take_a, compare,
                   slider, ab_summary)


def _out_dir(session: Session, kind: str) -> Path:
    root = session.outputs_root  # the folder the app serves, so the grid's pictures can be shown
    stamp, n = time.strftime("%Y%m%d-%H%M%S"), 1
    while (root / "grids" / f"{stamp}-{kind}-{n}").exists():
        n += 1
    return root / "grids" / f"{stamp}-{kind}-{n}"


def _base_request(prompt: str, rows: list[Row] | None, values: dict[str, Any]):
    form = GenerateForm.from_ui(prompt, rows, negative=values["negative"] or "",
                                seed=-1 if values["seed"] is None else int(values["seed"]), steps=int(values["steps"]),
                                cfg=float(values["cfg"]), width=int(values["width"]), height=int(values["height"]),
                                sampler=values["sampler"])
    return form.requests()[0]


def wire_grid_tab(tab: GridTab, gen: GenerateTab, session: Session, server: ServerInfo) -> None:
    runs = GridRuns()
    gen_inputs = [gen.prompt, gen.loras.rows, gen.negative, gen.seed, gen.steps, gen.cfg, gen.width, gen.height,
                  gen.sampler]
    keys = ("negative", "seed", "steps", "cfg", "width", "height", "sampler")
    quick: dict[str, Any] = {"queue": False, "api_visibility": "private", "show_progress": "hidden"}
    queued: dict[str, Any] = {"concurrency_id": GPU, "concurrency_limit": 1, "api_visibility": "private"}

    def names(rows: list[Row] | None, prompt: str) -> list[str]:
        known = [e.name for e in gen.loras.catalog.entries()]
        return list(dict.fromkeys([r["name"] for r in rows_from_prompt(prompt or "", rows or [])] + known))

    def refresh_targets(rows: list[Row] | None, prompt: str, *current: str):
        choices = names(rows, prompt)
        return [gr.Dropdown(choices=choices, value=c or (choices[0] if choices else None)) for c in current]

    targets = [a.target for a in tab.axes]
    for axis in tab.axes:
        axis.kind.input(lambda kind: gr.Textbox(placeholder=EXAMPLES.get(kind, "")), axis.kind, axis.values, **quick)
        axis.kind.input(refresh_targets, [gen.loras.rows, gen.prompt, *targets], targets, **quick)

    # Named parameters, not *args: Gradio passes gr.Request and gr.Progress only to positional ones
    # (helpers.special_args), and without them Stop never found the grid and progress stayed blank.
    def run(xk: str, xt: str, xv: str, yk: str, yt: str, yv: str, zk: str, zt: str, zv: str, prompt: str,
            rows: list[Row] | None, negative: str, seed: float | None, steps: float, cfg: float, width: float,
            height: float, sampler: str, request: gr.Request, progress: gr.Progress = gr.Progress()) -> dict:
        texts = [axis_text(xk, xt, xv), axis_text(yk, yt, yv), axis_text(zk, zt, zv)]
        rest = (negative, seed, steps, cfg, width, height, sampler)
        owner = owner_of(request)
        with engine_call():
            axes = [parse_axis(t) if t else None for t in texts]
            if not any(axes):
                raise gr.Error("Pick at least one axis and give it values.", print_exception=False)
            base = _base_request(prompt, rows, dict(zip(keys, rest)))
            progress(0, desc="checking every cell")
            plan = plan_grid(session, base, axes)
        result = _run(plan, owner, progress)
        return _grid_outputs(tab, result, plan, is_local(request, server))

    def _run(plan, owner: str, progress: gr.Progress) -> GridResult:
        flag = runs.start(owner)
        total = len(plan.order)
        done = [0]

        def on_cell(index: int, n: int, cell: tuple[int, ...]) -> None:
            done[0] = index - 1
            progress((index - 1, n), desc=f"cell {index}/{n}", unit="cells")

        def on_step(event) -> None:
            progress(((done[0] + event.step / event.total) / total), desc=f"cell {done[0] + 1}/{total}")

        try:
            with engine_call():
                return run_grid(session, plan, _out_dir(session, "grid"), on_cell=on_cell, on_step=on_step,
                                stop=flag)
        finally:
            runs.end(owner, flag)

    axis_inputs = [w for a in tab.axes for w in (a.kind, a.target, a.values)]
    outputs = [tab.status, tab.image, tab.summary, tab.cells, tab.json]
    tab.run.click(run, [*axis_inputs, *gen_inputs], outputs, **queued)

    def stop(request: gr.Request) -> str:
        if runs.stop(owner_of(request)):
            return "⏹ **Stop requested**: the grid ends after the cell that is running; what ran is saved."
        return "No grid of yours is running."

    tab.halt.click(stop, None, tab.status, **quick)

    def take(prompt: str, rows: list[Row] | None) -> str:
        stack = stack_of(rows_from_prompt(prompt or "", rows or []))
        return prompt_from_rows("", [{"name": e[0], "weight": e[1], "enabled": True,
                                      **({"options": e[2]} if len(e) > 2 else {})} for e in stack])

    tab.take_a.click(take, [gen.prompt, gen.loras.rows], tab.stack_a, **quick)

    def compare(a: str, b: str, prompt: str, rows: list[Row] | None, negative: str, seed: float | None, steps: float,
                cfg: float, width: float, height: float, sampler: str, request: gr.Request,
                progress: gr.Progress = gr.Progress()) -> dict:
        rest = (negative, seed, steps, cfg, width, height, sampler)
        with engine_call():
            # The Generate tab's rows are the base stack; the A/B stacks replace it whole.
            base = _base_request(prompt, [], dict(zip(keys, rest)))
            plan = plan_grid(session, base, [Axis("stack", ((a or "").strip(), (b or "").strip()))])
        result = _run(plan, owner_of(request), progress)
        paths = [result.results[c].paths[0] for c in ((0, 0, 0), (1, 0, 0)) if c in result.results]
        lines = [f"A: {a.strip() or 'no LoRAs'} · B: {b.strip() or 'no LoRAs'} · seed {base.seed}", summary(result)]
        return {tab.slider: (str(paths[0]), str(paths[1])) if len(paths) == 2 else gr.skip(),
                tab.ab_summary: "\n\n".join(lines)}

    tab.compare.click(compare, [tab.stack_a, tab.stack_b, *gen_inputs], [tab.slider, tab.ab_summary], **queued)


def _grid_outputs(tab: GridTab, result: GridResult, plan, local: bool) -> dict:
    """The grid's status, picture and files; a visitor through the public link is told the folder's name
    inside the outputs folder, never its local path (issue 11: no local paths for remote visitors)."""
    ran = len(result.results)
    where = result.out_dir if local else f"{result.out_dir.name} (in the outputs folder)"
    head = (f"**Stopped** after {ran} of {len(plan.order)} cells; what ran is saved in `{where}`."
            if result.stopped else f"**{ran} cells** in `{where}` (order: {plan.order_method}).")
    cells = [str(r.paths[0]) for c in plan.order for r in [result.results.get(c)] if r is not None]
    return {tab.status: head, tab.image: str(result.image), tab.summary: summary(result), tab.cells: cells,
            tab.json: str(result.json)}
