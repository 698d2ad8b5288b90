"""The model picker: an SDXL checkpoint and an optional separate VAE from the model folders, loaded here.

The list is the catalog of the `model_dirs` setting (studio/models/catalog.py: single files
and diffusers folders, read from their headers only) plus the built-in demo model; each
choice says how much memory its weights will take in the precision the app runs in, before
anything loads. Load waits for a running generation (the pipeline's own lock), shows each
stage of the load on the progress bar, and remembers the choice in the settings file. The
LoRA stack lives in the Generate tab's rows, not in the model, so it applies to the new
model at the next Generate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from studio.errors import StudioError
from studio.models.catalog import ModelCatalog, ModelEntry
from studio.session import Session
from studio.settings import update_settings_file
from studio.warm_pipeline import LOAD_STAGES
from ui.access import ServerInfo, is_local
from ui.errors import engine_call

log = logging.getLogger(__name__)
DEMO = ""  # the built-in demo model's value in the dropdown (an empty `model` setting)
OWN_VAE = ""  # "the model's own VAE"
DEMO_LABEL = "built-in demo model (tiny SDXL that draws shapes)"
OWN_VAE_LABEL = "the model's own VAE"


@dataclass
class ModelPicker:
    catalog: ModelCatalog
    model: gr.Dropdown
    vae: gr.Dropdown
    load: gr.Button
    rescan: gr.Button
    note: gr.Markdown  # what the choice will take; then what was loaded


def gigabytes(count: int) -> str:
    return f"{count / 1e9:.1f} GB" if count >= 1e8 else f"{count / 1e6:.0f} MB"


def weights(count: int) -> str:
    """2567000000 -> "2.57 B weights", 7286539 -> "7.3 M weights"."""
    return f"{count / 1e9:.2f} B weights" if count >= 1e9 else f"{count / 1e6:.1f} M weights"


def memory_line(session: Session, model: ModelEntry | None, vae: ModelEntry | None) -> str:
    """What loading the choice will take, from the headers and the precision the app runs in."""
    width, dtype = session.runtime.dtype.itemsize, session.runtime.dtype_name
    if model is None:
        text = f"The built-in demo model takes about 15 MB in {dtype}."
    else:
        text = (f"**{model.name}** ({model.detail}, {gigabytes(model.file_bytes)} on disk) will take "
                f"**≈ {gigabytes(model.memory_bytes(width))} of RAM in {dtype}**")
        text += ", and as much VRAM in full memory mode." if session.runtime.device.type == "cuda" else "."
    if vae is not None:
        text += f" Its VAE is replaced by **{vae.name}** (≈ {gigabytes(vae.memory_bytes(width))})."
    return text


def choices(catalog: ModelCatalog, local: bool = True) -> tuple[list[tuple[str, str]], list[tuple[str, str]],
                                                                 list[str]]:
    """(model choices, VAE choices, lines about files that cannot be used).

    A choice's value is its path, for the person at this computer; a visitor through the public
    link, who cannot load a model anyway, gets the labels as values and no refusals (they name
    files), so no local path reaches their page (issue 11).
    """
    models = [(DEMO_LABEL, DEMO)]
    models += [(f"{e.name} · {'single file' if e.kind == 'checkpoint' else 'diffusers folder'} · {weights(e.params)}",
                str(e.path)) for e in catalog.models() if e.usable]
    vaes = [(OWN_VAE_LABEL, OWN_VAE)] + [(f"{e.name} · {e.detail}", str(e.path)) for e in catalog.vaes() if e.usable]
    if not local:
        return [(label, label if value else value) for label, value in models], \
            [(label, label if value else value) for label, value in vaes], []
    bad = [f"- ⚠ {e.reason}" for e in catalog.entries() if not e.usable]
    return models, vaes, bad


def _label_of(rows: list[tuple[str, str]], value: str) -> str:
    """The label of the choice whose value (path) is `value`; the demo and the own VAE ("") stay as they are."""
    return next((label for label, path in rows if path == value), Path(value).name) if value else value


def build_model_picker(session: Session) -> ModelPicker:
    """Lay out the picker (call inside a container; the lists arrive with the page load)."""
    catalog = ModelCatalog()
    with gr.Accordion("Model", open=False, elem_id="model-picker"):
        with gr.Row(equal_height=True):
            model = gr.Dropdown([(DEMO_LABEL, DEMO)], value=DEMO, label="SDXL model", scale=4,
                                elem_id="model-choice")
            vae = gr.Dropdown([(OWN_VAE_LABEL, OWN_VAE)], value=OWN_VAE, label="VAE", scale=3, elem_id="vae-choice")
            load = gr.Button("Load", variant="primary", scale=1, min_width=90, elem_id="model-load")
            rescan = gr.Button("⟳ Rescan", scale=1, min_width=90, elem_id="model-rescan")
        note = gr.Markdown("Add folders under **Preferences → Model folders** to list your models here.",
                           elem_id="model-note")
    return ModelPicker(catalog, model, vae, load, rescan, note)


def current(session: Session) -> tuple[str, str]:
    """The dropdown values of what is loaded now (else what the settings will load)."""
    info = session.model
    if info is None:
        return session.settings.model, session.settings.vae
    return (DEMO if info.source.is_demo else info.source.location), info.vae


def wire_model_picker(picker: ModelPicker, session: Session, server: ServerInfo,
                      after_load: Callable[[], dict[Any, Any]], after_outputs: list) -> None:
    """Rescan (also on page load), the memory line as the choice changes, Load with progress."""
    catalog = picker.catalog
    quick: dict[str, Any] = {"queue": False, "api_visibility": "private", "show_progress": "hidden"}

    def find(value: str) -> ModelEntry | None:
        """The entry a dropdown value names: its path, or (for a visitor) its label."""
        if not value:
            return None
        labelled = {label: path for label, path in (row for rows in choices(catalog)[:2] for row in rows)}
        return catalog.find(labelled.get(value, value))

    def describe(model_value: str, vae_value: str) -> str:
        return memory_line(session, find(model_value), find(vae_value))

    def rescan(request: gr.Request) -> tuple[Any, Any, str]:
        local = is_local(request, server)
        catalog.scan([Path(d) for d in session.settings.model_dirs])
        models, vaes, bad = choices(catalog, local)
        model_value, vae_value = current(session)
        if not local:  # the label of what is loaded, not its path
            here_models, here_vaes, _ = choices(catalog)
            model_value, vae_value = _label_of(here_models, model_value), _label_of(here_vaes, vae_value)
        if model_value not in {v for _, v in models}:
            models.append((Path(model_value).name or model_value, model_value))  # loaded from outside the folders
        if vae_value not in {v for _, v in vaes}:
            vaes.append((Path(vae_value).name, vae_value))
        found = len(models) - 1
        head = (f"{found} model{'s' if found != 1 else ''} and {len(vaes) - 1} VAE{'s' if len(vaes) != 2 else ''} "
                "in the model folders." if session.settings.model_dirs else
                "Add folders under **Preferences → Model folders** to list your models here.")
        lines = [head, describe(model_value, vae_value), *bad]
        return gr.Dropdown(choices=models, value=model_value), gr.Dropdown(choices=vaes, value=vae_value), \
            "\n".join(lines)

    view = [picker.model, picker.vae, picker.note]
    picker.rescan.click(rescan, None, view, **quick)
    gr.on(triggers=None, fn=rescan, inputs=[], outputs=view, **quick)  # on page load
    for dropdown in (picker.model, picker.vae):
        dropdown.input(describe, [picker.model, picker.vae], picker.note, **quick)

    def load(model_value: str, vae_value: str, request: gr.Request, progress: gr.Progress = gr.Progress()) -> dict:
        if not is_local(request, server):
            raise gr.Error("The model can be changed only on the computer running LoRA Studio.",
                           print_exception=False)

        def on_progress(stage: str, fraction: float | None) -> None:
            progress(fraction, desc=LOAD_STAGES.get(stage, stage))

        progress(None, desc="waiting for the running generation" if session.status()["busy"] else "starting")
        with engine_call():
            try:
                info = session.load_model(model_value or DEMO, vae=vae_value or OWN_VAE, on_progress=on_progress)
            except StudioError as err:
                raise type(err)(f"{err}. The previous model loads again with the next generation.") from None
        _remember(session, model_value, vae_value)
        vae = f" with the VAE **{info.vae_name}**" if info.vae else ""
        done = (f"Loaded **{info.source.name}**{vae} in {info.load_seconds:.1f} s. The LoRA stack is kept: it "
                "applies to this model at the next Generate.")
        return {picker.note: done, **after_load()}

    picker.load.click(load, [picker.model, picker.vae], [picker.note, *after_outputs], api_visibility="private",
                      concurrency_id="gpu", concurrency_limit=1, show_progress_on=[picker.note])


def _remember(session: Session, model_value: str, vae_value: str) -> None:
    """Keep the choice for the next start (the settings file's `model` and `vae`), as A1111 does."""
    path = session.dirs.settings_file
    try:
        update_settings_file(path, model=model_value, vae=vae_value)
    except (OSError, StudioError) as err:
        log.warning("the model choice was loaded but not saved to %s: %s", path, err)
