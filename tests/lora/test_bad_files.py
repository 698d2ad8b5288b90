"""Every bad file gives one LoraError line that names the file and the reason."""

from __future__ import annotations

import json
import pathlib
import pickle
import struct
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import lora_fixtures as fx  # noqa: E402

from studio.errors import LoraError  # noqa: E402
from studio.lora.reader import inspect_lora, read_lora  # noqa: E402


def good_tensors() -> dict[str, torch.Tensor]:
    ix, g, tensors = fx.index(), fx.gen(0), {}
    for info in fx.samples():
        tensors |= fx.with_prefix(ix.kohya_key(info), fx.kohya_layer(info, g, 2, 1.0))
    return tensors


def refused(path: Path, *words: str) -> str:
    with pytest.raises(LoraError) as caught:
        read_lora(path, fx.index())
    message = str(caught.value)
    assert "\n" not in message, message
    assert path.name in message, message
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in {message!r}"
    return message


def test_missing_file(tmp_path):
    refused(tmp_path / "nope.safetensors", "not found")


def test_directory(tmp_path):
    (tmp_path / "dir.safetensors").mkdir()
    refused(tmp_path / "dir.safetensors", "directory")


def test_empty_file(tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    refused(tmp_path / "empty.safetensors", "empty", "0 bytes")


def test_truncated_file(tmp_path):
    path = fx.write(tmp_path / "cut.safetensors", good_tensors())
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    refused(path, "truncated")
    path.write_bytes(data[:20])  # cut inside the header
    refused(path, "truncated")


def test_no_message_echoes_the_bytes_or_the_size_of_a_file(tmp_path):
    """The header-length message printed a file's first 8 bytes as a number, and its size (issue 11)."""
    secret = b"root:x:0:0:root:/root:/bin/bash\n" * 3
    path = tmp_path / "passwd.safetensors"
    path.write_bytes(secret)
    message = refused(path, "not a safetensors file")
    length = str(int.from_bytes(secret[:8], "little"))
    assert length not in message and str(len(secret)) not in message and "root" not in message
    full = fx.write(tmp_path / "cut.safetensors", good_tensors())
    full.write_bytes(full.read_bytes()[:-100])
    message = refused(full, "truncated", "ends past the end of the file")
    assert str(full.stat().st_size) not in message and str(full.stat().st_size - 100) not in message


def test_corrupt_header(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(struct.pack("<Q", 16) + b"{not json at all" + b"\0" * 32)
    refused(path, "corrupt header")
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    refused(path, "corrupt header", "w")


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickle_extensions_are_refused_unread(tmp_path, suffix):
    path = tmp_path / f"old{suffix}"
    path.write_bytes(b"whatever")
    refused(path, "pickle", "never unpickles", ".safetensors")


class _Tripwire:
    """Unpickling this creates a file: proof that nothing was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_pickle_in_disguise_is_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(_Tripwire(marker), protocol=4))
    refused(path, "pickle", "never unpickles")
    zipped = tmp_path / "zipped.safetensors"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1)}, zipped)  # torch.save writes a zip
    refused(zipped, "pickle")
    assert not marker.exists()


@pytest.mark.parametrize("metadata,words", [
    ({"ss_base_model_version": "sd_v1"}, ["SD 1.x", "ss_base_model_version=sd_v1"]),
    ({"ss_v2": "True", "ss_base_model_version": ""}, ["SD 2.x", "ss_v2"]),
    ({"modelspec.architecture": "stable-diffusion-v2-768-v/lora"}, ["SD 2.x"]),
    ({"modelspec.architecture": "flux-1-dev/lora"}, ["Flux", "modelspec.architecture"]),
    ({"ss_base_model_version": "flux1"}, ["Flux"]),
    ({"modelspec.architecture": "stable-diffusion-v3-medium/lora"}, ["SD3"]),
    ({"modelspec.architecture": "stable-diffusion-xl-v1-refiner/lora"}, ["refiner"]),
])
def test_other_base_model_from_metadata(tmp_path, metadata, words):
    path = fx.write(tmp_path / "other.safetensors", good_tensors(), metadata)
    refused(path, "not SDXL", *words)
    assert inspect_lora(path).base_model != "sdxl"  # the browser still lists it, marked


def _sd1_keys(cross: int) -> dict[str, torch.Tensor]:
    g = fx.gen(1)
    return {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": fx.rand(g, 4, cross),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": fx.rand(g, 320, 4),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": fx.rand(g, 4, cross),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": fx.rand(g, cross, 4),
    }


@pytest.mark.parametrize("tensors,words", [
    (_sd1_keys(768), ["SD 1.x", "768-wide cross-attention"]),
    (_sd1_keys(1024), ["SD 2.x", "1024-wide"]),
    ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 3072),
      "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(9216, 4)}, ["Flux", "double_blocks"]),
    ({"transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight": torch.zeros(4, 1536),
      "transformer.transformer_blocks.0.attn.add_q_proj.lora_B.weight": torch.zeros(1536, 4)}, ["SD3"]),
])
def test_other_base_model_from_keys_and_shapes(tmp_path, tensors, words):
    path = fx.write(tmp_path / "nometa.safetensors", tensors)
    refused(path, "not SDXL", *words)


def test_no_key_matches(tmp_path):
    tensors = {f"lora_unet_made_up_layer_{i}.lora_down.weight": torch.zeros(2, 2) for i in range(5)}
    tensors["something_else"] = torch.zeros(1)
    path = fx.write(tmp_path / "alien.safetensors", tensors)
    message = refused(path, "none of its 6 keys matches")
    assert "lora_unet_made_up_layer_0.lora_down.weight" in message


def test_partly_matching_file_keeps_the_unmatched_keys(tmp_path):
    tensors = good_tensors()
    extra = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_x.lora_down.weight": torch.zeros(2, 64),
             "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_x.lora_up.weight": torch.zeros(64, 2),
             "bundle_emb.mychar.string_to_param.*": torch.zeros(2, 32)}
    path = fx.write(tmp_path / "partial.safetensors", tensors | extra)
    lora = read_lora(path, fx.index())
    assert sorted(lora.unmatched_keys) == sorted(extra)
    assert len(lora.patches) == len(fx.samples())


def test_shape_mismatch_names_the_layer_and_both_shapes(tmp_path):
    ix = fx.index()
    info = ix.get("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    prefix = ix.kohya_key(info)
    tensors = {f"{prefix}.lora_down.weight": torch.zeros(4, 64), f"{prefix}.lora_up.weight": torch.zeros(32, 4)}
    path = fx.write(tmp_path / "shapes.safetensors", tensors)
    refused(path, "shape mismatch", info.path, "[64, 64]", "[32, 4]", "[4, 64]")
    conv = ix.get("unet", "down_blocks.0.resnets.1.conv1")
    prefix = ix.kohya_key(conv)
    tensors = {f"{prefix}.lora_down.weight": torch.zeros(4, 32, 1, 1),
               f"{prefix}.lora_up.weight": torch.zeros(32, 4, 1, 1)}
    refused(fx.write(tmp_path / "kernel.safetensors", tensors), "shape mismatch", "[32, 32, 3, 3]", "[4, 32, 1, 1]")


@pytest.mark.parametrize("bad,word", [(float("nan"), "NaN"), (float("inf"), "Inf"), (float("-inf"), "Inf")])
def test_non_finite_tensor_is_named(tmp_path, bad, word):
    tensors = good_tensors()
    key = sorted(k for k in tensors if k.endswith("lora_up.weight"))[3]
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = bad
    refused(fx.write(tmp_path / "nan.safetensors", tensors), key, word)


@pytest.mark.parametrize("chunk", [1 << 25, 100])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_non_finite_value_in_any_dtype_or_chunk_is_found(tmp_path, monkeypatch, dtype, chunk):
    """The file-wide min/max check (one per dtype, in chunks of FINITE_CHUNK elements) sees every tensor."""
    import studio.lora.formats.common as common

    monkeypatch.setattr(common, "FINITE_CHUNK", chunk)
    tensors = {k: v.to(dtype) for k, v in good_tensors().items()}
    key = sorted(k for k in tensors if k.endswith("lora_down.weight"))[-1]  # the last of its dtype group
    tensors[key][-1, -1] = float("nan")
    refused(fx.write(tmp_path / "nan-last.safetensors", tensors), key, "NaN")
    tensors[key][-1, -1] = 0.0
    assert read_lora(fx.write(tmp_path / "fine.safetensors", tensors), fx.index()).patches


def test_all_finite_skips_integers_and_empty_tensors():
    from studio.lora.formats.common import all_finite

    assert all_finite([torch.arange(5), torch.empty(0), torch.ones(3, dtype=torch.bfloat16)])
    assert not all_finite([torch.ones(3), torch.tensor([1.0, -float("inf")], dtype=torch.float16)])
    assert all_finite([])


def test_incomplete_and_mixed_layers(tmp_path):
    ix = fx.index()
    info = fx.samples()[0]
    p = ix.kohya_key(info)
    down = torch.zeros(2, info.shape[1])
    refused(fx.write(tmp_path / "half.safetensors", {f"{p}.lora_down.weight": down}), "lora_up.weight is missing")
    refused(fx.write(tmp_path / "alpha.safetensors", {f"{p}.alpha": torch.tensor(1.0)}), "incomplete")
    mixed = {f"{p}.lora_down.weight": down, f"{p}.lora_up.weight": torch.zeros(info.shape[0], 2),
             f"{p}.hada_w1_a": torch.zeros(info.shape[0], 2)}
    refused(fx.write(tmp_path / "mixed.safetensors", mixed), "mixes")


def test_same_layer_named_twice(tmp_path):
    ix, info, g = fx.index(), fx.samples()[0], fx.gen(3)
    tensors = fx.with_prefix(ix.kohya_key(info, sgm=True), fx.kohya_layer(info, g, 2, 1.0))
    tensors |= fx.with_prefix(ix.kohya_key(info, sgm=False), fx.kohya_layer(info, g, 2, 1.0))
    refused(fx.write(tmp_path / "twice.safetensors", tensors), "twice")


def test_tensor_data_the_format_rejects(tmp_path):
    """Each entry fits the file, but the offsets leave a hole: safetensors refuses, in one line."""
    header = {"lora_unet_x.lora_down.weight": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}
    raw = json.dumps(header).encode()
    path = tmp_path / "holes.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 16)
    refused(path, "corrupt tensor data")
