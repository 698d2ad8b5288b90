"""The Generate tab: prompt, seed, steps, CFG, size, sampler, batch; gallery, progress, Stop.

Handlers build a named `GenerateForm` from named parameters and call the session. The LoRA
stack is the panel's rows (ui/lora_panel.py); the prompt's `<lora:name:weight>` tags mirror
them. Generate folds the prompt's tags into the rows once more (a tag typed just before the
click counts), then sends the text without tags and `loras=` from the enabled rows, so
nothing is applied twice (ui/lora_sync.py). API callers have no rows: their tags are the
stack. Every generation event shares the concurrency id "gpu"; the session's lock
is what really keeps two jobs apart (a cancelled Gradio handler keeps running).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import gradio as gr

from studio.demo_vocab import example_prompts
from studio.errors import Cancelled, SettingsError
from studio.request import MAX_SEED, MAX_SIDE, MIN_SIDE, SIDE_STEP, GenerationRequest, check_text, real_number, \
    whole_number
from studio.samplers import SAMPLERS
from studio.jobs import StepEvent
from studio.session import Session
from ui.access import ServerInfo, is_local, owner_of
from ui.errors import engine_call
from ui.jobs import accepted_at, waiting_events
from ui.lora_panel import LoraPanel, build_lora_panel
from ui.lora_sync import Row, rows_from_prompt, stack_of, strip_tags
from ui.scrub import ScrubForm
from ui.progress import BatchProgress
from ui.report_view import summary_line
from ui.sizes import CUSTOM, preset_for, size_presets

log = logging.getLogger(__name__)
MAX_BATCH = 16
GPU = "gpu"  # the one concurrency id of every event that runs the pipeline


def side_slider(label: str, native: int, elem_id: str) -> gr.Slider:
    """A width/height slider that leaves the bounds check to the engine, so a side out of range gets the
    one message the CLI gives too ("`width` must be a multiple of 8 between 64 and 2048, got 5000")
    instead of Gradio's own, and its `.change` events see a box being typed into ("5", "50", ...).

    The lenient `preprocess` is set on the instance: a Slider subclass would make Gradio write a
    `.pyi` stub beside this module every time it is imported (gradio/component_meta.py).
    """
    slider = gr.Slider(MIN_SIDE, MAX_SIDE, value=native, step=SIDE_STEP, label=label, elem_id=elem_id)

    def lenient(payload: float | None) -> int | None:
        return None if payload is None else int(round(float(payload)))

    slider.preprocess = lenient  # type: ignore[method-assign]
    return slider


@dataclass(frozen=True)
class GenerateForm:
    """What the Generate tab asks for, by name."""

    prompt: str
    negative: str = ""
    seed: int = -1
    steps: int = 20
    cfg: float = 5.0
    width: int = 0
    height: int = 0
    sampler: str = "Euler"
    batch_count: int = 1
    loras: tuple[tuple[str, float], ...] = ()  # the enabled LoRA rows; `prompt` then carries no tags

    @classmethod
    def from_ui(cls, prompt: str, rows: list[Row] | None, **fields: Any) -> GenerateForm:
        """The prompt box and the stack rows as one form: text without tags, loras from the rows."""
        stack = stack_of(rows_from_prompt(prompt or "", rows or []))
        return cls(prompt=strip_tags(prompt or ""), loras=stack, **fields)

    def requests(self) -> list[GenerationRequest]:
        """One validated request per image: seeds base, base+1, ... (a random base for -1)."""
        if isinstance(self.batch_count, bool) or not isinstance(self.batch_count, int) \
                or not 1 <= self.batch_count <= MAX_BATCH:
            raise SettingsError(f"`batch count` must be between 1 and {MAX_BATCH}, got {self.batch_count}")
        first = GenerationRequest(prompt=self.prompt, negative=self.negative, seed=self.seed, steps=self.steps,
                                  cfg=self.cfg, width=self.width, height=self.height, sampler=self.sampler,
                                  loras=self.loras).validated().with_seed()
        return [first.reseeded((first.seed + i) % (MAX_SEED + 1)) for i in range(self.batch_count)]


@dataclass
class GenerateTab:
    prompt: gr.Textbox
    negative: gr.Textbox
    seed: gr.Number
    steps: gr.Slider
    cfg: gr.Slider
    preset: gr.Dropdown
    width: gr.Slider
    height: gr.Slider
    sampler: gr.Dropdown
    batch_count: gr.Slider
    run: gr.Button
    halt: gr.Button
    stop_note: gr.Markdown
    gallery: gr.Gallery
    preview: gr.Image  # the live preview while denoising (fed by the app's Timer)
    seeds_note: gr.Markdown
    summary: gr.Markdown
    last_seed: gr.State  # seed of the last run, or of the image picked in the gallery
    last_reports: gr.State  # this tab's last run: list of Reports, one per image
    ticket: gr.State  # JobBook ticket of the job this tab queued
    loras: LoraPanel


def runs_demo(session: Session) -> bool:
    """Whether the built-in demo model is (or, before the first load, will be) the one generating."""
    return session.model.source.is_demo if session.model is not None else not session.settings.model


def build_generate_tab(session: Session) -> GenerateTab:
    """Lay out the controls (call inside a gr.Tab); events are wired by wire_generate_tab."""
    settings, native = session.settings, session.native_size
    presets = size_presets(native)
    with gr.Row():
        with gr.Column(scale=3):
            examples = example_prompts() if runs_demo(session) else []
            prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt",
                                placeholder=examples[0] if examples else "a cat in a hat",
                                info="`<lora:name:weight>` tags follow the LoRA stack below, and the other way round")
            if examples:  # what the demo model knows how to draw (studio.demo_vocab)
                gr.Examples([[text] for text in examples], inputs=[prompt], label="The demo model draws these",
                            cache_examples=False, elem_id="demo-examples", examples_per_page=len(examples),
                            api_visibility="private")
            negative = gr.Textbox(label="Negative prompt", lines=2, elem_id="negative")
            with gr.Row(equal_height=True):
                seed = gr.Number(label="Seed (-1 = random)", value=-1, precision=0, minimum=-1, maximum=MAX_SEED,
                                 elem_id="seed", scale=3)
                # ⚄ rather than the 🎲 emoji: it renders without an emoji font (Debian's chromium has none)
                dice = gr.Button("⚄ Random", elem_id="seed-random", scale=1, min_width=90, size="sm")
                recycle = gr.Button("♻ Reuse last", elem_id="seed-reuse", scale=1, min_width=90, size="sm")
                batch_count = gr.Slider(1, MAX_BATCH, value=1, step=1, label="Batch count", elem_id="batch-count",
                                        info="seeds s, s+1, …", scale=3)
            with gr.Row():
                steps = gr.Slider(1, 200, value=settings.default_steps, step=1, label="Steps", elem_id="steps")
                cfg = gr.Slider(0, 30, value=settings.default_cfg, step=0.5, label="CFG scale", elem_id="cfg")
                sampler = gr.Dropdown(list(SAMPLERS), value="Euler", label="Sampler", elem_id="sampler")
            with gr.Row():
                preset = gr.Dropdown([*presets, CUSTOM], value=preset_for(presets, native, native), label="Size",
                                     elem_id="size-preset")
                width = side_slider("Width", native, "width")
                height = side_slider("Height", native, "height")
            with gr.Row():
                run = gr.Button("Generate", variant="primary", elem_id="generate")
                halt = gr.Button("Stop", variant="stop", elem_id="stop")
            stop_note = gr.Markdown(elem_id="stop-note")
            loras = build_lora_panel(session, prompt, ScrubForm(negative, seed, cfg, width, height, sampler))
        with gr.Column(scale=2):
            preview = gr.Image(label="Live preview", type="pil", interactive=False, visible=False, height=280,
                               buttons=[], elem_id="live-preview")
            gallery = gr.Gallery(label="Images", columns=2, height=440, type="filepath", format="png",
                                 elem_id="gallery")
            seeds_note = gr.Markdown(elem_id="seeds-note")
            summary = gr.Markdown("Each generation's report appears here and, in full, in the **Report** tab.",
                                  elem_id="summary")
    tab = GenerateTab(prompt, negative, seed, steps, cfg, preset, width, height, sampler, batch_count, run, halt,
                      stop_note, gallery, preview, seeds_note, summary, gr.State(None), gr.State([]), gr.State(None),
                      loras)
    _wire_local_controls(session, tab, dice, recycle, presets)
    return tab


def _wire_local_controls(session: Session, tab: GenerateTab, dice: gr.Button, recycle: gr.Button,
                         presets: dict[str, tuple[int, int]]) -> None:
    """Browser-only helpers: no queue, no API."""
    quick: dict[str, Any] = {"queue": False, "api_visibility": "private", "show_progress": "hidden"}
    dice.click(lambda: -1, None, tab.seed, **quick)

    def reuse(last: int | None):
        """This tab's last seed; on a fresh page, the session's last generation's (it has one)."""
        if last is None and session.history:
            last = session.history[-1].request.get("seed")
        return gr.skip() if last is None else last

    recycle.click(reuse, tab.last_seed, tab.seed, **quick)

    def pick_preset(label: str):
        if label not in presets:
            return gr.skip(), gr.skip()
        return presets[label]

    def follow(width: int | None, height: int | None):
        """The Size menu names what the sliders hold, whichever way they got there (typed, clamped, dragged)."""
        if width is None or height is None:
            return gr.skip()
        return preset_for(presets, width, height)

    tab.preset.input(pick_preset, tab.preset, [tab.width, tab.height], **quick)
    for slider in (tab.width, tab.height):
        # .change, not .input: the number box clamps 5000 to 2048 after its last input event
        slider.change(follow, [tab.width, tab.height], tab.preset, trigger_mode="always_last", **quick)

    def pick_image(reports: list, evt: gr.SelectData):
        if not reports or evt.index is None or evt.index >= len(reports):
            return gr.skip(), gr.skip()
        seed = reports[evt.index].request.get("seed")
        return seed, f"Selected image: seed **{seed}** (♻ puts it in the seed box)"

    tab.gallery.select(pick_image, tab.last_reports, [tab.last_seed, tab.seeds_note], **quick)


