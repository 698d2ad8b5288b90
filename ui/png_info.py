"""The PNG info tab: drop an image, read its generation parameters, send them to Generate.

Reads A1111-style `parameters` text (this app's, A1111's, Forge's). The image input is
`type="filepath"` with `image_mode=None`, so Gradio hands over the uploaded file itself
and the text chunk is still in it (a re-encoded copy would have lost it).
Send to Generate keeps `<lora:name:weight>` tags in the prompt and turns them into the
LoRA panel's stack rows (replacing the stack there), so the image's LoRAs come back too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from studio.infotext import Infotext, read_png_infotext
from studio.request import MAX_SEED
from studio.samplers import SAMPLERS
from ui.errors import engine_call
from ui.generate_tab import GenerateTab
from ui.lora_panel import drawn
from ui.lora_sync import prompt_from_rows, rows_from_prompt
from ui.sizes import preset_for

SLIDER_MAX_SIDE = 2048


@dataclass
class PngInfoTab:
    image: gr.Image
    prompt: gr.Textbox
    negative: gr.Textbox
    params: gr.Dataframe
    send: gr.Button
    note: gr.Markdown


def build_png_info_tab() -> PngInfoTab:
    with gr.Row():
        with gr.Column(scale=2):
            image = gr.Image(label="Drop a PNG (LoRA Studio, A1111, Forge)", type="filepath", image_mode=None,
                             sources=["upload", "clipboard"], format="png", height=360, elem_id="png-drop")
            send = gr.Button("Send to Generate", variant="primary", elem_id="png-send")
            note = gr.Markdown(elem_id="png-note")
        with gr.Column(scale=3):
            prompt = gr.Textbox(label="Prompt", lines=3, interactive=False, elem_id="png-prompt")
            negative = gr.Textbox(label="Negative prompt", lines=2, interactive=False, elem_id="png-negative")
            params = gr.Dataframe(headers=["parameter", "value"], datatype=["str", "str"], interactive=False,
                                  label="Parameters", elem_id="png-params")
    return PngInfoTab(image, prompt, negative, params, send, note)


def read_info(path: str | None) -> Infotext | None:
    if not path:
        return None
    with engine_call():
        return read_png_infotext(Path(path))


def wire_png_info(tab: PngInfoTab, gen: GenerateTab, tabs: gr.Tabs, generate_tab_id: str,
                  presets: dict[str, tuple[int, int]]) -> None:
    def png_info(image: str | None) -> tuple[str, str, list[list[str]]]:
        """Read the generation parameters of a PNG: prompt, negative prompt, and a table of the rest."""
        info = read_info(image)
        if info is None:
            return "", "", []
        return info.prompt, info.negative, [[k, v] for k, v in info.params.items()]

    tab.image.change(png_info, tab.image, [tab.prompt, tab.negative, tab.params], api_name="png_info")

    def send_to_generate(image: str | None) -> dict:
        info = read_info(image)
        if info is None:
            return {tab.note: "Drop an image first."}
        values, skipped = restorable(info)
        rows = rows_from_prompt(info.prompt, [])  # the image's stack replaces the current one
        out: dict = {tabs: gr.Tabs(selected=generate_tab_id), gen.prompt: prompt_from_rows(info.prompt, rows),
                     gen.negative: info.negative, gen.loras.rows: rows, gen.loras.layout: drawn(rows)}
        for name, value in values.items():
            out[getattr(gen, name)] = value
        if "width" in values:
            out[gen.preset] = preset_for(presets, values["width"], values["height"])
        note = "Sent to Generate." + (f" Not restored: {'; '.join(skipped)}." if skipped else "")
        out[tab.note] = note
        return out

    outputs = [tabs, gen.prompt, gen.negative, gen.seed, gen.steps, gen.cfg, gen.sampler, gen.width, gen.height,
               gen.preset, gen.loras.rows, gen.loras.layout, tab.note]
    # queued: gradio re-renders the LoRA rows (a State change) only after a queued event
    tab.send.click(send_to_generate, tab.image, outputs, api_visibility="private", concurrency_limit=None,
                   show_progress="hidden")


def restorable(info: Infotext) -> tuple[dict[str, object], list[str]]:
    """Generate-tab values this image's parameters can set, and what had to be left out (and why)."""
    values: dict[str, object] = {}
    skipped: list[str] = []
    params = info.params

    def number(key: str, kind: type, low: float, high: float) -> int | float | None:
        raw = params.get(key)
        if raw is None:
            return None
        try:
            value = kind(float(raw)) if kind is int else float(raw)
        except ValueError:
            skipped.append(f"{key} {raw!r} (not a number)")
            return None
        if not low <= value <= high:
            skipped.append(f"{key} {raw} (outside {low:g}–{high:g})")
            return None
        return value

    for key, name, kind, low, high in (("Seed", "seed", int, 0, MAX_SEED), ("Steps", "steps", int, 1, 200),
                                       ("CFG scale", "cfg", float, 0, 30)):
        value = number(key, kind, low, high)
        if value is not None:
            values[name] = value
    sampler = params.get("Sampler")
    if sampler is not None:
        if sampler in SAMPLERS:
            values["sampler"] = sampler
        else:
            skipped.append(f"sampler {sampler!r} (this app has {', '.join(SAMPLERS)})")
    size = params.get("Size", "")
    if size:
        try:
            width, height = (int(v) for v in size.lower().split("x"))
        except ValueError:
            width = height = 0
        if all(64 <= v <= SLIDER_MAX_SIDE and v % 8 == 0 for v in (width, height)):
            values["width"], values["height"] = width, height
        else:
            skipped.append(f"size {size} (sides must be multiples of 8 from 64 to {SLIDER_MAX_SIDE})")
    return values, skipped
