"""The layer streamer's ordering and bounds, on the CPU with a recording stream/event shim.

What must hold (studio/models/stream.py): never more than N units in flight; each unit's
weights are device copies (not pristine) during its forward and back at rest after it; the
copy for position p waits on the compute event of position p-N, recorded before; compute
waits on the copy's event; outputs equal the unstreamed model bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from studio.models.slots import PristineCorrupted, collect_slots, make_pristine
from studio.models.stream import LayerStreamer, is_streamed
from studio.models.stream_backend import InlineBackend


class RecordingBackend(InlineBackend):
    """Logs every protocol call in order; copies are real clones so pointers can be checked."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple] = []
        self._stream = "compute"

    def record(self, event, stream, label):
        self.log.append(("record", stream, event, label))

    def wait(self, stream, event, label):
        self.log.append(("wait", stream, event, label))

    def on_stream(self, stream):
        backend = self

        class _Ctx:
            def __enter__(self):
                backend._prev, backend._stream = backend._stream, stream

            def __exit__(self, *exc):
                backend._stream = backend._prev

        return _Ctx()

    def copy(self, src, device):
        self.log.append(("copy", self._stream, src.numel()))
        return super().copy(src, device)


class Chain(nn.Module):
    """Blocks of Linear+LayerNorm; `skip` leaves a block out (an order the trace did not see)."""

    def __init__(self, depth: int, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Linear(width, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width)) for _ in range(depth))
        self.head = nn.Linear(width, 4)
        self.skip: int | None = None
        self.reverse = False

    def forward(self, x):
        x = self.stem(x)
        blocks = list(self.blocks)[::-1] if self.reverse else self.blocks
        for i, block in enumerate(blocks):
            if i != self.skip:
                x = torch.tanh(block(x))
        return self.head(x)


def streamed(model: nn.Module, lookahead: int, backend=None, **kw):
    slots = collect_slots(model)
    make_pristine(slots, pin=False)
    for slot in slots:
        slot.to_rest()
    kw.setdefault("max_unit_bytes", 2048)
    kw.setdefault("min_unit_bytes", 0)
    return LayerStreamer(model, slots, "cpu", lookahead, backend=backend or RecordingBackend(), **kw).install()


def watch(streamer: LayerStreamer, seen: list[str]) -> None:
    """Test hooks registered after the streamer's: see each unit during and after its forward."""
    limit = streamer.lookahead

    def pre(unit):
        def hook(_m, _a):
            assert streamer.in_flight <= limit
            for slot in unit.slots:
                assert slot.live.data_ptr() != slot.pristine.data_ptr(), f"{slot.name} not copied before forward"
                assert torch.equal(slot.live, slot.pristine)
            seen.append(unit.name)
        return hook

    def post(unit):
        def hook(_m, _a, _o):
            assert streamer.in_flight <= limit
            for slot in unit.slots:
                assert slot.live.data_ptr() == slot.pristine.data_ptr(), f"{slot.name} not released after forward"
        return hook

    for unit in streamer.units:
        unit.module.register_forward_pre_hook(pre(unit))
        unit.module.register_forward_hook(post(unit))


@pytest.mark.parametrize("lookahead", [1, 2, 3, 5])
def test_outputs_bounds_and_weights_present_before_forward(lookahead):
    torch.manual_seed(0)
    model = Chain(6)
    x = torch.randn(3, 16)
    ref = model(x).detach()
    s = streamed(model, lookahead)
    seen: list[str] = []
    watch(s, seen)
    with torch.no_grad():
        for _ in range(4):
            assert torch.equal(model(x), ref)
    assert s.order is not None and len(seen) == 4 * len(s.order)
    assert s.stats.max_in_flight <= lookahead and s.stats.resyncs == 0
    assert s.stats.sync_loads == len(s.order)  # only the tracing forward loads on demand
    s.close()
    assert not any(is_streamed(m) for m in model.modules())
    assert all(s_.live.data_ptr() == s_.pristine.data_ptr() for s_ in s.units[0].slots)


def test_copy_for_position_p_waits_on_compute_of_p_minus_n():
    torch.manual_seed(1)
    model = Chain(5)
    backend = RecordingBackend()
    s = streamed(model, 2, backend)
    x = torch.randn(2, 16)
    with torch.no_grad():
        for _ in range(3):
            model(x)
    log, n = backend.log, s.lookahead
    recorded = {}
    for i, op in enumerate(log):
        if op[0] == "record" and op[3][0] == "computed":
            recorded[op[3][1]] = i
    ready = [(i, op[3][1]) for i, op in enumerate(log) if op[0] == "record" and op[3][0] == "ready"]
    assert len(ready) >= 2 * len(s.order)
    for i, position in ready:
        j = i - 1
        while log[j][0] == "copy":
            assert log[j][1] == s._copy  # copies run on the side stream
            j -= 1
        assert log[j][0] == "wait" and log[j][1] == s._copy and log[j][3] == ("computed", position - n)
        if position - n >= 0:
            assert recorded[position - n] < j  # the event was recorded before the copy waits on it
    for position in range(2 * len(s.order)):  # compute waits for each copy before using it
        waits = [k for k, op in enumerate(log) if op[:2] == ("wait", "compute") and op[3] == ("ready", position)]
        readies = [k for k, p in ready if p == position]
        assert waits and readies and readies[0] < waits[0] < recorded[position]


