"""The math of one merged tensor: `pristine + sum(w_i * delta_i)`, accumulated in fp32, rounded once.

The patcher decides which tensors change and keeps the model consistent; this module computes
the new value of one tensor and checks, before any write, that a patch fits its layer.
- All low-rank LoRAs of a layer are ONE addmm (ranks concatenated, user weights folded into
  `up`, no dense per-LoRA delta).
- Other patches (LoHa, LoKr, full, DoRA) add `delta(pristine_fp32)`: always the pristine base,
  so the result does not depend on stack order (InvokeAI feeds the already patched weight to
  later DoRAs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from studio.errors import LoraError
from studio.lora.base import LayerPatch, LoraFile, LowRankPatch
from studio.lora.formats.common import all_finite
from studio.lora.sidecar import Entry

# CPU merges run in row blocks of about this many fp32 bytes, so the accumulator stays in cache: one
# full-size fp32 temporary costs ~20 bytes of memory traffic per weight, blocks ~4 (read the bf16
# base, write the result). Measured on 2 EPYC cores, SDXL ff.net.0.proj (10240x1280, rank 64):
# 47 -> 12 ms; SDXL-scale 2-LoRA apply ~3x faster (bench/lora_switch.py). 4 MB rather than 1 MB:
# 1 MB blocks of the 5120-wide layers are 64 rows, too short for the GEMM; SDXL-scale 2-LoRA apply,
# 5 interleaved runs: 1 MB median 5.08 s (min 3.70), 4 MB 3.91 s (min 3.18), whole layers 4.68 s.
CPU_ROW_BLOCK_BYTES = 4 << 20

Upload = Callable[[torch.Tensor], torch.Tensor]  # a host tensor as used on the target device
LowRank = list[tuple[float, tuple[torch.Tensor, torch.Tensor]]]


def split_entries(entries: Sequence[Entry]) -> tuple[LowRank, list[tuple[float, LayerPatch]]]:
    """(weight, (up, down)) of the low-rank patches, and (weight, patch) of those with a dense delta."""
    lowrank: LowRank = []
    dense: list[tuple[float, LayerPatch]] = []
    for _lora, w, patch in entries:
        f = None if patch.depends_on_base else patch.factors()
        if f is None:
            dense.append((w, patch))
        else:
            lowrank.append((w, f))
    return lowrank, dense


def concat_factors(lowrank: LowRank) -> tuple[torch.Tensor, torch.Tensor]:
    """One (up, down) pair for all of them: `up @ down == sum(w * up_i @ down_i)`."""
    return torch.cat([f[0] * w for w, f in lowrank], 1), torch.cat([f[1] for _, f in lowrank], 0)


def concat_entries(entries: Sequence[Entry]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`concat_factors(split_entries(entries)[0])` for plain LowRankPatch entries, written in place.

    The same fp32 values bit for bit (convert, times the file scale, times the user weight, in
    that order), but into two preallocated buffers: 4 kernels per LoRA instead of 6 kernels and
    6 temporaries per layer pair. None when some entry is another kind of patch.
    """
    if not entries or any(type(p) is not LowRankPatch for _, _, p in entries):
        return None
    rows, cols = entries[0][2].up.shape[0], entries[0][2].down.shape[1]
    rank = sum(p.up.shape[1] for _, _, p in entries)
    up = torch.empty((rows, rank), dtype=torch.float32, device=entries[0][2].up.device)
    down = torch.empty((rank, cols), dtype=torch.float32, device=entries[0][2].down.device)
    r0 = 0
    for _lora, w, patch in entries:
        r1 = r0 + patch.up.shape[1]
        part = up[:, r0:r1]
        part.copy_(patch.up)
        part.mul_(patch.scale)  # = LowRankPatch.factors(): up.float() * scale
        part.mul_(w)  # = concat_factors: f[0] * w
        down[r0:r1].copy_(patch.down)
        r0 = r1
    return up, down


