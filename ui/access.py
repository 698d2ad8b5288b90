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

from dataclasses import dataclass, field
from urllib.parse import urlsplit

import gradio as gr

from ui.jobs import JobBook
from ui.share import Credentials, PublicLink

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


@dataclass
class ServerInfo:
    """What the handlers need to know about the running server (filled in by launch_app)."""

    port: int | None = None  # None until launched: then any loopback port counts as local
    public: PublicLink = field(default_factory=PublicLink)
    credentials: Credentials | None = None  # set when sharing: login required
    jobs: JobBook = field(default_factory=JobBook)


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
