"""Live weight scrub: while a row's weight slider moves, the image follows it.

Opt-in per stack row. Each slider value starts a handler (concurrently, outside the GPU queue):
it becomes this visitor's latest scrub and cancels the one before, whose job then ends at its
next step (the session's cancel token); it waits DEBOUNCE_S for a newer value, then regenerates
the current seed at the row's preview step count. The patcher sees only that LoRA's weight
change, so only its tensors are re-merged. The note gives the latency from the slider value
reaching the server to the image, and how many tensors were re-merged.
"""

from __future__ import annotations

import hashlib
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from studio.errors import Cancelled
from studio.jobs import CancelToken
from studio.request import MAX_SEED, GenerationRequest
from studio.session import Session
from ui.errors import engine_call
from ui.lora_sync import Row, edit_row, stack_of, strip_tags

DEBOUNCE_S = 0.15  # a drag sends a value every few ms; only one that stays this long starts a job
EVENT: dict[str, Any] = {"queue": True, "concurrency_id": "scrub", "concurrency_limit": None,
                         "trigger_mode": "multiple", "api_visibility": "private", "show_progress": "hidden"}


@dataclass
class ScrubForm:
    """The Generate widgets a scrub reads (the prompt comes with the rows)."""

    negative: gr.Textbox
    seed: gr.Number
    cfg: gr.Slider
    width: gr.Slider
    height: gr.Slider
    sampler: gr.Dropdown

    def inputs(self) -> list:
        return [self.negative, self.seed, self.cfg, self.width, self.height, self.sampler]


class Scrubber:
    """Per visitor: the latest scrub, its job's cancel token, and a seed kept while the seed box says -1."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._lock = threading.Lock()
        self._latest: dict[str, tuple[int, CancelToken]] = {}
        self._seeds: dict[str, int] = {}
        self._counter = 0
        self._folder: Path | None = None

    @property
    def folder(self) -> Path:
        """Where previews are written (made on first use, never inside the outputs folder)."""
        with self._lock:
            if self._folder is None:
                self._folder = Path(tempfile.mkdtemp(prefix="lora-studio-scrub-"))
            return self._folder

    def begin(self, owner: str) -> tuple[int, CancelToken]:
        """This value is now the latest: the previous scrub's job is told to stop at its next step."""
        with self._lock:
            self._counter += 1
            old = self._latest.get(owner)
            token = CancelToken()
            self._latest[owner] = (self._counter, token)
        if old is not None:
            old[1].cancel()
        return self._counter, token

    def is_latest(self, owner: str, seq: int) -> bool:
        with self._lock:
            return self._latest.get(owner, (None,))[0] == seq

    def seed(self, owner: str, seed: int) -> int:
        if seed >= 0:
            return seed
        with self._lock:
            return self._seeds.setdefault(owner, secrets.randbelow(MAX_SEED + 1))

    def run(self, owner: str, name: str, weight: float, rows: list[Row], prompt: str, form: dict[str, Any]
            ) -> tuple[Any, Any]:
        """One slider value: (image, note), or (None, None) when a newer value came or this one was stopped."""
        changed = time.perf_counter()
        seq, token = self.begin(owner)
        time.sleep(DEBOUNCE_S)
        if not self.is_latest(owner, seq):
            return None, None
        rows = edit_row(rows, name, weight=round(float(weight), 4))
        row = next((r for r in rows if r["name"] == name), {})
        steps = int(row.get("preview_steps") or 4)
        path = self.folder / f"{hashlib.sha1(owner.encode()).hexdigest()[:12]}.png"
        with engine_call():
            request = GenerationRequest(prompt=strip_tags(prompt or ""), negative=form["negative"] or "",
                                        seed=self.seed(owner, int(form["seed"] if form["seed"] is not None else -1)),
                                        steps=steps, cfg=float(form["cfg"]), width=int(form["width"]),
                                        height=int(form["height"]), sampler=form["sampler"],
                                        loras=stack_of(rows)).validated()

            def annotate(report) -> None:  # before the report is kept, so the Report tab's history on disk has it
                latency = time.perf_counter() - changed
                report.lora["scrub"] = {"lora": name, "weight": float(weight), "latency_seconds": round(latency, 4)}
                report.notes.append(f"live scrub: {latency:.3f} s from the last slider change to this image")

            try:
                result = self.session.generate(request, cancel=token, out_path=path, annotate=annotate)
            except Cancelled:
                return None, None  # a newer value took over
        latency = result.report.lora["scrub"]["latency_seconds"]
        patch = result.report.lora.get("patch", {})
        note = (f"Live scrub: **{name}** at {weight:g}, seed {request.seed}, {steps} steps: image "
                f"**{latency:.2f} s** after the last slider change; {patch.get('tensors_touched', 0)} tensors "
                f"re-merged, {patch.get('tensors_skipped', 0)} unchanged.")
        with Image.open(result.paths[0]) as img:
            return img.copy(), note
