"""Bring a model's weights to the state a LoRA stack asks for, touching only what changes.

Rules (DESIGN.md 4), each learned from a peer's bug:
- Merged weight = `pristine + sum(w_i * delta_i)`, accumulated in fp32 from the pristine tensor
  and rounded once; restore is a copy from pristine. Never subtract: diffusers' `unfuse_lora`
  drifts by 4.9e-3 in bf16 after 40 switches (research/diffusers.md 0.1).
- The value of one merged tensor (one addmm for all low-rank LoRAs of a layer) is
  `studio.lora.merge`'s; this module decides which tensors change and keeps them consistent.
- Pristine copies live in CPU RAM (pinned for CUDA), snapshotted on first touch, and never
  alias the live tensor: InvokeAI #6559 patched its "read-only" copy in place on CPU.
- Per tensor, the ordered (lora, weight) pairs applied are kept: the same stack again does
  nothing, a moved slider recomputes only that LoRA's tensors. A stack weight may be a float or
  per-layer weights (`of(patch) -> float`, LoRA Block Weight's `LayerWeights`): each layer's entry
  then carries its own weight, so moving one block recomputes only that block's tensors.
- Transactional: everything is checked before any write; a failure half way rewrites each
  tensor the call touched to its previous state (from pristine, so bit-exact) and is raised
  as OutOfMemory when memory ran out, else as itself (a bug keeps its traceback).
- `unpatch_lora_by_vram_offload` (InvokeAI PR #6439 review, "Option 2"): drop the live tensor
  instead of copying pristine into it, and reload from pristine right before the next forward.
  The dropped tensor is an expanded NaN scalar (right shape, dtype, device; no memory; writes
  raise), so a patched copy can never pass for a clean one.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from types import TracebackType
from typing import Protocol, Union

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from studio.choices import LoraMode
from studio.dtypes import FP8_DTYPES
from studio.errors import LoraError, OutOfMemory, StudioError
from studio.lora.base import LayerPatch, LoraFile
from studio.lora.merge import check_finite, check_patch, merge_rows_cpu, merged_value
from studio.lora.sidecar import (Entry, MergeBlocker, SidecarSet, check_sidecar_module, compute_dtype_for,
                                 fp8_blocker)

log = logging.getLogger(__name__)

class PerLayer(Protocol):
    """Weights that differ by layer (block weights); equal objects give equal weights everywhere."""

    def of(self, patch: LayerPatch) -> float: ...


Weight = Union[float, PerLayer]
Stack = Sequence[tuple[LoraFile, Weight]]
SlotKey = tuple[str, str, str]  # (component, module path, "weight" | "bias")
Signature = tuple[tuple[int, float], ...]


class UnpatchPath(StrEnum):
    NONE = "none"  # nothing was taken off
    RESTORE = "restore_in_place"  # copy pristine RAM -> live tensor
    OFFLOAD = "drop_and_reload"  # drop the live tensor; reload pristine before the next forward


@dataclass(frozen=True)
class PatcherSettings:
    mode: LoraMode = LoraMode.MERGED
    unpatch_lora_by_vram_offload: bool = False
    compute_dtype: torch.dtype | None = None  # sidecar math; None: the weight dtype (bf16 for fp8)


@dataclass
class PatchStats:
    """What one apply (or one lazy reload) did and what it cost; goes into the report."""

    tensors_touched: int = 0  # written: patched, restored, dropped or reloaded
    tensors_skipped: int = 0  # already in the asked state
    tensors_restored: int = 0  # taken back to pristine (copied or dropped)
    tensors_snapshotted: int = 0  # first touch: pristine copied to RAM
    sidecars_changed: int = 0
    sidecars_active: int = 0
    bytes_snapshotted: int = 0
    bytes_uploaded: int = 0  # host -> device (pristine and factors); 0 on CPU
    bytes_written: int = 0  # into live weights
    seconds: float = 0.0
    unpatch_path: UnpatchPath = UnpatchPath.NONE

    @property
    def bytes_moved(self) -> int:
        return self.bytes_snapshotted + self.bytes_uploaded + self.bytes_written


@dataclass
class _Slot:
    """One parameter the patcher has touched."""

    module: nn.Module
    attr: str
    pristine: torch.Tensor  # CPU, never written after the snapshot
    entries: list[Entry] = field(default_factory=list)  # what is applied (holds those LoraFiles alive)
    dropped: bool = False  # live data is the NaN placeholder
    copied: torch.cuda.Event | None = None  # pending device->host snapshot copy
    stamp: tuple[int, str, int] | None = None  # live tensor after our last write: spots foreign writes

    def host_pristine(self) -> torch.Tensor:
        """Pristine for reading on the host: waits for its own snapshot copy, nothing else."""
        if self.copied is not None:
            self.copied.synchronize()
            self.copied = None
        return self.pristine

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.module, self.attr)

    @property
    def sig(self) -> Signature | None:
        """What is applied, or None when someone else replaced or wrote the tensor since."""
        return _sig(self.entries) if self.stamp == _stamp(self.param) else None


def _sig(entries: Sequence[Entry]) -> Signature:
    return tuple((id(lora), w) for lora, w, _ in entries)


def _stamp(t: torch.Tensor) -> tuple[int, str, int]:
    return (t.data_ptr(), str(t.device), t._version)


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class LoraPatcher:
    """Owns the LoRA state of some pipeline components; `apply(stack)` moves it, `close()` ends it.

    `components` maps "unet"/"text_encoder"/"text_encoder_2" to modules. `pristine_source`
    (optional) returns the model cache's read-only RAM copy of a parameter ("mod.path.weight"),
    so RAM is not spent twice; without it each tensor is snapshotted on first touch.
    `merge_blocker` says which layers auto mode must run as sidecars (default: fp8 weights).
    """

    def __init__(self, components: Mapping[str, nn.Module], settings: PatcherSettings = PatcherSettings(), *,
                 pristine_source: Callable[[str, str], torch.Tensor | None] | None = None,
                 merge_blocker: MergeBlocker = fp8_blocker, partial: bool = False):
        self.components = dict(components)
        # partial: patches for other components belong to another patcher (one per memory phase,
        # so each applies while its component is locked on the device) and are skipped here.
        self._partial = partial
        self.settings = settings
        self._pristine_source = pristine_source
        self._merge_blocker = merge_blocker
        self._slots: dict[SlotKey, _Slot] = {}
        self._sidecars = SidecarSet()
        self._modules: dict[tuple[str, str], nn.Module] = {}
        self._checked: weakref.WeakValueDictionary[int, LoraFile] = weakref.WeakValueDictionary()
        self._reload_hooks: dict[str, RemovableHandle] = {}
        self._lock = threading.RLock()
        self._closed = False
        self.applied: list[tuple[LoraFile, float]] = []
        self._applied_mode: LoraMode | None = None  # settings.mode of the last successful apply
        self.last_reload = PatchStats(unpatch_path=UnpatchPath.OFFLOAD)  # lazy reloads since the last apply

    # -- public API ------------------------------------------------------------------------
    def configure(self, settings: PatcherSettings) -> None:
        """New settings take effect at the next apply; no weight is touched here."""
        self.settings = settings

    def apply(self, stack: Stack) -> PatchStats:
        """Make the weights equal `pristine + sum(w * delta)` for `stack`; says what it did."""
        with self._lock, torch.no_grad():
            if self._closed:
                raise RuntimeError("LoraPatcher used after close()")
            t0 = time.perf_counter()
            stats = PatchStats()
            try:
                stack = [(lora, _weight(w)) for lora, w in stack]
                unchanged = self._unchanged(stack)
                if not unchanged:
                    merged, sidecar = self._plan(stack)
            except BaseException as err:
                _reraise(err)
            self.last_reload = PatchStats(unpatch_path=UnpatchPath.OFFLOAD)
            if unchanged:
                stats.tensors_skipped = len(self._slots)
            else:
                self._transition(merged, sidecar, stats)
                self.applied = [(lora, w) for lora, w in stack if w != 0.0]
                self._applied_mode = LoraMode(self.settings.mode)
            stats.sidecars_active = len(self._sidecars)
            stats.seconds = time.perf_counter() - t0
            log.debug("LoRA apply: %s", stats)
            return stats

    def gate(self, closed: Sequence[LoraFile]) -> int:
        """Sidecar LoRAs in `closed` stop contributing (until the next gate); no weight is touched.

        A step range in sidecar mode: switching at a step boundary costs no re-merge and no upload
        after the first time. Returns how many sidecars changed.
        """
        with self._lock:
            return self._sidecars.gate(frozenset(id(lora) for lora in closed))

    def clear(self) -> PatchStats:
        """Take every LoRA off (weights bit-identical to pristine, or dropped for reload)."""
        return self.apply([])

    def materialize(self) -> PatchStats:
        """Reload dropped weights now: call before reading or moving weights outside forward."""
        with self._lock, torch.no_grad():
            for component in list(self._reload_hooks):
                self._reload(component)
            return self.last_reload

    def pristine(self, component: str, param: str) -> torch.Tensor | None:
        """The pristine RAM copy of `component`'s parameter `param` ("mod.path.weight"), if touched."""
        module, _, attr = param.rpartition(".")
        slot = self._slots.get((component, module, attr))
        return slot.host_pristine() if slot else None

    def close(self) -> None:
        """Leave the model clean and whole (pristine weights, no hooks) and free the copies."""
        with self._lock:
            if self._closed:
                return
            try:
                self.configure(replace(self.settings, unpatch_lora_by_vram_offload=False))
                self.apply([])
            finally:
                try:
                    self.materialize()
                finally:
                    self._sidecars.clear()
                    for handle in self._reload_hooks.values():
                        handle.remove()
                    self._reload_hooks.clear()
                    self._slots.clear()
                    self.applied = []
                    self._closed = True

    def __enter__(self) -> LoraPatcher:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _unchanged(self, stack: list[tuple[LoraFile, Weight]]) -> bool:
        """The same non-empty stack again in merged mode, and nobody wrote a weight since: nothing to do.

        The common "generate again" case; skips `_plan` (per-layer lookups for every LoRA), so only
        one stamp per tensor is read. Measured, 2 LoRAs x 986 SDXL layers: 5.9 -> ~1.5 ms. Not in
        auto/sidecar mode, where the memory engine may have re-marked layers since.
        """
        if self.settings.mode != LoraMode.MERGED or self._applied_mode != LoraMode.MERGED or len(self._sidecars):
            return False
        live = [(lora, w) for lora, w in stack if w != 0.0]
        if not live or len(live) != len(self.applied):
            return False
        if any(a is not b or v != u for (a, v), (b, u) in zip(live, self.applied)):
            return False
        return all(slot.stamp == _stamp(slot.param) for slot in self._slots.values())

    # -- planning: checks everything, writes nothing -------------------------------------------
    def _plan(self, stack: list[tuple[LoraFile, Weight]]) -> tuple[dict[SlotKey, list[Entry]],
                                                                    dict[tuple[str, str], list[Entry]]]:
        merged: dict[SlotKey, list[Entry]] = {}
        sidecar: dict[tuple[str, str], list[Entry]] = {}
        mode = LoraMode(self.settings.mode)
        for lora, w in stack:
            if not isinstance(lora, LoraFile):
                raise LoraError(f"a LoRA stack holds (LoraFile, weight) pairs, got {type(lora).__name__}")
            if isinstance(w, float) and not math.isfinite(w):
                raise LoraError(f"{lora.name}: `weight` must be a finite number, got {w}")
            if w == 0.0:
                continue  # the same as absent: nothing to compute, nothing to keep
            checked = self._checked.get(id(lora)) is lora
            mine = [p for p in lora.patches if not (self._partial and p.component not in self.components)]
            if not checked:
                for patch in mine:
                    check_patch(lora, patch, self._module(lora, patch.component, patch.module), finite=False)
                check_finite(lora, mine)  # all of the file at once: one min/max per dtype
            for patch in mine:
                module = self._module(lora, patch.component, patch.module)
                pw = w if isinstance(w, float) else float(w.of(patch))
                if pw == 0.0:
                    continue  # a block at 0: this layer as without the LoRA
                if not math.isfinite(pw):
                    raise LoraError(f"{lora.name}: layer {patch.module} gets the weight {pw}, not a finite number")
                entry = (lora, pw, patch)
                if mode is LoraMode.SIDECAR or (mode is LoraMode.AUTO and self._merge_blocker(module)):
                    check_sidecar_module(lora, patch.module, module)
                    sidecar.setdefault((patch.component, patch.module), []).append(entry)
                    continue
                if module.weight.dtype in FP8_DTYPES:
                    raise LoraError(f"{lora.name}: layer {patch.module} stores float8 weights, which cannot hold a "
                                    "merged LoRA; use the sidecar or auto LoRA mode")
                merged.setdefault((patch.component, patch.module, "weight"), []).append(entry)
                if patch.bias_delta is not None:
                    merged.setdefault((patch.component, patch.module, "bias"), []).append(entry)
            self._checked[id(lora)] = lora
        return merged, sidecar

    def _module(self, lora: LoraFile, component: str, name: str) -> nn.Module:
        module = self._modules.get((component, name))
        if module is not None:
            return module
        root = self.components.get(component)
        if root is None:
            raise LoraError(f"{lora.name}: targets {component!r}, which this model does not have "
                            f"(it has {sorted(self.components)})")
        try:
            module = root.get_submodule(name)
        except AttributeError as err:
            raise LoraError(f"{lora.name}: {component} has no layer {name!r}; is the file for another base "
                            "model?") from err
        if not isinstance(getattr(module, "weight", None), torch.Tensor):
            raise LoraError(f"{lora.name}: layer {name} of {component} has no weight to patch")
        self._modules[(component, name)] = module
        return module

    # -- the transition: journaled writes ------------------------------------------------------------
    def _transition(self, merged: dict[SlotKey, list[Entry]], sidecar: dict[tuple[str, str], list[Entry]],
                    stats: PatchStats) -> None:
        offload = self.settings.unpatch_lora_by_vram_offload
        journal: list[tuple[SlotKey, list[Entry], bool]] = []
        car_journal: list[tuple[tuple[str, str], list[Entry]]] = []
        checks: list[tuple[SlotKey, torch.Tensor]] = []
        try:
            for key in list(dict.fromkeys([*self._slots, *merged])):
                entries = merged.get(key, [])
                slot = self._slots.get(key)
                if slot is not None and slot.sig == _sig(entries):
                    stats.tensors_skipped += 1
                    continue
                slot = slot or self._snapshot(key, stats)
                journal.append((key, slot.entries, slot.dropped))
                flag = self._write(key, slot, entries, offload, stats)
                if flag is not None:
                    checks.append((key, flag))
            for key in list(dict.fromkeys([*self._sidecars.keys(), *sidecar])):
                entries, old = sidecar.get(key, []), self._sidecars.entries(key)
                dtype = compute_dtype_for(self._modules[key], self.settings.compute_dtype)
                if _sig(old) == _sig(entries) and self._sidecars.dtype(key) in (None, dtype):
                    continue
                car_journal.append((key, old))
                self._set_sidecar(key, entries)
                stats.sidecars_changed += 1
            self._check_finite(checks)
            if (journal or car_journal) and torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()  # one wait per apply: honest `seconds`, host-readable snapshots
        except BaseException as err:
            self._rollback(journal, car_journal)
            _reraise(err)

    def _snapshot(self, key: SlotKey, stats: PatchStats) -> _Slot:
        module = self._modules[key[:2]]
        live = getattr(module, key[2])
        source = self._pristine_source(key[0], f"{key[1]}.{key[2]}") if self._pristine_source else None
        if source is None or source.shape != live.shape or source.dtype != live.dtype or _shares_memory(source, live):
            # Never `live.to("cpu")`: on CPU that returns the live tensor itself (InvokeAI #6559).
            pin = live.device.type == "cuda"
            source = torch.empty(live.shape, dtype=live.dtype, pin_memory=pin)
            source.copy_(live.detach(), non_blocking=pin)  # stream-ordered before our writes
            stats.tensors_snapshotted += 1
            stats.bytes_snapshotted += _nbytes(source)
        slot = self._slots[key] = _Slot(module, key[2], source, stamp=_stamp(live))
        if live.device.type == "cuda":
            slot.copied = torch.cuda.Event()
            slot.copied.record()
        return slot

    def _upload(self, t: torch.Tensor, device: torch.device, stats: PatchStats) -> torch.Tensor:
        if device.type == "cpu":
            return t
        stats.bytes_uploaded += _nbytes(t)
        src = t if t.is_pinned() else t.pin_memory()  # pinned, so the copy does not block the host
        return src.to(device, non_blocking=True)

    def _base(self, slot: _Slot, device: torch.device, stats: PatchStats) -> torch.Tensor:
        """Pristine on `device` to merge onto (read only): the live tensor itself while it is clean."""
        if not slot.entries and not slot.dropped and slot.stamp == _stamp(slot.param):
            return slot.param.detach()  # bit-identical to pristine and already on the device
        return self._upload(slot.pristine, device, stats)

    def _write(self, key: SlotKey, slot: _Slot, entries: list[Entry], offload: bool,
               stats: PatchStats) -> torch.Tensor | None:
        """Bring one tensor to `entries`; returns a device-side "not finite" flag when one is needed."""
        param = slot.param
        flag = None
        if not entries and offload:
            # 0-dim NaN expanded: right shape/dtype/device for `.device`/`.dtype` queries, no memory,
            # in-place writes raise, and a forward that skipped the reload gives NaN, never "clean".
            param.data = torch.full((), math.nan, dtype=param.dtype, device=param.device).expand(param.shape)
            slot.dropped = True
            if key[0] not in self._reload_hooks:
                self._reload_hooks[key[0]] = self.components[key[0]].register_forward_pre_hook(
                    lambda _m, _a, c=key[0]: self._reload(c))
            stats.unpatch_path = UnpatchPath.OFFLOAD
        elif not entries:
            if slot.dropped or _shares_memory(param, slot.pristine):
                param.data = slot.pristine.to(param.device, copy=True, non_blocking=True)
            else:
                param.copy_(slot.pristine, non_blocking=True)
            stats.unpatch_path = UnpatchPath.RESTORE
            stats.bytes_uploaded += _nbytes(param) if param.device.type != "cpu" else 0
            stats.bytes_written += _nbytes(param)
            slot.dropped = False
        else:
            out_of_place = offload or slot.dropped or _shares_memory(param, slot.pristine)
            had_dense = False
            base = self._base(slot, param.device, stats)
            if slot.attr != "weight" or not merge_rows_cpu(param, base, entries, out_of_place):
                value, had_dense = merged_value(base, slot.attr, entries,
                                                lambda t: self._upload(t, param.device, stats), slot.host_pristine)
                if out_of_place:
                    # Out of place: the old live tensor is dropped, never made "clean" again.
                    param.data = value.to(param.dtype).reshape(param.shape)
                else:
                    param.copy_(value.reshape(param.shape))  # the one rounding to the weight dtype
            slot.dropped = False
            stats.bytes_written += _nbytes(param)
            if param.dtype == torch.float16 or had_dense:
                # fp16 overflows past 65504 and dense formats can divide by zero (DoRA norms); fp32
                # sums of finite low-rank factors cannot, so they skip this extra read.
                flag = ~torch.isfinite(param).all()
        stats.tensors_touched += 1
        stats.tensors_restored += not entries
        slot.entries = list(entries)
        slot.stamp = _stamp(slot.param)
        return flag

    def _reload(self, component: str) -> None:
        """Lazy half of the offload path: clean weights from pristine, right before they are used."""
        with self._lock, torch.no_grad():
            t0, stats = time.perf_counter(), self.last_reload
            for (comp, _, _), slot in self._slots.items():
                if comp == component and slot.dropped:
                    param = slot.param
                    param.data = slot.pristine.to(param.device, copy=True, non_blocking=True)
                    slot.dropped, slot.stamp = False, _stamp(param)
                    stats.tensors_touched += 1
                    stats.bytes_written += _nbytes(param)
                    stats.bytes_uploaded += _nbytes(param) if param.device.type != "cpu" else 0
            handle = self._reload_hooks.pop(component, None)
            if handle is not None:
                handle.remove()
            stats.seconds += time.perf_counter() - t0

    def _set_sidecar(self, key: tuple[str, str], entries: list[Entry]) -> None:
        module = self._modules[key]
        slot = self._slots.get((*key, "weight"))
        # patch tensors live in RAM, so dense deltas are made there from a RAM base
        base = slot.host_pristine if slot is not None else (lambda: module.weight.detach().to("cpu"))
        self._sidecars.set(key, module, entries, base, compute_dtype_for(module, self.settings.compute_dtype))

    def _check_finite(self, checks: list[tuple[SlotKey, torch.Tensor]]) -> None:
        by_device: dict[torch.device, list[tuple[SlotKey, torch.Tensor]]] = {}
        for key, flag in checks:
            by_device.setdefault(flag.device, []).append((key, flag))
        for items in by_device.values():
            bad = torch.stack([f for _, f in items])
            if bool(bad.any()):  # the one host sync per device of an apply
                key = items[int(bad.nonzero()[0])][0]
                raise LoraError(f"the LoRA stack makes {key[0]} layer {key[1]} non-finite (inf/NaN); "
                                "lower its weights")

    def _rollback(self, journal: list[tuple[SlotKey, list[Entry], bool]],
                  car_journal: list[tuple[tuple[str, str], list[Entry]]]) -> None:
        """Put back what this call changed, newest first; recomputing from pristine is bit-exact.

        Every entry is tried even when one fails (issue 11): a tensor that cannot be recomputed
        goes back to pristine; one that cannot even be restored is logged and marked unknown, so
        the next apply rewrites it; the rest of the rollback runs either way.
        """
        scratch = PatchStats()
        for key, entries, was_dropped in reversed(journal):
            slot = self._slots[key]
            try:
                self._write(key, slot, entries, was_dropped, scratch)
            except Exception:  # noqa: BLE001 - cannot recompute (OOM): pristine is the honest fallback
                log.exception("LoRA rollback of %s failed; restoring it to pristine", key)
                try:
                    self._write(key, slot, [], False, scratch)
                except Exception:  # noqa: BLE001 - keep going: the other tensors must still be put back
                    log.exception("LoRA rollback could not restore %s either; the next apply rewrites it", key)
                    slot.stamp = None  # its signature no longer matches anything: never skipped
        for key, entries in reversed(car_journal):
            try:
                self._set_sidecar(key, entries)
            except Exception:  # noqa: BLE001
                log.exception("LoRA rollback of sidecar %s failed; removing it", key)
                try:
                    self._set_sidecar(key, [])
                except Exception:  # noqa: BLE001
                    log.exception("LoRA rollback could not remove sidecar %s", key)


def _weight(w: Weight) -> Weight:
    """A float, or per-layer weights as they are (anything with `of(patch)`)."""
    return w if hasattr(w, "of") else float(w)


def _reraise(err: BaseException) -> None:
    """Raise what the user should see, after the rollback: OutOfMemory for an out-of-memory error
    (by its type: torch's and the host's), the error itself for everything else.

    Bad input is refused as a LoraError before any write (`_plan`, `check_patch`), so anything
    else that arrives here is a bug: it keeps its type and traceback (a note says the weights were
    restored) instead of passing for a bad LoRA file. An error whose text merely says "out of
    memory" is not taken for one (issue 11, item 12).
    """
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        raise OutOfMemory(f"out of memory while applying LoRAs; the weights were restored ({err})") from err
    if isinstance(err, Exception) and not isinstance(err, StudioError):
        err.add_note("LoRA Studio: the patcher rolled back; the weights are as they were before this apply")
    raise err
