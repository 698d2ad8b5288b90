"""The value of one merged tensor: the row-blocked CPU path equals one addmm bit for bit, and both
equal the fp32 sum rounded once; patches that do not fit are refused before any write."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import studio.lora.merge as merge
from studio.errors import LoraError
from studio.lora.base import LoraFile, LowRankPatch
from studio.lora.merge import check_patch, merge_rows_cpu, merged_value


def _entry(seed: int, rows: int, cols: int, rank: int, weight: float) -> tuple:
    g = torch.Generator().manual_seed(seed)
    up = (torch.randn(rows, rank, generator=g) * 0.05).bfloat16()
    down = (torch.randn(rank, cols, generator=g) * 0.05).bfloat16()
    patch = LowRankPatch("unet", "ff", up, down, 0.5, (rows, cols))
    lora = LoraFile(Path(f"l{seed}.safetensors"), f"l{seed}", "kohya", "sdxl", "0" * 12, patches=[patch])
    return lora, weight, patch


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(merge, "CPU_ROW_BLOCK_BYTES", 64 * 4 * 96)  # 64-row blocks of a 96-wide weight
    return 64


@pytest.mark.parametrize("out_of_place", [False, True])
def test_row_blocks_equal_one_addmm_and_the_once_rounded_sum(small_blocks, out_of_place):
    rows, cols = 64 * 3 + 40, 96  # three whole blocks and a short last one
    pristine = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)).bfloat16()
    entries = [_entry(1, rows, cols, 8, 0.8), _entry(2, rows, cols, 4, -0.6)]
    param = nn.Parameter(pristine.clone(), requires_grad=False)
    before = param.data_ptr()
    assert merge_rows_cpu(param, param.detach(), entries, out_of_place)  # the live tensor as its own base
    assert (param.data_ptr() != before) == out_of_place and not torch.equal(param.data, pristine)
    one_addmm, had_dense = merged_value(pristine, "weight", entries, lambda t: t, lambda: pristine)
    assert not had_dense and torch.equal(param.data, one_addmm.to(torch.bfloat16))
    exact = pristine.double() + sum(w * p.scale * (p.up.double() @ p.down.double()) for _, w, p in entries)
    once = exact.to(torch.bfloat16)  # the float64 sum rounded once; fp32 accumulation may miss it by 1 ulp
    assert (param.data != once).float().mean() < 0.01
    assert ((param.data.float() - once.float()).abs() <= once.float().abs() * 2 ** -7).all()


def _one_fp32_addmm(base: torch.Tensor, entries: list) -> torch.Tensor:
    """The merge as written before the in-place factor buffers: factors(), times w, cat, one addmm."""
    up = torch.cat([p.up.float() * p.scale * w for _, w, p in entries], 1)
    down = torch.cat([p.down.float() for _, _, p in entries], 0)
    return torch.addmm(base.float().reshape(base.shape[0], -1), up, down)


@pytest.mark.parametrize("factor_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_in_place_factor_buffers_equal_factors_times_weight_bit_for_bit(factor_dtype):
    entries = [_entry(1, 40, 24, 8, 0.8), _entry(2, 40, 24, 4, -0.6), _entry(3, 40, 24, 2, 1.3)]
    for _, _, p in entries:
        p.up, p.down = p.up.to(factor_dtype), p.down.to(factor_dtype)
    up, down = merge.concat_entries(entries)
    lowrank, _ = merge.split_entries(entries)
    want_up, want_down = merge.concat_factors(lowrank)
    assert torch.equal(up, want_up) and torch.equal(down, want_down)
    assert merge.concat_entries([]) is None


@pytest.mark.parametrize("own_base", [True, False])
@pytest.mark.parametrize("out_of_place", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_row_blocks_in_the_destination_equal_one_addmm_bit_for_bit(small_blocks, dtype, out_of_place, own_base):
    """fp32 weights accumulate in their own rows (no scratch); bf16 through the fp32 scratch block."""
    rows, cols = 64 * 3 + 40, 96
    pristine = torch.randn(rows, cols, generator=torch.Generator().manual_seed(5)).to(dtype)
    entries = [_entry(1, rows, cols, 8, 0.8), _entry(2, rows, cols, 4, -0.6)]
    param = nn.Parameter(pristine.clone(), requires_grad=False)
    base = param.detach() if own_base else pristine
    assert merge_rows_cpu(param, base, entries, out_of_place)
    assert torch.equal(param.data, _one_fp32_addmm(pristine, entries).to(dtype))
    assert torch.equal(pristine, torch.randn(rows, cols, generator=torch.Generator().manual_seed(5)).to(dtype))
    value, _ = merged_value(pristine, "weight", entries, lambda t: t, lambda: pristine)
    assert torch.equal(value, _one_fp32_addmm(pristine, entries))  # the plain path: the same numbers


def test_small_weights_and_dense_patches_take_the_plain_path(small_blocks):
    class Dense(LowRankPatch):
        depends_on_base = True

    pristine = torch.randn(64, 96).bfloat16()
    param = nn.Parameter(pristine.clone(), requires_grad=False)
    assert not merge_rows_cpu(param, pristine, [_entry(1, 64, 96, 4, 1.0)], False)  # one block: nothing gained
    big = nn.Parameter(torch.randn(200, 96).bfloat16(), requires_grad=False)
    lora, w, p = _entry(1, 200, 96, 4, 1.0)
    dense = Dense(p.component, p.module, p.up, p.down, p.scale, p.weight_shape)
    assert not merge_rows_cpu(big, big.detach(), [(lora, w, dense)], False)
    assert torch.equal(param.data, pristine)  # nothing written when refused


def test_a_bias_change_adds_its_weighted_delta():
    lora, _, patch = _entry(1, 8, 4, 2, 1.0)
    patch.bias_delta = torch.full((8,), 0.25)
    value, _ = merged_value(torch.ones(8), "bias", [(lora, 2.0, patch)], lambda t: t, lambda: torch.ones(8))
    assert torch.equal(value.reshape(8), torch.full((8,), 1.5))


@pytest.mark.parametrize(("change", "message"), [
    ({"up": torch.zeros(9, 2)}, "has weight shape [8, 4], the file expects"),
    ({"down": torch.full((2, 4), float("nan"))}, "holds NaN or inf values"),
])
def test_patches_that_do_not_fit_are_refused_by_name(change, message):
    lora, _, patch = _entry(1, 8, 4, 2, 1.0)
    for attr, value in change.items():
        setattr(patch, attr, value)
    patch.weight_shape = (patch.up.shape[0], 4)
    with pytest.raises(LoraError, match=re.escape(message)):
        check_patch(lora, patch, nn.Linear(4, 8))


def test_a_whole_file_is_checked_for_nan_at_once_and_the_bad_layer_named():
    patches = []
    for i in range(5):
        _, _, patch = _entry(i, 8, 4, 2, 1.0)
        patch.module = f"layer{i}"
        patches.append(patch)
    lora = LoraFile(Path("l.safetensors"), "l", "kohya", "sdxl", "0" * 12, patches=patches)
    merge.check_finite(lora, patches)  # all finite: no error
    patches[3].down = patches[3].down.clone()
    patches[3].down[1, 2] = float("inf")
    with pytest.raises(LoraError, match=re.escape("layer layer3 holds NaN or inf values")):
        merge.check_finite(lora, patches)
