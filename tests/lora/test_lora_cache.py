"""LoraCache: one parse per file version, LRU by bytes, pins never evicted, handles used once."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import patch_fixtures as pf  # noqa: E402

from studio.errors import LoraError  # noqa: E402
from studio.lora.base import LowRankPatch  # noqa: E402
from studio.lora.cache import LoraCache, file_key  # noqa: E402

SIZE = 1000  # bytes of each fake parsed LoRA: up [25, 5] + down [5, 25] in float32


class CountingLoader:
    """Stands in for the reader: a LoraFile of SIZE bytes per call, and a log of what it read."""

    def __init__(self, fail: set[str] | None = None):
        self.calls: list[Path] = []
        self.fail = fail or set()

    def __call__(self, path: Path):
        self.calls.append(path)
        if path.name in self.fail:
            raise LoraError(f"{path.name}: bad header")
        patch = LowRankPatch("unet", "x", torch.zeros(25, 5), torch.zeros(5, 25), 1.0, (25, 25))
        return pf.make_lora(path.stem, [patch])


@pytest.fixture
def files(tmp_path):
    out = {}
    for name in "abcde":
        f = tmp_path / f"{name}.safetensors"
        f.write_bytes(name.encode() * 10)
        out[name] = f
    return out


def names(cache: LoraCache) -> list[str]:
    return [Path(k.path).stem for k in cache.keys()]


def test_each_version_is_parsed_once_and_hits_are_reported(files):
    loader = CountingLoader()
    cache = LoraCache(10 * SIZE, loader)
    with cache.pin(files["a"]) as first:
        assert not first.hit and first.lora.name == "a"
    with cache.pin(str(files["a"])) as second:
        assert second.hit and second.lora is first._entry.lora
    assert len(loader.calls) == 1 and (cache.stats.hits, cache.stats.misses) == (1, 1)
    assert cache.bytes_used == SIZE


def test_an_edited_file_is_a_new_version_and_the_old_one_goes(files):
    loader = CountingLoader()
    cache = LoraCache(10 * SIZE, loader)
    old_key = file_key(files["a"])
    cache.pin(files["a"]).release()
    files["a"].write_bytes(b"changed, and longer")
    st = files["a"].stat()
    os.utime(files["a"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with cache.pin(files["a"]) as pin:
        assert not pin.hit and pin.key != old_key
    assert len(loader.calls) == 2 and len(cache) == 1


def test_old_version_pinned_stays_until_released(files):
    cache = LoraCache(10 * SIZE, CountingLoader())
    old = cache.pin(files["a"])
    files["a"].write_bytes(b"new content!")
    os.utime(files["a"], ns=(1, 2 * 10**18))
    new = cache.pin(files["a"])
    assert len(cache) == 2 and old.lora is not new.lora
    old.release()
    assert cache.keys() == [new.key]
    new.release()


def test_lru_order_and_byte_budget(files):
    cache = LoraCache(3 * SIZE, CountingLoader())
    for n in "abc":
        cache.pin(files[n]).release()
    assert names(cache) == ["a", "b", "c"]
    cache.pin(files["a"]).release()  # a is now the most recent
    assert names(cache) == ["b", "c", "a"]
    cache.pin(files["d"]).release()
    assert names(cache) == ["c", "a", "d"] and cache.stats.evictions == 1
    assert cache.bytes_used == 3 * SIZE <= cache.byte_budget


def test_pinned_entries_are_never_evicted_even_over_budget(files):
    cache = LoraCache(2 * SIZE, CountingLoader())
    pins = [cache.pin(files[n]) for n in "abcd"]
    assert names(cache) == ["a", "b", "c", "d"] and cache.bytes_used == 4 * SIZE > cache.byte_budget
    assert all(p.lora is not None for p in pins)
    pins[0].release()  # a is unpinned and over budget: gone
    assert names(cache) == ["b", "c", "d"]
    for p in pins[1:]:
        p.release()
    assert names(cache) == ["c", "d"] and cache.bytes_used == 2 * SIZE


def test_pinning_twice_counts_twice(files):
    cache = LoraCache(0, CountingLoader())  # budget 0: only pins keep anything
    one = cache.pin(files["a"])
    two = cache.pin(files["a"])
    assert two.hit and cache.pin_count(one.key) == 2
    one.release()
    assert cache.pin_count(two.key) == 1 and len(cache) == 1
    two.release()
    assert len(cache) == 0


def test_pin_normal_exit_releases_once(files):
    cache = LoraCache(0, CountingLoader())
    with cache.pin(files["a"]) as pin:
        assert cache.pin_count(pin.key) == 1
    assert pin.released and cache.pin_count(pin.key) == 0
    with pytest.raises(RuntimeError, match="twice"):
        pin.release()
    with pytest.raises(RuntimeError, match="after release"):
        pin.lora  # noqa: B018


def test_pin_body_raises_still_releases(files):
    cache = LoraCache(0, CountingLoader())
    with pytest.raises(ValueError):
        with cache.pin(files["a"]) as pin:
            raise ValueError("body")
    assert pin.released and len(cache) == 0


def test_pin_release_raises_still_unpins(files, monkeypatch):
    cache = LoraCache(0, CountingLoader())
    pin = cache.pin(files["a"])
    key = pin.key
    monkeypatch.setattr(cache, "_evict", lambda: (_ for _ in ()).throw(RuntimeError("evict broke")))
    with pytest.raises(RuntimeError, match="evict broke"):
        pin.__exit__(None, None, None)
    assert pin.released and cache.pin_count(key) == 0
    monkeypatch.undo()
    cache.pin(files["b"]).release()  # the next eviction pass cleans up
    assert len(cache) == 0


def test_entered_and_exited_once(files, monkeypatch):
    cache = LoraCache(10 * SIZE, CountingLoader())
    released = []
    real = cache.release_pin
    monkeypatch.setattr(cache, "release_pin", lambda e: (released.append(e.key), real(e))[1])
    with cache.pin(files["a"]):
        pass
    assert len(released) == 1


def test_bad_files_are_one_clear_error_and_nothing_is_cached(files, tmp_path):
    cache = LoraCache(10 * SIZE, CountingLoader(fail={"b.safetensors"}))
    with pytest.raises(LoraError, match="b.safetensors: bad header"):
        cache.pin(files["b"])
    with pytest.raises(LoraError, match="cannot be read"):
        cache.pin(tmp_path / "missing.safetensors")
    assert len(cache) == 0 and cache.bytes_used == 0 and cache.stats.misses == 0


def test_a_file_changed_while_read_serves_that_pin_only(files):
    class Racing(CountingLoader):
        def __call__(self, path):
            lora = super().__call__(path)
            if len(self.calls) == 1:
                path.write_bytes(b"rewritten while reading")
            return lora

    loader = Racing()
    cache = LoraCache(10 * SIZE, loader)
    with cache.pin(files["a"]) as pin:
        assert pin.lora.name == "a"
    assert len(cache) == 0
    with cache.pin(files["a"]) as pin:
        assert not pin.hit
    assert len(loader.calls) == 2 and len(cache) == 1


def test_clear_keeps_pinned(files):
    cache = LoraCache(10 * SIZE, CountingLoader())
    keep = cache.pin(files["a"])
    cache.pin(files["b"]).release()
    cache.clear()
    assert names(cache) == ["a"]
    keep.release()
    assert files["a"] in cache
