"""Preferences through the API: save round trip, refusals that save nothing, reset, read-only from afar."""

from __future__ import annotations

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from studio.settings import load_settings


@pytest.fixture
def prefs(served):
    """A client, with the settings file and the session's settings put back afterwards."""
    session, url = served
    original = session.settings
    session.dirs.settings_file.unlink(missing_ok=True)
    yield session, Client(url, verbose=False, analytics_enabled=False)
    session.dirs.settings_file.unlink(missing_ok=True)
    session.apply_settings(original)


def test_saved_values_persist_and_apply_when_they_say(prefs):
    session, client = prefs
    result = client.predict({"default_steps": 7, "lora_mode": "sidecar", "port": 7999}, api_name="/save_preferences")
    assert result["changed"] == {
        "default_steps": {"from": 20, "to": 7, "applies": "applies now"},
        "lora_mode": {"from": "merged", "to": "sidecar", "applies": "applies now"},
        "port": {"from": 7860, "to": 7999, "applies": "needs a restart"}}
    saved = load_settings(session.dirs.settings_file)
    assert (saved.default_steps, saved.lora_mode.value, saved.port) == (7, "sidecar", 7999)
    assert session.settings.default_steps == 7 and session.settings.port != 7999  # the port waits for a restart
    shown = client.predict(api_name="/preferences")
    assert shown["default_steps"] == {"value": 7, "applies": "applies now"}
    assert shown["port"]["value"] == 7999


@pytest.mark.parametrize("changes, message", [
    ({"default_steps": 0, "default_cfg": 3.0}, "`default_steps` must be between 1 and 200, got 0"),
    ({"default_cfg": "lots"}, "`default_cfg` must be a number, got 'lots'"),
    ({"device": "tpu"}, "`device` must be one of auto, cpu, cuda, got 'tpu'"),
    ({"colour": "blue"}, "unknown setting(s) colour"),
])
def test_invalid_values_are_refused_and_nothing_is_saved(prefs, changes, message):
    session, client = prefs
    client.predict({"default_cfg": 6.0}, api_name="/save_preferences")
    before, running = session.dirs.settings_file.read_bytes(), session.settings
    with pytest.raises(AppError) as refused:
        client.predict(changes, api_name="/save_preferences")
    assert message in str(refused.value)
    assert session.dirs.settings_file.read_bytes() == before and session.settings == running


def test_a_bad_value_in_the_file_falls_back_alone_and_a_save_keeps_what_the_user_wrote(prefs):
    """default_steps = 0 by hand: only it falls back; the next Save writes neither defaults for the
    other numbers nor one for it (issue 11, item 4)."""
    session, client = prefs
    session.dirs.settings_file.write_text("default_steps = 0\nlora_cache_mb = 512\nport = 7999\n")
    shown = client.predict(api_name="/preferences")
    assert shown["default_steps"]["value"] == 20 and shown["lora_cache_mb"]["value"] == 512
    result = client.predict({"default_cfg": 6.0}, api_name="/save_preferences")
    assert list(result["changed"]) == ["default_cfg"]
    text = session.dirs.settings_file.read_text()
    assert "lora_cache_mb = 512" in text and "port = 7999" in text and "default_cfg = 6.0" in text
    assert "default_steps = 0" in text  # the user's own line, untouched until they change that field
    client.predict({"default_steps": 25}, api_name="/save_preferences")
    assert load_settings(session.dirs.settings_file).default_steps == 25


@pytest.mark.parametrize("pick, why", [(lambda dirs: "/", "it is the filesystem root"),
                                       (lambda dirs: "~", "it is your home folder"),
                                       (lambda dirs: str(dirs.config), "it is the config folder"),
                                       (lambda dirs: str(dirs.config.parent), "it holds the config folder")])
def test_an_outputs_folder_that_would_serve_other_files_is_refused_at_save(prefs, pick, why):
    """The outputs folder is served: `/` would serve /etc/passwd (issue 11, item 2)."""
    session, client = prefs
    with pytest.raises(AppError) as refused:
        client.predict({"outputs_dir": pick(session.dirs)}, api_name="/save_preferences")
    assert "`outputs_dir`" in str(refused.value) and why in str(refused.value)
    assert not session.dirs.settings_file.exists()
    fine = session.dirs.data / "my-images"
    assert client.predict({"outputs_dir": str(fine)}, api_name="/save_preferences")["changed"]["outputs_dir"]


