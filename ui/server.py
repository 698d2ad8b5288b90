"""Start the UI: load settings and the model, build the app, serve it locally."""

from __future__ import annotations

import argparse
import logging
import os
import webbrowser

from studio.errors import StudioError
from studio.paths import app_dirs
from studio.session import Session
from studio.settings import load_settings

log = logging.getLogger(__name__)


def launch_app(session: Session, port: int | None = None, quiet: bool = False):
    """Launch without blocking; returns (app, local_url). Only the outputs folder is served."""
    from ui.app import build_app

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    outputs = session.settings.outputs_dir or str(session.dirs.default_outputs)
    os.makedirs(outputs, exist_ok=True)
    app = build_app(session)
    app.queue(default_concurrency_limit=1, max_size=64)
    _, local_url, _ = app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=quiet,
                                 inbrowser=False, share=False, allowed_paths=[outputs],
                                 blocked_paths=[str(session.dirs.config)], footer_links=["api"], ssr_mode=False,
                                 max_file_size="20mb")
    return app, local_url


def serve(args: argparse.Namespace) -> int:
    dirs = app_dirs()
    settings = load_settings(dirs.settings_file)
    try:
        overrides = {k: getattr(args, k) for k in ("model", "device", "precision") if getattr(args, k, None)}
        if overrides:
            settings = settings.replace(**overrides)
        session = Session(settings, dirs)
        info = session.load_model()
    except StudioError as err:
        print(f"error: {err}")
        return 2
    print(f"model: {info.source.name} ({info.source.kind.value}) loaded in {info.load_seconds:.2f}s "
          f"on {session.runtime.device}/{session.runtime.dtype_name}")
    port = args.port if args.port is not None else settings.port
    app, url = launch_app(session, port=port or None, quiet=True)
    print(f"LoRA Studio is running at {url}  (Ctrl+C to quit)")
    if not args.no_browser:
        webbrowser.open(url)
    try:
        app.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
        session.close()
    return 0