def merged_value(base: torch.Tensor, attr: str, entries: Sequence[Entry], upload: Upload,
                 host_pristine: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """(base + sum(w * delta) in fp32 as a NEW [rows, -1] tensor, had dense parts).

    `base` is the pristine value on the target device (it may alias pristine or the live tensor:
    it is only read); `host_pristine` gives it in RAM, where dense deltas are made.
    """
    base = base.float().reshape(base.shape[0], -1)
    if attr == "bias":
        acc = base.clone()
        for _lora, w, patch in entries:
            acc.add_(upload(patch.bias_delta.float()).reshape(acc.shape), alpha=w)
        return acc, False
    fast = concat_entries(entries)
    lowrank, dense = ([], []) if fast else split_entries(entries)
    if fast or lowrank:  # one kernel for every low-rank LoRA of the layer
        up, down = fast or concat_factors(lowrank)
        acc = torch.addmm(base, upload(up), upload(down))
    else:
        acc = base.clone()
    for w, patch in dense:
        # Patch tensors live in CPU RAM (LayerPatch has no `.to`), so these deltas are made there.
        d = patch.delta(host_pristine().float()).float()
        if d.numel() != acc.numel():
            raise LoraError(f"layer {patch.module}: the delta has {d.numel()} values, the weight {acc.numel()}")
        acc.add_(upload(d.reshape(acc.shape)), alpha=w)
    return acc, bool(dense)


def merge_rows_cpu(param: nn.Parameter, base: torch.Tensor, entries: Sequence[Entry], out_of_place: bool) -> bool:
    """`merged_value` + the write for big low-rank-only CPU weights, in cache-sized row blocks.

    Same math (fp32 addmm of the concatenated factors onto the base, one rounding), block by
    block straight into the destination, so no full-size fp32 temporary exists. False: not
    applicable (GPU, small, or a dense patch), nothing written. `base` may be the live tensor
    itself: each block's rows are read before they are written.
    """
    if param.device.type != "cpu" or not param.is_contiguous():
        return False
    rows, cols = base.shape[0], base.numel() // max(base.shape[0], 1)
    # Whole multiples of 64 rows: BLAS then runs the same micro-kernels on every row as one
    # big addmm would (blocks of 1, 2 or 7 rows take other kernels and differ in the last bit).
    step = max(1, CPU_ROW_BLOCK_BYTES // (4 * max(cols, 1)) // 64) * 64
    if rows <= step:
        return False  # one block: the plain path is the same work
    factors = concat_entries(entries)
    if factors is None:
        lowrank, dense = split_entries(entries)
        if dense:
            return False
        factors = concat_factors(lowrank)
    up, down = factors
    base = base.reshape(rows, cols)
    dest = torch.empty(param.shape, dtype=param.dtype) if out_of_place else param.detach()
    out = dest.view(rows, cols)
    # fp32 weights: accumulate in the destination rows themselves (the same addmm on the same
    # values, one copy fewer); other dtypes through an fp32 scratch block, rounded once on the way out
    direct = dest.dtype == torch.float32
    scratch = None if direct else torch.empty((step, cols), dtype=torch.float32)
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        acc = out[r0:r0 + n] if direct else scratch[:n]
        if acc.data_ptr() != base[r0:r0 + n].data_ptr():
            acc.copy_(base[r0:r0 + n])
        acc.addmm_(up[r0:r0 + n], down)
        if not direct:
            out[r0:r0 + n].copy_(acc)  # the one rounding to the weight dtype
    if out_of_place:
        param.data = dest  # the old live tensor is dropped, never made "clean" again
    return True


def check_patch(lora: LoraFile, patch: LayerPatch, module: nn.Module, finite: bool = True) -> None:
    """Shapes against the module and (unless `finite` is False: see `check_finite`) finite values;
    once per LoRA object (cheap to repeat stacks)."""
    shape = tuple(module.weight.shape)
    want = getattr(patch, "weight_shape", None)
    # factors() converts to fp32: only for a patch that does not state its shape
    factors = patch.factors() if want is None else None
    if want is not None and tuple(want) != shape:
        bad = list(want)
    elif factors is not None and (factors[0].shape[0] != shape[0] or factors[1].shape[1] != math.prod(shape[1:])
                                  or factors[0].shape[1] != factors[1].shape[0]):
        bad = [factors[0].shape[0], factors[1].shape[1]]
    else:
        bad = None
    if bad is not None:
        raise LoraError(f"{lora.name}: layer {patch.module} has weight shape {list(shape)}, the file expects "
                        f"{bad}; is the file for another base model?")
    if patch.bias_delta is not None:
        bias = getattr(module, "bias", None)
        if bias is None or tuple(bias.shape) != tuple(patch.bias_delta.shape):
            raise LoraError(f"{lora.name}: layer {patch.module}: bias change of shape {list(patch.bias_delta.shape)} "
                            f"does not fit its bias {None if bias is None else list(bias.shape)}")
    if finite:
        check_finite(lora, [patch])


def _tensors(patch: LayerPatch) -> list[torch.Tensor]:
    return patch.tensors() + ([patch.bias_delta] if patch.bias_delta is not None else [])


def check_finite(lora: LoraFile, patches: Sequence[LayerPatch]) -> None:
    """NaN/inf anywhere in `patches` is a LoraError naming the first such layer (all checked at once:
    one min/max per dtype, see `all_finite`, instead of two ops per tensor)."""
    if all_finite(t for patch in patches for t in _tensors(patch)):
        return
    for patch in patches:
        if not all(bool(torch.isfinite(t).all()) for t in _tensors(patch)):
            raise LoraError(f"{lora.name}: layer {patch.module} holds NaN or inf values; the file is damaged")
