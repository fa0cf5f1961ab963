"""Residency of compiled KV: a device tier with a fixed byte budget, a host tier, and disk below.

Entries are keyed by content (the stored file's sha256), so prefixes with identical KV share one
copy. A pinned entry (a running request uses it) is never evicted. When the device tier needs
room, the least recently used idle entries move to the host tier; when the host tier is over its
budget, its least recently used entries are dropped (disk still has them).

Loading happens outside the lock, so a hit never waits behind another prefix's disk read, and
concurrent requests for the same missing key share one load.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from prefixes.errors import PoolExhausted

# Reads one entry from disk: a CPU tensor, already in the dtype it is served in.
Loader = Callable[[], torch.Tensor]


@dataclass(frozen=True, slots=True)
class PoolStats:
    device_budget_bytes: int
    device_bytes: int
    device_entries: int
    pinned_bytes: int
    pinned_entries: int
    host_budget_bytes: int
    host_bytes: int
    host_entries: int
    hits: int  # pinned while on the device
    host_hits: int  # brought back from the host tier
    misses: int  # read from disk
    evictions: int  # device -> host
    host_evictions: int  # dropped from the host tier
    loads: int  # host hits + misses
    load_seconds_total: float
    load_seconds_max: float


@dataclass(slots=True)
class _Resident:
    tensor: torch.Tensor
    nbytes: int
    pins: int = 0


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


# The defaults of the server's --device-pool-bytes and --host-pool-bytes, stated once here.
DEFAULT_DEVICE_POOL_BYTES = 1 << 30
DEFAULT_HOST_POOL_BYTES = 2 << 30


class PrefixPool:
    def __init__(
        self, device_budget_bytes: int, host_budget_bytes: int, device: torch.device | str
    ) -> None:
        if device_budget_bytes <= 0 or host_budget_bytes < 0:
            raise ValueError(
                f"pool budgets: expected device > 0 and host >= 0 bytes, found "
                f"{device_budget_bytes} and {host_budget_bytes}"
            )
        self.device_budget_bytes = device_budget_bytes
        self.host_budget_bytes = host_budget_bytes
        self.device = torch.device(device)
        self._lock = threading.Lock()
        self._device: dict[str, _Resident] = {}
        self._idle: OrderedDict[str, None] = OrderedDict()  # unpinned device keys, LRU first
        self._host: OrderedDict[str, torch.Tensor] = OrderedDict()  # LRU first
        self._loading: dict[str, Future[None]] = {}
        self._device_bytes = 0
        self._pinned_bytes = 0
        self._host_bytes = 0
        self._counts = dict.fromkeys(
            ("hits", "host_hits", "misses", "evictions", "host_evictions"), 0
        )
        self._load_seconds_total = 0.0
        self._load_seconds_max = 0.0

    def pin(self, key: str, load: Loader) -> torch.Tensor:
        """The entry on the device, pinned until `unpin`; loaded from host or disk if needed."""
        while True:
            with self._lock:
                resident = self._device.get(key)
                if resident is not None:
                    self._counts["hits"] += 1
                    return self._pin_resident(key, resident)
                pending = self._loading.get(key)
                if pending is None:  # nobody is loading it: we do
                    pending = self._loading[key] = Future()
                    from_host = self._host.pop(key, None)
                    if from_host is not None:
                        self._host_bytes -= _nbytes(from_host)
                    break
            pending.result()  # another thread is loading it: wait, then take it as a hit
        return self._load_pinned(key, pending, from_host, load)

    def unpin(self, key: str) -> int:
        """Drop one pin; return how many remain."""
        with self._lock:
            resident = self._device[key]
            if resident.pins <= 0:
                raise RuntimeError(f"pool: {key} unpinned more often than pinned")
            resident.pins -= 1
            if resident.pins == 0:
                self._idle[key] = None  # most recently used: evicted last
                self._pinned_bytes -= resident.nbytes
            return resident.pins

    def discard(self, key: str, on_dropped: Callable[[], None] | None = None) -> bool:
        """Forget an entry on both tiers unless it is pinned or loading; return whether it is
        gone. `on_dropped` runs under the pool's lock, so no pin can start before it is done."""
        with self._lock:
            resident = self._device.get(key)
            if key in self._loading or (resident is not None and resident.pins):
                return False
            if resident is not None:
                del self._device[key]
                del self._idle[key]
                self._device_bytes -= resident.nbytes
            host = self._host.pop(key, None)
            if host is not None:
                self._host_bytes -= _nbytes(host)
            if on_dropped is not None:
                on_dropped()
            return True

    def pins(self, key: str) -> int:
        with self._lock:
            resident = self._device.get(key)
            return 0 if resident is None else resident.pins

    def tier(self, key: str) -> str:
        """Where a key's KV is now: "device", "host" or "disk" (tests observe eviction by it)."""
        with self._lock:
            return "device" if key in self._device else "host" if key in self._host else "disk"

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(
                device_budget_bytes=self.device_budget_bytes,
                device_bytes=self._device_bytes,
                device_entries=len(self._device),
                pinned_bytes=self._pinned_bytes,
                pinned_entries=len(self._device) - len(self._idle),
                host_budget_bytes=self.host_budget_bytes,
                host_bytes=self._host_bytes,
                host_entries=len(self._host),
                loads=self._counts["host_hits"] + self._counts["misses"],
                load_seconds_total=self._load_seconds_total,
                load_seconds_max=self._load_seconds_max,
                **self._counts,
            )

    def _load_pinned(
        self, key: str, pending: Future[None], from_host: torch.Tensor | None, load: Loader
    ) -> torch.Tensor:
        """Load, then tell the threads waiting on `pending` (they get the same error, if any)."""
        try:
            tensor = self._bring_in(key, from_host, load)
        except BaseException as exc:
            with self._lock:
                del self._loading[key]
            pending.set_exception(exc)
            raise
        with self._lock:
            del self._loading[key]
        pending.set_result(None)
        return tensor

    def _bring_in(self, key: str, from_host: torch.Tensor | None, load: Loader) -> torch.Tensor:
        """Copy to the device outside the lock, then make room and insert it pinned."""
        started = time.perf_counter()
        source = from_host if from_host is not None else load()
        tensor = source.to(self.device)
        elapsed = time.perf_counter() - started
        nbytes = _nbytes(tensor)
        with self._lock:
            self._counts["host_hits" if from_host is not None else "misses"] += 1
            self._load_seconds_total += elapsed
            self._load_seconds_max = max(self._load_seconds_max, elapsed)
            if not self._make_room(nbytes):
                self._keep_on_host(key, source.cpu())  # the read is not wasted
                raise PoolExhausted(
                    f"prefix pool: {nbytes} bytes needed, {self.device_budget_bytes} in all, "
                    f"{self._pinned_bytes} pinned by running requests; retry when they finish",
                    field="prefix",
                )
            self._device[key] = _Resident(tensor, nbytes, pins=1)
            self._device_bytes += nbytes
            self._pinned_bytes += nbytes
            return tensor

    def _pin_resident(self, key: str, resident: _Resident) -> torch.Tensor:
        if resident.pins == 0:
            del self._idle[key]
            self._pinned_bytes += resident.nbytes
        resident.pins += 1
        return resident.tensor

    def _make_room(self, nbytes: int) -> bool:
        """Evict idle entries, least recently used first, until `nbytes` fit (lock held)."""
        if self._pinned_bytes + nbytes > self.device_budget_bytes:
            return False  # even evicting every idle entry would not do: evict nothing
        while self._device_bytes + nbytes > self.device_budget_bytes:
            key, _ = self._idle.popitem(last=False)
            resident = self._device.pop(key)
            self._device_bytes -= resident.nbytes
            self._counts["evictions"] += 1
            self._keep_on_host(key, resident.tensor.cpu())
        return True

    def _keep_on_host(self, key: str, tensor: torch.Tensor) -> None:
        nbytes = _nbytes(tensor)
        if nbytes > self.host_budget_bytes:
            self._counts["host_evictions"] += 1
            return
        self._host[key] = tensor
        self._host_bytes += nbytes
        while self._host_bytes > self.host_budget_bytes:
            _, dropped = self._host.popitem(last=False)
            self._host_bytes -= _nbytes(dropped)
            self._counts["host_evictions"] += 1
