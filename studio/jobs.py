"""One job at a time on the warm pipeline: the slot it waits for, its cancel token, its progress.

Gradio's queue is not enough to serialise GPU work: a cancelled blocking handler keeps
running and frees its queue slot (measured, research/gradio.md §1.4), so the pipeline is
guarded by a real lock and stopped cooperatively from the step callback.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from studio.errors import Cancelled


@dataclass(frozen=True)
class StepEvent:
    step: int  # 1-based
    total: int
    seconds: float  # this step's wall time
    preview: Any = None  # a small PIL image of the latents every few steps (studio.preview), else None


StepCallback = Callable[[StepEvent], None]


class CancelToken:
    """Set from any thread; the job stops at its next step boundary."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled("stopped by the user")


@dataclass(frozen=True)
class SlotStatus:
    busy: bool
    waiting: int  # jobs blocked on the slot
    progress: tuple[int, int] | None  # (step, total) of the running job


class JobSlot:
    """The pipeline's lock plus what the status line shows about it. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # held for the whole of a job, a model switch or a bake
        self._state = threading.Lock()  # guards the counters below
        self._waiting = 0
        self._current: CancelToken | None = None
        self._progress: tuple[int, int] | None = None

    @contextmanager
    def job(self, token: CancelToken) -> Iterator[None]:
        """Wait for the pipeline (counted in `waiting`), then hold it for the whole job."""
        with self._state:
            self._waiting += 1
        acquired = False
        try:
            self._lock.acquire()
            acquired = True
        finally:
            with self._state:
                self._waiting -= 1
                if acquired:
                    self._current = token
        try:
            yield
        finally:
            with self._state:
                self._current = None
                self._progress = None
            self._lock.release()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """The pipeline for work that is not a cancellable job (load, unload, bake)."""
        with self._lock:
            yield

    def report_progress(self, step: int, total: int) -> None:
        with self._state:
            self._progress = (step, total)

    def cancel_current(self) -> bool:
        """Stop the running job at its next step; returns whether one was running."""
        with self._state:
            token = self._current
        if token is None:
            return False
        token.cancel()
        return True

    def status(self) -> SlotStatus:
        with self._state:
            return SlotStatus(self._current is not None, self._waiting, self._progress)
