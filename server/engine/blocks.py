"""KV block bookkeeping: which blocks are free, who shares which, which prefixes are resident.

Pure Python, no tensors: the scheduler decides, the KV cache (kv_cache.py) moves the bytes.

A resident prefix's KV lives in the pool once. Its full blocks are shared, reference-counted, by
every row that uses it; only a partially filled last block is copied per row (the row's own
tokens continue in it). A prefix no row uses stays resident until its blocks are needed.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Collection
from dataclasses import dataclass, field

# Two blocks no request ever owns: the zero block, never written, is what a row's block table
# is padded with; the scratch block takes the writes of padding tokens.
ZERO_BLOCK = 0
SCRATCH_BLOCK = 1
RESERVED_BLOCKS = 2


class OutOfBlocks(Exception):
    """The pool has fewer free blocks than asked for."""


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= RESERVED_BLOCKS:
            raise ValueError(f"num_blocks: expected > {RESERVED_BLOCKS}, found {num_blocks}")
        self.num_blocks = num_blocks
        # Last freed, first handed out: memory follows use. The pool's pages are touched only
        # when a block is first zeroed, so a pool that cycled through every free block would
        # slowly make all of its pages resident (1.4 GiB at the CPU default) with a handful of
        # rows in use; reusing the warmest blocks keeps it at the most ever used at once.
        self._free: deque[int] = deque(range(RESERVED_BLOCKS, num_blocks))
        self._refs = [0] * num_blocks
        # Handed out since the cache last zeroed them: a block is zeroed before its first write,
        # so nothing a finished request left in it can reach the next owner's attention.
        self.to_zero: list[int] = []

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfBlocks(f"{count} blocks asked, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(count)]
        for block in blocks:
            self._refs[block] = 1
        self.to_zero += blocks
        return blocks

    def share(self, blocks: list[int]) -> None:
        for block in blocks:
            assert self._refs[block] > 0, f"block {block} is free"
            self._refs[block] += 1

    def release(self, blocks: list[int]) -> None:
        for block in blocks:
            self._refs[block] -= 1
            assert self._refs[block] >= 0, f"block {block} released twice"
            if self._refs[block] == 0:
                self._free.appendleft(block)


@dataclass(slots=True)
class ResidentPrefix:
    key: str
    num_tokens: int
    blocks: list[int]  # the last one is partial unless num_tokens % block_size == 0
    users: int = 0
    loaded: bool = False  # its KV has been written into the blocks


@dataclass
class PrefixBlocks:
    """Resident prefixes by content key, least recently used first among those with no users."""

    pool: BlockPool
    block_size: int
    resident: OrderedDict[str, ResidentPrefix] = field(default_factory=OrderedDict)

    @property
    def num_blocks(self) -> int:
        """Blocks resident prefixes hold (shared ones once)."""
        return sum(len(prefix.blocks) for prefix in self.resident.values())

    def full_blocks(self, prefix: ResidentPrefix) -> list[int]:
        return prefix.blocks[: prefix.num_tokens // self.block_size]

    def partial_block(self, prefix: ResidentPrefix) -> int | None:
        return None if prefix.num_tokens % self.block_size == 0 else prefix.blocks[-1]

    def blocks_to_attach(self, key: str, num_tokens: int) -> int:
        """New blocks a row with this prefix takes now: the prefix's own if not resident, plus a
        copy of its partial last block."""
        partial = 1 if num_tokens % self.block_size else 0
        if key in self.resident:
            return partial
        return -(-num_tokens // self.block_size) + partial

    def attach(self, key: str, num_tokens: int) -> tuple[ResidentPrefix, list[int]]:
        """A new row's first blocks: the shared full blocks, then its own copy of the partial one.
        Raises OutOfBlocks (and changes nothing) when the pool cannot hold them."""
        if self.blocks_to_attach(key, num_tokens) > self.pool.num_free:
            raise OutOfBlocks(f"prefix {key[:12]}: not enough free blocks")
        prefix = self.resident.get(key)
        if prefix is None:
            blocks = self.pool.allocate(-(-num_tokens // self.block_size))
            prefix = self.resident[key] = ResidentPrefix(key, num_tokens, blocks)
        self.resident.move_to_end(key)
        prefix.users += 1
        shared = self.full_blocks(prefix)
        self.pool.share(shared)
        own = self.pool.allocate(1) if self.partial_block(prefix) is not None else []
        return prefix, shared + own

    def detach(self, prefix: ResidentPrefix) -> None:
        prefix.users -= 1

    def forget(self, key: str) -> None:
        """Drop a resident prefix at once (its KV could not be written); rows still attached
        keep their blocks until they detach."""
        prefix = self.resident.pop(key, None)
        if prefix is not None:
            self.pool.release(prefix.blocks)

    def evict_unused(self, needed: int, keep: Collection[str] = ()) -> bool:
        """Free resident prefixes no row uses (but those in `keep`), oldest first, until
        `needed` blocks are free."""
        for key in [k for k, p in self.resident.items() if p.users == 0 and k not in keep]:
            if self.pool.num_free >= needed:
                break
            self.pool.release(self.resident.pop(key).blocks)
        return self.pool.num_free >= needed
