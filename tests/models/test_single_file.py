"""Single-file SDXL checkpoints: exact round trip, header-only inspection, refusals.

diffusers' own single-file converters serve as the independent oracle for our
SGM names: what we write, they must map back to exactly the diffusers keys.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import socket
import struct
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from studio.errors import ModelLoadError
from studio.models import sgm_keys
from studio.models.single_file import (
    Architecture,
    check_keys,
    classify,
    expected_shapes,
    inspect_checkpoint,
    load_single_file,
    read_header,
    save_single_file,
    signature,
)
from studio.paths import TINY_MODEL_DIR

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def tiny_pipe() -> Any:
    """The embedded tiny SDXL in float32, as the app loads it from its diffusers folder."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(TINY_MODEL_DIR, torch_dtype=torch.float32, local_files_only=True)


@pytest.fixture(scope="module")
def tiny_file(tiny_pipe: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("single") / "tiny-sdxl.safetensors"
    save_single_file(tiny_pipe, path)
    return path


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[object]]:
    """Any connection attempt fails and is recorded, so a hidden hub call cannot pass unnoticed."""
    attempts: list[object] = []

    def refuse(self: socket.socket, address: object) -> None:
        attempts.append(address)
        raise OSError(f"network disabled in tests (tried {address})")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield attempts
    assert attempts == [], f"tried to reach the network: {attempts}"


def tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def differing(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> list[str]:
    keys = sorted(set(a) | set(b))
    return [k for k in keys if k not in a or k not in b or a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]


# ---------------------------------------------------------------- round trip


def test_round_trip_is_bit_exact_and_offline(tiny_pipe: Any, tiny_file: Path, no_network: list[object]) -> None:
    assert inspect_checkpoint(tiny_file) == "tiny-sdxl"
    loaded = load_single_file(tiny_file, torch.float32)
    for component in COMPONENTS:
        bad = differing(tensors(getattr(tiny_pipe, component)), tensors(getattr(loaded, component)))
        assert not bad, f"{component}: {len(bad)} tensors differ: {bad[:10]}"
    prompts = ["a painting of a squirrel eating a burger", "", "!!! (masterpiece:1.2), 1girl"]
    for name in ("tokenizer", "tokenizer_2"):
        ours, theirs = getattr(loaded, name), getattr(tiny_pipe, name)
        for prompt in prompts:
            kwargs = {"padding": "max_length", "max_length": 77, "truncation": True}
            assert ours(prompt, **kwargs).input_ids == theirs(prompt, **kwargs).input_ids
    assert dict(loaded.scheduler.config) == dict(tiny_pipe.scheduler.config)
    assert not loaded.unet.training and not loaded.text_encoder_2.training


def test_saved_file_has_the_original_layout(tiny_pipe: Any, tiny_file: Path) -> None:
    shapes, metadata = read_header(tiny_file)
    assert metadata["format"] == "pt"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert shapes == expected_shapes(Architecture.TINY_SDXL)
    state = load_file(tiny_file)
    te2 = tiny_pipe.text_encoder_2.state_dict()
    p = sgm_keys.TE2_PREFIX
    assert torch.equal(state[p + "text_projection"], te2["text_projection.weight"].T)
    qkv = [te2[f"text_model.encoder.layers.1.self_attn.{x}_proj.weight"] for x in "qkv"]
    assert torch.equal(state[p + "transformer.resblocks.1.attn.in_proj_weight"], torch.cat(qkv))
    assert state[sgm_keys.TE1_POSITION_IDS].dtype == torch.int64
    assert state[sgm_keys.VAE_PREFIX + "decoder.mid.attn_1.q.weight"].ndim == 4
    unet = tiny_pipe.unet.state_dict()
    assert torch.equal(state[sgm_keys.UNET_PREFIX + "input_blocks.3.0.op.weight"],
                       unet["down_blocks.0.downsamplers.0.conv.weight"])
    assert torch.equal(state[sgm_keys.UNET_PREFIX + "output_blocks.2.2.conv.weight"],
                       unet["up_blocks.0.upsamplers.0.conv.weight"])


def test_save_is_the_exact_inverse_of_diffusers_conversion(tiny_pipe: Any, tiny_file: Path) -> None:
    """diffusers' own LDM converters, fed our file, give back the original tensors bit for bit."""
    from diffusers.loaders import single_file_utils as su

    state = load_file(tiny_file)
    got = {
        "unet": su.convert_ldm_unet_checkpoint(state, dict(tiny_pipe.unet.config)),
        "vae": su.convert_ldm_vae_checkpoint(state, dict(tiny_pipe.vae.config)),
        "text_encoder": {k.removeprefix("text_model."): v for k, v in su.convert_ldm_clip_checkpoint(state).items()
                         if not k.endswith("position_ids")},
        "text_encoder_2": su.convert_open_clip_checkpoint(tiny_pipe.text_encoder_2, state, sgm_keys.TE2_PREFIX),
    }
    for component in COMPONENTS:
        bad = differing(getattr(tiny_pipe, component).state_dict(), got[component])
        assert not bad, f"{component}: {len(bad)} tensors differ from diffusers' reading: {bad[:10]}"


def test_diffusers_own_loader_reads_our_file_bit_exactly(
    tiny_pipe: Any, tmp_path: Path, no_network: list[object]
) -> None:
    """Interop: diffusers' `from_single_file` loads what we write. It needs TE2 wider than TE1 (it tells the
    encoders apart by width; the tiny model's are equal, which is why we do not use it ourselves)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from studio.models import architectures as arch

    torch.manual_seed(0)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**arch.TINY_TE2, "hidden_size": 48, "projection_dim": 48,
                                                         "num_attention_heads": 3}))
    unet = UNet2DConditionModel(**{**arch.TINY_UNET, "cross_attention_dim": 32 + 48,
                                   "projection_class_embeddings_input_dim": 6 * 8 + 48})
    pipe = StableDiffusionXLPipeline(vae=tiny_pipe.vae, text_encoder=tiny_pipe.text_encoder, text_encoder_2=te2,
                                     tokenizer=tiny_pipe.tokenizer, tokenizer_2=tiny_pipe.tokenizer_2, unet=unet,
                                     scheduler=tiny_pipe.scheduler)
    pipe.save_pretrained(tmp_path / "config")
    save_single_file(pipe, tmp_path / "wide.safetensors")
    theirs = StableDiffusionXLPipeline.from_single_file(
        str(tmp_path / "wide.safetensors"), config=str(tmp_path / "config"), local_files_only=True,
        torch_dtype=torch.float32)
    for component in COMPONENTS:
        bad = differing(getattr(pipe, component).state_dict(), getattr(theirs, component).state_dict())
        assert not bad, f"{component}: {len(bad)} tensors differ: {bad[:10]}"


def test_save_in_bfloat16_and_load_in_bfloat16(tiny_pipe: Any, tmp_path: Path) -> None:
    path = tmp_path / "bf16.safetensors"
    save_single_file(tiny_pipe, path, dtype=torch.bfloat16)
    with safe_open(str(path), framework="pt") as f:
        assert f.get_slice(sgm_keys.UNET_PREFIX + "out.2.weight").get_dtype() == "BF16"
        assert f.get_slice(sgm_keys.TE1_POSITION_IDS).get_dtype() == "I64"
    loaded = load_single_file(path, torch.bfloat16)
    for component in COMPONENTS:
        want = {k: v.to(torch.bfloat16) for k, v in getattr(tiny_pipe, component).state_dict().items()}
        bad = differing(want, getattr(loaded, component).state_dict())
        assert not bad, f"{component}: {bad[:10]}"


def test_save_refuses_other_suffixes_and_leaves_nothing(tiny_pipe: Any, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"model\.ckpt: .*\.safetensors"):
        save_single_file(tiny_pipe, tmp_path / "model.ckpt")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- real SDXL layout (meta device, no weights)


def meta_models(arch: Architecture):
    from studio.models.single_file import _meta_components

    return _meta_components(arch)


def test_real_sdxl_names_are_what_diffusers_reads_back() -> None:
    """Map the real SDXL models' names to SGM, let diffusers map them back: same keys, same shapes."""
    from diffusers.loaders import single_file_utils as su

    meta = meta_models(Architecture.SDXL_BASE)
    sgm = {k: torch.empty(s, device="meta") for k, s in expected_shapes(Architecture.SDXL_BASE).items()}
    back = {
        "unet": su.convert_ldm_unet_checkpoint(sgm, dict(meta.unet.config)),
        "vae": su.convert_ldm_vae_checkpoint(sgm, dict(meta.vae.config)),
        "text_encoder": {k.removeprefix("text_model."): v for k, v in su.convert_ldm_clip_checkpoint(sgm).items()
                         if not k.endswith("position_ids")},
        "text_encoder_2": su.convert_open_clip_checkpoint(meta.text_encoder_2, sgm, sgm_keys.TE2_PREFIX),
    }
    for component in COMPONENTS:
        want = {k: tuple(v.shape) for k, v in getattr(meta, component).state_dict().items()}
        got = {k: tuple(v.shape) for k, v in back[component].items()}
        assert got == want, f"{component}: {sorted(set(got) ^ set(want))[:10]}"
    # one SGM tensor per diffusers tensor, except TE2's fused q/k/v and the two bookkeeping tensors
    counts = {p: sum(k.startswith(p) for k in sgm) for p in
              (sgm_keys.UNET_PREFIX, sgm_keys.VAE_PREFIX, sgm_keys.TE1_PREFIX, sgm_keys.TE2_PREFIX)}
    te2_layers = meta.text_encoder_2.config.num_hidden_layers
    assert counts == {
        sgm_keys.UNET_PREFIX: len(meta.unet.state_dict()),
        sgm_keys.VAE_PREFIX: len(meta.vae.state_dict()),
        sgm_keys.TE1_PREFIX: len(meta.text_encoder.state_dict()) + 1,
        sgm_keys.TE2_PREFIX: len(meta.text_encoder_2.state_dict()) - 4 * te2_layers + 1,
    }
    assert len(sgm) == sum(counts.values())


def test_signatures_agree_with_the_full_layouts() -> None:
    for arch in Architecture:
        full = expected_shapes(arch)
        assert {k: full[k] for k in signature(arch)} == signature(arch)
        assert classify(full) is arch
        check_keys(full, arch, "x.safetensors")


def write_header_only(path: Path, shapes: Mapping[str, Sequence[int]], dtype: str = "F16") -> None:
    """A safetensors file with this header and a sparse (unwritten) data section: GBs that use no disk."""
    width = {"F16": 2, "F32": 4}[dtype]
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape in shapes.items():
        size = width * int(torch.Size(shape).numel())
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)


