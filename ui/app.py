"""build_app(session) -> gr.Blocks: Generate, Grid, Report, History, PNG info, Preferences tabs; the model picker.

Each tab lives in its own module and is wired here. Engine errors become `gr.Error`
in one place (ui/errors.py). A gr.Timer refreshes the status line (busy/idle, queue,
memory, public link) and the live preview every second; its handler only reads
`session.status()` and the tab's latest preview picture.
"""

from __future__ import annotations

import logging

import gradio as gr

from studio.demo_vocab import COLOURS, SHAPES, WARM_TRIGGER, example_prompts
from studio.session import Session
from ui.access import ServerInfo, is_local, owner_of
from ui.generate_tab import GPU, build_generate_tab, runs_demo, wire_generate_tab
from ui.grid_tab import build_grid_tab, wire_grid_tab
from ui.history_tab import build_history_tab, wire_history_tab
from ui.model_picker import build_model_picker, wire_model_picker
from ui.png_info import build_png_info_tab, wire_png_info
from ui.preferences import Followers, build_preferences, panel_values, wire_preferences
from ui.report_view import render_unpatch_costs
from ui.report_panel import build_report_panel, live_memory_text, refresh_report_panel
from ui.sizes import preset_for, size_presets

log = logging.getLogger(__name__)
_MB = 1024 * 1024
TICK_SECONDS = 1.0
READY = " · ready"  # the model line's marker that the page load has happened (tests wait for it)

def demo_notice() -> str:
    """What the built-in demo model knows, from its vocabulary (studio.demo_vocab), so a newcomer knows what to ask."""
    colours = ", ".join(c.name for c in COLOURS)
    return (f"Running the **built-in demo model**: a tiny SDXL trained to draw one shape on a plain background. "
            f"It knows the colours {colours} and the shapes {', '.join(SHAPES)}; ask for "
            f"*“{example_prompts()[0]}”*. Its LoRAs: `demo-kohya-warm` warms the colours (more with the "
            f"trigger words *{WARM_TRIGGER}*), `demo-peft-cool` cools them, `demo-locon-grain` adds grain. "
            "For anything else, point the app at a real SDXL checkpoint (`--model`, or the model picker).")


def queued_jobs(app: gr.Blocks) -> int | None:
    """Jobs waiting in Gradio's queue for the GPU (an internal of gradio 6; None if it moved)."""
    try:
        return len(app._queue.event_queue_per_concurrency_id[GPU].queue)
    except (AttributeError, KeyError, TypeError):
        return None


def status_line(status: dict, queued: int | None, local: bool = True) -> str:
    """Busy or idle, the queue, memory; for the person at this computer also what fell back at start
    (a notice names local paths, so a visitor through the public link never sees one)."""
    parts = ["● **Generating**" if status.get("busy") else "○ **Idle**"]
    if queued:
        parts.append(f"{queued} in the queue")
    if status.get("waiting"):
        parts.append(f"{status['waiting']} waiting for the running job")
    parts.append(f"RAM {status.get('rss', 0) / _MB:,.0f} MB")
    if "cuda_allocated" in status:
        parts.append(f"VRAM {status['cuda_allocated'] / _MB:,.0f} MB")
    line = " · ".join(parts)
    notices = status.get("notices") if local else None
    return line + "".join(f"\n\n⚠ {notice}" for notice in notices or ())


def model_text(session: Session) -> str:
    """The header's model line: what is loaded, on which device and in which precision, right now."""
    model = session.model
    runtime = f"{session.runtime.device}/{session.runtime.dtype_name}"
    why = f" · {session.runtime.reason}" if session.runtime.reason else ""  # precision: which and why (issue 9)
    if model is None:
        return f"No model loaded yet (it loads with the next generation, on {runtime}){why}"
    kind = "built-in demo model" if model.source.is_demo else model.source.kind.value.replace("_", " ")
    vae = f" + VAE {model.vae_name}" if model.vae else ""
    return f"**{model.source.name}** ({kind}){vae} on {runtime}{why}"


