"""The one place engine errors turn into a message for the browser (STYLE.md: errors)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import gradio as gr

from studio.errors import StudioError


@contextmanager
def engine_call() -> Iterator[None]:
    """Run engine code; a StudioError becomes one `gr.Error` line, anything else keeps its traceback."""
    try:
        yield
    except StudioError as err:
        raise gr.Error(str(err), print_exception=False) from None
