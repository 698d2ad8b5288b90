"""The one place engine errors turn into a message for the browser (STYLE.md: errors).

A refusal (bad input, out of memory, stopped) is not a bug: it logs one line and the visitor
gets its message. An EngineFault is a bug the engine caught itself: its traceback is logged
once, and the visitor still gets the one-line message. Anything else is a bug Gradio reports
with its traceback (issue 11: 13 refusals wrote 13 tracebacks).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import gradio as gr

from studio.errors import EngineFault, StudioError

log = logging.getLogger(__name__)


@contextmanager
def engine_call() -> Iterator[None]:
    """Run engine code; a StudioError becomes one `gr.Error` line, anything else keeps its traceback."""
    try:
        yield
    except EngineFault as err:
        log.error("engine fault: %s", err, exc_info=err)
        raise gr.Error(str(err), print_exception=False) from None
    except StudioError as err:
        log.warning("refused: %s", err)
        raise gr.Error(str(err), print_exception=False) from None
