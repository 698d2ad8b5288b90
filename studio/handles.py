"""The lifecycle every pin shares: held from the moment it is returned until released, once.

A pin knows its state and says plainly when it is misused (released twice, used after
release), as httpx's client does. Subclasses say what releasing means (`_on_release`); the
owner's own release API does the bookkeeping, so a pin never reaches into its owner.
"""

from __future__ import annotations

from types import TracebackType


class Pin:
    """Held from creation until `release()` (or the end of a `with` block)."""

    def __init__(self, what: str) -> None:
        self._what = what  # for messages: "the pin on 'unet'"
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def _check_held(self) -> None:
        if self._released:
            raise RuntimeError(f"{self._what} was released and cannot be used after release; pin it again")

    def release(self) -> None:
        if self._released:
            raise RuntimeError(f"{self._what} was already released; releasing it twice is a bug")
        self._released = True  # first: a release that raises still counts as done
        self._on_release()

    def _on_release(self) -> None:
        raise NotImplementedError

    def __enter__(self):  # noqa: ANN204 - the subclass's own type
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self._what}, {'released' if self._released else 'held'}>"
