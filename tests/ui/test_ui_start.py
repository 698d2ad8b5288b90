"""Starting the UI from the settings file: what a bad file or a killed save leaves must not stop or expose it."""

from __future__ import annotations

import httpx
import pytest
from gradio_client import Client

from studio.cli import build_parser
from ui.app import status_line
from ui.server import launch_app, start_session


def _start():
    return start_session(build_parser().parse_args(["--device", "cpu", "--precision", "bf16", "--no-browser"]))


@pytest.mark.parametrize("value, why", [("/", "it is the filesystem root"), ("/proc/x", "it cannot be created")])
def test_a_bad_outputs_dir_falls_back_at_start_says_so_and_serves_nothing_else(studio_home, caplog, value, why):
    """`outputs_dir = "/"` served /etc/passwd and `/proc/x` stopped every start (issue 11, items 2 and 3)."""
    studio_home.settings_file.write_text(f'outputs_dir = "{value}"\n')
    session = _start()
    running = launch_app(session, quiet=True)  # no FileNotFoundError: the default folder is used
    try:
        url = running.local_url
        assert httpx.get(f"{url}gradio_api/file=/etc/passwd").status_code == 403
        assert session.outputs_root == studio_home.default_outputs
        status = Client(url, verbose=False, analytics_enabled=False).predict(api_name="/status")
        [notice] = status["notices"]
        assert notice.startswith(f"`outputs_dir` {value!r} is not used: {why}")
        assert notice in caplog.text  # the console
        assert f"⚠ {notice}" in status_line(status, None, local=True)  # the status line, here only
        assert "⚠" not in status_line(status, None, local=False)
    finally:
        running.close()
        session.close()


def test_leftovers_of_a_killed_settings_save_are_removed_at_start(studio_home):
    """A kill -9 during a save leaves `.settings-*.toml` with the password in it (issue 11, item 10)."""
    studio_home.settings_file.write_text("default_steps = 12\n")
    leftover = studio_home.config / ".settings-k1ll3d.toml"
    leftover.write_text('auth_password = "hunter2"\n')
    session = _start()
    try:
        assert not leftover.exists() and studio_home.settings_file.exists()
        assert session.settings.default_steps == 12
    finally:
        session.close()


def test_a_bad_value_at_start_is_on_the_console_and_the_status_line(studio_home, caplog):
    studio_home.settings_file.write_text("default_steps = 0\nlora_cache_mb = 512\n")
    session = _start()
    try:
        line = "`default_steps` must be between 1 and 200, got 0; using the default 20"
        assert line in caplog.text and session.notices == [f"settings.toml: {line}"]
        assert session.settings.lora_cache_mb == 512
    finally:
        session.close()
