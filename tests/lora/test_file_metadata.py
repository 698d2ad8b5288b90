"""What a LoRA file says about itself: trigger words, cover, A1111 hash, header-only inspection."""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import lora_fixtures as fx  # noqa: E402

from studio.lora import file_metadata as md  # noqa: E402
from studio.lora.reader import inspect_lora, read_lora  # noqa: E402


def test_trigger_words_summed_over_folders_by_frequency():
    meta = {"ss_tag_frequency": json.dumps({"5_a": {"blue": 3, " red ": 7, "": 9}, "3_b": {"blue": 5, "green": 8}}),
            "modelspec.trigger_phrase": "my style, red"}
    assert md.trigger_words(meta) == ["my style", "red", "blue", "green"]
    assert md.trigger_words(meta, limit=2) == ["my style", "red"]
    assert md.trigger_words({"ss_tag_frequency": "not json"}) == []
    assert md.trigger_words({}) == []


def test_ties_are_alphabetical():
    meta = {"ss_tag_frequency": json.dumps({"x": {"b": 2, "a": 2, "c": 5}})}
    assert md.trigger_words(meta) == ["c", "a", "b"]


def test_thumbnail_sources():
    png = b"\x89PNG\r\n\x1a\nfake"
    uri = "data:image/jpeg;base64," + base64.b64encode(png).decode()
    assert md.thumbnail({"modelspec.thumbnail": uri}) == ("image/jpeg", png)
    covers = json.dumps([base64.b64encode(png).decode()])
    assert md.thumbnail({"ssmd_cover_images": covers}) == ("image/png", png)
    assert md.thumbnail({"modelspec.thumbnail": "http://example.com/x.png"}) is None
    assert md.thumbnail({}) is None


def test_hash_ignores_metadata_and_prefers_sshs_model_hash(tmp_path):
    """A1111: `sshs_model_hash` if the trainer stored it, else sha256 of the bytes after the header."""
    info = fx.samples()[0]
    tensors = fx.with_prefix(fx.index().kohya_key(info), fx.kohya_layer(info, fx.gen(0), 2, 1.0))
    a = fx.write(tmp_path / "a.safetensors", tensors, {"ss_output_name": "a"})
    b = fx.write(tmp_path / "b.safetensors", tensors, {"ss_output_name": "a much longer name", "x": "y"})
    assert a.read_bytes() != b.read_bytes()
    ha, hb = (read_lora(p, fx.index()).short_hash for p in (a, b))
    data = a.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert ha == hb == hashlib.sha256(data[8 + n:]).hexdigest()[:12]
    c = fx.write(tmp_path / "c.safetensors", tensors, {"sshs_model_hash": "ABCDEF0123456789" * 4})
    assert read_lora(c, fx.index()).short_hash == "abcdef012345"


def test_inspect_reads_the_header_only(tmp_path):
    info = fx.samples()[0]
    tensors = fx.with_prefix(fx.index().kohya_key(info), fx.kohya_layer(info, fx.gen(0), 2, 1.0))
    tensors["x.lora_up.weight"] = torch.full((2, 2), float("nan"))
    path = fx.write(tmp_path / "nan-inside.safetensors", tensors,
                    {"ss_output_name": "Pretty", "ss_base_model_version": "sdxl_base_v1-0"})
    summary = inspect_lora(path)  # no tensor is read, so the NaN is not seen here
    got = (summary.title, summary.format, summary.base_model, summary.components)
    assert got == ("Pretty", "kohya", "sdxl", ("unet",))
    assert summary.n_tensors == 4 and summary.short_hash is None


def test_format_guess_from_header(tmp_path):
    ix, g = fx.index(), fx.gen(1)
    conv = ix.get("unet", "down_blocks.0.resnets.1.conv1")
    lin = fx.samples()[0]
    cases = {
        "locon": fx.with_prefix(ix.kohya_key(conv), fx.kohya_layer(conv, g, 2, 1.0)),
        "loha": fx.with_prefix(ix.kohya_key(lin), fx.loha_layer(lin, g, 2, 1.0)),
        "lokr": fx.with_prefix(ix.kohya_key(lin), fx.lokr_layer(lin, g, "full", "lowrank", 2, 1.0)),
        "peft": fx.with_prefix(fx.peft_prefix(lin), fx.peft_layer(lin, g, 2)),
        "full": fx.with_prefix(ix.kohya_key(lin), fx.full_layer(lin, g, True)),
        "dora": fx.with_prefix(fx.peft_prefix(lin),
                               fx.peft_layer(lin, g, 2) | {"lora_magnitude_vector": torch.ones(64)}),
    }
    for expected, tensors in cases.items():
        path = fx.write(tmp_path / f"{expected}.safetensors", tensors)
        assert inspect_lora(path).format == expected
        assert read_lora(path, ix).format == expected
