"""Start the UI: load settings and the model, build the app, serve it locally, then maybe share it.

Order matters for the public link: the local server is up first; the tunnel is tried
afterwards in a background thread (ui/share.py), and the login it requires is set at
launch, so the app is never reachable through a link without one.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import webbrowser
from dataclasses import dataclass
from typing import Callable

import gradio as gr
from starlette.middleware import Middleware

from studio.errors import StudioError
from studio.paths import ASSETS_DIR, app_dirs
from studio.session import Session
from studio.settings import read_settings, remove_temp_leftovers
from ui.access import ServerInfo, let_this_computer_in
from ui.login_throttle import LoginThrottle
from ui.share import Opener, PublicLink, login_for, open_tunnel

log = logging.getLogger(__name__)
CSS = ASSETS_DIR / "css" / "studio.css"
AUTH_MESSAGE = "LoRA Studio is shared through a public link: log in with the user and password shown on its console."


@dataclass
class RunningApp:
    app: gr.Blocks
    local_url: str
    server: ServerInfo

    def start_public_link(self) -> None:
        """Try the tunnel in the background (launch_app does this unless told to wait)."""
        self.server.public.start(self.app.server_name, self.app.server_port, self.app.share_token)

    def close(self) -> None:
        self.app.close()


def served_folders(session: Session) -> tuple[list[str], list[str]]:
    """(allowed, blocked): the outputs folder and the thumbnail cache are served; the config folder never.

    `session.outputs_root` is a checked folder of its own (studio/outputs.py): a refused or uncreatable
    `outputs_dir` has already fallen back to the default, with a notice for the status line.
    """
    thumbnails = session.dirs.cache / "thumbnails"
    thumbnails.mkdir(parents=True, exist_ok=True)
    return [str(session.outputs_root), str(thumbnails)], [str(session.dirs.config)]


def launch_app(session: Session, port: int | None = None, quiet: bool = False, share: bool = False,
               opener: Opener | None = None, announce: Callable[[str], None] | None = None,
               start_tunnel: bool = True) -> RunningApp:
    """Launch without blocking. With `share`, a visitor through the link must log in (the person at this
    computer need not) and the tunnel is tried in the background (now, or when the caller calls
    `start_public_link`, with start_tunnel=False)."""
    from ui.app import build_app

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    credentials = login_for(session.settings) if share else None
    opener = opener or functools.partial(open_tunnel, cache_dir=session.dirs.cache)
    server = ServerInfo(public=PublicLink(opener, announce), credentials=credentials)
    app = build_app(session, server)
    app.queue(default_concurrency_limit=1, max_size=64)
    allowed, blocked = served_folders(session)
    _, local_url, _ = app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=quiet,
                                 inbrowser=False, share=False, auth=credentials.pair if credentials else None,
                                 auth_message=AUTH_MESSAGE if credentials else None, allowed_paths=allowed,
                                 blocked_paths=blocked, footer_links=["api"], ssr_mode=False, max_file_size="20mb",
                                 css_paths=[CSS], app_kwargs={"middleware": [Middleware(LoginThrottle)]})
    server.port = app.server_port
    if credentials is not None:
        let_this_computer_in(app, server)
    running = RunningApp(app, local_url, server)
    if share and start_tunnel:
        running.start_public_link()
    return running


def start_session(args: argparse.Namespace) -> Session:
    """The session `serve` runs: leftovers of a killed save removed, settings read (each bad value
    falls back alone, with a warning on the console and a notice for the status line)."""
    dirs = app_dirs()
    for leftover in remove_temp_leftovers(dirs.settings_file):
        log.warning("removed %s, left by a settings save that was interrupted", leftover.name)
    loaded = read_settings(dirs.settings_file)
    settings = loaded.settings
    overrides = {k: getattr(args, k) for k in ("model", "device", "precision") if getattr(args, k, None)}
    if overrides:
        settings = settings.replace(**overrides)
    session = Session(settings, dirs)
    session.notices.extend(f"settings.toml: {line}" for line in loaded.warnings())
    return session


def serve(args: argparse.Namespace) -> int:
    try:
        session = start_session(args)
        info = session.load_model()
    except StudioError as err:
        print(f"error: {err}")
        return 2
    print(f"model: {info.source.name} ({info.source.kind.value}) loaded in {info.load_seconds:.2f}s "
          f"on {session.runtime.device}/{session.runtime.dtype_name} ({session.runtime.reason})")
    port = args.port if args.port is not None else session.settings.port
    share = bool(getattr(args, "share", False) or session.settings.share)
    running = launch_app(session, port=port or None, quiet=True, share=share, announce=print, start_tunnel=False)
    print(f"LoRA Studio is running at {running.local_url}  (Ctrl+C to quit)")
    if running.server.credentials is not None:
        creds = running.server.credentials
        print(f"Public link requested: trying it in the background. Login: {creds.user} / {creds.password}"
              + (" (generated for this run; set auth_password in Preferences to keep one)" if creds.generated else ""))
        running.start_public_link()  # after the lines above, so its outcome prints below them
    if not args.no_browser:
        webbrowser.open(running.local_url)
    try:
        running.app.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        running.close()
        session.close()
    return 0
