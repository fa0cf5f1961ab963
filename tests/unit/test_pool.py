"""The residency pool on its own: LRU eviction, pins, the host tier, single-flight loads, counters.

Every entry here is 1 KiB (256 float32), so budgets read as numbers of entries.
"""

from __future__ import annotations

import threading

import pytest
import torch

from prefixes.errors import PoolExhausted
from prefixes.storage.pool import PrefixPool

KIB = 1024


def entry(value: float) -> torch.Tensor:
    return torch.full((256,), value)


class Disk:
    """A loader per key that counts its reads."""

    def __init__(self) -> None:
        self.reads: list[str] = []

    def loader(self, key: str):
        def load() -> torch.Tensor:
            self.reads.append(key)
            return entry(float(ord(key[0])))

        return load


def touch(pool: PrefixPool, disk: Disk, *keys: str) -> None:
    for key in keys:
        pool.pin(key, disk.loader(key))
        pool.unpin(key)


def test_least_recently_used_idle_entries_go_to_the_host_tier_first():
    pool, disk = PrefixPool(3 * KIB, 10 * KIB, "cpu"), Disk()
    touch(pool, disk, "a", "b", "c", "a")  # a is now the most recent
    touch(pool, disk, "d")
    assert [pool.tier(k) for k in "abcd"] == ["device", "host", "device", "device"]
    touch(pool, disk, "e")
    assert [pool.tier(k) for k in "abcde"] == ["device", "host", "host", "device", "device"]
    stats = pool.stats()
    assert (stats.evictions, stats.misses, stats.hits) == (2, 5, 1)
    assert (stats.device_bytes, stats.host_bytes) == (3 * KIB, 2 * KIB)


def test_a_pinned_entry_is_never_evicted():
    pool, disk = PrefixPool(2 * KIB, 10 * KIB, "cpu"), Disk()
    pinned = pool.pin("a", disk.loader("a"))
    touch(pool, disk, "b", "c", "d")  # each newcomer evicts the idle one, never a
    assert pool.tier("a") == "device"
    assert [pool.tier(k) for k in "bcd"] == ["host", "host", "device"]
    assert torch.equal(pinned, entry(float(ord("a"))))
    assert pool.stats().pinned_bytes == KIB


def test_when_everything_is_pinned_the_pool_refuses_and_keeps_the_read_on_host():
    pool, disk = PrefixPool(2 * KIB, 10 * KIB, "cpu"), Disk()
    pool.pin("a", disk.loader("a"))
    pool.pin("b", disk.loader("b"))
    with pytest.raises(PoolExhausted, match="2048 pinned"):
        pool.pin("c", disk.loader("c"))
    assert [pool.tier(k) for k in "abc"] == ["device", "device", "host"]
    pool.unpin("a")
    pool.pin("c", disk.loader("c"))  # from the host tier: no second read
    assert disk.reads == ["a", "b", "c"]
    assert [pool.tier(k) for k in "abc"] == ["host", "device", "device"]
    assert pool.stats().host_hits == 1


def test_the_host_tier_drops_its_least_recent_entries_beyond_its_budget():
    pool, disk = PrefixPool(1 * KIB, 2 * KIB, "cpu"), Disk()
    touch(pool, disk, "a", "b", "c", "d")
    assert [pool.tier(k) for k in "abcd"] == ["disk", "host", "host", "device"]
    touch(pool, disk, "a")
    assert disk.reads == ["a", "b", "c", "d", "a"]
    stats = pool.stats()
    assert (stats.evictions, stats.host_evictions, stats.host_entries) == (4, 2, 2)


def test_no_host_tier_means_evicted_entries_go_back_to_disk():
    pool, disk = PrefixPool(1 * KIB, 0, "cpu"), Disk()
    touch(pool, disk, "a", "b", "a")
    assert disk.reads == ["a", "b", "a"]
    assert pool.stats().host_bytes == 0


def test_concurrent_pins_of_a_missing_key_share_one_load():
    pool = PrefixPool(4 * KIB, 0, "cpu")
    started, finish, reads = threading.Event(), threading.Event(), []

    def slow_load() -> torch.Tensor:
        reads.append(1)
        started.set()
        finish.wait(5)
        return entry(1.0)

    results = []
    threads = [
        threading.Thread(target=lambda: results.append(pool.pin("a", slow_load))) for _ in range(4)
    ]
    threads[0].start()
    started.wait(5)
    for thread in threads[1:]:
        thread.start()
    # A hit on another key does not wait behind the load.
    pool.pin("b", lambda: entry(2.0))
    assert pool.tier("a") == "disk"
    finish.set()
    for thread in threads:
        thread.join()
    assert len(reads) == 1 and len(results) == 4
    assert pool.pins("a") == 4
    assert (pool.stats().misses, pool.stats().hits) == (2, 3)


def test_a_failed_load_reaches_every_waiter_and_the_next_pin_retries():
    pool = PrefixPool(4 * KIB, 0, "cpu")

    def broken() -> torch.Tensor:
        raise OSError("disk on fire")

    with pytest.raises(OSError, match="on fire"):
        pool.pin("a", broken)
    assert torch.equal(pool.pin("a", lambda: entry(1.0)), entry(1.0))


def test_discard_refuses_a_pinned_entry_and_forgets_an_idle_one():
    pool, disk = PrefixPool(2 * KIB, 4 * KIB, "cpu"), Disk()
    pool.pin("a", disk.loader("a"))
    touch(pool, disk, "b", "c")  # b on host, c on device
    dropped = []
    assert not pool.discard("a", lambda: dropped.append("a"))
    assert pool.discard("b", lambda: dropped.append("b"))
    assert pool.discard("c", lambda: dropped.append("c"))
    assert dropped == ["b", "c"]
    assert [pool.tier(k) for k in "abc"] == ["device", "disk", "disk"]
    stats = pool.stats()
    assert (stats.device_bytes, stats.host_bytes, stats.device_entries) == (KIB, 0, 1)
    pool.unpin("a")
    with pytest.raises(RuntimeError, match="unpinned more often"):
        pool.unpin("a")


def test_loads_are_timed_and_entries_counted():
    pool, disk = PrefixPool(2 * KIB, 4 * KIB, "cpu"), Disk()
    touch(pool, disk, "a", "b", "c", "a")
    stats = pool.stats()
    assert stats.loads == stats.misses + stats.host_hits == 4
    assert 0 < stats.load_seconds_max <= stats.load_seconds_total
    assert (stats.device_entries, stats.host_entries, stats.pinned_entries) == (2, 1, 0)


def test_budgets_are_checked():
    with pytest.raises(ValueError, match="budgets"):
        PrefixPool(0, 0, "cpu")
