"""Measure what steps cost on this device and model, once, when the engine starts.

A handful of synthetic steps span the cost model's features (step_cost.py): decode steps of one
row and of every slot at short and long contexts, prompt chunks short and long, at the start of
a row and deep into it, and a decode step beside a chunk. Each runs through the engine's own
runner on real blocks of the pool (the pool's blocks are free at start-up and given back
after), first to warm up (allocations, kernel choices, CUDA graphs), then timed. Where forwards
are padded (eager attention, the paged kernel), the fit's forward cost over its token cost
becomes the runner's rule for running decode rows apart (`forward_overhead_tokens`).
On the embedded model on a 2-core CPU this takes about three seconds.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from server.engine.blocks import BlockPool
from server.engine.request import Request, SamplingParams
from server.engine.runner import ModelRunner
from server.engine.scheduler import ScheduledRow
from server.engine.step_cost import RowShape, StepCost

log = logging.getLogger(__name__)

# Probes are timed this many times after a warm-up; the fastest counts (noise only adds).
TIMED_RUNS = 2


def probe_shapes(num_slots: int, max_len: int) -> list[list[RowShape]]:
    """Steps that tell the four costs apart, within the engine's slots and lengths."""
    short = min(32, max_len // 4)
    deep = max_len // 2
    deepest = max_len * 7 // 8
    chunk = max(2, min(256, max_len // 4))
    small = max(2, chunk // 4)
    half = max(1, num_slots // 2)
    return [
        [RowShape(1, short)],
        [RowShape(1, short)] * num_slots,
        [RowShape(1, deep)] * half,
        [RowShape(chunk, chunk)],
        [RowShape(chunk, deep)],
        [RowShape(small, deepest)],
        [RowShape(small, small)] * min(4, num_slots),
        [RowShape(1, short)] * max(1, half - 1) + [RowShape(chunk, chunk)],
        [RowShape(1, short)] * max(1, half - 1) + [RowShape(small, deepest)],
    ]


# What the probes measured, per model and engine shape: an engine started again in the same
# process on the same model (scripts, tests, a restarted engine) fits its cost from these and
# refits online as usual, instead of running the probes again.
_measured: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, list]] = (
    weakref.WeakKeyDictionary()
)


def measure_step_cost(
    runner: ModelRunner, pool: BlockPool, num_slots: int, max_len: int
) -> StepCost:
    key = (runner.packs, runner.block_size, runner.kv_len_bucket, num_slots, max_len)
    known = _measured.setdefault(runner.model, {})
    if key not in known:
        samples: list[tuple[list[RowShape], float]] = []
        for shape in probe_shapes(num_slots, max_len):
            seconds = _time_step(runner, pool, shape)
            if seconds is not None:
                samples.append((shape, seconds))
        known[key] = samples
    samples = known[key]
    cost = StepCost(samples, overhead_tokens=runner.forward_overhead_tokens, packed=runner.packs)
    per_forward, per_token = cost.coefficients[:2]
    if not runner.packs and per_forward > 0 and per_token > 0:
        overhead = round(per_forward / per_token)
        runner.forward_overhead_tokens = cost.overhead_tokens = max(1, min(overhead, 4096))
    log.info("step cost on %s: %s", runner.device, cost.describe())
    return cost


def _time_step(runner: ModelRunner, pool: BlockPool, shape: list[RowShape]) -> float | None:
    """Seconds of the fastest timed run of one synthetic step, or None when the pool is too
    small to hold it (a tiny test pool)."""
    needed = sum(-(-kv_len // runner.block_size) for _, kv_len in shape)
    if needed > pool.num_free:
        return None
    with synthetic_step(runner, pool, shape) as run:
        best = float("inf")
        for attempt in range(TIMED_RUNS + 1):
            _synchronize(runner.device)
            started = time.perf_counter()
            run()  # reads its sampled tokens back: the device has finished
            if attempt:
                best = min(best, time.perf_counter() - started)
        return best


@contextmanager
def synthetic_step(
    runner: ModelRunner, pool: BlockPool, shape: Sequence[RowShape]
) -> Iterator[Callable[[], None]]:
    """A step of this shape on real blocks of the pool (zeroed first, given back after): yields
    a callable that runs it through the runner, as often as asked."""
    greedy = SamplingParams(max_new_tokens=1, temperature=0)
    requests = [Request([1] * kv_len, greedy) for _, kv_len in shape]
    try:
        for request, (_, kv_len) in zip(requests, shape, strict=True):
            request.block_table = pool.allocate(-(-kv_len // runner.block_size))
        runner.cache.zero(pool.to_zero)
        pool.to_zero = []
        rows = [ScheduledRow(r, n) for r, (n, _) in zip(requests, shape, strict=True)]

        def run() -> None:
            for request, (num_tokens, kv_len) in zip(requests, shape, strict=True):
                request.num_cached = kv_len - num_tokens
            runner.step(rows)

        yield run
    finally:
        for request in requests:
            pool.release(request.block_table)
            request.block_table = []


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
