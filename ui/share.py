"""The public link: login credentials, and a tunnel opened in the background.

The local app is up before the tunnel is tried, and the attempt runs in a daemon
thread, so a missing network never delays or blocks local use. Gradio's own
`launch(share=True)` waits inside `launch()` for up to ~90 s when the network is slow
and then prints a misleading "Missing file: frpc" (research/gradio.md §2.2). Here a
5 s preflight to the share API names the real cause in plain words, and the root
certificate goes to the app's cache folder instead of `.gradio/` in the working folder.
"""

from __future__ import annotations

import logging
import secrets
import threading
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse, urlunparse

import httpx

from studio.settings import Settings

log = logging.getLogger(__name__)

SHARE_API = "https://api.gradio.app/v3/tunnel-request"  # gradio.networking.GRADIO_API_SERVER
PREFLIGHT_TIMEOUT_S = 5.0
STATUS_PAGE = "https://status.gradio.app"

Opener = Callable[[str, int, str], str]  # (local host, local port, share token) -> public URL


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str
    generated: bool  # True: made up for this run, never saved

    @property
    def pair(self) -> tuple[str, str]:
        return self.user, self.password


def login_for(settings: Settings) -> Credentials:
    """The login a shared app requires: the saved one, or a fresh password for this run."""
    if settings.auth_password:
        return Credentials(settings.auth_user or "studio", settings.auth_password, generated=False)
    return Credentials(settings.auth_user or "studio", secrets.token_urlsafe(12), generated=True)


class ShareFailed(Exception):
    """The public link could not be created; the message is the plain reason."""


def open_tunnel(host: str, port: int, share_token: str, *, cache_dir: Path, api_url: str = SHARE_API,
                timeout: float = PREFLIGHT_TIMEOUT_S) -> str:
    """Ask the share server for a tunnel and start frpc; returns the https URL or raises ShareFailed."""
    from gradio import networking, tunneling

    try:
        response = httpx.get(api_url, timeout=timeout)
        response.raise_for_status()
        payload = response.json()[0]
        server = f"{payload['host']}:{int(payload['port'])}"
        certificate = payload["root_ca"]
    except httpx.ConnectError as err:
        raise ShareFailed("no internet connection: the public link could not be created "
                          f"(the share server {urlparse(api_url).hostname} could not be reached: {err})") from None
    except httpx.TimeoutException:
        raise ShareFailed(f"the share server did not answer within {timeout:g} s: the network is offline or "
                          f"blocks it, or the service is down ({STATUS_PAGE})") from None
    except httpx.HTTPStatusError as err:
        raise ShareFailed(f"the share server refused the request (HTTP {err.response.status_code}); "
                          f"try again later ({STATUS_PAGE})") from None
    except (ValueError, KeyError, IndexError, TypeError, httpx.HTTPError) as err:
        raise ShareFailed(f"the share server sent an unexpected answer ({err!r})") from None
    cert_path = cache_dir / "share" / "certificate.pem"
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.write_text(certificate, encoding="utf-8")
    try:
        url = networking.setup_tunnel(host, port, share_token, server, str(cert_path))
    except tunneling.ChecksumMismatchError:
        raise ShareFailed(f"the downloaded tunnel program failed its checksum; delete {tunneling.BINARY_PATH} "
                          "and try again") from None
    except (httpx.HTTPError, OSError) as err:
        missing = not Path(tunneling.BINARY_PATH).exists()
        what = f"the tunnel program could not be downloaded to {tunneling.BINARY_PATH}" if missing else \
            "the tunnel program could not start"
        raise ShareFailed(f"{what} ({err})") from None
    except Exception as err:  # frpc's own failures arrive as ValueError/RuntimeError with its log
        raise ShareFailed(f"the tunnel could not be opened ({err})") from None
    return urlunparse(("https",) + urlparse(url)[1:])


class LinkState(StrEnum):
    OFF = "off"
    CONNECTING = "connecting"
    READY = "ready"
    FAILED = "failed"


class PublicLink:
    """The state of the public link; `start` tries it in a daemon thread and reports the outcome."""

    def __init__(self, opener: Opener | None = None, announce: Callable[[str], None] | None = None) -> None:
        self._opener = opener
        self._announce = announce or log.warning
        self._lock = threading.Lock()
        self._done = threading.Event()
        self.state = LinkState.OFF
        self.url: str | None = None
        self.reason = ""

    def start(self, host: str, port: int, share_token: str) -> threading.Thread:
        if self._opener is None:
            raise RuntimeError("PublicLink.start needs an opener")
        with self._lock:
            self.state = LinkState.CONNECTING
        thread = threading.Thread(target=self._attempt, args=(host, port, share_token), name="public-link",
                                  daemon=True)
        thread.start()
        return thread

    def _attempt(self, host: str, port: int, share_token: str) -> None:
        try:
            url = self._opener(host, port, share_token)
        except ShareFailed as err:
            self._finish(LinkState.FAILED, None, str(err))
        except Exception as err:  # a bug in an opener must not kill the app; say what happened
            log.exception("public link attempt failed")
            self._finish(LinkState.FAILED, None, f"unexpected error: {err!r}")
        else:
            self._finish(LinkState.READY, url, "")

    def _finish(self, state: LinkState, url: str | None, reason: str) -> None:
        with self._lock:
            self.state, self.url, self.reason = state, url, reason
        self._done.set()
        if state is LinkState.READY:
            self._announce(f"Public link: {url}")
        else:
            self._announce(f"Public link unavailable: {reason}. The app keeps running locally.")

    def wait(self, timeout: float) -> bool:
        """Block until the attempt ended (tests, console)."""
        return self._done.wait(timeout)

    def describe(self, credentials: Credentials | None, local: bool) -> str:
        """One Markdown line; the password only for a visitor on this computer."""
        with self._lock:
            state, url, reason = self.state, self.url, self.reason
        if state is LinkState.OFF:
            return ("Public link: off. Turn on **Public link** in Preferences (applies at the next start) "
                    "or start with `--share`.")
        login = ""
        if credentials is not None and local:
            login = f" · visitors log in with `{credentials.user}` / `{credentials.password}`"
            if credentials.generated:
                login += " (generated for this run)"
        if state is LinkState.CONNECTING:
            return f"Public link: connecting… the app already works here{login}"
        if state is LinkState.READY:
            return f"Public link: [{url}]({url}){login}"
        return f"Public link unavailable: {reason}. The app keeps running locally{login}."
