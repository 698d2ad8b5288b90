"""The LoRA browser's catalog: every file listed (unusable ones with the reason), cached scans, thumbnails."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from studio.demo_vocab import WARM_TRIGGER
from studio.lora.stack import search_dirs
from ui.lora_catalog import LoraCatalog
from ui.lora_panel import add_from_browser, browser_view

SD15_KEY = "lora_unet_down_blocks_0_attentions_0_proj_in"


def write_sd15_lora(path: Path) -> Path:
    """A small kohya LoRA at SD1.5 shapes (320-wide level 0, 768-wide cross-attention)."""
    tensors = {f"{SD15_KEY}.lora_down.weight": torch.zeros(4, 320), f"{SD15_KEY}.lora_up.weight": torch.zeros(320, 4),
               f"{SD15_KEY}.alpha": torch.tensor(4.0)}
    save_file(tensors, str(path), metadata={"ss_base_model_version": "sd_v1", "ss_output_name": "pastel 1.5"})
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    loras = tmp_path / "loras"
    (loras / "styles").mkdir(parents=True)
    write_sd15_lora(loras / "styles" / "pastel-sd15.safetensors")
    (loras / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    (loras / "old.ckpt").write_bytes(b"PK\x03\x04 pickled")
    return loras


@pytest.fixture
def catalog(tmp_path) -> LoraCatalog:
    return LoraCatalog(tmp_path / "cache" / "thumbnails")


def test_every_file_is_listed_and_unusable_ones_say_why(catalog, folder):
    entries = {e.name: e for e in catalog.scan(search_dirs([str(folder)]))}
    assert {"demo-kohya-warm", "demo-peft-cool", "demo-locon-grain", "pastel-sd15", "broken", "old"} <= set(entries)
    sd15 = entries["pastel-sd15"]
    assert not sd15.compatible and sd15.badge == "SD 1.x" and sd15.title == "pastel 1.5"
    assert sd15.reason.startswith("made for SD 1.x, not SDXL") and "ss_base_model_version=sd_v1" in sd15.reason
    assert sd15.caption() == "⚠ pastel-sd15 · SD 1.x · can't be used"  # the reason is in the note
    assert not entries["broken"].compatible and entries["broken"].reason.startswith("LoRA broken.safetensors:")
    assert entries["old"].badge == "unreadable" and "never unpickles" in entries["old"].reason
    warm = entries["demo-kohya-warm"]
    assert warm.compatible and warm.badge == "SDXL" and warm.caption() == "demo-kohya-warm · SDXL"
    assert warm.trigger_words == (WARM_TRIGGER,)  # what training taught it (scripts/train_demo_loras.py)


def test_an_unusable_file_is_shown_but_cannot_be_added(catalog, folder):
    catalog.scan(search_dirs([str(folder)]))
    items, names, note = browser_view(catalog, "pastel")
    assert names == ["pastel-sd15"] and items[0][1].startswith("⚠ pastel-sd15")
    assert "⚠ **pastel-sd15** can't be used: made for SD 1.x" in note
    rows, prompt, message = add_from_browser(catalog, [], "a cat", "pastel-sd15")
    assert (rows, prompt) == ([], "a cat") and "can't be added: made for SD 1.x" in message
    rows, prompt, message = add_from_browser(catalog, [], "a cat", "demo-kohya-warm")
    assert rows == [{"name": "demo-kohya-warm", "weight": 1.0, "enabled": True}]
    assert prompt == "a cat <lora:demo-kohya-warm:1>" and "Added" in message
    # a second click on a tile in the stack says so instead of "Added" again
    again, prompt, message = add_from_browser(catalog, rows, prompt, "demo-kohya-warm")
    assert again == rows and "already in the stack" in message and "Added" not in message
    off = [{**rows[0], "enabled": False}]
    assert "switched it back on" in add_from_browser(catalog, off, "a cat", "demo-kohya-warm")[2]


def test_an_unusable_tile_is_greyed_under_a_band_and_names_wrap_at_separators(catalog, folder):
    from ui.lora_catalog import wrap_name

    catalog.scan(search_dirs([str(folder)]))
    (pastel, _), = browser_view(catalog, "pastel")[0]
    (warm, _), = browser_view(catalog, "demo-kohya-warm")[0]
    assert Path(pastel).name.startswith("unusable-") and Path(pastel).parent == catalog.thumbnails

    def colour(path: str) -> float:  # mean saturation of the top quarter (above the band)
        hsv = Image.open(path).convert("RGB").convert("HSV")
        top = hsv.crop((0, 0, hsv.width, hsv.height // 4)).getchannel("S")
        return sum(top.getdata()) / (top.width * top.height)

    assert colour(pastel) < 5 < 50 < colour(warm)  # grey next to a coloured picture
    band = Image.open(pastel).convert("RGB").getpixel((4, 128))
    assert band[0] > 2 * band[1]  # the red "can't be used" band across the middle
    assert wrap_name("demo-locon-grain", 14) == ["demo-locon-", "grain"]  # not "demo-locon-gra" / "in"
    assert wrap_name("pastel-portrait_style-sd15", 14) == ["pastel-", "portrait_", "style-sd15"]


def test_search_looks_at_names_titles_and_trigger_words(catalog, folder):
    catalog.scan(search_dirs([str(folder)]))
    assert [e.name for e in catalog.entries("warm")] == ["demo-kohya-warm"]
    assert [e.name for e in catalog.entries("GOLDEN hour")] == ["demo-kohya-warm"]  # a trigger word, any case
    assert [e.name for e in catalog.entries("GRAIN")] == ["demo-locon-grain"]  # a name, any case
    assert [e.name for e in catalog.entries("pastel 1.5")] == ["pastel-sd15"]  # the title
    assert catalog.entries("nothing like this") == []
    assert len(catalog.entries("  ")) == len(catalog.entries())


def test_a_rescan_reads_only_changed_files(catalog, folder):
    dirs = search_dirs([str(folder)])
    catalog.scan(dirs)
    first = catalog.reads
    assert first >= 6
    catalog.scan(dirs)
    assert catalog.reads == first  # nothing changed: no header parsed again
    target = folder / "styles" / "pastel-sd15.safetensors"
    write_sd15_lora(target)
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    catalog.scan(dirs)
    assert catalog.reads == first + 1
    (folder / "broken.safetensors").unlink()
    assert "broken" not in {e.name for e in catalog.scan(dirs)}


def test_thumbnails_come_from_a_sidecar_or_the_embedded_cover_into_the_cache_only(catalog, folder, tmp_path):
    Image.new("RGB", (900, 600), (200, 40, 40)).save(folder / "styles" / "pastel-sd15.preview.png")
    (folder / "broken.png").write_bytes(b"<svg onload=alert(1)>")  # claims to be an image: never served
    entries = {e.name: e for e in catalog.scan(search_dirs([str(folder)]))}
    cache = tmp_path / "cache" / "thumbnails"
    pastel, warm = entries["pastel-sd15"].thumbnail, entries["demo-kohya-warm"].thumbnail
    assert pastel is not None and pastel.parent == cache
    with Image.open(pastel) as img:
        assert img.format == "PNG" and max(img.size) == 256 and img.getpixel((5, 5)) == (200, 40, 40)
    assert warm is not None and warm.parent == cache  # kohya's embedded ssmd_cover_images
    assert entries["broken"].thumbnail is None and entries["demo-peft-cool"].thumbnail is None
    items, _, _ = browser_view(catalog, "")
    assert all(Path(path).parent == cache for path, _ in items)  # placeholders too: only this folder is served
    again = {e.name: e for e in catalog.scan(search_dirs([str(folder)]))}
    assert again["pastel-sd15"].thumbnail == pastel  # same source, same cached file


def test_stack_rows_say_when_their_file_is_missing_or_unusable(catalog, folder):
    from ui.lora_panel import row_label

    catalog.scan(search_dirs([str(folder)]))
    assert row_label(catalog, {"name": "gone", "weight": 1.0, "enabled": True})[1].startswith("missing: not in the")
    assert row_label(catalog, {"name": "pastel-sd15", "weight": 1.0, "enabled": True})[1].startswith(
        "can't be used: made for SD 1.x")
    label, info = row_label(catalog, {"name": "DEMO-KOHYA-WARM", "weight": 1.0, "enabled": True})  # any case
    assert label == "demo-kohya-warm · SDXL" and info.startswith(f"trigger words: {WARM_TRIGGER}")