def build_app(session: Session, server: ServerInfo | None = None) -> gr.Blocks:
    server = server or ServerInfo()
    with gr.Blocks(title="LoRA Studio") as app:
        gr.Markdown("# LoRA Studio")
        if runs_demo(session):
            gr.Markdown(demo_notice(), elem_id="demo-notice")
        with gr.Row():
            model_line = gr.Markdown("Loading…", elem_id="model-line")
            live_status = gr.Markdown("Connecting…", elem_id="live-status")
        public_line = gr.Markdown(elem_id="public-link")  # a row of its own: a failure reason is a sentence
        picker = build_model_picker(session)
        with gr.Tabs() as tabs:
            with gr.Tab("Generate", id="generate"):
                gen = build_generate_tab(session)
            with gr.Tab("Grid", id="grid"):
                grid = build_grid_tab(session)
            with gr.Tab("Report", id="report") as report_tab:
                report = build_report_panel(session)
            with gr.Tab("History", id="history") as history_tab:
                history = build_history_tab()
            with gr.Tab("PNG info", id="png-info"):
                png = build_png_info_tab()
            with gr.Tab("Preferences", id="preferences") as prefs_tab:
                prefs = build_preferences(session)

        report_outputs = [report.table, report.json_files, report.phase_plot, report.memory_plot]

        def refresh_report(own: list, request: gr.Request) -> dict:
            return refresh_report_panel(report, session, own, is_local(request, server))

        def header() -> str:
            return model_text(session) + READY

        quiet = {"api_visibility": "private", "queue": False, "show_progress": "hidden"}
        for event in wire_generate_tab(gen, session, server, report.json_files):
            event.then(refresh_report, gen.last_reports, report_outputs, **quiet)
            event.then(header, None, model_line, **quiet)  # a first generation loads the model
        report_tab.select(refresh_report, gen.last_reports, report_outputs, **quiet)
        presets = size_presets(session.native_size)
        wire_png_info(png, gen, tabs, "generate", presets)
        wire_history_tab(history, session, server, gen, tabs, history_tab, "generate", presets)
        wire_grid_tab(grid, gen, session, server)
        wire_preferences(prefs, session, server, Followers({"default_steps": gen.steps, "default_cfg": gen.cfg},
                                                           model_line, header))
        prefs_tab.select(lambda: render_unpatch_costs(list(session.history)), None, prefs.unpatch_costs, **quiet)

        def after_load() -> dict:
            """A new model: the header names it, the size sliders go to its native size."""
            native = session.native_size
            return {model_line: header(), gen.width: native, gen.height: native,
                    gen.preset: preset_for(presets, native, native)}

        wire_model_picker(picker, session, server, after_load, [model_line, gen.width, gen.height, gen.preset])

        def lines(request: gr.Request) -> tuple[str, str, str]:
            status = session.status()
            local = is_local(request, server)
            public = server.public.describe(server.credentials, local)
            return status_line(status, queued_jobs(app), local), public, live_memory_text(status)

        def tick(request: gr.Request) -> tuple:
            changed, picture, caption = server.previews.take(owner_of(request))
            if not changed:
                preview = gr.skip()
            elif picture is None:
                preview = gr.Image(value=None, visible=False)
            else:
                preview = gr.Image(value=picture, label=caption, visible=True)
            return (*lines(request), preview)

        timer = gr.Timer(TICK_SECONDS)
        timer.tick(tick, None, [live_status, public_line, report.live_memory, gen.preview], **quiet)

        def on_load(request: gr.Request) -> dict:
            """Fill the page from the session. The model line's "ready" is the marker that this has
            happened: before it, a value typed into a control may still be overwritten (gradio.md §1.7)."""
            settings = session.settings
            live, public, memory = lines(request)
            return {**panel_values(prefs, session, server, request), gen.steps: settings.default_steps,
                    gen.cfg: settings.default_cfg, live_status: live, public_line: public, report.live_memory: memory,
                    **refresh_report([], request), model_line: header()}

        app.load(on_load, None, [*prefs.widgets.values(), prefs.note, prefs.unpatch_costs, prefs.save, prefs.reset,
                                 gen.steps, gen.cfg, live_status, public_line, report.live_memory, *report_outputs,
                                 model_line], **quiet)

        def status(request: gr.Request) -> dict:
            """Busy or idle, jobs queued and waiting, memory in bytes, and the public link's state."""
            local = is_local(request, server)
            data = session.status()
            if not local:  # no local paths for a visitor through the public link
                data["notices"] = []
                if data.get("model"):
                    data["model"] = {k: v for k, v in data["model"].items() if k not in ("location", "vae_location")}
            return {**data, "queued": queued_jobs(app), "public_link": server.public.state.value,
                    "public_url": server.public.url}

        gr.api(status, api_name="status", queue=False)
    return app
