"""The live preview's latest picture per browser tab, handed from the generation thread to the Timer.

The generation runs in the handler's thread and calls back once per step; the app's 1 s Timer
(which keeps ticking while a job runs, research/gradio.md §1.6) shows what arrived since its last
tick. Pictures are kept per owner (the tab that queued the job), so a visitor through the public
link never sees another visitor's image forming.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any


@dataclass
class _Slot:
    picture: Any  # a PIL image, or None once the run ended
    caption: str
    version: int
    sent: int = 0  # the version the tab last showed


class PreviewBoard:
    """owner -> the latest preview picture; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slots: dict[str, _Slot] = {}
        self._version = 0

    def post(self, owner: str, picture: Any, caption: str) -> None:
        with self._lock:
            self._version += 1
            sent = self._slots[owner].sent if owner in self._slots else 0
            self._slots[owner] = _Slot(picture, caption, self._version, sent)

    def end(self, owner: str) -> None:
        """The run is over: the tab hides its preview at the next tick."""
        with self._lock:
            if owner in self._slots:
                self._version += 1
                slot = self._slots[owner]
                slot.picture, slot.caption, slot.version = None, "", self._version

    def take(self, owner: str) -> tuple[bool, Any, str]:
        """(changed since the last take, picture or None, caption); forgets an ended run once it was taken."""
        with self._lock:
            slot = self._slots.get(owner)
            if slot is None or slot.sent == slot.version:
                return False, None, ""
            slot.sent = slot.version
            if slot.picture is None:
                del self._slots[owner]
            return True, slot.picture, slot.caption
