"""Block weights, te/unet weights and step ranges through the session, the PNG round trip and bake."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from studio.errors import SettingsError
from studio.infotext import read_png_infotext
from studio.lora.block_weights import BLOCKS_20, PRESETS, expand
from studio.phases import Phase
from studio.request import GenerationRequest

KOHYA, PEFT = "demo-kohya-warm", "demo-peft-cool"
PROBE = ("unet", "down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q")  # IN07; kohya-warm patches it


def _req(prompt="a cat", loras=(), seed=3, steps=2) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, seed=seed, steps=steps, width=64, height=64, loras=tuple(loras))


def _pixels(result) -> np.ndarray:
    return np.asarray(Image.open(result.paths[0]).convert("RGB")).astype(np.int16)


def _weights(session, component: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in getattr(session.warm.pipe, component).state_dict().items()}


@pytest.fixture
def clean(tiny_session, tmp_path):
    """The shared session with no LoRA applied before and after, merged mode, no user presets."""
    tiny_session.generate(_req(), out_path=tmp_path / "reset-before.png")
    yield tiny_session
    tiny_session.apply_settings(tiny_session.settings.replace(lora_mode="merged", lbw_presets=""))
    tiny_session.generate(_req(), out_path=tmp_path / "reset-after.png")


def test_block_weights_round_trip_through_png_info(clean, tmp_path):
    first = clean.generate(_req(prompt=f"a cat <lora:{KOHYA}:0.8:lbw=OUTD>"), out_path=tmp_path / "a.png")
    assert first.report.lora["stack"][0]["options"] == "lbw=OUTD"
    info = read_png_infotext(first.paths[0])
    assert f"<lora:{KOHYA}:0.8:lbw=OUTD>" in info.prompt
    request = info.to_request()
    assert request.loras == ((KOHYA, 0.8, "lbw=OUTD"),)
    again = clean.generate(request, out_path=tmp_path / "b.png")
    assert np.array_equal(_pixels(first), _pixels(again))
    plain = clean.generate(_req(loras=[(KOHYA, 0.8)]), out_path=tmp_path / "c.png")
    assert not np.array_equal(_pixels(first), _pixels(plain))


def test_lbw_all_is_bit_identical_to_no_lbw(clean, tmp_path):
    plain = clean.generate(_req(loras=[(KOHYA, 0.9)]), out_path=tmp_path / "plain.png")
    every = clean.generate(_req(loras=[(KOHYA, 0.9, "lbw=ALL")]), out_path=tmp_path / "all.png")
    assert every.report.lora["patch"]["tensors_touched"] == 0  # the same weights: nothing to rewrite
    assert np.array_equal(_pixels(plain), _pixels(every))


def test_moving_one_block_rewrites_only_that_blocks_tensors(clean, tmp_path):
    vector = list(PRESETS["MIDD"])
    job = clean.prepare(_req(loras=[(KOHYA, 1.0, "lbw=" + ",".join(map(str, vector)))]))
    layers = clean.lora_footprint(job.stack[0])
    mid = BLOCKS_20.index("MID")
    in_mid = sum(1 for _c, _m, block, _n in layers if block == mid)
    assert 0 < in_mid < len(layers)
    clean.generate(job, out_path=tmp_path / "a.png")
    vector[5] = 0.3  # MID in the 12-value layout
    moved = clean.generate(_req(loras=[(KOHYA, 1.0, "lbw=" + ",".join(map(str, vector)))]),
                           out_path=tmp_path / "b.png")
    assert moved.report.lora["patch"]["tensors_touched"] == in_mid


def test_text_encoder_and_unet_weights_are_separate(clean, tmp_path):
    te_pristine, unet_pristine = _weights(clean, "text_encoder"), _weights(clean, "unet")
    clean.generate(_req(prompt=f"a cat <lora:{KOHYA}:0:1>"), out_path=tmp_path / "unet-only.png")
    assert all(torch.equal(v, te_pristine[k]) for k, v in _weights(clean, "text_encoder").items())
    assert any(not torch.equal(v, unet_pristine[k]) for k, v in _weights(clean, "unet").items())
    clean.generate(_req(prompt=f"a cat <lora:{KOHYA}:te=1:unet=0>"), out_path=tmp_path / "te-only.png")
    assert all(torch.equal(v, unet_pristine[k]) for k, v in _weights(clean, "unet").items())
    assert any(not torch.equal(v, te_pristine[k]) for k, v in _weights(clean, "text_encoder").items())


@pytest.mark.parametrize("prompt, words", [
    (f"a cat <lora:{KOHYA}:1e30>", [KOHYA, "between -4 and 4"]),  # issue 11 item 7
    (f"a cat <lora:{KOHYA}:nan>", [KOHYA, "'nan'"]),
    (f"a cat <lora:{KOHYA}:1:lbw=1,1,1>", [KOHYA, "12 values", "got 3"]),
    (f"a cat <lora:{KOHYA}:1:lbw=NOPE>", [KOHYA, "unknown block-weight preset"]),
    (f"a cat <lora:{KOHYA}:1:lbw=1,a,1,1,1,1,1,1,1,1,1,1>", [KOHYA, "must be a number"]),
])
def test_bad_tags_are_one_error_and_make_no_image(clean, tmp_path, prompt, words):
    with pytest.raises(SettingsError) as err:
        clean.generate(_req(prompt=prompt), out_path=tmp_path / "bad.png")
    assert all(w in str(err.value) for w in words), str(err.value)
    assert not (tmp_path / "bad.png").exists()


def test_user_presets_come_from_the_settings(clean, tmp_path):
    vector = "1,0,0.5,1,1,0,0,0,1,1,0,0"
    clean.apply_settings(clean.settings.replace(lbw_presets=f"# my presets\nMINE:{vector}"))
    named = clean.generate(_req(loras=[(KOHYA, 1.0, "lbw=MINE")]), out_path=tmp_path / "named.png")
    spelled = clean.generate(_req(loras=[(KOHYA, 1.0, f"lbw={vector}")]), out_path=tmp_path / "spelled.png")
    assert np.array_equal(_pixels(named), _pixels(spelled))
    with pytest.raises(SettingsError, match="lbw_presets"):
        clean.apply_settings(clean.settings.replace(lbw_presets="BROKEN:1,2"))


def _probe_per_step(session):
    """Before every UNet forward (one per step with CFG batched): is the probed weight pristine?"""
    module = session.warm.pipe.unet.get_submodule(PROBE[1])
    seen: list[bool] = []
    pristine = session.loras.patcher(Phase.DENOISE).pristine("unet", f"{PROBE[1]}.weight")
    handle = session.warm.pipe.unet.register_forward_pre_hook(
        lambda _m, _a: seen.append(torch.equal(module.weight, pristine)))
    return seen, handle


def test_a_step_range_switches_the_unet_at_its_boundary_in_merged_mode(clean, tmp_path):
    clean.generate(_req(loras=[(KOHYA, 1.0)]), out_path=tmp_path / "warm.png")  # the probe's pristine copy exists
    seen, handle = _probe_per_step(clean)
    try:
        result = clean.generate(_req(prompt=f"a cat <lora:{KOHYA}:1:stop=2>", steps=4), out_path=tmp_path / "a.png")
    finally:
        handle.remove()
    assert seen == [False, False, True, True]  # on for steps 0-1, off from step 2
    switches = result.report.lora["step_switches"]
    assert [(s["step"], s["method"]) for s in switches] == [(2, "incremental")]
    unet_layers = sum(1 for c, _m, _b, _n in clean.lora_footprint(clean.prepare(_req(loras=[(KOHYA, 1)])).stack[0])
                      if c == "unet")
    assert switches[0]["tensors_touched"] == unet_layers and switches[0]["seconds"] > 0
    assert "lora_step_switch" in result.report.phases
    always = clean.generate(_req(loras=[(KOHYA, 1.0)], steps=4), out_path=tmp_path / "always.png")
    assert not np.array_equal(_pixels(result), _pixels(always))


@pytest.mark.parametrize("mode", ["merged", "sidecar"])
def test_a_range_that_holds_no_step_equals_the_text_encoder_part_alone(clean, tmp_path, mode):
    clean.apply_settings(clean.settings.replace(lora_mode=mode))
    never = clean.generate(_req(prompt=f"a cat <lora:{KOHYA}:1:start=3>", steps=3), out_path=tmp_path / "n.png")
    te_only = clean.generate(_req(prompt=f"a cat <lora:{KOHYA}:1:0>", steps=3), out_path=tmp_path / "t.png")
    assert np.array_equal(_pixels(never), _pixels(te_only))
    assert any("only its text-encoder part ran" in n for n in never.report.lora["notes"])


def test_sidecar_mode_gates_at_the_boundary(clean, tmp_path):
    clean.apply_settings(clean.settings.replace(lora_mode="sidecar"))
    result = clean.generate(_req(prompt=f"a cat <lora:{KOHYA}:1:start=1>", steps=3), out_path=tmp_path / "g.png")
    switches = result.report.lora["step_switches"]
    assert [(s["step"], s["method"]) for s in switches] == [(1, "gate")] and switches[0]["sidecars_gated"] > 0
    again = clean.generate(_req(prompt=f"a cat <lora:{KOHYA}:1:start=1>", steps=3), out_path=tmp_path / "h.png")
    assert np.array_equal(_pixels(result), _pixels(again))


def test_bake_takes_block_weights(clean, tmp_path):
    result = clean.bake([(KOHYA, 1.0, "lbw=OUTD")], tmp_path / "baked")
    assert result.stack[0]["blocks"] == list(expand(PRESETS["OUTD"]))
    info = json.loads((tmp_path / "baked" / "lora_studio_bake.json").read_text())
    assert info["stack"][0]["blocks"][BLOCKS_20.index("OUT01")] == 1.0
    job = clean.prepare(_req(loras=[(KOHYA, 1.0, "lbw=OUTD")]))
    out_layers = {m for c, m, b, _n in clean.lora_footprint(job.stack[0])
                  if c == "unet" and b is not None and BLOCKS_20[b] in ("OUT00", "OUT01", "OUT02")}
    assert result.modules_patched == len(out_layers) + sum(
        1 for c, *_ in clean.lora_footprint(job.stack[0]) if c != "unet")
