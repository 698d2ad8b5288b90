"""Property test: any sequence of stack edits, mode/offload toggles, injected failures and forwards
keeps the weights at pristine + sum (exactly, computed the patcher's way), the pristine copies
untouched and unaliased, and gives the same outputs for the same stack after any detour."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
import patch_fixtures as pf  # noqa: E402

from studio.errors import OutOfMemory  # noqa: E402
from studio.choices import LoraMode  # noqa: E402
from studio.lora.patcher import LoraPatcher, PatcherSettings  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def pool():
    """Three LoRAs sharing some layers: low-rank only, mixed with dense+bias and DoRA, high rank."""
    comps = pf.fresh_components()
    return [
        pf.random_lora(comps, "L0", 10, n_layers=16),
        pf.random_lora(comps, "L1", 11, n_layers=16, kinds=("lowrank", "dense", "dora")),
        pf.random_lora(comps, "L2", 10, n_layers=10, rank=8),  # same seed as L0: overlapping layers
    ]


WEIGHTS = st.sampled_from([-1.0, -0.5, 0.0, 0.25, 0.6, 1.0, 1.7])
OPS = st.lists(st.one_of(
    st.tuples(st.just("set"), st.integers(0, 2), WEIGHTS),
    st.tuples(st.just("remove"), st.integers(0, 2)),
    st.just(("clear",)),
    st.just(("toggle_offload",)),
    st.just(("toggle_mode",)),
    st.tuples(st.just("fail"), st.integers(0, 3), st.sampled_from(["runtime", "oom"])),
    st.just(("forward",)),
), min_size=1, max_size=12)


def is_placeholder(t: torch.Tensor) -> bool:
    return t.numel() > 1 and 0 in t.stride() and bool(torch.isnan(t).all())


def check_weights(comps, pristine, stack, mode) -> None:
    expected = pf.expected_state(pristine, stack if mode is LoraMode.MERGED else [])
    for comp, sd in pf.state_of(comps).items():
        for name, live in sd.items():
            if is_placeholder(live):  # dropped by the offload path: only ever when clean
                assert torch.equal(expected[comp][name], pristine[comp][name]), f"{comp}.{name} dropped while patched"
            else:
                assert torch.equal(live, expected[comp][name]), f"{comp}.{name}"


def check_pristine(comps, patcher, pristine) -> None:
    for (comp, module, attr), slot in patcher._slots.items():
        name = f"{module}.{attr}"
        assert torch.equal(slot.pristine, pristine[comp][name])
        live = comps[comp].get_parameter(name)
        assert slot.pristine.untyped_storage().data_ptr() != live.untyped_storage().data_ptr()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_any_sequence_keeps_weights_exact(pool, ops):
    comps = pf.fresh_components()
    pristine = pf.snapshot(comps)
    stack: list[list] = []  # [pool index, weight], in stack order
    mode, offload = LoraMode.MERGED, False
    outputs: dict[tuple, dict[str, torch.Tensor]] = {}
    patcher = LoraPatcher(comps)
    try:
        for op in ops:
            as_files = [(pool[i], w) for i, w in stack]
            if op[0] == "set":
                hit = [s for s in stack if s[0] == op[1]]
                if hit:
                    hit[0][1] = op[2]
                else:
                    stack.append([op[1], op[2]])
            elif op[0] == "remove":
                stack = [s for s in stack if s[0] != op[1]]
            elif op[0] == "clear":
                stack = []
            elif op[0] == "toggle_offload":
                offload = not offload
            elif op[0] == "toggle_mode":
                mode = LoraMode.SIDECAR if mode is LoraMode.MERGED else LoraMode.MERGED
            elif op[0] == "fail":
                # a layer some LoRA of the pool also touches, reached after others were rewritten
                target = pool[op[1] % 3].patches[-1]
                error = RuntimeError("injected") if op[2] == "runtime" else torch.cuda.OutOfMemoryError("injected")
                bad = pf.make_lora("bad", [pf.FailingPatch(target.component, target.module, error)])
                # the failing stack also moves every weight and adds the whole pool, so many
                # tensors are rewritten before the failing layer is reached, and must be put back
                moved = [(lo, w * 0.5 + 0.1) for lo, w in as_files]
                moved += [(lo, 0.3) for lo in pool if all(lo is not f for f, _ in as_files)]
                patcher.configure(PatcherSettings(mode=mode, unpatch_lora_by_vram_offload=offload))
                before = pf.forward_all(comps)
                with pytest.raises((RuntimeError, OutOfMemory)):  # a bug keeps its type; OOM becomes OutOfMemory
                    patcher.apply(moved[:op[1]] + [(bad, 1.0)] + moved[op[1]:])
                check_weights(comps, pristine, as_files, mode)
                after = pf.forward_all(comps)  # sidecars were rolled back too
                assert all(torch.equal(after[k], before[k]) for k in after)
                continue
            elif op[0] == "forward":
                out = pf.forward_all(comps)
                key = (mode, tuple((i, w) for i, w in stack if w != 0.0))
                if key in outputs:
                    assert all(torch.equal(out[k], outputs[key][k]) for k in out), "same stack, other output"
                outputs[key] = out
                check_weights(comps, pristine, as_files, mode)
                assert not any(is_placeholder(t) for sd in pf.state_of(comps).values() for t in sd.values())
                continue
            patcher.configure(PatcherSettings(mode=mode, unpatch_lora_by_vram_offload=offload))
            as_files = [(pool[i], w) for i, w in stack]
            patcher.apply(as_files)
            check_weights(comps, pristine, as_files, mode)
            check_pristine(comps, patcher, pristine)
            again = patcher.apply(as_files)
            assert again.tensors_touched == 0 and again.sidecars_changed == 0
        patcher.clear()
        patcher.materialize()
        assert pf.mismatches(comps, pristine) == []  # after clear: bit-identical
        check_pristine(comps, patcher, pristine)
    finally:
        patcher.close()
    assert pf.mismatches(comps, pristine) == []
