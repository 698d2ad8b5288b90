"""The History tab: every image in the outputs folder, newest first, a page at a time.

Click one to see its parameters (from the PNG's own text), its full Report (from the JSON
saved beside it), Send to Generate (the same restore as PNG info) and Open folder (the file
manager on this computer; a visitor through the public link gets the path only). The gallery
shows the saved PNGs themselves, from the outputs folder the server already serves.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from studio.outputs import list_outputs
from studio.report import Report
from studio.session import Session
from ui.access import ServerInfo, is_local
from ui.generate_tab import GenerateTab
from ui.png_info import inspect_image, restore_into, restore_targets
from ui.report_view import render_report

log = logging.getLogger(__name__)
PAGE_SIZE = 24
QUICK: dict[str, Any] = {"queue": False, "api_visibility": "private", "show_progress": "hidden"}


@dataclass
class HistoryTab:
    gallery: gr.Gallery
    page_note: gr.Markdown
    newer: gr.Button
    older: gr.Button
    refresh: gr.Button
    page: gr.State  # 0-based page number
    shown: gr.State  # the paths on this page, in gallery order
    picked: gr.State  # the selected image's path
    summary: gr.Markdown
    params: gr.Dataframe
    report: gr.Markdown
    send: gr.Button
    open_folder: gr.Button
    action: gr.Markdown


def caption(path: Path) -> str:
    """The tile's caption: seed, size and steps from the PNG's text (the file name when it has none)."""
    facts = inspect_image(path)
    if facts.info is None:
        return path.name
    params = facts.info.params
    bits = [f"seed {params['Seed']}" if "Seed" in params else "", params.get("Size", ""),
            f"{params['Steps']} steps" if "Steps" in params else ""]
    return " · ".join(b for b in bits if b) or path.name


def page_of(session: Session, page: int, local: bool = True) -> tuple[list[tuple[str, str]], list[str], int, str]:
    """(gallery items, their paths, the page actually shown, the note above the gallery; the folder's
    path only for the person at this computer)."""
    root = session.outputs_root
    where = f" · `{root}`" if local else ""
    paths = list_outputs(root)
    pages = max(1, math.ceil(len(paths) / PAGE_SIZE))
    page = min(max(0, page), pages - 1)
    chunk = paths[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]
    if not paths:
        note = f"No images yet{f' in `{root}`' if local else ''}: generate one and it appears here."
    else:
        first, last = page * PAGE_SIZE + 1, page * PAGE_SIZE + len(chunk)
        note = f"Images {first}–{last} of {len(paths)}, newest first (page {page + 1} of {pages}){where}"
    return [(str(p), caption(p)) for p in chunk], [str(p) for p in chunk], page, note


def old_report(path: Path, local: bool = True) -> str:
    """The Report of an image from the JSON saved beside it; for a visitor through the public link
    without local paths (model location, LoRA files, outputs), as their own reports are (issue 11)."""
    json_path = path.with_suffix(".json")
    if not json_path.is_file():
        return f"No report beside this image (`{json_path.name}` is not there): only its parameters are known."
    try:
        report = Report.from_dict(json.loads(json_path.read_text(encoding="utf-8")))
        return render_report(report if local else report.without_local_paths())
    except (OSError, ValueError, TypeError) as err:
        return f"The report `{json_path.name}` could not be read ({err})."


def open_in_file_manager(folder: Path) -> None:
    """Show `folder` in the OS file manager (never a shell; the path is one argument)."""
    if sys.platform.startswith("win"):
        os.startfile(folder)  # type: ignore[attr-defined]  # noqa: S606
        return
    command = ["open", str(folder)] if sys.platform == "darwin" else ["xdg-open", str(folder)]
    subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def build_history_tab() -> HistoryTab:
    with gr.Row(equal_height=True):
        page_note = gr.Markdown("Loading the outputs folder…", elem_id="history-note")
        newer = gr.Button("◀ Newer", size="sm", min_width=90, scale=0, elem_id="history-newer")
        older = gr.Button("Older ▶", size="sm", min_width=90, scale=0, elem_id="history-older")
        refresh = gr.Button("⟳ Refresh", size="sm", min_width=90, scale=0, elem_id="history-refresh")
    with gr.Row():
        with gr.Column(scale=3):
            gallery = gr.Gallery(show_label=False, columns=4, height=560, type="filepath", format="png",
                                 allow_preview=False, object_fit="cover", elem_id="history-gallery")
        with gr.Column(scale=2):
            summary = gr.Markdown("Click an image to see its parameters and report.", elem_id="history-summary")
            with gr.Row():
                send = gr.Button("Send to Generate", variant="primary", elem_id="history-send")
                # no folder emoji: Debian's chromium has no emoji font
                open_folder = gr.Button("Open folder", elem_id="history-open")
            action = gr.Markdown(elem_id="history-action")
            params = gr.Dataframe(headers=["parameter", "value"], datatype=["str", "str"], interactive=False,
                                  label="Parameters", elem_id="history-params")
            with gr.Accordion("Report", open=True):
                report = gr.Markdown(elem_id="history-report")
    return HistoryTab(gallery, page_note, newer, older, refresh, gr.State(0), gr.State([]), gr.State(None), summary,
                      params, report, send, open_folder, action)


def wire_history_tab(tab: HistoryTab, session: Session, server: ServerInfo, gen: GenerateTab, tabs: gr.Tabs,
                     opened: gr.Tab, generate_tab_id: str, presets: dict[str, tuple[int, int]]) -> None:
    """Paging (the page is read again whenever the tab is opened), picking, Send to Generate, Open folder."""
    view = [tab.gallery, tab.shown, tab.page, tab.page_note]

    def show(page: int, request: gr.Request) -> tuple[Any, list[str], int, str]:
        items, paths, page, note = page_of(session, page, is_local(request, server))
        return items, paths, page, note

    opened.select(show, tab.page, view, **QUICK)
    tab.refresh.click(show, tab.page, view, **QUICK)

    def newer(page: int, request: gr.Request) -> tuple[Any, list[str], int, str]:
        return show(page - 1, request)

    def older(page: int, request: gr.Request) -> tuple[Any, list[str], int, str]:
        return show(page + 1, request)

    tab.newer.click(newer, tab.page, view, **QUICK)
    tab.older.click(older, tab.page, view, **QUICK)

    def pick(paths: list[str], evt: gr.SelectData, request: gr.Request) -> tuple[Any, ...]:
        if evt.index is None or not 0 <= evt.index < len(paths or []):
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        path = Path(paths[evt.index])
        facts = inspect_image(path)
        table = [[k, v] for k, v in facts.info.params.items()] if facts.info else []
        prompt = f"\n\n**Prompt:** {facts.info.prompt}" if facts.info and facts.info.prompt else ""
        return str(path), facts.summary + prompt, table, old_report(path, is_local(request, server)), ""

    tab.gallery.select(pick, tab.shown, [tab.picked, tab.summary, tab.params, tab.report, tab.action], **QUICK)

    def send(path: str | None) -> dict:
        facts = inspect_image(path)
        if facts.info is None:
            return {tab.action: "Pick an image with generation parameters first." if path else "Pick an image first."}
        out, note = restore_into(gen, facts.info, presets)
        return {**out, tabs: gr.Tabs(selected=generate_tab_id), tab.action: note}

    # queued: gradio re-renders the LoRA rows (a State change) only after a queued event
    tab.send.click(send, tab.picked, [tabs, *restore_targets(gen), tab.action], api_visibility="private",
                   concurrency_limit=None, show_progress="hidden")

    def open_folder(path: str | None, request: gr.Request) -> str:
        folder = Path(path).parent if path else session.outputs_root
        if not is_local(request, server):
            return "The folder is on the computer running LoRA Studio."
        try:
            open_in_file_manager(folder)
        except OSError as err:
            log.info("could not open %s: %s", folder, err)
            return f"Could not open a file manager ({err.strerror or err}); the folder is `{folder}`."
        return f"Opened `{folder}` in the file manager."

    tab.open_folder.click(open_folder, tab.picked, tab.action, **QUICK)
