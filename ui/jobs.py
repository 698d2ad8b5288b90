"""Which jobs belong to which browser tab, so Stop stops the visitor's own work.

A click on Generate first reserves a ticket (a fast `queue=False` event) and hands it,
through a `gr.State`, to the queued generation that follows with `.then`. The ticket
exists while the job still waits in Gradio's queue, so Stop can cancel a job that has
not started yet: when it starts, its token is already cancelled and it ends at once.
API clients call `/generate` directly; their job gets a ticket when it starts.
"""

from __future__ import annotations

import itertools
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from studio.jobs import CancelToken

MAX_TICKETS_PER_OWNER = 16  # a tab that reserved and never ran (closed, queue full) leaves a stale ticket


@dataclass
class _Ticket:
    owner: str
    token: CancelToken
    running: bool = False


@dataclass(frozen=True)
class StopResult:
    running: int
    queued: int


class JobBook:
    """Thread-safe map of ticket id -> (owner, cancel token)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tickets: dict[str, _Ticket] = {}
        self._ids = itertools.count(1)

    def reserve(self, owner: str) -> str:
        """A ticket for a job about to be queued; returns its id."""
        with self._lock:
            mine = [tid for tid, t in self._tickets.items() if t.owner == owner and not t.running]
            for stale in mine[: max(0, len(mine) - MAX_TICKETS_PER_OWNER + 1)]:
                del self._tickets[stale]
            ticket_id = f"t{next(self._ids)}"
            self._tickets[ticket_id] = _Ticket(owner, CancelToken())
            return ticket_id

    @contextmanager
    def hold(self, owner: str, ticket_id: str | None) -> Iterator[CancelToken]:
        """The token of a running job (the reserved one when given); forgotten when the job ends."""
        with self._lock:
            ticket = self._tickets.get(ticket_id or "")
            if ticket is None or ticket.owner != owner or ticket.running:
                ticket_id = f"t{next(self._ids)}"
                ticket = self._tickets[ticket_id] = _Ticket(owner, CancelToken())
            ticket.running = True
        try:
            yield ticket.token
        finally:
            with self._lock:
                self._tickets.pop(ticket_id, None)

    def stop(self, owner: str) -> StopResult:
        """Cancel every job of this owner, running or still queued."""
        running = queued = 0
        with self._lock:
            for ticket in self._tickets.values():
                if ticket.owner == owner and not ticket.token.cancelled:
                    ticket.token.cancel()
                    running += ticket.running
                    queued += not ticket.running
        return StopResult(running, queued)

    def active(self) -> int:
        with self._lock:
            return sum(t.running for t in self._tickets.values())
