"""Every "applies now" preference reaches its owner when Save returns, one test per field (issue 11, item 5).

Saved through the API as a script (or the panel) does; each test then looks at the part of the
engine that uses the value, or uses it. `default_steps` reaching the Generate tab at the next
page load is also driven in a real browser (tests/ui/test_browser.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from studio.choices import LoraMode
from studio.models.budget import MB, Budgets
from studio.models.catalog import ModelCatalog
from studio.paths import DEMO_LORA_DIR, TINY_MODEL_DIR
from studio.phases import Phase
from studio.settings import SETTING_INFO, Applies

NOW = sorted(name for name, info in SETTING_INFO.items() if info.applies is Applies.NOW)
TESTED = {"lora_dirs", "lora_mode", "unpatch_lora_by_vram_offload", "lora_cache_mb", "ram_limit_mb", "vram_limit_mb",
          "working_memory_mb", "default_steps", "default_cfg", "live_preview", "model_dirs", "lbw_presets"}


def test_every_now_setting_has_a_test_here():
    assert set(NOW) == TESTED


@pytest.fixture
def live(served):
    """A client, with the settings file and the session's settings put back afterwards."""
    session, url = served
    original = session.settings
    session.dirs.settings_file.unlink(missing_ok=True)
    client = Client(url, verbose=False, analytics_enabled=False)

    def save(**changes):
        return client.predict(changes, api_name="/save_preferences")["changed"]

    yield session, client, save
    session.dirs.settings_file.unlink(missing_ok=True)
    session.apply_settings(original)


def _generate(client: Client, prompt: str) -> dict:
    *_, jsons = client.predict(prompt, "", 3, 2, 5.0, 64, 64, "Euler", 1, api_name="/generate")
    return json.loads(Path(jsons[0]).read_text())


def test_lora_dirs_find_a_new_folder_s_loras_at_once(live, tmp_path):
    session, client, save = live
    folder = tmp_path / "mine"
    folder.mkdir()
    shutil.copy(DEMO_LORA_DIR / "demo-kohya-warm.safetensors", folder / "my-style.safetensors")
    save(lora_dirs=[str(folder)])
    report = _generate(client, "a boat <lora:my-style:0.5>")
    assert [row["name"] for row in report["lora"]["stack"]] == ["my-style"]


def test_lora_mode_reaches_the_patchers_and_the_next_generation(live):
    session, client, save = live
    save(lora_mode="sidecar")
    assert {session.loras.patcher(p).settings.mode for p in (Phase.TEXT_ENCODE, Phase.DENOISE)} == {LoraMode.SIDECAR}
    assert _generate(client, "a boat <lora:demo-peft-cool:0.5>")["lora"]["mode"] == "sidecar"


def test_unpatch_lora_by_vram_offload_reaches_the_patchers(live):
    session, client, save = live
    save(unpatch_lora_by_vram_offload=True)
    assert all(session.loras.patcher(p).settings.unpatch_lora_by_vram_offload
               for p in (Phase.TEXT_ENCODE, Phase.DENOISE))


def test_lora_cache_mb_holds_at_once(live):
    session, client, save = live
    _generate(client, "a boat <lora:demo-kohya-warm:0.5>")
    assert session.loras.cache.bytes_used > 0
    save(lora_cache_mb=0)
    assert session.loras.cache.bytes_used == 0  # evicted now, not at the next release


def test_ram_limit_mb_reaches_the_model_cache_at_once(live):
    """It took effect only at the next model load (issue 11)."""
    session, client, save = live
    save(ram_limit_mb=123_456)
    assert session.warm.cache.ram_budget == 123_456 * MB
    save(ram_limit_mb=0)
    assert session.warm.cache.ram_budget != 123_456 * MB  # measured again


@pytest.fixture
def gpu_budgets(monkeypatch):
    """Budgets as a GPU machine measures them (this one has none): VRAM = the limit minus the reserve."""
    import studio.session as session_module

    def measure(device, *, ram_limit_mb=0, vram_limit_mb=0, working_memory_mb=0, held_ram=0, held_vram=0):
        working = (working_memory_mb or 3072) * MB
        return Budgets(ram=(ram_limit_mb or 64_000) * MB, vram=max((vram_limit_mb or 24_000) * MB - working, 0),
                       working=working)

    monkeypatch.setattr(session_module, "measure_budgets", measure)


def test_vram_limit_mb_reaches_the_model_cache_at_once(live, gpu_budgets):
    session, client, save = live
    save(vram_limit_mb=8192)
    assert session.warm.cache.vram_budget == (8192 - 3072) * MB


def test_working_memory_mb_reaches_the_budgets_and_the_next_decode(live, gpu_budgets):
    session, client, save = live
    save(vram_limit_mb=8192, working_memory_mb=1024)
    assert session.warm.cache.vram_budget == (8192 - 1024) * MB
    assert session.settings.working_memory_mb == 1024  # what the next VAE decode reserves (DecodeMemory)


@pytest.mark.parametrize("name, value", [("default_steps", 7), ("default_cfg", 6.5)])
def test_generation_defaults_are_what_the_next_page_and_job_start_from(live, name, value):
    """The Generate tab reads them at each page load, the CLI's jobs for each line: both from the session."""
    session, client, save = live
    save(**{name: value})
    assert getattr(session.settings, name) == value
    assert client.predict(api_name="/preferences")[name]["value"] == value


def test_live_preview_is_on_or_off_from_the_next_generation(live):
    session, client, save = live
    save(live_preview=False)
    assert _generate(client, "a boat")["preview"]["enabled"] is False
    save(live_preview=True)
    assert _generate(client, "a boat")["preview"]["enabled"] is True


def test_model_dirs_are_what_the_model_picker_lists_at_its_next_scan(live, tmp_path):
    """The picker scans `session.settings.model_dirs` at each page load and Rescan (ui/model_picker.py)."""
    session, client, save = live
    shutil.copytree(TINY_MODEL_DIR, tmp_path / "models" / "my-sdxl")
    save(model_dirs=[str(tmp_path / "models")])
    catalog = ModelCatalog()
    catalog.scan([Path(d) for d in session.settings.model_dirs])
    assert [entry.path.name for entry in catalog.models()] == ["my-sdxl"]


def test_lbw_presets_are_what_the_next_tag_resolves_against(live):
    session, client, save = live
    tag = "a boat <lora:demo-kohya-warm:1:lbw=MYSTYLE>"
    with pytest.raises(AppError, match="MYSTYLE"):  # not a preset yet: one error naming it
        _generate(client, tag)
    save(lbw_presets="MYSTYLE:1,0,0,0,0,0,0,0,0,0,0,1")
    row = _generate(client, tag)["lora"]["stack"][0]
    assert (row["name"], row["options"]) == ("demo-kohya-warm", "lbw=MYSTYLE")
