"""Model cache: pins are never evicted, LRU order, lock/unlock pairing, and no aliasing (InvokeAI #6559)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from studio.errors import OutOfMemory
from studio.errors import EngineFault, InputError, StudioError
from studio.models.cache import ModelCache, PristineCorrupted

CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))


def small(seed: int = 0, width: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, 8))


def size_of(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def shares(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


# -- aliasing -------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_pristine_is_a_separate_copy_and_survives_writes_under_lock(device):
    module = small().to(device)
    x = torch.randn(4, 32, device=device)
    ref = module(x).detach()
    original = {k: v.detach().clone() for k, v in module.state_dict().items()}
    cache = ModelCache(device)
    with cache.put("m", module) as handle:
        pristine = cache.pristine("m", "0.weight")
        assert pristine.device.type == "cpu" and pristine.is_pinned() == (device == "cuda")
        for _ in range(3):  # the #6559 scenario: patch, generate, restore, generate again
            with cache.lock(handle, device) as live:
                assert not shares(live[0].weight, pristine)
                with torch.no_grad():
                    live[0].weight.add_(1.0)  # in place, as the LoRA patcher writes
                    live[2].weight.copy_(torch.randn_like(live[2].weight))
                    live.load_state_dict({**live.state_dict(), "0.bias": torch.zeros(32)})
            assert torch.equal(cache.pristine("m", "0.weight"), original["0.weight"].cpu())
            cache.offload(handle)  # off the device: points back at pristine, no copy back
            with cache.lock(handle, device) as live:
                assert torch.equal(live(x), ref)
        assert cache.check() == []


def test_write_at_rest_is_caught_at_the_next_lock():
    module = small()
    cache = ModelCache("cpu")
    with cache.put("m", module) as handle:
        cache.offload(handle)
        assert shares(module[0].weight, cache.pristine("m", "0.weight"))  # at rest: points at pristine
        with torch.no_grad():
            module[0].weight.mul_(2.0)  # a write without a lock lands in pristine
        assert any("pristine written" in p for p in cache.check())
        with pytest.raises(PristineCorrupted, match="written while at rest") as caught:
            with cache.lock(handle):
                pass
        assert cache.lookup("m").locks == 0
    # one of the engine's own errors (issue 11): the UI and CLI give its message, not a bare crash
    assert isinstance(caught.value, EngineFault) and isinstance(caught.value, StudioError)
    assert not isinstance(caught.value, InputError)


def test_lora_patcher_over_the_cache_leaves_pristine_untouched():
    """The real patcher, reading its base weights from the cache's pristine copy."""
    from studio.lora.base import LoraFile, LowRankPatch
    from studio.lora.patcher import LoraPatcher

    module = small(3)
    x = torch.randn(4, 32)
    ref = module(x).detach()
    original = module[0].weight.detach().clone()
    cache = ModelCache("cpu")
    patch = LowRankPatch("unet", "0", torch.randn(32, 4), torch.randn(4, 32), 0.5, (32, 32))
    lora = LoraFile(path=None, name="t", format="kohya", base_model="sdxl", short_hash="0" * 12, patches=[patch])
    with cache.put("unet", module) as handle, cache.lock(handle) as live:
        patcher = LoraPatcher({"unet": live}, pristine_source=lambda comp, name: cache.pristine(comp, name))
        outputs = []
        for weight in (1.0, 0.0, 1.0, 0.0):
            stats = patcher.apply([(lora, weight)])
            assert stats.tensors_snapshotted == 0  # its base came from the cache: no second RAM copy
            outputs.append(live(x).detach())
        patcher.close()
        assert torch.equal(cache.pristine("unet", "0.weight"), original)
        assert not torch.equal(outputs[0], ref) and torch.equal(outputs[0], outputs[2])
        assert torch.equal(outputs[1], ref) and torch.equal(outputs[3], ref)


# -- pins, eviction ---------------------------------------------------------------------------------
def test_lru_eviction_order_and_pins_never_evicted():
    mods = {k: small(i) for i, k in enumerate("abcde")}
    cache = ModelCache("cpu", keep_resident=False)

    def admit(key: str, keep_pin: bool = False):
        handle = cache.put(key, mods[key])
        cache.offload(handle)  # at rest: only the pristine copy counts
        return handle if keep_pin else handle.release()

    held = admit("a", keep_pin=True)
    unit = cache.used("cpu")  # one entry at rest; a put needs two (pristine + the module's own tensors)
    admit("b")
    admit("c")
    cache.set_budgets(int(unit * 4.5), None)
    with cache.pin("b") as handle, cache.lock(handle):  # b used after c: c is the least recently used
        pass
    admit("d")
    assert {r.key for r in cache.records()} == {"a", "b", "d"}
    assert mods["c"][0].weight.device.type == "meta"  # evicted: unusable until reloaded
    admit("e")
    assert {r.key for r in cache.records()} == {"a", "d", "e"}  # b went next; a is pinned
    with pytest.raises(KeyError):
        cache.pin("c")
    assert cache.stats.evictions == 2
    held.release()