def test_a_model_folder_of_the_model_picker_is_no_outputs_folder(prefs, tmp_path):
    """Main's model picker reads checkpoints from `model_dirs`: serving one would serve them."""
    session, client = prefs
    models = tmp_path / "models"
    models.mkdir()
    client.predict({"model_dirs": [str(models)]}, api_name="/save_preferences")
    for value, why in ((models, "it is a model folder"), (tmp_path, "it holds a model folder")):
        with pytest.raises(AppError, match=why):
            client.predict({"outputs_dir": str(value)}, api_name="/save_preferences")
    (tmp_path / "out").mkdir()
    with pytest.raises(AppError, match="it is a model folder"):  # the other way round too
        client.predict({"outputs_dir": str(tmp_path / "out"), "model_dirs": [str(tmp_path / "out")]},
                       api_name="/save_preferences")


def test_reset_puts_defaults_back_and_says_what_changed(prefs):
    session, client = prefs
    client.predict({"default_steps": 9, "share": True}, api_name="/save_preferences")
    changed = client.predict(api_name="/reset_preferences")["changed"]
    assert changed == {"default_steps": {"from": 9, "to": 20, "applies": "applies now"},
                       "share": {"from": True, "to": False, "applies": "needs a restart"}}
    assert load_settings(session.dirs.settings_file).default_steps == 20 and session.settings.default_steps == 20
    assert client.predict(api_name="/reset_preferences")["changed"] == {}


def _call(url: str, api_name: str, data: list, host: str) -> str:
    """Gradio's REST API with a chosen Host header: what a visitor through the tunnel sends."""
    with httpx.Client(base_url=url, headers={"host": host}, timeout=30) as http:
        event = http.post(f"/gradio_api/call/{api_name}", json={"data": data}).json()["event_id"]
        return http.get(f"/gradio_api/call/{api_name}/{event}").text


def test_through_the_public_link_preferences_are_read_only_and_secrets_hidden(prefs, served):
    session, client = prefs
    _, url = served
    client.predict({"auth_password": "s3cret"}, api_name="/save_preferences")
    before = session.dirs.settings_file.read_bytes()
    answer = _call(url, "save_preferences", [{"default_steps": 3}], host="abcd.gradio.live")
    assert "event: error" in answer and "read-only through the public link" in answer
    assert session.dirs.settings_file.read_bytes() == before
    assert '"s3cret"' not in _call(url, "preferences", [], host="abcd.gradio.live")


def test_the_password_is_never_returned_even_to_this_computer(prefs, served):
    """Behind a proxy that rewrites the Host header every visitor looks local, and /preferences
    handed them `auth_password` (issue 11, item 11): it says only whether one is set."""
    session, client = prefs
    _, url = served
    changed = client.predict({"auth_password": "s3cret"}, api_name="/save_preferences")["changed"]
    assert changed["auth_password"] == {"from": "(empty)", "to": "(set)", "applies": "needs a restart"}
    local = url.split("//")[1].rstrip("/")
    assert "s3cret" not in _call(url, "preferences", [], host=local)
    shown = client.predict(api_name="/preferences")["auth_password"]
    assert shown == {"value": "", "applies": "needs a restart", "set": True}
    assert "s3cret" not in str(client.predict(api_name="/reset_preferences"))
    assert client.predict(api_name="/preferences")["auth_password"]["set"] is False


def test_a_visitor_through_the_public_link_sees_no_local_paths(prefs, served, tmp_path):
    session, client = prefs
    _, url = served
    loras, out = tmp_path / "my-loras", tmp_path / "my-images"
    loras.mkdir()
    client.predict({"lora_dirs": [str(loras)], "outputs_dir": str(out)}, api_name="/save_preferences")
    remote = _call(url, "preferences", [], host="abcd.gradio.live")
    assert str(tmp_path) not in remote and "(a folder on the computer running LoRA Studio)" in remote
    assert str(loras) in _call(url, "preferences", [], host=url.split("//")[1].rstrip("/"))  # here: shown
