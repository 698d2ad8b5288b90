"""The PNG info tab: drop an image, read its generation parameters, send them to Generate.

Reads A1111-style `parameters` text (this app's, A1111's, Forge's). The drop zone is a
gr.File, so Gradio hands over the uploaded file itself (the text chunk is still in it; a
re-encoded copy would have lost it) and a file that only claims to be a PNG never reaches an
<img> as a broken picture: the preview shows only what Pillow could open. One line says what
the file is and what was found, whatever it is.
Send to Generate keeps `<lora:name:weight>` tags in the prompt and turns them into the
LoRA panel's stack rows (replacing the stack there), so the image's LoRAs come back too;
the output history's Send to Generate uses the same restore (`restore_into`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image, UnidentifiedImageError

from studio.infotext import PNG_KEY, Infotext, parse_infotext
from studio.request import MAX_SEED, MAX_SIDE, MIN_SIDE, SIDE_STEP
from studio.samplers import SAMPLERS
from ui.generate_tab import GenerateTab
from ui.lora_panel import drawn
from ui.lora_sync import prompt_from_rows, rows_from_prompt
from ui.sizes import preset_for

SLIDER_MAX_SIDE = MAX_SIDE


@dataclass
class PngInfoTab:
    upload: gr.File
    preview: gr.Image
    prompt: gr.Textbox
    negative: gr.Textbox
    params: gr.Dataframe
    send: gr.Button
    note: gr.Markdown


@dataclass(frozen=True)
class ImageFacts:
    """What a dropped file is (`summary`, one line) and its parameters when it has any."""

    summary: str
    info: Infotext | None = None
    is_image: bool = False


def _first_bytes(path: Path) -> str:
    head = path.read_bytes()[:24]
    text = head.decode("utf-8", errors="replace")
    if all(ch.isprintable() or ch in "\r\n\t" for ch in text):
        snippet = " ".join(text.split())[:24].replace("`", "'")
        return f"the text `{snippet}…`"  # a code span: Markdown would take "<html>" for a tag
    return "bytes " + head[:8].hex(" ")


def inspect_image(path: str | Path | None) -> ImageFacts:
    """Open what was dropped as an image and read its `parameters` text; never raises for a bad file."""
    if not path:
        return ImageFacts("Drop a PNG made by LoRA Studio, A1111 or Forge to read its parameters.")
    path = Path(path)
    name = path.name
    try:
        size = path.stat().st_size
        with Image.open(path) as img:
            kind, (width, height) = img.format or "image", img.size
            texts = dict(getattr(img, "text", {}) or {})
            texts.update({k: v for k, v in img.info.items() if isinstance(v, str)})
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        if isinstance(err, FileNotFoundError):
            return ImageFacts(f"⚠ **{name}** is gone (it was removed after the upload).")
        if path.exists() and path.stat().st_size == 0:
            return ImageFacts(f"⚠ **{name}** is empty (0 bytes): not an image.")
        return ImageFacts(f"⚠ **{name}** is not an image: it starts with {_first_bytes(path)}, which no image "
                          f"format does ({path.stat().st_size:,} bytes). Nothing to read.")
    what = f"**{name}** is a {width}×{height} {kind} ({size:,} bytes)" if size < 10_000 else \
        f"**{name}** is a {width}×{height} {kind} ({size / 1024:,.0f} KB)"
    text = texts.get(PNG_KEY)
    if not text:
        others = sorted(k for k in texts if k != PNG_KEY)
        found = f"its text chunks: {', '.join(others)}" if others else "it holds no text at all"
        return ImageFacts(f"{what} without generation parameters (no `{PNG_KEY}` text; {found}). "
                          "It was not made by LoRA Studio, A1111 or Forge, or its metadata was stripped.",
                          is_image=True)
    info = parse_infotext(text)
    made = info.params.get("Version", "")
    return ImageFacts(f"{what} with {len(info.params)} generation parameters" + (f", made by {made}" if made else "")
                      + ".", info, is_image=True)


def build_png_info_tab() -> PngInfoTab:
    with gr.Row():
        with gr.Column(scale=2):
            upload = gr.File(label="Drop a PNG (LoRA Studio, A1111, Forge)", file_count="single", type="filepath",
                             height=120, elem_id="png-drop")
            preview = gr.Image(label="The image", type="filepath", interactive=False, height=300, buttons=[],
                               elem_id="png-preview")
            send = gr.Button("Send to Generate", variant="primary", elem_id="png-send")
        with gr.Column(scale=3):
            note = gr.Markdown("Drop a PNG made by LoRA Studio, A1111 or Forge to read its parameters.",
                               elem_id="png-note")
            prompt = gr.Textbox(label="Prompt", lines=3, interactive=False, elem_id="png-prompt")
            negative = gr.Textbox(label="Negative prompt", lines=2, interactive=False, elem_id="png-negative")
            params = gr.Dataframe(headers=["parameter", "value"], datatype=["str", "str"], interactive=False,
                                  label="Parameters", elem_id="png-params")
    return PngInfoTab(upload, preview, prompt, negative, params, send, note)


def restore_targets(gen: GenerateTab) -> list:
    """Every Generate-tab control `restore_into` may set."""
    return [gen.prompt, gen.negative, gen.seed, gen.steps, gen.cfg, gen.sampler, gen.width, gen.height, gen.preset,
            gen.loras.rows, gen.loras.layout]


def restore_into(gen: GenerateTab, info: Infotext, presets: dict[str, tuple[int, int]]) -> tuple[dict, str]:
    """(Generate-tab values from an image's parameters, the note saying what could not be restored)."""
    values, skipped = restorable(info)
    rows = rows_from_prompt(info.prompt, [])  # the image's stack replaces the current one
    out: dict = {gen.prompt: prompt_from_rows(info.prompt, rows), gen.negative: info.negative,
                 gen.loras.rows: rows, gen.loras.layout: drawn(rows)}
    for name, value in values.items():
        out[getattr(gen, name)] = value
    if "width" in values:
        out[gen.preset] = preset_for(presets, values["width"], values["height"])
    note = "Sent to Generate." + (f" Not restored: {'; '.join(skipped)}." if skipped else "")
    return out, note


def wire_png_info(tab: PngInfoTab, gen: GenerateTab, tabs: gr.Tabs, generate_tab_id: str,
                  presets: dict[str, tuple[int, int]]) -> None:
    def png_info(path: str | None) -> tuple[str, str, list[list[str]], str, Any]:
        """Read an image's generation parameters: prompt, negative prompt, a table of the rest, one line
        saying what the file is and what was found, and the image itself when it is one."""
        facts = inspect_image(path)
        info = facts.info
        preview = path if facts.is_image else None
        if info is None:
            return "", "", [], facts.summary, preview
        return info.prompt, info.negative, [[k, v] for k, v in info.params.items()], facts.summary, preview

    tab.upload.change(png_info, tab.upload, [tab.prompt, tab.negative, tab.params, tab.note, tab.preview],
                      api_name="png_info")

    def send_to_generate(path: str | None) -> dict:
        facts = inspect_image(path)
        if facts.info is None:
            return {tab.note: facts.summary + " Nothing was sent to Generate."}
        out, note = restore_into(gen, facts.info, presets)
        return {**out, tabs: gr.Tabs(selected=generate_tab_id), tab.note: note}

    # queued: gradio re-renders the LoRA rows (a State change) only after a queued event
    tab.send.click(send_to_generate, tab.upload, [tabs, *restore_targets(gen), tab.note], api_visibility="private",
                   concurrency_limit=None, show_progress="hidden")


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
        if all(MIN_SIDE <= v <= MAX_SIDE and v % SIDE_STEP == 0 for v in (width, height)):
            values["width"], values["height"] = width, height
        else:
            skipped.append(f"size {size} (sides must be multiples of {SIDE_STEP} from {MIN_SIDE} to {MAX_SIDE})")
    return values, skipped
