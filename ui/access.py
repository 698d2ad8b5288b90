"""Who is asking: the person at this computer, or a visitor through the public link.

The client address cannot tell: the tunnel's frpc connects to the app from 127.0.0.1,
so every visitor through the public link looks local (research/gradio.md §2.4). The
Host header can: a browser on this computer sends the address it opened,
`127.0.0.1:<port>` or `localhost:<port>`, while a visitor through the tunnel sends
`<id>.gradio.live` (gradio starts frpc without `host_header_rewrite`, so the header
arrives unchanged) and one on the LAN sends this machine's network address. A remote
visitor cannot forge a loopback Host through the tunnel, because the share server
routes requests by that very header. So: local means a loopback host name with this
app's own port; anything else, or no Host header at all, is remote.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import gradio as gr
from fastapi import Request  # at module level: FastAPI resolves the override's annotation from here

from ui.jobs import JobBook
from ui.live_preview import PreviewBoard
from ui.share import Credentials, PublicLink

log = logging.getLogger(__name__)
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
LOCAL_USER = "this computer"  # the user name of a browser on this computer when a login is required


@dataclass
class ServerInfo:
    """What the handlers need to know about the running server (filled in by launch_app)."""

    port: int | None = None  # None until launched: then any loopback port counts as local
    public: PublicLink = field(default_factory=PublicLink)
    credentials: Credentials | None = None  # set when sharing: login required
    jobs: JobBook = field(default_factory=JobBook)
    previews: PreviewBoard = field(default_factory=PreviewBoard)  # live preview pictures per browser tab


def host_is_local(host_header: str | None, port: int | None) -> bool:
    if not host_header:
        return False
    try:
        parts = urlsplit(f"//{host_header.strip()}")
        host_port = parts.port
    except ValueError:
        return False
    if (parts.hostname or "").lower() not in LOOPBACK_NAMES:
        return False
    return port is None or (host_port or 80) == port


def is_local(request: gr.Request | None, server: ServerInfo) -> bool:
    """True for a browser or client on this computer; a direct Python call (no request) is local."""
    if request is None:
        return True
    headers = getattr(request, "headers", None)
    return host_is_local(headers.get("host") if headers is not None else None, server.port)


def owner_of(request: gr.Request | None) -> str:
    """The browser tab (or API client) a job belongs to."""
    return getattr(request, "session_hash", None) or "local"


def let_this_computer_in(app: gr.Blocks, server: ServerInfo) -> bool:
    """With a login required (the app is shared), do not ask the person at this computer for it.

    Gradio asks everyone once `auth` is set, so with `--share` the user at the keyboard had to type
    a generated password into their own app, even when the link had failed. Every Gradio route
    learns the user from one FastAPI dependency (`get_current_user`, found on the `/config` route
    the page loads first); overriding it
    answers LOCAL_USER for a request whose Host is this computer's (the same test Preferences use)
    and defers to Gradio's cookie login for everyone else. Returns False (everyone logs in, as
    before) if this Gradio has no such route.
    """
    fastapi_app = getattr(app, "server_app", None)
    original = _user_dependency(getattr(fastapi_app, "routes", []))
    if original is None:
        log.warning("Gradio's user route moved: the person at this computer must log in too")
        return False

    async def current_user(request: Request) -> str | None:
        user = await original(request)
        if user is None and host_is_local(request.headers.get("host"), server.port):
            return LOCAL_USER
        return user

    fastapi_app.dependency_overrides[original] = current_user
    return True


def _user_dependency(routes: list) -> object | None:
    """Gradio's `get_current_user` dependency, from the dependencies of its `/config` route."""
    for route in routes:
        if getattr(route, "path", None) != "/config" or not hasattr(route, "dependant"):
            continue
        pending = list(route.dependant.dependencies)
        while pending:
            dependency = pending.pop()
            if getattr(dependency.call, "__name__", "") == "get_current_user":
                return dependency.call
            pending += dependency.dependencies
    return None
