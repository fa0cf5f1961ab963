"""CUDA graphs for the static decode step: captured once per bucket, replayed after.

The only CUDA-specific code of the decode path. A decode step of a small model is hundreds of
short kernels, and launching them one by one from Python costs far more than running them
(33 ms for a step of 16 rows of SmolLM2 on an H100, against about 0.1 ms to read its weights).
A graph launches the whole forward at once. It replays the kernels exactly as captured, on the
same memory: the forward must read its inputs only from the bucket's static buffers and make
no host sync, which static_decode.py guarantees and the CPU tests check.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

# Runs before capture: cuBLAS handles, attention kernels' plans and the allocator's first
# blocks are created lazily on a forward's first runs, and none of that may happen mid-capture.
WARMUP_RUNS = 2


class CudaGraphs:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        # One memory pool for every bucket's graph: only one replays at a time, so their
        # intermediate tensors can share memory.
        self.pool = torch.cuda.graph_pool_handle()
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.captures = 0
        self.replays = 0

    def run(self, key: Hashable, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Replay `key`'s graph (capturing `forward` first if new); return its output tensor,
        which the next replay of the same graph overwrites."""
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(forward)
        graph, output = entry
        graph.replay()
        self.replays += 1
        return output

    def _capture(
        self, forward: Callable[[], torch.Tensor]
    ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm-up on a side stream, as PyTorch documents for capture. It runs on the step's real
        # inputs: a decode forward rewrites the same K/V into the same slots, so running it
        # again changes nothing.
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                forward()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (a soft prompt compiled for an upload) keep using the
        # device while this thread captures.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            output = forward()
        self.captures += 1
        return graph, output
