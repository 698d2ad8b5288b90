"""The LoRA panel of the Generate tab: a browser over the LoRA folders and the stack of rows.

- Browser: a gr.Gallery of thumbnails (captions carry the base-model badge, and a ⚠ with
  the reason for a file that cannot be used), a search box and Refresh. Clicking a usable
  LoRA adds a row at weight 1; clicking an unusable one only says why.
- Stack: @gr.render over a gr.State list of {"name", "weight", "enabled"}; each row has an
  enable box, a weight slider (-2..2), up/down/remove, and the file's trigger words as chips
  (a click adds that one word to the prompt, never all of them).
- The rows are the truth; the prompt's `<lora:...>` tags mirror them (ui/lora_sync.py says how).
- Each row has a collapsed panel (ui/lora_blocks.py): block weights (presets or per-block
  sliders), UNet weight, start=/stop=, and the opt-in live weight scrub (ui/scrub.py).
Every event here is browser-only (out of the API); those that write the rows are queued (see ROWS).

What the screen shows is what runs, however a weight is changed: a slider's `.change` fires for
a drag, the arrow keys, typing in its number box and its reset button alike (`.release` missed the
keyboard, so a weight moved with the arrows never reached the rows). Weight edits write `rows`
only; the stack is drawn from `layout`, which changes with the rows' structure (add, remove,
reorder, enable, a prompt edit), so a drag is never re-drawn under the pointer.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import gradio as gr

from studio.lora.stack import search_dirs
from studio.session import Session
from ui.access import owner_of
from ui.lora_blocks import render_blocks
from ui.lora_catalog import CatalogEntry, LoraCatalog
from ui.lora_sync import (Row, add_row, add_word, clean_rows, edit_row, move_row, prompt_from_rows, remove_row,
                          rows_from_prompt)
from ui.scrub import EVENT as SCRUB_EVENT
from ui.scrub import Scrubber, ScrubForm

COLUMNS = 4
MAX_CHIPS = 12  # ss_tag_frequency can hold hundreds of tags; the most frequent come first
WEIGHT_RANGE = 2.0
QUICK: dict[str, Any] = {"queue": False, "api_visibility": "private", "show_progress": "hidden"}
# Events that write the rows go through the queue: gradio 6.31 reports a State's change (which
# re-renders the stack) only on queued events; a queue=False reply leaves `changed_state_ids` out.
ROWS: dict[str, Any] = {"queue": True, "concurrency_limit": None, "api_visibility": "private",
                        "show_progress": "hidden"}


@dataclass
class LoraPanel:
    catalog: LoraCatalog
    search: gr.Textbox
    refresh: gr.Button
    browser: gr.Gallery
    note: gr.Markdown
    rows: gr.State  # list[Row]: the stack, the single source of truth
    layout: gr.State  # drawn(rows): written with `rows` by every edit but a weight's
    shown: gr.State  # names in the browser, in gallery order (a click gives an index)
    action: gr.Markdown  # what the last click in the browser did; cleared by the next edit
    scrub_image: gr.Image | None = None  # the live scrub's picture and its latency note
    scrub_note: gr.Markdown | None = None


def drawn(rows: list[Row]) -> dict[str, Any]:
    """The `layout` value that draws `rows`: always a new value, so the stack is re-drawn even when the
    rows equal the last drawing (a slider moved off 1 and a typed tag putting it back to 1)."""
    return {"rows": clean_rows(rows), "drawn": time.monotonic_ns()}


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "lora"


def lookup(catalog: LoraCatalog, name: str) -> CatalogEntry | None:
    """The entry for a row's name: exact, else ignoring case (as the engine resolves names)."""
    entry = catalog.get(name)
    if entry is None:
        folded = {e.name.lower(): e for e in catalog.entries()}
        entry = folded.get(name.lower())
    return entry


