from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from studio.errors import SettingsError
from studio.choices import Device, LoraMode
from studio.settings import Settings, load_settings, read_settings, save_settings, to_dict, update_settings_file


def test_missing_file_gives_defaults(tmp_path):
    assert load_settings(tmp_path / "settings.toml") == Settings()


def test_round_trip_keeps_every_value(tmp_path):
    path = tmp_path / "settings.toml"
    settings = Settings(model="/models/x.safetensors", lora_dirs=("/a", "/b"), device=Device.CPU, default_steps=33,
                        default_cfg=6.5, lora_mode=LoraMode.SIDECAR, unpatch_lora_by_vram_offload=True)
    save_settings(settings, path)
    assert load_settings(path) == settings
    assert [p.name for p in tmp_path.iterdir()] == ["settings.toml"]  # the temp file of the atomic write is gone


def test_corrupt_file_is_moved_aside_with_a_warning(tmp_path, caplog):
    path = tmp_path / "settings.toml"
    path.write_text("default_steps = [unclosed\n")
    with caplog.at_level(logging.WARNING):
        settings = load_settings(path)
    assert settings == Settings()
    assert not path.exists()
    aside = list(tmp_path.glob("settings.toml.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text() == "default_steps = [unclosed\n"
    assert "moved it to" in caplog.text


def test_bad_value_falls_back_to_its_default_only(tmp_path, caplog):
    path = tmp_path / "settings.toml"
    path.write_text('device = "tpu"\ndefault_steps = 30\n')
    with caplog.at_level(logging.WARNING):
        settings = load_settings(path)
    assert settings.device == Device.AUTO and settings.default_steps == 30
    assert "`device` must be one of auto, cpu, cuda, got 'tpu'" in caplog.text


def test_each_bad_value_falls_back_alone_with_a_warning_naming_it(tmp_path, caplog):
    """One bad number no longer resets every number (issue 11, item 4)."""
    path = tmp_path / "settings.toml"
    path.write_text("default_steps = 0\ndefault_cfg = nan\nport = 99999\nlora_cache_mb = 512\nram_limit_mb = 1000\n"
                    'lora_mode = "sidecar"\n')
    with caplog.at_level(logging.WARNING):
        loaded = read_settings(path)
    s = loaded.settings
    assert (s.default_steps, s.default_cfg, s.port) == (20, 5.0, 7860)  # the bad ones, each alone
    assert (s.lora_cache_mb, s.ram_limit_mb, s.lora_mode) == (512, 1000, LoraMode.SIDECAR)  # the good ones kept
    assert sorted(loaded.fallbacks) == ["default_cfg", "default_steps", "port"]
    for line in ("`default_steps` must be between 1 and 200, got 0; using the default 20",
                 "`default_cfg` must be between 0 and 30, got nan; using the default 5.0",
                 "`port` must be between 0 and 65535, got 99999; using the default 7860"):
        assert line in caplog.text
    assert len(caplog.records) == 3


def test_a_save_writes_back_the_bad_values_nobody_touched(tmp_path):
    path = tmp_path / "settings.toml"
    path.write_text("default_steps = 0\nlora_cache_mb = 512\n")
    loaded = read_settings(path)
    changed = loaded.settings.replace(default_cfg=6.0)
    save_settings(changed, path, keep_raw={n: f.raw for n, f in loaded.fallbacks.items()})
    again = read_settings(path)
    assert again.settings.default_cfg == 6.0 and again.settings.lora_cache_mb == 512
    assert again.fallbacks["default_steps"].raw == 0  # still what the user wrote, still reported


def test_the_model_picker_remembering_a_model_keeps_the_hand_written_bad_value(tmp_path):
    """Loading a model writes `model`/`vae` into the file; it must not write the default over a bad
    value the user wrote by hand (issue 11, item 4: a Save wrote every fallback's default)."""
    from ui.model_picker import _remember

    path = tmp_path / "settings.toml"
    path.write_text('default_steps = 0\nlora_cache_mb = 512\nmodel = "/old.safetensors"\n')
    _remember(SimpleNamespace(dirs=SimpleNamespace(settings_file=path)), "/new.safetensors", "")
    again = read_settings(path)
    assert again.settings.model == "/new.safetensors" and again.settings.lora_cache_mb == 512
    assert again.fallbacks["default_steps"].raw == 0
    assert update_settings_file(path, model="/new.safetensors") is False  # already so: not written again


def test_out_of_range_value_is_refused_and_not_saved(tmp_path):
    path = tmp_path / "settings.toml"
    save_settings(Settings(default_steps=25), path)
    with pytest.raises(SettingsError, match=r"`default_steps` must be between 1 and 200, got 0"):
        save_settings(Settings(default_steps=0), path)
    with pytest.raises(SettingsError, match="`default_cfg` must be between 0 and 30"):
        Settings().replace(default_cfg=99)
    assert load_settings(path).default_steps == 25


def test_unknown_keys_survive_a_round_trip(tmp_path):
    path = tmp_path / "settings.toml"
    path.write_text('future_option = "kept"\nport = 7999\n')
    settings = load_settings(path)
    save_settings(settings.replace(default_steps=12), path)
    assert "future_option" in to_dict(load_settings(path))
    assert load_settings(path).port == 7999


def test_env_override_puts_every_folder_under_one_root(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_STUDIO_HOME", str(tmp_path / "portable"))
    from studio.paths import app_dirs

    dirs = app_dirs()
    for folder in (dirs.config, dirs.data, dirs.cache):
        assert folder.is_dir() and folder.is_relative_to(tmp_path / "portable")
    assert dirs.settings_file == tmp_path / "portable" / "config" / "settings.toml"


def test_every_setting_says_when_it_applies():
    from studio.settings import SETTING_INFO, field_names

    assert sorted(SETTING_INFO) == sorted(field_names())


def test_session_applies_settings_and_flags_a_reload(session_dirs):
    from studio.session import Session
    from studio.choices import Precision
    from studio.settings import Applies

    session = Session(Settings(device="cpu", precision=Precision.BF16), session_dirs)
    changed = session.apply_settings(session.settings.replace(default_steps=9, precision="fp32"))
    assert changed == {"default_steps": Applies.NOW, "precision": Applies.MODEL_RELOAD}
    assert session.runtime.dtype_name == "float32" and session.settings.default_steps == 9
    with pytest.raises(SettingsError, match="fp16 on the CPU"):
        session.apply_settings(session.settings.replace(precision="fp16"))
    assert session.settings.precision == Precision.FP32  # a refused change leaves the old settings


def test_now_settings_apply_during_a_generation_and_restart_ones_wait(session_dirs):
    import threading

    from studio.session import Session

    session = Session(Settings(device="cpu", precision="bf16"), session_dirs)
    with session._slot.exclusive():  # as if a generation were running
        done = threading.Event()
        worker = threading.Thread(target=lambda: (session.apply_settings(
            session.settings.replace(default_steps=7, outputs_dir="/elsewhere", port=9000)), done.set()))
        worker.start()
        assert done.wait(5), "a 'now' change waited for the running generation"
    assert session.settings.default_steps == 7
    assert session.settings.outputs_dir == "" and session.settings.port == 7860  # kept until restart