def wire_generate_tab(tab: GenerateTab, session: Session, server: ServerInfo,
                      report_json: gr.File) -> list[gr.Dependency]:
    """Generate (queued on "gpu"), Stop (outside the queue); returns the generate events for `.then`."""

    def generate(prompt: str, negative: str, seed: float | None, steps: float, cfg: float, width: float | None,
                 height: float | None, sampler: str, batch_count: float, ticket: str | None = None,
                 rows: list[Row] | None = None, request: gr.Request = None,
                 progress: gr.Progress = gr.Progress()) -> Iterator[dict]:
        """The values arrive as sent (`preprocess=False`): Gradio's own preprocessing rounds 1.5 to 2
        and answers NaN or "abc" with a generic error, so each is checked here, by its name."""
        with engine_call():
            form = GenerateForm.from_ui(
                check_text("prompt", prompt or ""), rows, negative=check_text("negative", negative or ""),
                seed=-1 if seed is None else whole_number("seed", seed), steps=whole_number("steps", steps),
                cfg=real_number("cfg", cfg), width=0 if width is None else whole_number("width", width),
                height=0 if height is None else whole_number("height", height), sampler=sampler,
                batch_count=whole_number("batch count", batch_count))
        yield from _run_batch(session, server, form, owner_of(request), ticket, progress, tab, report_json,
                              accepted_at(), local=is_local(request, server))

    inputs = [tab.prompt, tab.negative, tab.seed, tab.steps, tab.cfg, tab.width, tab.height, tab.sampler,
              tab.batch_count, tab.ticket, tab.loras.rows]
    outputs = [tab.gallery, tab.seeds_note, tab.summary, report_json, tab.last_seed, tab.last_reports]

    def reserve(request: gr.Request):
        return server.jobs.reserve(owner_of(request)), ""

    first: dict[str, Any] = {"queue": False, "api_visibility": "private", "show_progress": "hidden"}
    run: dict[str, Any] = {"concurrency_id": GPU, "concurrency_limit": 1, "show_progress_on": [tab.gallery],
                           "preprocess": False}
    clicked = tab.run.click(reserve, None, [tab.ticket, tab.stop_note], **first)
    event = clicked.then(generate, inputs, outputs, api_name="generate", **run)
    submitted = tab.prompt.submit(reserve, None, [tab.ticket, tab.stop_note], **first)
    submitted = submitted.then(generate, inputs, outputs, api_visibility="private", **run)
    for done in (event, submitted):  # the run has ended (stopped or not): "Stop requested" is history
        done.then(lambda: "", None, tab.stop_note, **first)

    def stop(request: gr.Request) -> str:
        """Stop this visitor's jobs; the person at this computer may also stop anyone's running job."""
        owner = owner_of(request)
        mine = server.jobs.stop(owner)
        # an API job accepted by the queue has no ticket until it starts; the Stop still holds for it
        unticketed = max(0, waiting_events(owner, GPU) - mine.running - mine.queued)
        if mine.running or mine.queued or unticketed:
            parts = ["the running image ends at its next step (nothing of it is saved)"] if mine.running else []
            if mine.queued or unticketed:
                parts.append("your queued job will not start")
            return "⏹ **Stop requested**: " + "; ".join(parts) + "."
        if is_local(request, server) and session.cancel_current():
            return "⏹ **Stop requested**: the running job ends at its next step (nothing of it is saved)."
        return "Nothing of yours is running."

    tab.halt.click(stop, None, tab.stop_note, queue=False, api_name="stop", show_progress="hidden")
    return [event, submitted]