def test_inspect_a_real_sdxl_sized_file_reads_only_the_header(tmp_path: Path) -> None:
    path = tmp_path / "sd_xl_base_1.0.safetensors"
    write_header_only(path, expected_shapes(Architecture.SDXL_BASE))
    assert path.stat().st_size > 6_000_000_000  # the real file's size, but sparse
    assert inspect_checkpoint(path) == "sdxl-base"
    assert inspect_checkpoint(path) is Architecture.SDXL_BASE


def test_classify_sdxl_from_distinguishing_keys_only() -> None:
    shapes = {**signature(Architecture.SDXL_BASE), sgm_keys.VAE_PREFIX + "encoder.conv_in.weight": (128, 3, 3, 3)}
    assert classify(shapes) == "sdxl-base"


@settings(max_examples=8, deadline=None)
@given(levels=st.integers(2, 4), layers=st.integers(1, 3), attends=st.lists(st.booleans(), min_size=4, max_size=4))
def test_unet_map_follows_the_architecture(levels: int, layers: int, attends: list[bool]) -> None:
    """Any SDXL-style UNet (levels, resnets per level, which levels attend) maps as diffusers reads it."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends[:levels]]
    up = [t.replace("Down", "Up") for t in reversed(down)]
    with torch.device("meta"):
        unet = UNet2DConditionModel(block_out_channels=[32 * (i + 1) for i in range(levels)], layers_per_block=layers,
                                    down_block_types=down, up_block_types=up, cross_attention_dim=32,
                                    attention_head_dim=2, norm_num_groups=8, addition_embed_type="text_time",
                                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=80)
    state = unet.state_dict()
    sgm = sgm_keys.to_sgm("unet", state, dict(unet.config))
    back = convert_ldm_unet_checkpoint(sgm, dict(unet.config))
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in state.items()}


# ---------------------------------------------------------------- refusals


def entries(*keys: str) -> dict[str, tuple[int, ...]]:
    return {k: (1,) for k in keys}


SDXL_UNET_KEY = sgm_keys.UNET_PREFIX + "input_blocks.0.0.weight"
WRONG_MODELS = {
    "sd15": (entries("model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight",
                     "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"),
             "Stable Diffusion 1.x"),
    "sd2": (entries("model.diffusion_model.input_blocks.0.0.weight",
                    "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"), "Stable Diffusion 2.x"),
    "refiner": ({SDXL_UNET_KEY: (384, 4, 3, 3), "conditioner.embedders.0.model.positional_embedding": (77, 1280),
                 "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3)}, "SDXL refiner"),
    "flux": (entries("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"), "Flux"),
    "flux_prefixed": (entries("model.diffusion_model.double_blocks.0.img_attn.qkv.weight"), "Flux"),
    "sd3": (entries("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"), "Stable Diffusion 3"),
    "kohya_lora": (entries("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
                           "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha"), "LoRA"),
    "peft_lora": (entries("unet.down_blocks.1.attentions.0.proj_in.lora_A.weight"), "LoRA"),
    "lycoris": (entries("lora_unet_middle_block_1_proj_in.hada_w1_a"), "LoRA"),
    "diffusers_unet": (entries("conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"), "single component"),
    "vae_only": (entries("encoder.down.0.block.0.conv1.weight"), "single component"),
    "no_unet": (entries("first_stage_model.encoder.conv_in.weight"), "no model.diffusion_model"),
    "inpainting": ({**signature(Architecture.SDXL_BASE), SDXL_UNET_KEY: (320, 9, 3, 3),
                    "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3)}, "inpainting"),
    "odd_size": ({**signature(Architecture.SDXL_BASE), SDXL_UNET_KEY: (256, 4, 3, 3),
                  "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3)}, "unknown sizes"),
}
WRONG_MODELS["unet_only"] = ({k: v for k, v in signature(Architecture.SDXL_BASE).items()
                              if k.startswith(sgm_keys.UNET_PREFIX)}, "no CLIP-L text encoder")


@pytest.mark.parametrize("case", sorted(WRONG_MODELS))
def test_other_models_are_refused_by_name(case: str, tmp_path: Path) -> None:
    shapes, phrase = WRONG_MODELS[case]
    path = tmp_path / f"{case}.safetensors"
    write_header_only(path, shapes)
    with pytest.raises(ModelLoadError) as err:
        inspect_checkpoint(path)
    message = str(err.value)
    assert message.startswith(f"{case}.safetensors: ") and phrase in message and "\n" not in message
    with pytest.raises(ModelLoadError, match=phrase):
        load_single_file(path, torch.float32)


class Trap:
    """Unpickling this creates a folder: proof that something unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("name, writer", [
    ("model.ckpt", "torch"),
    ("model.pt", "pickle"),
    ("model.bin", "torch"),
    ("renamed_zip.safetensors", "torch"),
    ("renamed_pickle.safetensors", "pickle"),
    ("renamed_pickle.sft", "pickle"),
])
def test_pickles_are_refused_without_being_unpickled(name: str, writer: str, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    path = tmp_path / name
    if writer == "torch":
        torch.save({"state_dict": {"x": torch.zeros(2)}, "trap": Trap(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"trap": Trap(marker)}, protocol=4))
    for action in (inspect_checkpoint, lambda p: load_single_file(p, torch.float32)):
        with pytest.raises(ModelLoadError, match=rf"^{re.escape(name)}: .*pickle.*never loaded.*\.safetensors"):
            action(path)
    assert not marker.exists()
    if writer == "pickle":  # the trap is live: unpickling our own bytes does spring it
        pickle.loads(path.read_bytes())
        assert marker.exists()


def test_truncated_and_empty_files(tiny_file: Path, tmp_path: Path) -> None:
    data = tiny_file.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    cases = {
        "empty.safetensors": (b"", "empty"),
        "stub.safetensors": (data[:5], "truncated"),
        "cut_header.safetensors": (data[: 8 + header_len // 2], "truncated or corrupt header"),
        "cut_data.safetensors": (data[: len(data) // 2], "truncated"),
        "one_byte_short.safetensors": (data[:-1], "truncated"),
        "garbage.safetensors": (struct.pack("<Q", 16) + b"{not json at all", "corrupt"),
        "not_object.safetensors": (struct.pack("<Q", 2) + b"[]", "corrupt"),
    }
    for name, (content, phrase) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        for action in (inspect_checkpoint, lambda p: load_single_file(p, torch.float32)):
            with pytest.raises(ModelLoadError, match=rf"^{re.escape(name)}: .*{phrase}"):
                action(path)


def test_missing_files_and_other_suffixes(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="nothere.safetensors: no such file"):
        inspect_checkpoint(tmp_path / "nothere.safetensors")
    (tmp_path / "weights.onnx").write_bytes(b"\x08\x07onnx")
    with pytest.raises(ModelLoadError, match=r"weights\.onnx: is not a \.safetensors file"):
        inspect_checkpoint(tmp_path / "weights.onnx")


def test_key_check_names_missing_misshapen_and_unknown_tensors() -> None:
    arch = Architecture.TINY_SDXL
    full = dict(expected_shapes(arch))
    conv = sgm_keys.UNET_PREFIX + "out.2.weight"
    with pytest.raises(ModelLoadError, match=rf"x: 1 tiny-sdxl tensors are missing, e\.g\. {conv}"):
        check_keys({k: v for k, v in full.items() if k != conv}, arch, "x")
    with pytest.raises(ModelLoadError, match=r"wrong shape.*is \[4, 32, 1, 1\], expected \[4, 32, 3, 3\]"):
        check_keys({**full, conv: (4, 32, 1, 1)}, arch, "x")
    with pytest.raises(ModelLoadError, match="not part of tiny-sdxl, e.g. model.diffusion_model.extra"):
        check_keys({**full, sgm_keys.UNET_PREFIX + "extra": (1,)}, arch, "x")
    # training bookkeeping is ignored; the two tensors nobody reads may be absent
    check_keys({**full, "model_ema.decay": (), "denoiser.sigmas": (1000,)}, arch, "x")
    check_keys({k: v for k, v in full.items() if k not in sgm_keys.OPTIONAL_KEYS}, arch, "x")


def test_load_refuses_a_file_with_a_missing_tensor_before_reading(tiny_file: Path, tmp_path: Path) -> None:
    state = load_file(tiny_file)
    del state[sgm_keys.VAE_PREFIX + "decoder.conv_out.weight"]
    path = tmp_path / "holey.safetensors"
    save_file(state, str(path))
    assert inspect_checkpoint(path) == "tiny-sdxl"
    with pytest.raises(ModelLoadError, match=r"^holey\.safetensors: 1 tiny-sdxl tensors are missing"):
        load_single_file(path, torch.float32)
