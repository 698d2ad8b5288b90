"""LoraPatcher on the tiny SDXL's real modules: exactness, incrementality, transactions, offload."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import patch_fixtures as pf  # noqa: E402

from studio.errors import LoraError, OutOfMemory  # noqa: E402
from studio.lora.base import LowRankPatch  # noqa: E402
from studio.choices import LoraMode  # noqa: E402
from studio.lora.patcher import LoraPatcher, PatcherSettings, UnpatchPath  # noqa: E402

OFFLOAD = PatcherSettings(unpatch_lora_by_vram_offload=True)
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def comps():
    return pf.fresh_components()


@pytest.fixture
def loras(comps):
    return {
        "A": pf.random_lora(comps, "A", 1, n_layers=30, kinds=("lowrank", "dense", "dora")),
        "B": pf.random_lora(comps, "B", 2, n_layers=30),
        "C": pf.random_lora(comps, "C", 3, n_layers=20, rank=8),
    }


def touched_by(lora) -> int:
    return sum(1 + (p.bias_delta is not None) for p in lora.patches)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_equals_pristine_plus_sum_rounded_once(dtype):
    comps = pf.fresh_components(dtype)
    pristine = pf.snapshot(comps)
    a = pf.random_lora(comps, "A", 1, n_layers=30, kinds=("lowrank", "dense", "dora"))
    b = pf.random_lora(comps, "B", 2, n_layers=30)
    stack = [(a, 0.8), (b, -0.6)]
    with LoraPatcher(comps) as patcher:
        patcher.apply(stack)
        assert pf.mismatches(comps, pf.expected_state(pristine, stack)) == []
        # and the math itself, summed per LoRA in float64: within one rounding of the dtype
        atol = 1e-6 if dtype == torch.float32 else 2 ** -7
        assert pf.mismatches(comps, pf.expected_state(pristine, stack, exact=False), atol=atol) == []
    assert pf.mismatches(comps, pristine) == []


def test_clear_is_bit_identical_and_pristine_never_aliases(comps, loras):
    pristine = pf.snapshot(comps)
    keys = [(p.component, f"{p.module}.weight") for lo in (loras["A"], loras["B"]) for p in lo.patches]
    before = {k: comps[k[0]].get_parameter(k[1]).untyped_storage().data_ptr() for k in keys}
    patcher = LoraPatcher(comps)
    patcher.apply([(loras["A"], 1.0), (loras["B"], 0.5)])
    for comp, name in keys:
        live = comps[comp].get_parameter(name)
        copy = patcher.pristine(comp, name)
        assert copy.device.type == "cpu"
        # the InvokeAI #6559 bug: on CPU the "read-only" copy was the live tensor itself
        assert copy.untyped_storage().data_ptr() not in (before[(comp, name)], live.untyped_storage().data_ptr())
        assert live.untyped_storage().data_ptr() == before[(comp, name)]  # merged in place, not reallocated
        assert torch.equal(copy, pristine[comp][name])
    stats = patcher.clear()
    assert stats.unpatch_path is UnpatchPath.RESTORE
    assert stats.tensors_restored == stats.tensors_touched > 0
    assert pf.mismatches(comps, pristine) == []
    for comp, name in keys:
        assert torch.equal(patcher.pristine(comp, name), pristine[comp][name])
    patcher.close()


def test_only_what_changes_is_touched(comps, loras):
    a, b = loras["A"], loras["B"]
    pristine = pf.snapshot(comps)
    with LoraPatcher(comps) as patcher:
        first = patcher.apply([(a, 1.0)])
        assert first.tensors_touched == first.tensors_snapshotted == touched_by(a)
        assert first.bytes_snapshotted > 0 and first.bytes_moved >= first.bytes_written > 0
        again = patcher.apply([(a, 1.0)])  # DESIGN 4: the same stack again costs nothing (its time: bench.lora_switch)
        assert (again.tensors_touched, again.tensors_skipped, again.bytes_moved) == (0, touched_by(a), 0)
        added = patcher.apply([(a, 1.0), (b, 0.5)])
        assert added.tensors_touched == touched_by(b)  # B's layers, whether or not A shares them
        moved = patcher.apply([(a, 1.0), (b, 0.7)])
        assert moved.tensors_touched == touched_by(b) and moved.tensors_snapshotted == 0
        removed = patcher.apply([(b, 0.7)])
        assert removed.tensors_touched == touched_by(a)
        assert pf.mismatches(comps, pf.expected_state(pristine, [(b, 0.7)])) == []
        zero = patcher.apply([(b, 0.7), (a, 0.0)])  # weight 0 is the same as absent
        assert zero.tensors_touched == 0 and patcher.applied == [(b, 0.7)]


def test_order_of_the_stack_is_part_of_the_signature(comps, loras):
    a, c = loras["A"], loras["C"]
    pristine = pf.snapshot(comps)
    with LoraPatcher(comps) as patcher:
        patcher.apply([(a, 1.0), (c, 1.0)])
        patcher.apply([(c, 1.0), (a, 1.0)])
        assert pf.mismatches(comps, pf.expected_state(pristine, [(c, 1.0), (a, 1.0)])) == []


@pytest.mark.parametrize("error, raised", [(RuntimeError("injected"), RuntimeError),
                                           (TypeError("a bug in a format reader"), TypeError),
                                           (RuntimeError("allocator: out of memory, in words only"), RuntimeError),
                                           (torch.cuda.OutOfMemoryError("CUDA out of memory (injected)"), OutOfMemory),
                                           (MemoryError(), OutOfMemory)])
def test_failure_half_way_restores_every_tensor(comps, loras, error, raised):
    a, b = loras["A"], loras["B"]
    pristine = pf.snapshot(comps)
    with LoraPatcher(comps) as patcher:
        patcher.apply([(a, 1.0)])
        before = pf.snapshot(comps)
        # A's layers are rewritten (new weight) and B's snapshotted before the failing layer is reached
        bad = pf.make_lora("bad", [pf.FailingPatch("text_encoder_2", "text_projection", error)])
        writes = []
        real_write = patcher._write
        patcher._write = lambda *args: (writes.append(args[0]), real_write(*args))[1]
        with pytest.raises(raised) as info:
            patcher.apply([(a, 0.3), (b, 1.0), (bad, 1.0)])
        # a bug is not dressed up as a bad LoRA file, and OOM is known by its type, not its text
        assert type(info.value) is raised and (raised is OutOfMemory or info.value is error)
        del patcher._write
        assert len(writes) > 2 * touched_by(a)  # really half way: A rewritten, then all of it rolled back
        assert pf.mismatches(comps, before) == []
        assert patcher.applied == [(a, 1.0)]
        assert patcher.apply([(a, 1.0)]).tensors_touched == 0  # signatures were rolled back too
        patcher.apply([(b, 1.0)])
        assert pf.mismatches(comps, pf.expected_state(pristine, [(b, 1.0)])) == []
    assert pf.mismatches(comps, pristine) == []


def test_failure_in_offload_mode_restores_dropped_state(comps, loras):
    a = loras["A"]
    pristine = pf.snapshot(comps)
    with LoraPatcher(comps, OFFLOAD) as patcher:
        patcher.apply([(a, 1.0)])
        patcher.clear()  # all of A's tensors dropped
        bad = pf.make_lora("bad", [pf.FailingPatch("text_encoder_2", "text_projection")])
        with pytest.raises(RuntimeError, match="injected failure"):
            patcher.apply([(a, 1.0), (bad, 1.0)])
        patcher.materialize()
        assert pf.mismatches(comps, pristine) == []


def test_a_failed_rollback_write_does_not_skip_the_rest_of_the_rollback(comps, loras):
    """The newest tensor cannot be put back at all: every other one still is (issue 11, item 12)."""
    a, b = loras["A"], loras["B"]
    pristine = pf.snapshot(comps)
    with LoraPatcher(comps) as patcher:
        patcher.apply([(a, 1.0)])
        before = pf.snapshot(comps)
        stuck = ("text_encoder_2", "text_projection", "weight")  # written last, so rolled back first
        bad = pf.make_lora("bad", [pf.FailingPatch(*stuck[:2])])
        rolling_back = []
        real_write, real_rollback = patcher._write, patcher._rollback

        def write(key, *args):
            if rolling_back and key == stuck:
                raise RuntimeError("this tensor cannot be written now")
            return real_write(key, *args)

        patcher._write = write
        patcher._rollback = lambda *args: (rolling_back.append(1), real_rollback(*args))[1]
        with pytest.raises(RuntimeError, match="injected failure"):  # the cause, not the rollback's trouble
            patcher.apply([(a, 0.3), (b, 1.0), (bad, 1.0)])
        del patcher._write, patcher._rollback
        assert pf.mismatches(comps, before) == []
        patcher.apply([(b, 1.0)])
        assert pf.mismatches(comps, pf.expected_state(pristine, [(b, 1.0)])) == []


def bad_shape_lora(comps):
    gen = torch.Generator().manual_seed(0)
    p = pf.make_lowrank(comps, "unet", "conv_in", 2, gen)
    p.module = "conv_out"  # conv_in's shape on conv_out
    return pf.make_lora("shapes", [p])


@pytest.mark.parametrize("make_bad, words", [
    (bad_shape_lora, "weight shape"),
    (lambda c: pf.make_lora("nan", [LowRankPatch("unet", "conv_in", torch.full((32, 2), float("nan")),
                                                 torch.zeros(2, 36), 1.0, (32, 4, 3, 3))]), "NaN"),
    (lambda c: pf.make_lora("ghost", [pf.FailingPatch("unet", "no.such.layer")]), "no layer"),
    (lambda c: pf.make_lora("sd1", [pf.FailingPatch("vae", "decoder")]), "does not have"),
])
def test_bad_input_is_refused_before_any_write(comps, loras, make_bad, words):
    pristine = pf.snapshot(comps)
    with LoraPatcher(comps) as patcher:
        with pytest.raises(LoraError, match=words):
            patcher.apply([(loras["A"], 1.0), (make_bad(comps), 1.0)])
        assert pf.mismatches(comps, pristine) == []
        assert patcher.pristine("unet", "conv_in.weight") is None  # not even a snapshot was taken
        with pytest.raises(LoraError, match="finite"):
            patcher.apply([(loras["A"], float("nan"))])


def test_non_finite_result_is_rolled_back():
    # fp16 storage: the fp32 sum is finite but does not fit in fp16 (65504); only copies run in fp16
    lin = nn.Linear(8, 8).half()
    comps = {"unet": nn.Sequential(lin)}
    pristine = lin.weight.detach().clone()
    huge = pf.make_lora("huge", [pf.DensePatch("unet", "0", torch.full((8, 8), 1e5), None)])
    with LoraPatcher(comps) as patcher:
        with pytest.raises(LoraError, match="non-finite"):
            patcher.apply([(huge, 1.0)])
        assert torch.equal(lin.weight, pristine)


def test_offload_path_drops_and_reloads_lazily(comps, loras):
    a = loras["A"]
    pristine = pf.snapshot(comps)
    base_out = pf.forward_all(comps)
    with LoraPatcher(comps, OFFLOAD) as patcher:
        patcher.apply([(a, 1.0)])
        lin = next(p for p in a.patches if p.component == "text_encoder")
        param = comps["text_encoder"].get_parameter(f"{lin.module}.weight")
        patched_tensor = param.data
        patched_values = patched_tensor.clone()
        stats = patcher.clear()
        assert stats.unpatch_path is UnpatchPath.OFFLOAD and stats.bytes_written == 0
        # the patched tensor was dropped, not cleaned in place: nothing can reuse it as clean
        assert param.data_ptr() != patched_tensor.data_ptr()
        assert torch.equal(patched_tensor, patched_values)
        assert torch.isnan(param).all() and param.shape == patched_tensor.shape and param.device.type == "cpu"
        with pytest.raises(RuntimeError):
            param.data.add_(1)  # the placeholder refuses writes
        out = pf.forward_all(comps)  # the pre-forward hook reloads clean weights
        for k in out:
            assert torch.equal(out[k], base_out[k])
        assert patcher.last_reload.tensors_touched == touched_by(a)
        assert pf.mismatches(comps, pristine) == []
        assert not any(m._forward_pre_hooks for m in comps.values())


@pytest.mark.parametrize("sequence", [[True, False, True, False], [False, True, True, False, False, True]])
def test_toggling_offload_between_applies_never_reuses_a_patched_copy(comps, loras, sequence):
    a, b = loras["A"], loras["B"]
    pristine = pf.snapshot(comps)
    stacks = [[(a, 1.0)], [], [(b, 0.5), (a, 0.25)], [], [(b, 0.5)], [(a, 1.0)]]
    with LoraPatcher(comps) as patcher:
        for offload, stack in zip(sequence, stacks):
            patcher.configure(PatcherSettings(unpatch_lora_by_vram_offload=offload))
            patcher.apply(stack)
            patcher.materialize()
            assert pf.mismatches(comps, pf.expected_state(pristine, stack)) == []
    assert pf.mismatches(comps, pristine) == []


def test_foreign_replacement_of_a_weight_is_noticed(comps, loras):
    """A model cache re-pointing a parameter at clean weights must not leave the LoRA silently off."""
    a = loras["B"]
    pristine = pf.snapshot(comps)
    with LoraPatcher(comps) as patcher:
        patcher.apply([(a, 1.0)])
        p = a.patches[0]
        param = comps[p.component].get_parameter(f"{p.module}.weight")
        param.data = pristine[p.component][f"{p.module}.weight"].clone()
        assert patcher.apply([(a, 1.0)]).tensors_touched == 1
        assert pf.mismatches(comps, pf.expected_state(pristine, [(a, 1.0)])) == []


def test_pristine_source_is_used_and_an_aliasing_one_refused(comps, loras):
    a = loras["B"]
    pristine = pf.snapshot(comps)
    ram = {c: {k: v.clone() for k, v in sd.items()} for c, sd in pristine.items()}
    with LoraPatcher(comps, pristine_source=lambda c, n: ram[c][n]) as patcher:
        assert patcher.apply([(a, 1.0)]).tensors_snapshotted == 0
        assert pf.mismatches(comps, pf.expected_state(pristine, [(a, 1.0)])) == []
    assert all(torch.equal(ram[c][k], pristine[c][k]) for c in ram for k in ram[c])
    # a "copy" that is the live tensor (InvokeAI #6559) is detected and snapshotted instead
    with LoraPatcher(comps, pristine_source=lambda c, n: comps[c].get_parameter(n).data) as patcher:
        assert patcher.apply([(a, 1.0)]).tensors_snapshotted == touched_by(a)
        patcher.clear()
        assert pf.mismatches(comps, pristine) == []


def test_fp8_weights_cannot_be_merged():
    lin = nn.Linear(8, 8)
    lin.weight.data = lin.weight.data.to(torch.float8_e4m3fn)
    comps = {"unet": nn.Sequential(lin)}
    lora = pf.make_lora("x", [LowRankPatch("unet", "0", torch.ones(8, 1), torch.ones(1, 8), 1.0, (8, 8))])
    with LoraPatcher(comps) as patcher:
        with pytest.raises(LoraError, match="float8"):
            patcher.apply([(lora, 1.0)])
        patcher.configure(PatcherSettings(mode=LoraMode.AUTO))
        stats = patcher.apply([(lora, 1.0)])
        assert stats.sidecars_active == 1 and stats.tensors_touched == 0


# -- the patcher as a context manager ---------------------------------------------------------------
def test_context_normal_exit_leaves_model_clean(comps, loras):
    pristine = pf.snapshot(comps)
    with LoraPatcher(comps, OFFLOAD) as patcher:
        patcher.apply([(loras["A"], 1.0)])
        patcher.clear()  # dropped: close() must reload them
        patcher.configure(PatcherSettings(mode=LoraMode.SIDECAR))
        patcher.apply([(loras["B"], 1.0)])
    assert pf.mismatches(comps, pristine) == []
    assert not any(m._forward_pre_hooks or m._forward_hooks for c in comps.values() for m in c.modules())
    with pytest.raises(RuntimeError, match="after close"):
        patcher.apply([])


def test_context_body_raises(comps, loras):
    pristine = pf.snapshot(comps)
    with pytest.raises(KeyError):
        with LoraPatcher(comps) as patcher:
            patcher.apply([(loras["A"], 1.0)])
            raise KeyError("body")
    assert pf.mismatches(comps, pristine) == []


def test_context_release_raises_still_ends_the_lifetime(comps, loras, monkeypatch):
    patcher = LoraPatcher(comps, OFFLOAD)
    patcher.apply([(loras["A"], 1.0)])
    patcher.clear()
    monkeypatch.setattr(patcher, "_transition", lambda *a: (_ for _ in ()).throw(RuntimeError("restore broke")))
    with pytest.raises(RuntimeError, match="restore broke"):
        patcher.__exit__(None, None, None)
    # hooks and copies are released even though the restore failed
    assert not any(m._forward_pre_hooks for m in comps.values())
    assert patcher.pristine("text_encoder", "x.weight") is None and patcher.applied == []
    patcher.close()  # a second close is a no-op


def test_context_entered_and_exited_once(comps, loras, monkeypatch):
    calls = []
    real_close = LoraPatcher.close
    monkeypatch.setattr(LoraPatcher, "close", lambda self: (calls.append(1), real_close(self))[1])
    with LoraPatcher(comps) as patcher:
        patcher.apply([(loras["A"], 1.0)])
    assert calls == [1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pristine_is_pinned_ram_and_restore_is_exact():
    comps = {k: v.cuda() for k, v in pf.fresh_components().items()}
    pristine = {c: {k: v.cpu() for k, v in sd.items()} for c, sd in pf.snapshot(comps).items()}
    a = pf.random_lora(comps, "A", 1, n_layers=30, kinds=("lowrank", "dense", "dora"))
    base = pf.forward_all(comps)
    for offload in (False, True):
        with LoraPatcher(comps, PatcherSettings(unpatch_lora_by_vram_offload=offload)) as patcher:
            stats = patcher.apply([(a, 1.0)])
            assert stats.bytes_uploaded > 0
            p = a.patches[0]
            copy = patcher.pristine(p.component, f"{p.module}.weight")
            assert copy.device.type == "cpu" and copy.is_pinned()
            assert torch.equal(copy, pristine[p.component][f"{p.module}.weight"])
            merged = pf.forward_all(comps)
            patcher.configure(PatcherSettings(mode=LoraMode.SIDECAR, unpatch_lora_by_vram_offload=offload))
            patcher.apply([(a, 1.0)])
            side = pf.forward_all(comps)  # reloads what the switch dropped, then runs the sidecars
            assert all(pf.rel_err(side[k], merged[k]) < 1e-3 for k in side)  # TF32 matmuls on CUDA
            patcher.clear()
            assert all(torch.equal(v, base[k]) for k, v in pf.forward_all(comps).items())
            got = {c: {k: v.cpu() for k, v in m.state_dict().items()} for c, m in comps.items()}
            assert all(torch.equal(got[c][k], pristine[c][k]) for c in got for k in got[c])


def test_timings_are_reported(comps, loras):
    with LoraPatcher(comps) as patcher:
        t0 = time.perf_counter()
        stats = patcher.apply([(loras["A"], 1.0)])
        assert 0 < stats.seconds <= time.perf_counter() - t0


def test_demo_loras_through_the_cache_and_the_patcher(comps):
    """End to end with the real reader: parse once, pin for the job, apply exactly, switch to sidecar."""
    reader = pytest.importorskip("studio.lora.reader")
    from studio.lora.cache import LoraCache
    from studio.lora.keymap import tiny_index
    from studio.paths import DEMO_LORA_DIR

    index = tiny_index()
    cache = LoraCache(64 << 20, lambda path: reader.read_lora(path, index))
    pristine = pf.snapshot(comps)
    files = sorted(DEMO_LORA_DIR.glob("*.safetensors"))
    with LoraPatcher(comps) as patcher:
        for attempt in range(2):
            pins = [cache.pin(f) for f in files]
            try:
                assert all(p.hit == (attempt == 1) for p in pins)
                stack = [(p.lora, 0.7 - 0.2 * i) for i, p in enumerate(pins)]
                patcher.configure(PatcherSettings())
                patcher.apply(stack)
                assert pf.mismatches(comps, pf.expected_state(pristine, stack)) == []
                merged = pf.forward_all(comps)
                patcher.configure(PatcherSettings(mode=LoraMode.SIDECAR))
                patcher.apply(stack)
                side = pf.forward_all(comps)
                assert all(pf.rel_err(side[k], merged[k]) < 2e-5 for k in side)
            finally:
                for p in pins:
                    p.release()
    assert pf.mismatches(comps, pristine) == []
