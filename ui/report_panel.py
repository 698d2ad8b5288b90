"""The Report tab: the last generation as a table, its JSON, charts over the recent runs, live memory.

The charts read `session.history` (the last reports of any tab, kept on disk so a restart
keeps them, studio/history.py); the table and the JSON files show this tab's last run, or
after a reload the session's last one (both: the table and its JSON always name the same
generation). The live readout is fed by the app's gr.Timer with `session.status()`, which
is cheap (a process RSS read, and CUDA counters on a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from studio.report import Report
from studio.session import Session
from ui.charts import memory_chart, phase_chart
from ui.report_view import HISTORY_SHOWN, PHASE_LABELS, render_report

_MB = 1024 * 1024
EMPTY_TABLE = "No generation yet: generate an image and its report appears here."


@dataclass
class ReportPanel:
    table: gr.Markdown
    json_files: gr.File
    live_memory: gr.Markdown
    phase_plot: gr.HTML
    memory_plot: gr.HTML


def json_paths(reports: list[Report]) -> list[str]:
    """The report JSON beside each report's PNG, where it is on disk."""
    found = []
    for report in reports:
        for output in report.outputs:
            path = Path(output).with_suffix(".json")
            if path.is_file():
                found.append(str(path))
    return found


def build_report_panel(session: Session) -> ReportPanel:
    """Lay out the panel (call inside a gr.Tab)."""
    history = list(session.history)
    with gr.Row():
        with gr.Column(scale=3):
            gr.Markdown("### Last generation")
            table = gr.Markdown(render_report(history[-1]) if history else EMPTY_TABLE, elem_id="report-table")
        with gr.Column(scale=2):
            live_memory = gr.Markdown(live_memory_text(session.status()), elem_id="live-memory")
            # filled at page load, for the person at this computer or the visitor's own runs only: the
            # page's first values go to every visitor, and a local run's JSON names local paths (issue 11)
            json_files = gr.File(value=None, label="Report JSON (saved next to each PNG)",
                                 file_count="multiple", interactive=False, elem_id="report-json")
    gr.Markdown(f"### Recent generations (the last {HISTORY_SHOWN}, kept across restarts)")
    phase_plot = gr.HTML(phase_chart(history, PHASE_LABELS), elem_id="phase-plot")
    memory_plot = gr.HTML(memory_chart(history), elem_id="memory-plot")
    return ReportPanel(table, json_files, live_memory, phase_plot, memory_plot)


def refresh_report_panel(panel: ReportPanel, session: Session, own: list[Report] | None, local: bool = True) -> dict:
    """The visitor's last run in the table and its JSON (else the session's last), the history in the charts.

    A visitor through the public link gets the JSON of their own runs only (written without local
    paths); the session's last run, maybe this computer's, shows as its table alone."""
    history = list(session.history)
    reports = own or history[-1:]
    if reports:
        table = render_report(reports[-1])
        if len(reports) > 1:
            seeds = ", ".join(str(r.request.get("seed")) for r in reports)
            total = sum(r.phases.get("total", 0.0) for r in reports)
            table = f"Batch of {len(reports)} images (seeds {seeds}), {total:.2f} s in all; the last one:\n\n" + table
    else:
        table = EMPTY_TABLE
    return {panel.table: table, panel.json_files: (json_paths(reports) if own or local else []) or None,
            panel.phase_plot: phase_chart(history, PHASE_LABELS), panel.memory_plot: memory_chart(history)}


def live_memory_text(status: dict) -> str:
    """The live readout: process RAM, and VRAM on CUDA."""
    parts = [f"RAM (RSS) **{status.get('rss', 0) / _MB:,.0f} MB**"]
    if "cuda_allocated" in status:
        parts.append(f"VRAM **{status['cuda_allocated'] / _MB:,.0f} MB** allocated, "
                     f"{status.get('cuda_reserved', 0) / _MB:,.0f} MB reserved")
    state = "generating" if status.get("busy") else "idle"
    return f"Live memory ({state}): " + " · ".join(parts)
