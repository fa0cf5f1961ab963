"""What runs in the next step, and where its KV goes. Pure Python, no tensors; engine thread only.

The scheduler owns the waiting queues, the running rows and the KV blocks. Each step it hands the
runner a `Schedule`: which rows are fed how many tokens, which prefixes to write into the pool
first, which partial blocks to copy. Policy, in order:

- Running rows first, in the order they were admitted: a decoding row is fed its one token, a row
  still prefilling a chunk of its prompt. Tokens per step are capped by `max_step_tokens`, so a
  long prompt is prefilled over several steps (chunked prefill) and the running rows keep
  decoding meanwhile; decode tokens are reserved before any prefill chunk is cut.
- When the pool runs out of blocks mid-generation, resident prefixes no row uses are evicted
  first; then the most recently admitted row is preempted: its blocks are freed and it goes
  back to the front of its tenant's queue, to be prefilled again from its prompt and the tokens
  it already produced (recompute; its stream just pauses).
- Newcomers join while slots, tokens and blocks allow. Tenants take turns (round-robin, one
  request per turn), so a flooding tenant delays another by at most one request per busy
  tenant, and a tenant holds at most `max_running_per_tenant` rows.
- A newcomer never preempts a running row: it waits until blocks free up.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from prefixes import CompiledPrefix
from server.engine.blocks import RESERVED_BLOCKS, BlockPool, PrefixBlocks, ResidentPrefix
from server.engine.config import EngineConfig
from server.engine.request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledRow:
    request: Request
    num_tokens: int  # fed this step, from request.num_cached on

    @property
    def samples(self) -> bool:
        """This step feeds the row's last pending token, so its next token is sampled."""
        return self.num_tokens == self.request.num_pending


@dataclass
class Schedule:
    rows: list[ScheduledRow] = field(default_factory=list)
    # Done before the forward, in this order: zero fresh blocks, write new prefixes, copy each
    # new row's partial prefix block into its own block.
    zero_blocks: list[int] = field(default_factory=list)
    prefix_loads: list[tuple[ResidentPrefix, CompiledPrefix]] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    admitted: list[Request] = field(default_factory=list)  # first admission or resumption
    preempted: list[Request] = field(default_factory=list)


