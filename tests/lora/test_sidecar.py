"""Sidecar mode: the LoRA runs in forward, weights are never written, removal leaves no trace."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import patch_fixtures as pf  # noqa: E402

from studio.errors import LoraError  # noqa: E402
from studio.lora.base import LowRankPatch  # noqa: E402
from studio.choices import LoraMode  # noqa: E402
from studio.lora.patcher import LoraPatcher, PatcherSettings  # noqa: E402
from studio.lora.sidecar import fp8_blocker  # noqa: E402

SIDECAR = PatcherSettings(mode=LoraMode.SIDECAR)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def comps():
    return pf.fresh_components()


def mixed(comps, name, seed):
    """Low-rank (incl. 3x3 conv kernels in down), dense with bias, and DoRA-like layers."""
    return pf.random_lora(comps, name, seed, n_layers=36, kinds=("lowrank", "dense", "lowrank", "dora"))


def test_sidecar_output_equals_merged_output(comps):
    a, b = mixed(comps, "A", 1), pf.random_lora(comps, "B", 2, n_layers=36, rank=8)
    assert any(isinstance(comps[p.component].get_submodule(p.module), nn.Conv2d)
               and comps[p.component].get_submodule(p.module).kernel_size == (3, 3)
               for p in a.patches + b.patches if p.factors() is not None)
    stack = [(a, 0.9), (b, -0.7)]
    base = pf.forward_all(comps)
    with LoraPatcher(comps) as patcher:
        patcher.apply(stack)
        merged = pf.forward_all(comps)
        patcher.configure(SIDECAR)
        stats = patcher.apply(stack)
        assert stats.sidecars_active == len({(p.component, p.module) for lo, _ in stack for p in lo.patches})
        side = pf.forward_all(comps)
    for k in merged:
        assert pf.rel_err(merged[k], base[k]) > 1e-3  # the LoRAs do change every output
        assert pf.rel_err(side[k], merged[k]) < 2e-5, k


def test_sidecar_writes_no_weights(comps):
    pristine = pf.snapshot(comps)
    ptrs = {(c, k): v.data_ptr() for c, m in comps.items() for k, v in m.state_dict().items()}
    a, b = mixed(comps, "A", 1), mixed(comps, "B", 2)
    with LoraPatcher(comps, SIDECAR) as patcher:
        for stack in ([(a, 1.0)], [(a, 0.5), (b, 1.0)], [(b, 0.2)]):
            stats = patcher.apply(stack)
            assert stats.bytes_written == stats.tensors_touched == stats.tensors_snapshotted == 0
            pf.forward_all(comps)
            assert pf.mismatches(comps, pristine) == []
            assert {(c, k): v.data_ptr() for c, m in comps.items() for k, v in m.state_dict().items()} == ptrs
        again = patcher.apply([(b, 0.2)])
        assert again.sidecars_changed == 0


def test_removal_leaves_the_module_as_it_was(comps):
    keys = {c: list(m.state_dict()) for c, m in comps.items()}
    structure = {c: [(n, type(m)) for n, m in root.named_modules()] for c, root in comps.items()}
    base = pf.forward_all(comps)
    with LoraPatcher(comps, SIDECAR) as patcher:
        patcher.apply([(mixed(comps, "A", 1), 1.0)])
        assert any(m._forward_hooks for c in comps.values() for m in c.modules())
        patcher.clear()
        assert not any(m._forward_hooks for c in comps.values() for m in c.modules())
        assert {c: list(m.state_dict()) for c, m in comps.items()} == keys
        assert {c: [(n, type(m)) for n, m in root.named_modules()] for c, root in comps.items()} == structure
        out = pf.forward_all(comps)
        assert all(torch.equal(out[k], base[k]) for k in out)


def test_switching_between_merged_and_sidecar(comps):
    pristine = pf.snapshot(comps)
    a = mixed(comps, "A", 1)
    with LoraPatcher(comps) as patcher:
        patcher.apply([(a, 1.0)])
        merged = pf.forward_all(comps)
        patcher.configure(SIDECAR)
        stats = patcher.apply([(a, 1.0)])
        assert stats.tensors_restored == stats.tensors_touched > 0  # weights back to pristine, LoRA in forward
        assert pf.mismatches(comps, pristine) == []
        patcher.configure(PatcherSettings())
        patcher.apply([(a, 1.0)])
        assert all(torch.equal(v, merged[k]) for k, v in pf.forward_all(comps).items())
        assert not any(m._forward_hooks for c in comps.values() for m in c.modules())


def test_auto_mode_uses_sidecars_only_where_the_blocker_says(comps):
    pristine = pf.snapshot(comps)
    a = pf.random_lora(comps, "A", 1, n_layers=20)
    marked = comps[a.patches[0].component].get_submodule(a.patches[0].module)
    blocked = {marked}  # what the memory engine would answer for a streamed layer

    def blocker(module):
        return "streamed" if module in blocked else None

    assert blocker(marked) == "streamed"
    with LoraPatcher(comps, PatcherSettings(mode=LoraMode.AUTO), merge_blocker=blocker) as patcher:
        stats = patcher.apply([(a, 1.0)])
        assert stats.sidecars_active == 1 and stats.tensors_touched == len(a.patches) - 1
        name = f"{a.patches[0].module}.weight"
        assert torch.equal(comps[a.patches[0].component].get_parameter(name), pristine[a.patches[0].component][name])
        auto_out = pf.forward_all(comps)
        blocked.clear()
        assert blocker(marked) is None
        patcher.apply([(a, 1.0)])  # now everything merged
        assert patcher.apply([(a, 1.0)]).sidecars_active == 0
        merged_out = pf.forward_all(comps)
    for k in auto_out:
        assert pf.rel_err(auto_out[k], merged_out[k]) < 2e-5


def test_fp8_storage_is_detected():
    lin = nn.Linear(4, 4)
    assert fp8_blocker(lin) is None
    lin.weight.data = lin.weight.data.to(torch.float8_e4m3fn)
    assert fp8_blocker(lin) == "stored in fp8"


def test_grouped_conv_runs_its_lora_as_a_dense_extra_weight():
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=2)
    comps = {"unet": nn.Sequential(conv)}
    gen = torch.Generator().manual_seed(0)
    up, down = torch.randn(4, 2, generator=gen), torch.randn(2, 18, generator=gen)  # [out, r] @ [r, in/g*3*3]
    lora = pf.make_lora("g", [LowRankPatch("unet", "0", up, down, 0.5, (4, 2, 3, 3))])
    x = torch.randn(1, 4, 6, 6, generator=gen)
    with LoraPatcher(comps) as patcher, torch.no_grad():
        patcher.apply([(lora, 1.0)])
        merged = conv(x)
        patcher.configure(SIDECAR)
        patcher.apply([(lora, 1.0)])
        side = conv(x)
    assert pf.rel_err(side, merged) < 1e-5


def test_sidecar_compute_dtype_is_honoured(comps):
    a = pf.random_lora(comps, "A", 1, n_layers=10)
    with LoraPatcher(comps, PatcherSettings(mode=LoraMode.SIDECAR, compute_dtype=torch.bfloat16)) as patcher:
        patcher.apply([(a, 1.0)])
        cars = patcher._sidecars._cars
        assert {c.up.dtype for c in cars.values()} == {torch.bfloat16}
        out = pf.forward_all(comps)
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in out.values())


def test_unsupported_layer_types_are_refused_in_sidecar_mode():
    comps = {"text_encoder": nn.Sequential(nn.Embedding(10, 4))}
    lora = pf.make_lora("emb", [pf.DensePatch("text_encoder", "0", torch.zeros(10, 4))])
    with LoraPatcher(comps, SIDECAR) as patcher, pytest.raises(LoraError, match="Linear and Conv2d"):
        patcher.apply([(lora, 1.0)])


def test_gating_a_lora_off_is_bit_identical_to_the_smaller_stacks_sidecars(comps):
    """A step range in sidecar mode: gated, the fused sidecars run exactly what [B] alone builds."""
    a, b = mixed(comps, "A", 1), pf.random_lora(comps, "B", 2, n_layers=36, rank=8)
    with LoraPatcher(comps, SIDECAR) as patcher:
        patcher.apply([(b, -0.7)])
        only_b = pf.forward_all(comps)
        patcher.clear()
        base = pf.forward_all(comps)
        patcher.apply([(a, 0.9), (b, -0.7)])
        both = pf.forward_all(comps)
        shared = {(p.component, p.module) for p in a.patches}
        changed = patcher.gate([a])
        assert changed == len(shared)  # every sidecar A runs in, and no other
        gated = pf.forward_all(comps)
        assert patcher.gate([a]) == 0  # already closed: nothing to do
        patcher.gate([a, b])
        none = pf.forward_all(comps)
        patcher.gate([])
        reopened = pf.forward_all(comps)
    for k in both:
        assert torch.equal(gated[k], only_b[k]), k
        assert torch.equal(none[k], base[k]), k
        assert torch.equal(reopened[k], both[k]), k
