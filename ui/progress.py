"""What the progress bar says while a batch runs: the phase, the step, and how long is left.

The engine announces each phase as it starts (`Session.generate(on_phase=...)`, the report's
own phase names) and each denoising step; this turns both into one `gr.Progress` line per
event, so the bar never sits at "denoising 100%" through the VAE decode.
"""

from __future__ import annotations

from typing import Callable

from studio.jobs import StepEvent

PHASE_WORDS = {
    "model_load": "loading the model",
    "preview_fit": "fitting the live preview to the VAE",
    "lora_load": "reading the LoRA files",
    "lora_patch": "patching the LoRAs in",
    "lora_unpatch_reload": "reloading clean weights",
    "text_encode": "encoding the prompt",
    "denoise": "denoising",
    "vae_decode": "decoding the image (VAE)",
    "save": "saving the PNG",
}

Reporter = Callable[..., None]  # gr.Progress: reporter((done, total), desc=..., unit=...)


def eta_text(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"


class BatchProgress:
    """One batch's progress: steps counted over every image, the phase named for the current one."""

    def __init__(self, reporter: Reporter, steps_per_image: list[int]) -> None:
        self._report = reporter
        self._steps = steps_per_image
        self._total = max(1, sum(steps_per_image))
        self._index = 0
        self._done = 0  # steps finished in the images before this one
        self._step = 0
        self._step_seconds: list[float] = []

    @property
    def done(self) -> int:
        return self._done + self._step

    def _prefix(self) -> str:
        count = len(self._steps)
        return f"image {self._index + 1} of {count}: " if count > 1 else ""

    @property
    def where(self) -> str:
        """"image 2 of 4, " in a batch, else nothing."""
        count = len(self._steps)
        return f"image {self._index + 1} of {count}, " if count > 1 else ""

    def start_image(self, index: int) -> None:
        self._index, self._done, self._step = index, sum(self._steps[:index]), 0

    def phase(self, name: str) -> None:
        if name == "denoise":
            return  # its first step is a second away; "denoise step 0/N" tells nothing more
        words = PHASE_WORDS.get(name, name.replace("_", " "))
        self._report((self.done, self._total), desc=self._prefix() + words, unit="steps")

    def step(self, event: StepEvent) -> None:
        self._step = event.step
        self._step_seconds.append(event.seconds)
        recent = self._step_seconds[-10:]
        left = (self._total - self.done) * sum(recent) / len(recent)
        self._report((self.done, self._total), unit="steps",
                     desc=f"{self._prefix()}denoise step {event.step}/{event.total} · ETA {eta_text(left)}")
