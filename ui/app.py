"""build_app(session) -> gr.Blocks: the Generate tab.

Handlers build a named GenerationRequest and call the session; engine errors become
`gr.Error` in exactly one place (`_engine_call`). Stop runs outside the queue
(`queue=False`) and cancels cooperatively: a cancelled Gradio handler's thread keeps
running, so the session's lock, not the queue, keeps jobs from overlapping.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import gradio as gr

from studio.errors import Cancelled, StudioError
from studio.request import SAMPLERS, GenerationRequest
from studio.session import Session, StepEvent
from ui.report_view import render_report

log = logging.getLogger(__name__)

DEMO_NOTICE = ("Running the **built-in demo model**: a tiny SDXL with random weights. Its images are "
               "noise by nature; point the app at a real SDXL checkpoint with `--model` for pictures.")


@contextmanager
def _engine_call() -> Iterator[None]:
    """The one place engine errors turn into a message for the browser."""
    try:
        yield
    except StudioError as err:
        raise gr.Error(str(err), print_exception=False) from None


def build_app(session: Session) -> gr.Blocks:
    settings = session.settings
    size = session.native_size

    def generate(prompt: str, negative: str, seed: float, steps: float, cfg: float, width: float, height: float,
                 sampler: str, progress: gr.Progress = gr.Progress()):
        with _engine_call():
            request = GenerationRequest(prompt=prompt, negative=negative, seed=int(seed), steps=int(steps),
                                        cfg=float(cfg), width=int(width), height=int(height), sampler=sampler)
            progress(0, desc="waiting for the model" if session.status()["busy"] else "starting")

            def on_step(event: StepEvent) -> None:
                progress((event.step, event.total), desc="denoising", unit="steps")

            try:
                result = session.generate(request, on_step=on_step)
            except Cancelled:
                return gr.skip(), "**Stopped.** The run was cancelled before it finished; nothing was saved.", gr.skip()
        paths = [str(p) for p in result.paths]
        return paths, render_report(result.report), result.seeds[0]

    def stop() -> str:
        return "Stopping at the end of the current step…" if session.cancel_current() else "Nothing is running."

    with gr.Blocks(title="LoRA Studio") as app:
        gr.Markdown("# LoRA Studio")
        if session.model is None or session.model.source.is_demo:
            gr.Markdown(DEMO_NOTICE, elem_id="demo-notice")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=3):
                    prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt", placeholder="a cat in a hat")
                    negative = gr.Textbox(label="Negative prompt", lines=2, elem_id="negative")
                    with gr.Row():
                        seed = gr.Number(label="Seed (-1 = random)", value=-1, precision=0, elem_id="seed")
                        steps = gr.Slider(1, 150, value=settings.default_steps, step=1, label="Steps", elem_id="steps")
                        cfg = gr.Slider(0, 30, value=settings.default_cfg, step=0.5, label="CFG scale", elem_id="cfg")
                    with gr.Row():
                        width = gr.Slider(64, 2048, value=size, step=8, label="Width", elem_id="width")
                        height = gr.Slider(64, 2048, value=size, step=8, label="Height", elem_id="height")
                        sampler = gr.Dropdown(list(SAMPLERS), value="Euler", label="Sampler", elem_id="sampler")
                    with gr.Row():
                        run = gr.Button("Generate", variant="primary", elem_id="generate")
                        halt = gr.Button("Stop", variant="stop", elem_id="stop")
                    stop_note = gr.Markdown(elem_id="stop-note")
                with gr.Column(scale=2):
                    gallery = gr.Gallery(label="Images", columns=1, height=420, type="filepath", format="png",
                                         elem_id="gallery")
                    used_seed = gr.Number(label="Seed used", interactive=False, precision=0, elem_id="used-seed")
                    report = gr.Markdown("The report of each generation appears here.", elem_id="report")
        inputs = [prompt, negative, seed, steps, cfg, width, height, sampler]
        run.click(generate, inputs, [gallery, report, used_seed], api_name="generate", concurrency_id="gpu",
                  concurrency_limit=1, show_progress_on=[gallery])
        prompt.submit(generate, inputs, [gallery, report, used_seed], api_visibility="private", concurrency_id="gpu",
                      concurrency_limit=1, show_progress_on=[gallery])
        halt.click(stop, None, stop_note, queue=False, api_name="stop")
    return app