def test_nothing_evictable_raises_out_of_memory():
    cache = ModelCache("cpu", ram_budget=size_of(small()) * 3)
    keep = cache.put("a", small())
    with pytest.raises(OutOfMemory, match="RAM budget"):
        cache.put("b", small(1))
    assert cache.lookup("b") is None and cache.lookup("a").pins == 1
    keep.release()


def test_live_copies_are_dropped_before_entries_are_evicted():
    a, b = small(0), small(1)
    one = size_of(a)
    cache = ModelCache("cpu", ram_budget=int(one * 3.5))
    cache.put("a", a).release()  # pristine + its own live copy: 2 units
    assert cache.lookup("a").device == "cpu"
    cache.put("b", b).release()  # needs 2 more: a's live copy goes (LRU), a itself stays cached
    assert cache.lookup("a").device is None and cache.lookup("b").device == "cpu"
    assert cache.stats.evictions == 0 and cache.stats.offloads == 1


def test_pin_handle_lifetime():
    cache = ModelCache("cpu")
    handle = cache.put("m", small())
    with cache.pin("m") as second:
        assert cache.lookup("m").pins == 2
    assert second.released and cache.lookup("m").pins == 1
    handle.release()
    with pytest.raises(RuntimeError, match="already released"):
        handle.release()
    with pytest.raises(RuntimeError, match="released"):
        with cache.lock(handle):
            pass
    calls = []
    again = cache.load("m", lambda: calls.append(1) or small())
    fresh = cache.load("n", lambda: calls.append(1) or small(2))
    assert calls == [1] and cache.stats.hits >= 1 and cache.stats.misses == 1
    again.release()
    fresh.release()


# -- lock pairing -----------------------------------------------------------------------------------
class Boom(Exception):
    pass


@pytest.mark.parametrize("case", ["normal", "body raises", "release raises", "both raise"])
def test_lock_unlock_pairs_under_exceptions(case, monkeypatch):
    cache = ModelCache("cpu", keep_resident=False)
    handle = cache.put("m", small())
    if case in ("release raises", "both raise"):
        def failing_offload(entry):
            raise Boom("release")
        monkeypatch.setattr(cache, "_offload", failing_offload)
    entered = []
    expected = {"normal": None, "body raises": "body", "release raises": "release", "both raise": "release"}[case]
    try:
        with cache.lock(handle) as live:
            entered.append(live)
            assert cache.lookup("m").locks == 1
            if case in ("body raises", "both raise"):
                raise Boom("body")
    except Boom as err:
        assert str(err) == expected
    else:
        assert expected is None
    assert len(entered) == 1
    assert cache.lookup("m").locks == 0
    assert cache.stats.locks == cache.stats.unlocks == 1
    monkeypatch.undo()
    with cache.lock(handle):  # usable again
        pass
    assert cache.stats.locks == cache.stats.unlocks == 2 and cache.check() == []


def test_nested_locks_count_and_other_device_is_refused():
    cache = ModelCache("cpu")
    handle = cache.put("m", small())
    with cache.lock(handle), cache.lock(handle):
        assert cache.lookup("m").locks == 2
        with pytest.raises(RuntimeError, match="locked on"):
            with cache.lock(handle, "meta"):
                pass
    assert cache.lookup("m").locks == 0


def test_lock_is_all_or_nothing_when_a_copy_runs_out_of_memory(monkeypatch):
    module = small()
    x = torch.randn(2, 32)
    ref = module(x).detach()
    cache = ModelCache("cpu")
    handle = cache.put("m", module)
    cache.offload(handle)
    real_copy, calls = ModelCache._copy, []

    def flaky(src, device, pinned):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_copy(src, device, pinned)

    monkeypatch.setattr(ModelCache, "_copy", staticmethod(flaky))
    with pytest.raises(torch.OutOfMemoryError):
        with cache.lock(handle):
            pass
    record = cache.lookup("m")
    assert record.locks == 0 and record.device is None and cache.check() == []
    assert all(shares(p, cache.pristine("m", n)) for n, p in module.named_parameters())
    monkeypatch.undo()
    with cache.lock(handle) as live:
        assert torch.equal(live(x), ref)


def test_reservations_count_against_the_budget():
    cache = ModelCache("cpu", ram_budget=10_000)
    with cache.reserve("cpu", 6_000, "buffers"):
        assert cache.used("cpu") == 6_000
        with pytest.raises(OutOfMemory):
            cache.reserve("cpu", 5_000, "more")
    assert cache.used("cpu") == 0
