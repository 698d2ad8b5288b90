"""LoRAs through the session: visible effect, exact restore, incremental work, bad files, the toggle."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from PIL import Image

from studio.errors import Cancelled, LoraError
from studio.infotext import read_png_infotext
from studio.paths import DEMO_LORA_DIR
from studio.request import GenerationRequest
from studio.jobs import CancelToken
from tests.demo_hashes import DEMO_SHORT_HASHES

KOHYA, PEFT, LOCON = "demo-kohya-warm", "demo-peft-cool", "demo-locon-grain"


def _req(prompt="a cat", loras=(), seed=3) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, seed=seed, steps=2, width=64, height=64, loras=tuple(loras))


def _pixels(result) -> np.ndarray:
    return np.asarray(Image.open(result.paths[0]).convert("RGB")).astype(np.int16)


def _weights(session) -> dict[str, torch.Tensor]:
    pipe = session.warm.pipe
    return {f"{c}.{k}": v.detach().clone() for c in ("unet", "text_encoder", "text_encoder_2")
            for k, v in getattr(pipe, c).state_dict().items()}


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert differ == [], f"{len(differ)} tensors differ, e.g. {differ[:3]}"


@pytest.fixture
def clean(tiny_session, tmp_path):
    """The shared session with no LoRA applied before and after the test."""
    tiny_session.generate(_req(), out_path=tmp_path / "reset-before.png")
    yield tiny_session
    tiny_session.apply_settings(tiny_session.settings.replace(unpatch_lora_by_vram_offload=False,
                                                              lora_dirs=()))
    tiny_session.generate(_req(), out_path=tmp_path / "reset-after.png")


def test_lora_changes_the_image_and_clearing_restores_it_exactly(clean, tmp_path):
    pristine = _weights(clean)
    base = clean.generate(_req(), out_path=tmp_path / "base.png")
    with_lora = clean.generate(_req(loras=[(KOHYA, 1.0)]), out_path=tmp_path / "lora.png")
    assert np.abs(_pixels(with_lora) - _pixels(base)).mean() > 5
    again = clean.generate(_req(), out_path=tmp_path / "again.png")
    assert np.array_equal(_pixels(again), _pixels(base))
    _assert_same_weights(_weights(clean), pristine)
    assert all(name.startswith("lora") for name in with_lora.report.phases
               if name not in {"text_encode", "denoise", "vae_decode", "save", "total"})
    info = read_png_infotext(with_lora.paths[0])
    assert info.params["Lora hashes"] == f"{KOHYA}: {DEMO_SHORT_HASHES[KOHYA]}"
    assert info.to_request().loras == ((KOHYA, 1.0),)


def test_same_stack_again_does_no_work_and_a_moved_weight_touches_only_its_lora(clean, tmp_path):
    first = clean.generate(_req(loras=[(KOHYA, 0.8), (LOCON, 0.5)]), out_path=tmp_path / "1.png")
    assert [row["cache"] for row in first.report.lora["stack"]] in (["miss", "miss"], ["hit", "hit"],
                                                                   ["hit", "miss"], ["miss", "hit"])
    again = clean.generate(_req(loras=[(KOHYA, 0.8), (LOCON, 0.5)]), out_path=tmp_path / "2.png")
    assert again.report.lora["patch"]["tensors_touched"] == 0
    assert [row["cache"] for row in again.report.lora["stack"]] == ["hit", "hit"]
    assert np.array_equal(_pixels(first), _pixels(again))
    moved = clean.generate(_req(loras=[(KOHYA, 0.8), (LOCON, 0.2)]), out_path=tmp_path / "3.png")
    locon_layers = moved.report.lora["stack"][1]["layers"]
    kohya_layers = moved.report.lora["stack"][0]["layers"]
    assert 0 < moved.report.lora["patch"]["tensors_touched"] <= locon_layers < locon_layers + kohya_layers


def test_prompt_tags_and_rows_are_the_same_stack(clean, tmp_path):
    by_row = clean.generate(_req(loras=[(PEFT, 0.7)]), out_path=tmp_path / "row.png")
    by_tag = clean.generate(_req(prompt=f"a cat <lora:{PEFT}:0.7>"), out_path=tmp_path / "tag.png")
    assert np.array_equal(_pixels(by_row), _pixels(by_tag))
    assert by_tag.report.request["prompt"] == "a cat" and by_tag.report.request["loras"] == [[PEFT, 0.7]]


def test_bad_lora_files_give_one_line_and_change_nothing(clean, tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    (folder / "truncated.safetensors").write_bytes((DEMO_LORA_DIR / f"{KOHYA}.safetensors").read_bytes()[:5000])
    (folder / "pickled.safetensors").write_bytes(b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94.")
    clean.apply_settings(clean.settings.replace(lora_dirs=(str(folder),)))
    clean.generate(_req(loras=[(KOHYA, 0.6)]), out_path=tmp_path / "before.png")
    before = _weights(clean)
    for name, words in (("truncated", "truncated"), ("pickled", "pickle"), ("missing", "no LoRA named 'missing'")):
        with pytest.raises(LoraError) as err:
            clean.generate(_req(loras=[(KOHYA, 0.6), (name, 1.0)]), out_path=tmp_path / f"{name}.png")
        assert words in str(err.value) and "\n" not in str(err.value)
        assert not (tmp_path / f"{name}.png").exists()
        _assert_same_weights(_weights(clean), before)
    after = clean.generate(_req(loras=[(KOHYA, 0.6)]), out_path=tmp_path / "after.png")
    assert after.report.lora["patch"]["tensors_touched"] == 0
    assert np.array_equal(_pixels(after), np.asarray(Image.open(tmp_path / "before.png").convert("RGB")))


def test_a_lora_path_works_on_the_command_line_only(clean, tmp_path):
    copy = tmp_path / "style.safetensors"
    shutil.copy(DEMO_LORA_DIR / f"{KOHYA}.safetensors", copy)
    with pytest.raises(LoraError, match="is named by its file name in the LoRA folders"):
        clean.prepare(_req(loras=[(str(copy), 0.5)]))
    job = clean.prepare(_req(loras=[(str(copy), 0.5)]), allow_paths=True)  # what the CLI passes
    assert [(item.name, item.path) for item in job.stack] == [("style", copy.resolve())]


def test_a_checkpoint_in_a_lora_folder_is_refused_from_its_header(clean, tmp_path, monkeypatch):
    """A whole checkpoint was read into RAM as a LoRA (issue 11, item 1): its header says what it is."""
    import studio.lora.reader as reader
    from safetensors.torch import save_file

    folder = tmp_path / "loras"
    folder.mkdir()
    weights = {f"model.diffusion_model.input_blocks.{i}.0.weight": torch.zeros(2) for i in range(80)}
    weights |= {f"first_stage_model.decoder.conv_{i}.bias": torch.zeros(2) for i in range(20)}
    save_file(weights, str(folder / "sdxl-checkpoint.safetensors"))
    monkeypatch.setattr(reader, "_load_tensors", lambda *a: pytest.fail("the tensors of a checkpoint were read"))
    clean.apply_settings(clean.settings.replace(lora_dirs=(str(folder),)))
    with pytest.raises(LoraError, match=r"sdxl-checkpoint.safetensors: not a LoRA: 100 of its 100 tensors are plain "
                                        r"model weights \(e.g. \w+_model\..*\), as in a checkpoint"):
        clean.generate(_req(loras=[("sdxl-checkpoint", 1.0)]), out_path=tmp_path / "x.png")


def test_offload_toggle_gives_identical_images_and_reports_its_path(clean, tmp_path):
    results = {}
    for offload in (False, True):
        clean.apply_settings(clean.settings.replace(unpatch_lora_by_vram_offload=offload))
        clean.generate(_req(loras=[(KOHYA, 1.0)]), out_path=tmp_path / f"{offload}-a.png")
        results[offload] = clean.generate(_req(loras=[(PEFT, 0.9)]), out_path=tmp_path / f"{offload}-b.png")
    assert np.array_equal(_pixels(results[False]), _pixels(results[True]))
    assert results[False].report.lora["unpatch"]["method"] == "restore_in_place"
    assert results[True].report.lora["unpatch"]["method"] == "drop_and_reload"
    assert "lora_unpatch_reload" in results[True].report.phases
    assert set(clean.loras.unpatch_costs) == {"restore_in_place", "drop_and_reload"}


def test_the_report_names_the_unpatch_path_that_ran_when_the_setting_changes_mid_generation(clean, tmp_path,
                                                                                            monkeypatch):
    """The toggle applies now: flipped after the text encoders were restored in place, the UNet is
    dropped and reloaded; the report names both, not the setting's value at the end (issue 11)."""
    from studio.phases import Phase

    clean.generate(_req(loras=[(KOHYA, 1.0)]), out_path=tmp_path / "a.png")
    text_patcher = clean.loras.patcher(Phase.TEXT_ENCODE)
    real_apply = text_patcher.apply

    def apply_then_flip(stack):
        stats = real_apply(stack)
        clean.apply_settings(clean.settings.replace(unpatch_lora_by_vram_offload=True))
        return stats

    monkeypatch.setattr(text_patcher, "apply", apply_then_flip)
    clean.loras.unpatch_costs.clear()
    off = clean.generate(_req(), out_path=tmp_path / "off.png")
    assert off.report.lora["unpatch"]["method"] == "restore_in_place + drop_and_reload"
    assert clean.loras.unpatch_costs == {}  # a mixed switch measures neither path alone


