"""A stack row's collapsed panel: LoRA Block Weight sliders and presets, UNet weight, step range, live scrub.

Everything here edits the row's `options` (the canonical `unet=..:lbw=..:start=..:stop=..` text),
so the prompt's tag follows (`<lora:name:1:lbw=OUTD:stop=10>`) and Generate sends it as is. The
block sliders use the extension's SDXL layout, 12 blocks (BASE IN04 IN05 IN07 IN08 MID OUT0-OUT5),
or its 20-block LyCORIS layout when the row's vector has values in the other 8 blocks. The panel's
open state is a UI key of the row ("blocks_open"), so a re-draw of the stack keeps it open.
A block slider, like the row's weight, reacts to `.change` (drag, arrow keys, typing) and writes the
rows and the tag without re-drawing the stack under the pointer; a preset, the step boxes and the
scrub box re-draw it (the sliders show the preset's values; a scrubbing row wires its scrub event).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import gradio as gr

from studio.errors import SettingsError
from studio.lora.block_weights import BLOCKS_20, LABELS_12, PRESETS, compact, expand, resolve_lbw, vector_text
from studio.lora.spec import parse_args, parse_number
from ui.errors import engine_call
from ui.lora_sync import Row, clean_rows, edit_row, prompt_from_rows, spec_of_row

CUSTOM = "custom vector"
NO_LBW = "— (all blocks)"
DEFAULT_PREVIEW_STEPS = 4
Presets = Callable[[], Mapping[str, tuple[float, ...]]]


def block_view(row: Row, presets: Mapping[str, tuple[float, ...]], lycoris: bool = False
               ) -> tuple[str, list[str], list[float]]:
    """(preset choice, slider labels, slider values) for a row: 12 sliders, or 20 for a LyCORIS/LoCon
    file (its conv layers live in the 8 blocks the 12 leave out) or a vector with values there."""
    spec = spec_of_row(row)
    try:
        vector = resolve_lbw(spec, presets)
    except SettingsError:
        vector = None
    if vector is None:
        return NO_LBW, list(BLOCKS_20 if lycoris else LABELS_12), [1.0] * (20 if lycoris else 12)
    values = list(vector) if lycoris else compact(vector)
    labels = list(LABELS_12) if len(values) == 12 else list(BLOCKS_20)
    choice = spec.lbw if spec.lbw in {**PRESETS, **presets} else CUSTOM
    return choice, labels, list(values)


def with_lbw(rows: list[Row], name: str, lbw: str) -> list[Row]:
    row = next(r for r in clean_rows(rows) if r["name"] == name)
    return edit_row(rows, name, options=replace(spec_of_row(row), lbw=lbw).options)


def set_block(rows: list[Row], name: str, index: int, value: float, presets: Mapping[str, tuple[float, ...]],
              lycoris: bool = False) -> list[Row]:
    """One slider moved: the row's block weights become an explicit vector with that value (in the
    layout the sliders show, so a LoCon's 8 extra blocks never drop to 0 behind the user's back)."""
    _choice, labels, values = block_view(next(r for r in clean_rows(rows) if r["name"] == name), presets, lycoris)
    values[index] = round(float(value), 4)
    return with_lbw(rows, name, vector_text(compact(expand(tuple(values)))))


def set_fields(rows: list[Row], name: str, unet: float | None, start: str, stop: str) -> list[Row]:
    """UNet weight and step range from their boxes; raises SettingsError naming what does not read."""
    row = next(r for r in clean_rows(rows) if r["name"] == name)
    spec = spec_of_row(row)
    args = [f"unet={unet}"] if unet is not None else []
    args += [f"start={start.strip()}"] if start and start.strip() else []
    args += [f"stop={stop.strip()}"] if stop and stop.strip() else []
    if spec.lbw:
        args.append(f"lbw={spec.lbw}")
    new = parse_args(name, [repr(float(row["weight"])), *args])
    return edit_row(rows, name, options=new.options)


def render_blocks(row: Row, tag_id: str, rows: gr.State, prompt: gr.Textbox, presets: Presets,
                  changed: Callable[[list[Row], str], tuple], outs: list, wire: Callable[..., None],
                  rows_options: dict[str, Any], quick: dict[str, Any], lycoris: bool = False) -> gr.Checkbox:
    """The row's accordion; returns its scrub checkbox. Element ids end in `tag_id` (the row's slug).
    `changed(rows, prompt)` gives the values of `outs` (the rows, the drawing, the prompt...) after an
    edit that re-draws the stack. `lycoris`: the file has layers outside the 12 SDXL LoRA blocks."""
    name = row["name"]
    spec = spec_of_row(row) if _readable(row) else None
    choice, labels, values = block_view(row, presets(), lycoris) if spec is not None \
        else (NO_LBW, list(LABELS_12), [1.0] * 12)
    keep: dict[str, Any] = {"preserved_by_key": None, "interactive": True}
    with gr.Accordion("Blocks · steps · live scrub", open=bool(row.get("blocks_open")), key=f"adv-{name}",
                      elem_classes="lora-adv", elem_id=f"lora-adv-{tag_id}") as panel:
        with gr.Row(equal_height=True, key=f"adv-top-{name}"):
            preset = gr.Dropdown([NO_LBW, *sorted({*PRESETS, *presets()}), CUSTOM], value=choice,
                                 label="block weights (lbw=)", key=f"preset-{name}", scale=2,
                                 elem_id=f"lora-lbw-{tag_id}", **keep)
            unet = gr.Number(spec.unet if spec is not None else None, label="UNet weight (empty = weight)",
                             key=f"unet-{name}", scale=1, elem_id=f"lora-unet-{tag_id}", **keep)
            start = gr.Textbox("" if spec is None or spec.start is None else f"{spec.start:g}", label="start=",
                               placeholder="step or 0-1", key=f"start-{name}", scale=1,
                               elem_id=f"lora-start-{tag_id}", **keep)
            stop = gr.Textbox("" if spec is None or spec.stop is None else f"{spec.stop:g}", label="stop=",
                              placeholder="step or 0-1", key=f"stop-{name}", scale=1,
                              elem_id=f"lora-stop-{tag_id}", **keep)
        sliders = []
        per_line = 6 if len(labels) == 12 else 7
        for first in range(0, len(labels), per_line):
            with gr.Row(key=f"blocks-{name}-{first}"):
                for i in range(first, min(first + per_line, len(labels))):
                    sliders.append(gr.Slider(min(-1.0, values[i]), max(1.5, values[i]), value=values[i], step=0.05,
                                             label=labels[i], key=f"b{i}-{name}-{len(labels)}", min_width=90,
                                             elem_classes="lora-block", elem_id=f"lora-block-{tag_id}-{i}",
                                             **keep))
        with gr.Row(equal_height=True, key=f"scrub-line-{name}"):
            scrub = gr.Checkbox(bool(row.get("scrub")), label="live scrub: regenerate while the weight slider moves",
                                key=f"scrub-{name}", scale=3, elem_id=f"lora-scrub-{tag_id}", **keep)
            steps = gr.Number(int(row.get("preview_steps") or DEFAULT_PREVIEW_STEPS), label="preview steps",
                              precision=0, minimum=1, maximum=50, key=f"psteps-{name}", scale=1,
                              elem_id=f"lora-psteps-{tag_id}", **keep)
    def on_preset(value: str, rs: list[Row], text: str):
        if value == CUSTOM:
            return tuple(gr.skip() for _ in outs)
        return changed(with_lbw(rs, name, "" if value == NO_LBW else value), text)

    def on_fields(u: float | None, a: str, b: str, rs: list[Row], text: str):
        with engine_call():
            return changed(set_fields(rs, name, u, a, b), text)

    def on_block(value: float | None, rs: list[Row], text: str, i: int):
        """One block from any input path; its own value again (the stack re-drawn) changes nothing."""
        current = next((r for r in clean_rows(rs) if r["name"] == name), None)
        if value is None or current is None or not _readable(current) \
                or round(float(value), 4) == block_view(current, presets(), lycoris)[2][i]:
            return gr.skip(), gr.skip(), gr.skip()
        new_rows = set_block(rs, name, i, value, presets(), lycoris)
        tidy = prompt_from_rows(text, new_rows)
        return new_rows, (tidy if tidy != text else gr.skip()), gr.Dropdown(value=CUSTOM)

    ins = [rows, prompt]
    wire(preset.input, "preset", on_preset, [preset, *ins], outs, rows_options)
    for box in (unet, start, stop):
        wire(box.blur, f"field-{box.label}", on_fields, [unet, start, stop, *ins], outs, rows_options)
        wire(box.submit, f"submit-{box.label}", on_fields, [unet, start, stop, *ins], outs, rows_options)
    for i, slider in enumerate(sliders):
        wire(slider.change, f"block{i}", lambda v, rs, text, i=i: on_block(v, rs, text, i), [slider, *ins],
             [rows, prompt, preset], {**rows_options, "trigger_mode": "always_last"})
    wire(scrub.input, "scrub-on", lambda on, rs, text: changed(edit_row(rs, name, scrub=bool(on)), text),
         [scrub, *ins], outs, rows_options)
    wire(steps.blur, "psteps", lambda n, rs: edit_row(rs, name, preview_steps=_steps(n)), [steps, rows], [rows],
         rows_options)
    wire(panel.expand, "open", lambda rs: _open(rs, name, True), [rows], [rows], quick)
    wire(panel.collapse, "close", lambda rs: _open(rs, name, False), [rows], [rows], quick)
    return scrub


def _open(rows: list[Row], name: str, state: bool) -> list[Row]:
    return [{**r, "blocks_open": state} if r.get("name") == name else r for r in rows or []]


def _steps(value: Any) -> int:
    try:
        return max(1, min(50, int(parse_number(str(value), "preview steps"))))
    except SettingsError:
        return DEFAULT_PREVIEW_STEPS


def _readable(row: Row) -> bool:
    try:
        spec_of_row(row)
        return True
    except SettingsError:
        return False