class Scheduler:
    def __init__(self, config: EngineConfig, num_blocks: int) -> None:
        self.config = config
        self.block_size = config.block_size
        self.pool = BlockPool(num_blocks)
        self.prefixes = PrefixBlocks(self.pool, config.block_size)
        self.queues: dict[str, deque[Request]] = {}
        self.turns: deque[str] = deque()  # tenants with waiting requests, next turn first
        self.running: list[Request] = []  # admission order: the last is preempted first
        self.running_per_tenant: Counter[str] = Counter()
        self._resident: dict[str, ResidentPrefix] = {}  # request id -> the prefix it attached

    @property
    def num_waiting(self) -> int:
        return sum(len(queue) for queue in self.queues.values())

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.turns)

    @property
    def blocks_in_use(self) -> int:
        """Blocks held by rows or resident prefixes; 0 + the prefixes' once every row is gone."""
        return self.pool.num_blocks - RESERVED_BLOCKS - self.pool.num_free

    def add(self, request: Request, *, front: bool = False) -> None:
        request.status = RequestStatus.WAITING
        queue = self.queues.setdefault(request.tenant, deque())
        if not queue:
            self.turns.append(request.tenant)
        if front:
            queue.appendleft(request)
        else:
            queue.append(request)

    def remove(self, request: Request) -> bool:
        """Take a waiting or running request out and free what it holds; False if not here."""
        if request in self.running:
            self.running.remove(request)
            self._free(request)
            return True
        queue = self.queues.get(request.tenant)
        if queue and request in queue:
            queue.remove(request)
            if not queue:
                self._drop_tenant(request.tenant)
            return True
        return False

    def retire(self, request: Request) -> None:
        """A running row finished: free its blocks and its place."""
        self.running.remove(request)
        self._free(request)

    def schedule(self) -> Schedule:
        plan = Schedule()
        budget = self.config.max_step_tokens
        # In admission order, so a row that needs a block preempts only rows admitted after
        # it; decode tokens of the rows still ahead are reserved before any chunk is cut.
        decode_left = sum(1 for r in self.running if r.num_pending == 1)
        scheduled: set[int] = set()
        for request in list(self.running):
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted by a row before it in this loop
            if request.num_pending == 1:
                decode_left -= 1
                tokens = 1
            else:
                tokens = min(request.num_pending, budget - decode_left)
                if tokens <= 0:
                    continue
            if not self._grow_or_preempt(request, tokens, scheduled, plan):
                continue
            plan.rows.append(ScheduledRow(request, tokens))
            scheduled.add(id(request))
            budget -= tokens
        if not plan.preempted:  # blocks are short: let the running rows finish first
            self._admit(plan, budget)
        plan.zero_blocks, self.pool.to_zero = self.pool.to_zero, []
        return plan

    def _admit(self, plan: Schedule, budget: int) -> None:
        cap = self.config.max_running_per_tenant
        passes_without_admission = 0
        while (
            budget > 0
            and len(self.running) < self.config.num_slots
            and self.turns
            and passes_without_admission < len(self.turns)
        ):
            tenant = self.turns[0]
            self.turns.rotate(-1)
            request = self.queues[tenant][0]
            chunk = min(request.num_pending, budget)
            if (cap and self.running_per_tenant[tenant] >= cap) or not self._start(
                request, chunk, plan
            ):
                passes_without_admission += 1
                continue
            passes_without_admission = 0
            self.queues[tenant].popleft()
            if not self.queues[tenant]:
                self._drop_tenant(tenant)
            plan.rows.append(ScheduledRow(request, chunk))
            plan.admitted.append(request)
            budget -= chunk

    def _start(self, request: Request, chunk: int, plan: Schedule) -> bool:
        """Give a newcomer its prefix's blocks and room for its first chunk; False (and nothing
        changed) if the pool cannot, even after evicting unused prefixes."""
        prefix = request.prefix
        end_blocks = -(-(request.next_position + chunk) // self.block_size)
        needed = end_blocks
        if prefix is not None:
            tokens = prefix.num_virtual_tokens
            # Its blocks (or none, if resident) and a partial block's copy, then the rest.
            needed += self.prefixes.blocks_to_attach(prefix.digest, tokens)
            needed -= -(-tokens // self.block_size)
        keep = prefix.digest if prefix is not None else None
        if not self._ensure_free(needed, keep=keep):
            return False
        table: list[int] = []
        if prefix is not None:
            resident, table = self.prefixes.attach(prefix.digest, prefix.num_virtual_tokens)
            self._resident[request.request_id] = resident
            if not resident.loaded:
                resident.loaded = True
                plan.prefix_loads.append((resident, prefix))
            partial = self.prefixes.partial_block(resident)
            if partial is not None:
                plan.block_copies.append((partial, table[-1]))
        request.block_table = table + self.pool.allocate(end_blocks - len(table))
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        self.running_per_tenant[request.tenant] += 1
        return True

    def _grow_or_preempt(
        self, request: Request, tokens: int, scheduled: set[int], plan: Schedule
    ) -> bool:
        """Blocks for `tokens` more positions of a running row, preempting the most recently
        admitted unscheduled rows (or this one, last) when the pool is dry. False if this row
        itself was preempted."""
        end = request.next_position + tokens
        needed = -(-end // self.block_size) - len(request.block_table)
        while not self._ensure_free(needed):
            victims = [r for r in self.running if id(r) not in scheduled and r is not request]
            victim = victims[-1] if victims else request
            self._preempt(victim, plan)
            if victim is request:
                return False
        if needed > 0:
            request.block_table += self.pool.allocate(needed)
        return True

    def _ensure_free(self, needed: int, keep: str | None = None) -> bool:
        return self.pool.num_free >= needed or self.prefixes.evict_unused(needed, keep)

    def _preempt(self, request: Request, plan: Schedule) -> None:
        self.running.remove(request)
        self._free(request)
        request.num_cached = 0  # recomputed from its prompt and output when it runs again
        request.num_preemptions += 1
        self.add(request, front=True)
        plan.preempted.append(request)

    def _free(self, request: Request) -> None:
        self.pool.release(request.block_table)
        request.block_table = []
        resident = self._resident.pop(request.request_id, None)
        if resident is not None:
            self.prefixes.detach(resident)
        self.running_per_tenant[request.tenant] -= 1
        if self.running_per_tenant[request.tenant] <= 0:
            del self.running_per_tenant[request.tenant]

    def _drop_tenant(self, tenant: str) -> None:
        del self.queues[tenant]
        self.turns.remove(tenant)