def _run_batch(session: Session, server: ServerInfo, form: GenerateForm, owner: str, ticket: str | None,
               progress: gr.Progress, tab: GenerateTab, report_json: gr.File,
               accepted: float | None = None, local: bool = True) -> Iterator[dict]:
    """Run the images one after another, yielding the gallery as each one lands.

    The report JSON beside each PNG is served to whoever ran the job: a visitor through the public
    link gets it without local paths (model location, LoRA files, the outputs folder)."""
    paths: list[str] = []
    reports: list = []
    jsons: list[str] = []
    stopped = False
    with server.jobs.hold(owner, ticket, accepted_at=accepted) as token:
        with engine_call():
            requests = form.requests()
        count = len(requests)
        bar = BatchProgress(progress, [r.steps for r in requests])
        if session.status()["busy"]:
            progress(0, desc="waiting for the running job")

        def on_step(event: StepEvent) -> None:
            bar.step(event)
            if event.preview is not None:
                server.previews.post(owner, event.preview, f"Live preview: {bar.where}step {event.step}/{event.total}")

        try:
            for index, request in enumerate(requests):
                bar.start_image(index)
                with engine_call():
                    try:
                        # a visitor may be anyone with the link: LoRAs by name from the LoRA folders only
                        result = session.generate(request, on_step=on_step, on_phase=bar.phase, cancel=token,
                                                  allow_paths=False)
                    except Cancelled:
                        stopped = True
                if stopped:
                    break
                json_path = Path(result.paths[0]).with_suffix(".json")
                (result.report if local else result.report.without_local_paths()).write_json(json_path)
                paths += [str(p) for p in result.paths]
                reports.append(result.report)
                jsons.append(str(json_path))
                yield _outputs(tab, report_json, paths, reports, jsons, f"image {index + 1} of {count} done", False)
        finally:
            server.previews.end(owner)
    yield _outputs(tab, report_json, paths, reports, jsons, "", stopped, count)


def _outputs(tab: GenerateTab, report_json: gr.File, paths: list[str], reports: list, jsons: list[str],
             note: str, stopped: bool, count: int | None = None) -> dict:
    seeds = [r.request.get("seed") for r in reports]
    if stopped:
        summary = (f"**Stopped** after {len(reports)} of {count} image{'s' if count != 1 else ''}; "
                   "the image in progress was not saved.")
        if reports:
            summary += "\n\nLast finished: " + summary_line(reports[-1])
    elif reports:
        summary = summary_line(reports[-1]) + (f" ({note})" if note else "")
    else:
        summary = gr.skip()
    return {
        tab.gallery: paths or gr.skip(),
        tab.seeds_note: f"Seeds: {', '.join(str(s) for s in seeds)}" if seeds else gr.skip(),
        tab.summary: summary,
        report_json: jsons or gr.skip(),
        tab.last_seed: seeds[0] if seeds else gr.skip(),
        tab.last_reports: reports if reports else gr.skip(),
    }