def browser_view(catalog: LoraCatalog, query: str) -> tuple[list[tuple[str, str]], list[str], str]:
    """Gallery items (thumbnail, caption), their names, and the note under the gallery."""
    entries = catalog.entries(query or "")
    items = [(str(tile(catalog, e)), e.caption()) for e in entries]
    everything = catalog.entries()
    usable = sum(e.compatible for e in everything)
    if not everything:
        head = "No LoRA files found. Add folders under **Preferences → LoRA folders**, then ⟳ Refresh."
    elif query and query.strip():
        head = f"{len(entries)} of {len(everything)} LoRAs match “{query.strip()}”."
    else:
        head = f"{len(everything)} LoRAs ({usable} usable with SDXL). Click one to add it to the stack."
    bad = [e for e in entries if not e.compatible]
    lines = [head] + [f"- ⚠ **{e.name}** can't be used: {e.reason}" for e in bad]
    return items, [e.name for e in entries], "\n".join(lines)


def tile(catalog: LoraCatalog, entry: CatalogEntry):
    """The tile's picture: its thumbnail (or a name tile), greyed under a band when it can't be used."""
    if not entry.compatible:
        return catalog.unusable_tile(entry)
    return entry.thumbnail or catalog.placeholder(entry.name)


def gallery_height(count: int) -> int:
    """Room for up to two rows of tiles (more scroll); Gradio's own default leaves a tall empty box."""
    return 40 + 175 * min(2, max(1, -(-count // COLUMNS)))


def add_from_browser(catalog: LoraCatalog, rows: list[Row], prompt: str, name: str) -> tuple[list[Row], str, str]:
    """(rows, prompt, note) after a click on `name` in the browser; an unusable file changes nothing."""
    entry = lookup(catalog, name)
    if entry is None:
        return clean_rows(rows), prompt, f"⚠ **{name}** is no longer in the LoRA folders (⟳ Refresh)."
    if not entry.compatible:
        return clean_rows(rows), prompt, f"⚠ **{entry.name}** can't be added: {entry.reason}"
    before = next((r for r in clean_rows(rows) if r["name"] == entry.name), None)
    rows = add_row(rows, entry.name)
    if before is None:
        note = f"Added **{entry.name}** to the stack."
    elif before["enabled"]:
        note = f"**{entry.name}** is already in the stack (weight {before['weight']:g}); nothing changed."
    else:
        note = f"**{entry.name}** was in the stack switched off: switched it back on."
    return rows, prompt_from_rows(prompt, rows), note


def row_label(catalog: LoraCatalog, row: Row) -> tuple[str, str]:
    """(label, info) of a row's checkbox: name and badge; missing or unusable files say so."""
    entry = lookup(catalog, row["name"])
    if entry is None:
        return f"⚠ {row['name']}", "missing: not in the LoRA folders (generation will fail until it is removed)"
    if not entry.compatible:
        return f"⚠ {entry.name} · {entry.badge}", f"can't be used: {entry.reason}"
    words = ", ".join(entry.trigger_words[:3])
    return f"{entry.name} · {entry.badge}", (f"trigger words: {words}…" if words else "no trigger words in the file")


def build_lora_panel(session: Session, prompt: gr.Textbox, form: ScrubForm | None = None) -> LoraPanel:
    """Lay out and wire the panel (call inside the Generate tab's column, below the prompt).

    `form`: the Generate widgets the live scrub reads (without it, rows offer no scrub).
    """
    catalog = LoraCatalog(session.dirs.cache / "thumbnails")
    scrubber = Scrubber(session) if form is not None else None
    with gr.Accordion("LoRAs", open=True, elem_id="lora-panel"):
        with gr.Row(equal_height=True):
            search = gr.Textbox(show_label=False, placeholder="Search LoRAs: name, title or trigger word",
                                elem_id="lora-search", scale=5, container=False)
            refresh = gr.Button("⟳ Refresh", elem_id="lora-refresh", size="sm", scale=1, min_width=90)
        browser = gr.Gallery(show_label=False, columns=COLUMNS, height=gallery_height(0), allow_preview=False,
                             object_fit="cover", fit_columns=False, interactive=False, buttons=[],
                             elem_id="lora-browser")
        note = gr.Markdown(elem_id="lora-note")
        action = gr.Markdown(elem_id="lora-action")
        rows = gr.State([])
        layout = gr.State(drawn([]))
        shown = gr.State([])
        gr.Markdown("**Stack** (the prompt's `<lora:name:weight>` tags follow these rows, and the other way round)",
                    elem_id="lora-stack-title")

        scrub_note = gr.Markdown(elem_id="lora-scrub-note") if scrubber is not None else None
        scrub_image = gr.Image(label="Live scrub", type="pil", height=224, interactive=False, visible=False,
                               elem_id="lora-scrub-image") if scrubber is not None else None
        scrub = (scrubber, form, scrub_image, scrub_note) if scrubber is not None else None

        @gr.render(inputs=[layout], queue=False, show_progress="hidden")
        def stack(current: dict[str, Any]) -> None:
            current = clean_rows((current or {}).get("rows"))
            if not current:
                gr.Markdown("No LoRAs in the stack: pick one above, or type `<lora:name:1>` in the prompt.",
                            elem_id="lora-stack-empty", key="empty")
            for row in current:
                _render_row(catalog, row, rows, layout, prompt, action, session, scrub)

    panel = LoraPanel(catalog, search, refresh, browser, note, rows, layout, shown, action, scrub_image, scrub_note)
    _wire_browser(panel, session, prompt)
    return panel


def _render_row(catalog: LoraCatalog, row: Row, rows: gr.State, layout: gr.State, prompt: gr.Textbox,
                action: gr.Markdown, session: Session, scrub: tuple | None) -> None:
    name, tag_id = row["name"], slug(row["name"])
    label, info = row_label(catalog, row)
    entry = lookup(catalog, name)
    # Keyed by name so a row keeps its widgets across re-renders; preserved_by_key=None because the
    # state, not the widget, holds the value (a weight typed into the prompt must move the slider).
    keep: dict[str, Any] = {"preserved_by_key": None, "interactive": True}
    with gr.Group(elem_classes="lora-row", key=f"row-{name}"):  # a Group writes its elem_id twice: on the Row
        with gr.Row(equal_height=True, key=f"line-{name}", elem_id=f"lora-row-{tag_id}"):
            enabled = gr.Checkbox(row["enabled"], label=label, info=info, key=f"on-{name}", scale=3,
                                  elem_id=f"lora-enable-{tag_id}", **keep)
            weight = gr.Slider(min(-WEIGHT_RANGE, row["weight"]), max(WEIGHT_RANGE, row["weight"]),
                               value=row["weight"], step=0.05, label="weight", key=f"w-{name}", scale=4,
                               elem_id=f"lora-weight-{tag_id}", **keep)
            up, down, drop = (gr.Button(text, size="sm", min_width=36, scale=0, key=f"{kind}-{name}",
                                        elem_id=f"lora-{kind}-{tag_id}", variant=variant)
                              for text, kind, variant in (("↑", "up", "secondary"), ("↓", "down", "secondary"),
                                                          ("✕", "remove", "stop")))
        words = entry.trigger_words[:MAX_CHIPS] if entry is not None else ()
        chips = []
        if words:
            with gr.Row(elem_classes="lora-chips", key=f"chips-{name}"):
                chips = [gr.Button(f"+ {word}", size="sm", scale=0, key=f"chip-{name}-{i}",
                                   elem_id=f"lora-chip-{tag_id}-{i}", elem_classes="lora-chip")
                         for i, word in enumerate(words)]
        # LoCon/LyCORIS files have conv layers in the 8 blocks the 12-block SDXL layout leaves out
        lycoris = entry is not None and entry.format not in ("kohya", "peft", "dora", "")

    def wire(listener, kind: str, fn, inputs: list, outputs: list, options: dict[str, Any]) -> None:
        listener(fn, inputs, outputs, key=f"{kind}-{name}", **options)  # keyed: the same event across re-renders

    def changed(new_rows: list[Row], text: str) -> tuple[list[Row], dict[str, Any], str, str]:
        return new_rows, drawn(new_rows), prompt_from_rows(text, new_rows), ""

    def weighed(value: float | None, current: list[Row], text: str) -> tuple[Any, Any, Any]:
        """A weight from any input path; the same value again (the stack re-drawn) changes nothing."""
        if value is None:
            return gr.skip(), gr.skip(), gr.skip()
        new_rows = edit_row(current, name, weight=round(float(value), 4))
        if new_rows == clean_rows(current):
            return gr.skip(), gr.skip(), gr.skip()
        tidy = prompt_from_rows(text, new_rows)
        return new_rows, (tidy if tidy != text else gr.skip()), ""

    ins, outs = [rows, prompt], [rows, layout, prompt, action]
    wire(enabled.input, "enable", lambda on, rs, text: changed(edit_row(rs, name, enabled=bool(on)), text),
         [enabled, *ins], outs, ROWS)
    wire(weight.change, "weight", weighed, [weight, *ins], [rows, prompt, action],
         {**ROWS, "trigger_mode": "always_last"})
    wire(up.click, "up", lambda rs, text: changed(move_row(rs, name, -1), text), ins, outs, ROWS)
    wire(down.click, "down", lambda rs, text: changed(move_row(rs, name, +1), text), ins, outs, ROWS)
    wire(drop.click, "remove", lambda rs, text: changed(remove_row(rs, name), text), ins, outs, ROWS)
    for i, (chip, word) in enumerate(zip(chips, words)):
        wire(chip.click, f"chip{i}", lambda text, w=word: add_word(text, w), [prompt], [prompt], QUICK)
    with gr.Group(elem_classes="lora-row-adv", key=f"adv-group-{name}"):
        render_blocks(row, tag_id, rows, prompt, session.lbw_presets, changed, outs, wire, ROWS, QUICK, lycoris)
    if scrub is not None and row.get("scrub"):
        scrubber, form, image, note = scrub

        def scrub_step(w: float, rs: list[Row], text: str, negative: str, seed: float | None, cfg: float,
                       width: float, height: float, sampler: str, request: gr.Request):
            values = {"negative": negative, "seed": seed, "cfg": cfg, "width": width, "height": height,
                      "sampler": sampler}
            picture, line = scrubber.run(owner_of(request), name, w, rs, text, values)
            if picture is None:
                return gr.skip(), gr.skip()
            return gr.Image(value=picture, visible=True), line

        # .input: the user's own moves only (a re-draw setting the value must not start a job)
        wire(weight.input, "scrub", scrub_step, [weight, rows, prompt, *form.inputs()], [image, note], SCRUB_EVENT)


def _wire_browser(panel: LoraPanel, session: Session, prompt: gr.Textbox) -> None:
    catalog = panel.catalog
    view = [panel.browser, panel.shown, panel.note]

    def show(query: str) -> tuple[gr.Gallery, list[str], str]:
        items, names, note = browser_view(catalog, query)
        return gr.Gallery(value=items, height=gallery_height(len(items))), names, note

    def rescan(query: str) -> tuple[gr.Gallery, list[str], str]:
        catalog.scan(search_dirs(session.settings.lora_dirs))  # settings may have changed in Preferences
        return show(query)

    panel.refresh.click(rescan, panel.search, view, **QUICK)
    panel.search.change(show, panel.search, view, **QUICK)
    gr.on(triggers=None, fn=lambda: rescan(""), inputs=[], outputs=view, **QUICK)  # on page load

    def pick(rows: list[Row], text: str, names: list[str], evt: gr.SelectData) -> tuple[Any, Any, Any, str]:
        if evt.index is None or not 0 <= evt.index < len(names or []):
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        new_rows, new_prompt, note = add_from_browser(catalog, rows, text, names[evt.index])
        return new_rows, drawn(new_rows), new_prompt, note

    panel.browser.select(pick, [panel.rows, prompt, panel.shown], [panel.rows, panel.layout, prompt, panel.action],
                         **ROWS)

    def from_prompt(text: str, rows: list[Row]) -> tuple[Any, Any, Any, Any]:
        """A hand edit of the prompt: tags become rows; the prompt is tidied only if that changes it."""
        new_rows = rows_from_prompt(text, rows)
        tidy = prompt_from_rows(text, new_rows)
        if new_rows == clean_rows(rows):
            return gr.skip(), gr.skip(), (tidy if tidy != text else gr.skip()), gr.skip()
        return new_rows, drawn(new_rows), (tidy if tidy != text else gr.skip()), ""

    prompt.blur(from_prompt, [prompt, panel.rows], [panel.rows, panel.layout, prompt, panel.action], **ROWS)
