"""Streams, events and copies for the layer streamer, behind one small interface.

`CudaBackend` is the real one. `InlineBackend` runs the same protocol on the CPU with no
concurrency (copies are real clones, streams and events are tokens), so the streamer's
ordering and bounds can be tested without a GPU; a test subclass records every call.
Every call takes a label (what the streamer means by it) for tests and profiler ranges.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

import torch

Label = tuple[str, int]


class Backend(Protocol):
    def new_stream(self) -> Any: ...

    def current_stream(self) -> Any: ...

    def new_event(self) -> Any: ...

    def record(self, event: Any, stream: Any, label: Label) -> None:
        """Mark the point in `stream` that `event` stands for (non-blocking)."""

    def wait(self, stream: Any, event: Any, label: Label) -> None:
        """Make `stream` wait on the GPU for `event`; the host does not wait."""

    def on_stream(self, stream: Any) -> AbstractContextManager: ...

    def copy(self, src: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A new tensor on `device` holding `src`, allocated and queued on the current stream."""


class CudaBackend:
    """torch.cuda streams and events; copies from pinned memory are asynchronous."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def new_stream(self) -> torch.cuda.Stream:
        return torch.cuda.Stream(self.device)

    def current_stream(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def new_event(self) -> torch.cuda.Event:
        return torch.cuda.Event()  # timing off: cheaper to record and wait on

    def record(self, event: torch.cuda.Event, stream: torch.cuda.Stream, label: Label) -> None:
        event.record(stream)

    def wait(self, stream: torch.cuda.Stream, event: torch.cuda.Event, label: Label) -> None:
        stream.wait_event(event)  # waiting on a never-recorded event is a no-op, as the ring needs

    def on_stream(self, stream: torch.cuda.Stream) -> AbstractContextManager:
        return torch.cuda.stream(stream)

    def copy(self, src: torch.Tensor, device: torch.device) -> torch.Tensor:
        return torch.empty(src.shape, dtype=src.dtype, device=device).copy_(src, non_blocking=True)


class InlineBackend:
    """The CPU stand-in: everything happens at once, in call order; copies are real clones."""

    def __init__(self) -> None:
        self._tokens = 0

    def _token(self, kind: str) -> str:
        self._tokens += 1
        return f"{kind}{self._tokens}"

    def new_stream(self) -> str:
        return self._token("stream")

    def current_stream(self) -> str:
        return "compute"

    def new_event(self) -> str:
        return self._token("event")

    def record(self, event: Any, stream: Any, label: Label) -> None:
        pass

    def wait(self, stream: Any, event: Any, label: Label) -> None:
        pass

    def on_stream(self, stream: Any) -> AbstractContextManager:
        return nullcontext()

    def copy(self, src: torch.Tensor, device: torch.device) -> torch.Tensor:
        return src.to(device, copy=True)


def make_backend(device: torch.device) -> Backend:
    return CudaBackend(device) if device.type == "cuda" else InlineBackend()
