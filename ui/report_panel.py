"""The Report tab: the last generation as a table, its JSON, charts over the session, live memory.

The charts read `session.history` (every generation of this session, any tab); the
table shows this tab's last run. The live readout is fed by the app's gr.Timer with
`session.status()`, which is cheap (a process RSS read, and CUDA counters on a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from studio.report import Report
from studio.session import Session
from ui.report_view import memory_axis, memory_frame, phase_frame, render_report

_MB = 1024 * 1024
EMPTY_TABLE = "No generation yet: generate an image and its report appears here."


@dataclass
class ReportPanel:
    table: gr.Markdown
    json_files: gr.File
    live_memory: gr.Markdown
    phase_plot: gr.BarPlot
    memory_plot: gr.LinePlot


def build_report_panel(session: Session) -> ReportPanel:
    """Lay out the panel (call inside a gr.Tab)."""
    history = list(session.history)
    with gr.Row():
        with gr.Column(scale=3):
            gr.Markdown("### Last generation")
            table = gr.Markdown(render_report(history[-1]) if history else EMPTY_TABLE, elem_id="report-table")
        with gr.Column(scale=2):
            live_memory = gr.Markdown(live_memory_text(session.status()), elem_id="live-memory")
            json_files = gr.File(label="Report JSON (saved next to each PNG)", file_count="multiple",
                                 interactive=False, elem_id="report-json")
    gr.Markdown("### This session")
    # one chart a row: side by side, the legend of nine phases was cut off after "VAE decode"
    phase_plot = gr.BarPlot(phase_frame(history), x="generation", y="seconds", color="phase",
                            title="Time per phase", y_title="seconds", height=300, elem_id="phase-plot")
    memory = memory_frame(history)
    memory_plot = gr.LinePlot(memory, x="generation", y="MB", color="measure", title="Peak memory per generation",
                              y_title="MB", y_lim=memory_axis(memory), height=260, elem_id="memory-plot")
    return ReportPanel(table, json_files, live_memory, phase_plot, memory_plot)


def refresh_report_panel(panel: ReportPanel, session: Session, own: list[Report] | None) -> dict:
    """The visitor's last run in the table (else the session's last), the session in the charts."""
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
    memory = memory_frame(history)
    return {panel.table: table, panel.phase_plot: phase_frame(history),
            panel.memory_plot: gr.LinePlot(memory, y_lim=memory_axis(memory))}


def live_memory_text(status: dict) -> str:
    """The live readout: process RAM, and VRAM on CUDA."""
    parts = [f"RAM (RSS) **{status.get('rss', 0) / _MB:,.0f} MB**"]
    if "cuda_allocated" in status:
        parts.append(f"VRAM **{status['cuda_allocated'] / _MB:,.0f} MB** allocated, "
                     f"{status.get('cuda_reserved', 0) / _MB:,.0f} MB reserved")
    state = "generating" if status.get("busy") else "idle"
    return f"Live memory ({state}): " + " · ".join(parts)
