"""Which jobs belong to which browser tab, so Stop stops the visitor's own work.

A click on Generate first reserves a ticket (a fast `queue=False` event) and hands it,
through a `gr.State`, to the queued generation that follows with `.then`. The ticket
exists while the job still waits in Gradio's queue, so Stop can cancel a job that has
not started yet: when it starts, its token is already cancelled and it ends at once.

API clients call `/generate` directly, so their job has no ticket until it starts. A Stop
is stopping every job its owner had submitted by then (issue 11: 2 of 6 Stops sent right
after a submit were lost): the book keeps the time of each owner's last Stop, and a job
starting without a ticket is born cancelled when it was accepted before that Stop. When it
was accepted comes from Gradio's queue (`accepted_at`, an internal of gradio 6: without it,
such a job can be stopped only once it runs, as before).
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from studio.jobs import CancelToken

MAX_TICKETS_PER_OWNER = 16  # a tab that reserved and never ran (closed, queue full) leaves a stale ticket
MAX_STOPS_KEPT = 4096  # owners whose last Stop is remembered (the oldest are forgotten first)


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
        self._stops: dict[str, float] = {}  # owner -> time.monotonic() of its last Stop

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
    def hold(self, owner: str, ticket_id: str | None, accepted_at: float | None = None) -> Iterator[CancelToken]:
        """The token of a running job (the reserved one when given); forgotten when the job ends.

        Without a ticket, `accepted_at` (time.monotonic() when the job was accepted) lets a Stop
        that came after it, while the job waited, stop it now: its token starts cancelled.
        """
        with self._lock:
            ticket = self._tickets.get(ticket_id or "")
            if ticket is None or ticket.owner != owner or ticket.running:
                ticket_id = f"t{next(self._ids)}"
                ticket = self._tickets[ticket_id] = _Ticket(owner, CancelToken())
                if accepted_at is not None and self._stops.get(owner, -math.inf) >= accepted_at:
                    ticket.token.cancel()
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
            self._stops.pop(owner, None)  # re-inserted last: the dict is ordered oldest Stop first
            self._stops[owner] = time.monotonic()
            while len(self._stops) > MAX_STOPS_KEPT:
                del self._stops[next(iter(self._stops))]
            for ticket in self._tickets.values():
                if ticket.owner == owner and not ticket.token.cancelled:
                    ticket.token.cancel()
                    running += ticket.running
                    queued += not ticket.running
        return StopResult(running, queued)

    def active(self) -> int:
        with self._lock:
            return sum(t.running for t in self._tickets.values())


def accepted_at() -> float | None:
    """When Gradio's queue accepted the event being handled now (time.monotonic()), or None.

    Reads gradio 6 internals (the handler's event id, the queue's Event.enqueue_time); if they
    move, None: the job is then stoppable from when it starts, as before.
    """
    try:
        from gradio.context import LocalContext

        blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
        event = blocks._queue.event_ids_to_events.get(event_id) if blocks is not None and event_id else None
        return float(event.enqueue_time) if event is not None else None
    except (AttributeError, LookupError, TypeError, ValueError):
        return None


def waiting_events(owner: str, concurrency_id: str) -> int:
    """This owner's events on `concurrency_id` that Gradio has accepted but that hold no ticket yet
    (queued, or started and not yet in `hold`); 0 if gradio 6's internals moved."""
    try:
        from gradio.context import LocalContext

        blocks = LocalContext.blocks.get(None)
        events = list(blocks._queue.event_ids_to_events.values()) if blocks is not None else []
        return sum(e.session_hash == owner and e.concurrency_id == concurrency_id for e in events)
    except (AttributeError, LookupError, TypeError):
        return 0

