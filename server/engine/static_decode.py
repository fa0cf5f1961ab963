"""Decode forwards on static shapes: the form a CUDA graph can capture.

When every row of a forward decodes one token, the rows are padded to a batch-size bucket
(1, 2, 4, ... up to num_slots) and their block tables to a width bucket, and the step's inputs
(token ids, positions, write slots, block tables) cross to the device in one copy, into buffers
allocated once per bucket. The forward reads nothing else: on CUDA it is captured once per
bucket and replayed (cuda_graphs.py); on CPUs it runs eagerly, which is how the tests prove it
token-equal to the dynamic path.

A padding row feeds token 0 at position 0, writes its K/V into the scratch block and reads a
table of zero blocks only, like a padding token of the dynamic path. It never changes a real
row's output: attention reads each row's own table, every other operation is row by row, and
its logits are cut off before sampling.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Sequence

import torch

from server.engine.blocks import SCRATCH_BLOCK, ZERO_BLOCK
from server.engine.cuda_graphs import CudaGraphs
from server.engine.scheduler import ScheduledRow

log = logging.getLogger(__name__)

# Width buckets take this many steps per doubling: a row reads at most 1/4 more key positions
# than the longest row of its step needs, and a growing context meets a new bucket (a new
# capture on CUDA) every eighth or so of its length.
WIDTHS_PER_DOUBLING = 4


def batch_buckets(max_rows: int) -> list[int]:
    """1, 2, 4, ... and max_rows itself: padding at most doubles a decode batch."""
    sizes = [1]
    while sizes[-1] < max_rows:
        sizes.append(min(sizes[-1] * 2, max_rows))
    return sizes


def width_buckets(max_blocks: int, min_blocks: int = 1) -> list[int]:
    """Block-table widths from min_blocks to max_blocks, WIDTHS_PER_DOUBLING per doubling."""
    sizes = [min(min_blocks, max_blocks)]
    while sizes[-1] < max_blocks:
        width = sizes[-1]
        octave = 1 << (width.bit_length() - 1)  # the power of two at or below width
        sizes.append(min(width + max(1, octave // WIDTHS_PER_DOUBLING), max_blocks))
    return sizes


def bucket(sizes: list[int], needed: int) -> int | None:
    """The smallest size >= needed, or None if none is."""
    index = bisect.bisect_left(sizes, needed)
    return sizes[index] if index < len(sizes) else None


class DecodeBuffers:
    """One bucket's inputs in one device tensor, laid out [ids | positions | slots | tables] so
    that a step's inputs cross in one copy, with a host mirror they are written into first; and
    where its forward writes the logits (`[rows, vocab]`, float32)."""

    def __init__(self, rows: int, width: int, logits: torch.Tensor) -> None:
        self.rows, self.width = rows, width
        self.logits = logits
        device = logits.device
        size = rows * (3 + width)
        self.packed = torch.zeros(size, dtype=torch.long, device=device)
        self.host = torch.zeros(size, dtype=torch.long)
        self._host = self.host.numpy()  # writing through numpy skips a tensor op per element
        # Views: the forward (and a graph capturing it) reads them at fixed addresses.
        self.input_ids = self.packed[:rows].view(rows, 1)
        self.positions = self.packed[rows : 2 * rows].view(rows, 1)
        self.write_slots = self.packed[2 * rows : 3 * rows]
        self.tables = self.packed[3 * rows :].view(rows, width)

    def fill(self, rows: Sequence[ScheduledRow], block_size: int) -> None:
        host, size, count = self._host, self.rows, len(rows)
        requests = [row.request for row in rows]
        positions = [r.next_position for r in requests]
        host[:count] = [r.token_ids(r.num_cached, 1)[0] for r in requests]
        host[size : size + count] = positions
        host[2 * size : 2 * size + count] = [
            r.block_table[p // block_size] * block_size + p % block_size
            for r, p in zip(requests, positions, strict=True)
        ]
        # Padding rows feed token 0 at position 0, write into the scratch block and read zero
        # blocks only.
        host[count:size] = 0
        host[size + count : 2 * size] = 0
        host[2 * size + count : 3 * size] = SCRATCH_BLOCK * block_size
        tables = host[3 * size :].reshape(size, self.width)
        tables[:] = ZERO_BLOCK
        for i, request in enumerate(requests):
            tables[i, : len(request.block_table)] = request.block_table
        source = self.host
        if self.packed.device.type == "cuda":
            # A pinned copy lets the transfer run without blocking the host; the allocator
            # keeps that copy alive until the transfer is done.
            source = source.pin_memory()
        self.packed.copy_(source, non_blocking=True)


class StaticDecoder:
    """Runs a decode forward on the bucket's buffers: replayed from a CUDA graph when `graphs`
    is given, eagerly otherwise."""

    def __init__(
        self,
        forward: Callable[[DecodeBuffers], torch.Tensor],
        *,
        device: torch.device,
        block_size: int,
        max_rows: int,
        max_blocks: int,
        vocab_size: int,
        min_blocks: int = 1,
        graphs: CudaGraphs | None = None,
    ) -> None:
        self.forward = forward
        self.device = device
        self.block_size = block_size
        self.batch_sizes = batch_buckets(max_rows)
        self.widths = width_buckets(max_blocks, min_blocks)
        self.graphs = graphs
        # One output for every bucket (each writes its first rows): a graph's own output would
        # stay allocated for as long as the graph, one [rows, vocab] tensor per bucket.
        self.logits = torch.empty(
            (self.batch_sizes[-1], vocab_size), dtype=torch.float32, device=device
        )
        self._buffers: dict[tuple[int, int], DecodeBuffers] = {}
        self.steps = 0  # forwards run on static buffers, eagerly or replayed

    def key(self, rows: Sequence[ScheduledRow]) -> tuple[int, int] | None:
        """The (batch, width) bucket of a forward, or None if it is not a pure decode forward
        that fits one."""
        if not rows or any(row.num_tokens != 1 or not row.samples for row in rows):
            return None
        size = bucket(self.batch_sizes, len(rows))
        width = bucket(self.widths, max(len(row.request.block_table) for row in rows))
        return None if size is None or width is None else (size, width)

    def buffers(self, key: tuple[int, int]) -> DecodeBuffers:
        """The (batch, width) bucket's buffers, made on first use."""
        if key not in self._buffers:
            size, width = key
            self._buffers[key] = DecodeBuffers(size, width, self.logits[:size])
        return self._buffers[key]

    def run(self, rows: Sequence[ScheduledRow], key: tuple[int, int]) -> torch.Tensor:
        """Logits `[len(rows), vocab]` of one decode forward; the bucket's padding rows cut off.
        They live in a buffer that the next decode forward overwrites."""
        buffers = self.buffers(key)
        buffers.fill(rows, self.block_size)
        self.steps += 1
        return self._forward(key, buffers)[: len(rows)]

    def _forward(self, key: tuple[int, int], buffers: DecodeBuffers) -> torch.Tensor:
        if self.graphs is None:
            return self.forward(buffers)
        try:
            return self.graphs.run(key, lambda: self.forward(buffers))
        except Exception:
            # Something in this model's forward cannot be captured (a host sync, say): serve
            # eagerly on the same buffers rather than fail. A failed capture ran no kernel,
            # and its warm-up only rewrote these rows' K/V with the same values.
            log.exception("capturing the decode step in a CUDA graph failed; running it eagerly")
            self.graphs = None
            return self.forward(buffers)