def test_no_call_outside_the_protocol():
    """The streamer only uses record/wait/copy/on_stream: no synchronize or query exists to call."""
    backend = RecordingBackend()
    model = Chain(3)
    streamed(model, 2, backend)
    with torch.no_grad():
        model(torch.randn(1, 16))
        model(torch.randn(1, 16))
    assert {op[0] for op in backend.log} <= {"record", "wait", "copy"}


def test_out_of_order_and_skipped_units_resync():
    torch.manual_seed(2)
    model = Chain(6)
    x = torch.randn(2, 16)
    s = streamed(model, 3)
    with torch.no_grad():
        model(x)
        model(x)
        model.skip = 2
        ref_skip = _plain(model, x)
        assert torch.equal(model(x), ref_skip)
        model.skip, model.reverse = None, True
        assert torch.equal(model(x), _plain(model, x))
    assert s.stats.resyncs >= 2 and s.stats.max_in_flight <= 3


def test_error_inside_a_unit_leaves_weights_at_rest():
    torch.manual_seed(3)
    model = Chain(4)
    x = torch.randn(2, 16)
    ref = model(x).detach()
    s = streamed(model, 2)
    with torch.no_grad():
        model(x)
        boom = model.blocks[1].register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):
            model(x)
        boom.remove()
        s.idle()
        assert s.in_flight == 0
        assert all(sl.live.data_ptr() == sl.pristine.data_ptr() for u in s.units for sl in u.slots)
        assert torch.equal(model(x), ref)


def test_write_into_a_streamed_weight_at_rest_is_caught():
    model = Chain(3)
    s = streamed(model, 2)
    with torch.no_grad():
        model.blocks[0][0].weight.add_(1.0)  # what merging a LoRA into a streamed layer would do
    with pytest.raises(PristineCorrupted):
        s.verify_rest()


def test_resident_parts_and_reserved_bytes():
    model = Chain(4)
    s = streamed(model, 2, max_unit_bytes=2048, min_unit_bytes=1200)
    assert s.units and s.resident  # the LayerNorms and the stem (first parameter) stay resident
    assert any(sl.name.startswith("stem.") for sl in s.resident)
    largest = max(u.nbytes for u in s.units)
    assert s.reserved_bytes == s.resident_bytes + 2 * largest
    assert all(len(u.ranges) == 1 for u in s.units)  # one copy per unit


def test_lookahead_is_validated_and_capped():
    with pytest.raises(ValueError, match="lookahead"):
        streamed(Chain(2), 0)
    s = streamed(Chain(2), 16)
    assert s.lookahead == len(s.units)


@settings(max_examples=15, deadline=None)
@given(depth=st.integers(1, 7), lookahead=st.integers(1, 6), forwards=st.integers(1, 4))
def test_bounds_hold_for_any_depth_and_lookahead(depth, lookahead, forwards):
    torch.manual_seed(depth)
    model = Chain(depth)
    x = torch.randn(2, 16)
    ref = model(x).detach()
    s = streamed(model, lookahead)
    watch(s, [])
    with torch.no_grad():
        for _ in range(forwards):
            assert torch.equal(model(x), ref)
    assert s.stats.max_in_flight <= min(lookahead, len(s.units))


def _plain(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The same forward with pristine weights and no streaming hooks."""
    import copy

    clone = copy.deepcopy(model)
    for m in clone.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    return clone(x)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_cuda_stream_has_no_host_sync_and_matches(device):
    torch.manual_seed(4)
    model = Chain(8, width=256).to(device)
    x = torch.randn(64, 256, device=device)
    ref = model(x).detach()
    slots = collect_slots(model)
    make_pristine(slots, pin=True)
    for slot in slots:
        slot.to_rest()
    s = LayerStreamer(model, slots, device, 3, max_unit_bytes=1 << 20, min_unit_bytes=0).install()
    with torch.no_grad():
        model(x)  # trace
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = [model(x) for _ in range(3)]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(o, ref) for o in out)
    assert s.stats.max_in_flight <= 3
    s.close()
