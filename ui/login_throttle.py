"""Failed logins back off exponentially, per client (issue 11: 30 wrong logins took 0.24 s).

An ASGI middleware in front of Gradio's `POST /login`: after the n-th failure in a row a client
must wait `min(BASE_DELAY * 2**(n-1), MAX_DELAY)` seconds (0.5 s after a typo, a minute after
eight wrong guesses); until then its logins are answered `429 Too Many Requests` with
`Retry-After`, without checking the password. One attempt per client runs at a time, so
parallel guesses do not slip through before the first failure is counted. A success clears
the client's count.

Who a "client" is: the connection's address; through a proxy on this computer (the Gradio
tunnel's frpc connects from 127.0.0.1) the last `X-Forwarded-For` address, which is the one
the proxy saw. When the proxy sets none, every visitor through it shares one back-off: a
guesser then slows the owner's logins too, which is the price of not being guessable.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

BASE_DELAY = 0.5  # seconds after the first failure
MAX_DELAY = 60.0
FORGET_AFTER = 15 * 60.0  # a client's failures are forgotten after this long without one
MAX_CLIENTS = 10_000  # remembered clients; the longest quiet are dropped first
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


@dataclass
class _Record:
    failures: int = 0
    blocked_until: float = 0.0
    last_failure: float = 0.0
    busy: bool = False  # an attempt of this client is being checked now


def client_key(scope: Scope) -> str:
    """The address a login attempt comes from (see the module doc for proxies)."""
    client = scope.get("client") or ("", 0)
    peer = str(client[0])
    if peer in LOOPBACK:
        for name, value in scope.get("headers") or ():
            if name.lower() == b"x-forwarded-for":
                forwarded = [part.strip() for part in value.decode("latin-1").split(",") if part.strip()]
                if forwarded:
                    return forwarded[-1]
    return peer


def delay_after(failures: int) -> float:
    return 0.0 if failures <= 0 else min(BASE_DELAY * 2 ** (failures - 1), MAX_DELAY)


class LoginThrottle:
    """ASGI middleware; `Middleware(LoginThrottle)` in the FastAPI app Gradio builds."""

    def __init__(self, app: ASGIApp, clock: Callable[[], float] = time.monotonic) -> None:
        self.app = app
        self.clock = clock
        self._clients: OrderedDict[str, _Record] = OrderedDict()

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST" or \
                not str(scope.get("path", "")).rstrip("/").endswith("/login"):
            await self.app(scope, receive, send)
            return
        key, now = client_key(scope), self.clock()
        record = self._record(key, now)
        wait = max(record.blocked_until - now, 0.0)
        if record.busy or wait > 0:
            await _too_many(send, max(wait, 1.0))
            return
        status: dict[str, int] = {}

        async def watch(message: dict) -> None:
            if message.get("type") == "http.response.start":
                status["code"] = int(message.get("status", 0))
            await send(message)

        record.busy = True
        try:
            await self.app(scope, receive, watch)
        finally:
            record.busy = False
            self._settle(key, record, status.get("code"))

    def _record(self, key: str, now: float) -> _Record:
        record = self._clients.get(key)
        if record is None or (record.failures and now - record.last_failure > FORGET_AFTER and not record.busy):
            record = self._clients[key] = _Record()
        self._clients.move_to_end(key)
        while len(self._clients) > MAX_CLIENTS:
            oldest = next(iter(self._clients))
            if self._clients[oldest].busy:
                break
            del self._clients[oldest]
        return record

    def _settle(self, key: str, record: _Record, code: int | None) -> None:
        if code == 200:
            self._clients.pop(key, None)  # logged in: a clean slate
        elif code is not None and 400 <= code < 500:  # wrong user or password (Gradio answers 400)
            now = self.clock()
            record.failures += 1
            record.last_failure = now
            record.blocked_until = now + delay_after(record.failures)


async def _too_many(send, wait: float) -> None:
    seconds = math.ceil(wait)
    body = (f'{{"detail": "Too many failed logins: wait {seconds} s before the next try."}}').encode()
    await send({"type": "http.response.start", "status": 429,
                "headers": [(b"content-type", b"application/json"), (b"retry-after", str(seconds).encode()),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