ACTIONS = st.lists(st.tuples(st.sampled_from(["gen", "cancel", "toggle"]),
                             st.lists(st.tuples(st.sampled_from([KOHYA, PEFT, LOCON]),
                                                st.sampled_from([-0.5, 0.3, 1.0])), max_size=3)),
                   min_size=1, max_size=5)


@hsettings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(actions=ACTIONS)
def test_same_stack_gives_the_same_image_after_any_detour(tiny_session, tmp_path_factory, actions):
    out = tmp_path_factory.mktemp("detour")
    target = [(KOHYA, 0.7), (PEFT, 0.4)]
    reference = tiny_session.generate(_req(loras=target), out_path=out / "ref.png")
    for index, (action, stack) in enumerate(actions):
        if action == "toggle":
            flag = not tiny_session.settings.unpatch_lora_by_vram_offload
            tiny_session.apply_settings(tiny_session.settings.replace(unpatch_lora_by_vram_offload=flag))
        elif action == "cancel":
            token = CancelToken()
            with pytest.raises(Cancelled):
                tiny_session.generate(_req(loras=stack), cancel=token, on_step=lambda e: token.cancel(),
                                      out_path=out / f"{index}.png")
        else:
            tiny_session.generate(_req(loras=stack), out_path=out / f"{index}.png")
    back = tiny_session.generate(_req(loras=target), out_path=out / "back.png")
    assert np.array_equal(_pixels(back), _pixels(reference))
    tiny_session.apply_settings(tiny_session.settings.replace(unpatch_lora_by_vram_offload=False))
    shutil.rmtree(out)
