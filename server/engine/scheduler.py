"""What runs in the next step, and where its KV goes. Pure Python, no tensors; engine thread only.

The scheduler owns the waiting queues, the running rows and the KV blocks. Each step it hands the
runner a `Schedule`: which rows are fed how many tokens, which prefixes to write into the pool
first, which partial blocks to copy. Policy, in order:

- Running rows first, in the order they were admitted: a decoding row is fed its one token, a row
  still prefilling a chunk of its prompt; decode tokens are reserved before any chunk is cut.
- How much prompt a step takes is a matter of time (step_cost.py): while some rows decode, a
  step may cost at most `gap_target` times what their decode alone costs, so prompts are
  prefilled in chunks beside them (chunked prefill) and they keep streaming; with no row
  decoding, prompts take the whole step, several prompts in one forward. `max_step_tokens`
  bounds the tokens of any step (activation memory).
- When the pool runs out of blocks mid-generation, resident prefixes no row uses are evicted
  first; then the most recently admitted row is preempted: its blocks are freed and it goes
  back to the front of its tenant's queue, to be prefilled again from its prompt and the tokens
  it already produced (recompute; its stream just pauses).
- Newcomers join while slots, tokens and blocks allow. Tenants take turns (round-robin, one
  request per turn), so a flooding tenant delays another by at most one request per busy
  tenant, and a tenant holds at most `max_running_per_tenant` rows.
- A newcomer never preempts a running row: it waits until blocks free up.
- The rows of a group (a prompt ensemble, request.RequestGroup) are admitted together or not at
  all, and count as that many rows against the slots and the tenant's cap (a group larger than
  either is refused when submitted: it could never run). A group short of slots keeps its turn
  and nobody is admitted until enough rows finish (else others could take each slot as it
  frees, forever). A lockstep group is also
  scheduled, fed and preempted as one: its rows always hold the same number of tokens.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Collection
from dataclasses import dataclass, field

from prefixes import CompiledPrefix
from server.engine.blocks import RESERVED_BLOCKS, BlockPool, PrefixBlocks, ResidentPrefix
from server.engine.config import EngineConfig
from server.engine.request import Request, RequestGroup, RequestStatus
from server.engine.step_cost import RowShape, StepCostModel, max_chunk


@dataclass(slots=True)
class ScheduledRow:
    request: Request
    num_tokens: int  # fed this step, from request.num_cached on
    # One of `n` choices sharing a prompt (request.RequestGroup.shares_prompt), fed nothing:
    # it samples its first token from this row's logits.
    logits_of: Request | None = None

    @property
    def samples(self) -> bool:
        """This step feeds the row's last pending token (or, for a choice fed nothing, its
        leader's), so its next token is sampled."""
        return self.logits_of is not None or self.num_tokens == self.request.num_pending


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


@dataclass
class StepBudget:
    """What the step being planned may still take: tokens (memory) and, while rows decode,
    time (the cost model's seconds for everything planned so far must stay within `limit`)."""

    tokens: int
    cost: StepCostModel | None = None
    limit: float | None = None  # seconds; None: tokens alone bound the step
    planned: list[RowShape] = field(default_factory=list)
    has_prefill: bool = False
    min_chunk: int = 1

    def chunk(self, starts: list[int], pending: int) -> int:
        """Tokens each row of a unit starting at `starts` may be fed (a prompt chunk)."""
        most = min(pending, self.tokens // len(starts))
        if most <= 0 or self.cost is None or self.limit is None:
            return max(0, most)
        fits = max_chunk(self.cost, self.planned, starts, most, self.limit)
        if fits == 0 and not self.has_prefill:
            # Whatever the model says, prompts always advance: a step with decoding rows
            # feeds at least one block of prompt.
            fits = min(most, self.min_chunk)
        return fits

    def take(self, starts: list[int], tokens: int) -> None:
        self.tokens -= tokens * len(starts)
        self.planned += [RowShape(tokens, start + tokens) for start in starts]
        self.has_prefill = self.has_prefill or tokens > 1


class Scheduler:
    def __init__(
        self, config: EngineConfig, num_blocks: int, cost: StepCostModel | None = None
    ) -> None:
        self.config = config
        # The measured step cost (calibrate.py); None: steps are bounded by tokens alone.
        self.cost = cost
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

    def remove(self, request: Request) -> list[Request]:
        """Take a waiting or running request out, with the rows that go with it (request.rows),
        and free what they hold; returns them, or [] if they are not here."""
        rows = request.rows
        if request in self.running:
            rows = [row for row in rows if row in self.running]  # some may have left alone
            for row in rows:
                self.running.remove(row)
                self._free(row)
            return rows
        queued = rows[0]  # a group waits in the queue as its leader
        queue = self.queues.get(queued.tenant)
        if queue and queued in queue:
            queue.remove(queued)
            if not queue:
                self._drop_tenant(queued.tenant)
            return rows
        return []

    def retire(self, request: Request) -> None:
        """A running row finished: free its blocks and its place."""
        self.running.remove(request)
        self._free(request)

    def step_budget(self) -> StepBudget:
        """This step's budget, with every decoding row's token already in it: while rows
        decode, the step may cost `gap_target` times what their decode alone costs (times the
        prefill pressure, below)."""
        decoding = [
            RowShape(1, r.next_position + 1) for r in fed_rows(self.running) if r.num_pending == 1
        ]
        budget = StepBudget(
            self.config.max_step_tokens - len(decoding),
            planned=decoding,
            min_chunk=self.block_size,
        )
        target = self.config.gap_target
        if self.cost is not None and target is not None and decoding:
            budget.cost = self.cost
            budget.limit = target * self.cost.seconds(decoding) * self._prefill_pressure(decoding)
        return budget

    def _prefill_pressure(self, decoding: list[RowShape]) -> float:
        """How many more rows wait for their first token than stream (at least 1): the step's
        time target grows by it. Holding eight arrivals' prompts to what suits the one row that
        happened to arrive first would make all eight wait longer to spare that one's gap."""
        prefilling = sum(1 for r in self.running if r.num_pending > 1)
        free_slots = max(0, self.config.num_slots - len(self.running))
        prefilling += min(self._admissible_waiting(), free_slots)
        return max(1.0, prefilling / len(decoding))

    def _admissible_waiting(self) -> int:
        """Waiting requests their tenants' caps would let in: a tenant queueing hundreds counts
        for no more rows than it may run, so it cannot stretch other tenants' steps."""
        cap = self.config.max_running_per_tenant
        admissible = 0
        for tenant, queue in self.queues.items():
            room = max(0, cap - self.running_per_tenant[tenant]) if cap else len(queue)
            admissible += min(len(queue), room)
        return admissible

    def schedule(self) -> Schedule:
        plan = Schedule()
        budget = self.step_budget()
        # In admission order, so a row that needs a block preempts only rows admitted after it.
        scheduled: set[int] = set()
        for request in list(self.running):
            if request.status is not RequestStatus.RUNNING or id(request) in scheduled:
                continue  # preempted by a row before it in this loop, or fed with its group
            unit = request.rows  # a lockstep group's rows hold the same number of tokens
            fed = fed_rows(unit)
            decoding = fed[0].num_pending == 1
            tokens = 1
            if not decoding:
                tokens = budget.chunk([r.next_position for r in fed], fed[0].num_pending)
                if tokens <= 0:
                    continue
            if not self._grow_or_preempt(unit, tokens, scheduled, plan, fed):
                continue
            plan.rows += scheduled_rows(unit, fed, tokens)
            scheduled.update(id(row) for row in unit)
            if not decoding:  # decode tokens are in the budget from the start
                budget.take([r.next_position for r in fed], tokens)
        if not plan.preempted:  # blocks are short: let the running rows finish first
            self._admit(plan, budget)
        plan.zero_blocks, self.pool.to_zero = self.pool.to_zero, []
        return plan

    def _admit(self, plan: Schedule, budget: StepBudget) -> None:
        passes_without_admission = 0
        while (
            budget.tokens > 0
            and len(self.running) < self.config.num_slots
            and self.turns
            and passes_without_admission < len(self.turns)
        ):
            tenant = self.turns[0]
            request = self.queues[tenant][0]
            rows = request.rows
            if len(self.running) + len(rows) > self.config.num_slots and self._within_cap(
                tenant, len(rows)
            ):
                # A group needs several slots at once. Were the slots that free one at a time
                # given to the tenants after it, a tenant that always has a request queued
                # would keep the group waiting forever: it keeps its turn and nobody is
                # admitted until enough running rows finish (each within its own length).
                break
            self.turns.rotate(-1)
            fed = fed_rows(rows)
            starts = [row.next_position for row in fed]
            chunk = budget.chunk(starts, request.num_pending)
            if not (chunk > 0 and self._may_run(tenant, len(rows)) and self._start(rows, chunk)):
                passes_without_admission += 1
                continue
            passes_without_admission = 0
            self.queues[tenant].popleft()
            if not self.queues[tenant]:
                self._drop_tenant(tenant)
            if request.group is not None:
                request.group.admitted = True
            for row in rows:
                self._attach_prefix(row, plan)
                plan.admitted.append(row)
            plan.rows += scheduled_rows(rows, fed, chunk)
            budget.take(starts, chunk)

    def _may_run(self, tenant: str, num_rows: int) -> bool:
        """Slots for `num_rows` more rows, within the tenant's cap."""
        if len(self.running) + num_rows > self.config.num_slots:
            return False
        return self._within_cap(tenant, num_rows)

    def _within_cap(self, tenant: str, num_rows: int) -> bool:
        cap = self.config.max_running_per_tenant
        return not (cap and self.running_per_tenant[tenant] + num_rows > cap)

    def _start(self, rows: list[Request], chunk: int) -> bool:
        """Give newcomers their prefixes' blocks and room for their first chunk, all or none;
        False (and nothing changed) if the pool cannot, even after evicting unused prefixes."""
        needed, keep = 0, set()
        waiting = [r for r in rows if waits_for_prompt(r)]
        needed += len(waiting)  # a block each for its copy of the prompt's partial last block
        for request in rows:
            if waits_for_prompt(request):
                continue
            prefix = request.prefix
            needed += -(-(request.next_position + chunk) // self.block_size)
            if prefix is not None:
                tokens = prefix.num_virtual_tokens
                # Its blocks (or none, if resident) and a partial block's copy, then the rest.
                needed += self.prefixes.blocks_to_attach(prefix.digest, tokens)
                needed -= -(-tokens // self.block_size)
                keep.add(prefix.digest)
        if not self._ensure_free(needed, keep=keep):
            return False
        for request in rows:
            if waits_for_prompt(request):
                request.block_table = self.pool.allocate(1)
                self._run(request)
                continue
            end_blocks = -(-(request.next_position + chunk) // self.block_size)
            table: list[int] = []
            if request.prefix is not None:
                resident, table = self.prefixes.attach(
                    request.prefix.digest, request.prefix.num_virtual_tokens
                )
                self._resident[request.request_id] = resident
            request.block_table = table + self.pool.allocate(end_blocks - len(table))
            self._run(request)
        return True

    def _run(self, request: Request) -> None:
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        self.running_per_tenant[request.tenant] += 1

    def fork(self, group: RequestGroup) -> list[tuple[int, int]]:
        """The step that fed a shared prompt's last token ran: every other choice takes the
        leader's blocks (its full ones shared; the partial last one into the block each
        reserved) and its place. Returns the (source, target) block copies to make now,
        before the leader's next token is written into that partial block."""
        leader = group.leader
        end = leader.next_position
        full = leader.block_table[: end // self.block_size]
        partial = leader.block_table[end // self.block_size] if end % self.block_size else None
        resident = self._resident.get(leader.request_id)
        copies = []
        for follower in group.members[1:]:
            (reserved,) = follower.block_table
            self.pool.share(full)
            if partial is None:
                self.pool.release([reserved])
                follower.block_table = list(full)
            else:
                follower.block_table = [*full, reserved]
                copies.append((partial, reserved))
            follower.num_cached = leader.num_cached
            follower.prompt_logprobs = list(leader.prompt_logprobs)
            if resident is not None:
                resident.users += 1
                self._resident[follower.request_id] = resident
        group.forked = True
        return copies

    def _attach_prefix(self, request: Request, plan: Schedule) -> None:
        """Plan what the row's prefix needs before the forward: its KV written into the pool
        (the first row to attach it), a copy of its partial block into the row's own."""
        if waits_for_prompt(request):
            return  # takes the leader's blocks, prefix included, at the fork
        resident = self._resident.get(request.request_id)
        if resident is None or request.prefix is None:
            return
        if not resident.loaded:
            resident.loaded = True
            plan.prefix_loads.append((resident, request.prefix))
        partial = self.prefixes.partial_block(resident)
        if partial is not None:
            plan.block_copies.append((partial, request.block_table[len(resident.blocks) - 1]))

    def _grow_or_preempt(
        self,
        unit: list[Request],
        tokens: int,
        scheduled: set[int],
        plan: Schedule,
        fed: list[Request],
    ) -> bool:
        """Blocks for `tokens` more positions of each `fed` row of `unit`, preempting the
        most recently admitted unscheduled rows (or the unit itself, last) when the pool is dry.
        False if the unit itself was preempted."""
        needed = sum(max(0, self._blocks_short(request, tokens)) for request in fed)
        while not self._ensure_free(needed):
            victims = [r for r in self.running if id(r) not in scheduled and r not in unit]
            victim = victims[-1] if victims else unit[0]
            self._preempt(victim, plan)
            if victim in unit:
                return False
        for request in fed:
            short = self._blocks_short(request, tokens)
            if short > 0:
                request.block_table += self.pool.allocate(short)
        return True

    def _blocks_short(self, request: Request, tokens: int) -> int:
        end = request.next_position + tokens
        return -(-end // self.block_size) - len(request.block_table)

    def _ensure_free(self, needed: int, keep: Collection[str] = ()) -> bool:
        return self.pool.num_free >= needed or self.prefixes.evict_unused(needed, keep)

    def _preempt(self, victim: Request, plan: Schedule) -> None:
        rows = victim.rows  # a lockstep group goes back to the queue whole
        for request in rows:
            self.running.remove(request)
            self._free(request)
            request.num_cached = 0  # recomputed from its prompt and output when it runs again
            request.num_preemptions += 1
            request.status = RequestStatus.WAITING
        self.add(rows[0], front=True)
        plan.preempted.extend(rows)

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


def waits_for_prompt(request: Request) -> bool:
    """One of `n` choices, not the leader, before the leader's prompt is in (fork)."""
    group = request.group
    return group is not None and group.waits_for_fork and request is not group.leader


def fed_rows(unit: list[Request]) -> list[Request]:
    """The rows of a unit fed tokens this step: a shared prompt's leader alone, else all."""
    return [row for row in unit if not waits_for_prompt(row)]


def scheduled_rows(unit: list[Request], fed: list[Request], tokens: int) -> list[ScheduledRow]:
    """`fed` rows get `tokens` each; the choices waiting for a shared prompt join the step in
    which its leader samples, to sample from the leader's logits."""
    rows = [ScheduledRow(row, tokens) for row in fed]
    leader = fed[0]
    if len(fed) < len(unit) and tokens == leader.num_pending:
        rows += [ScheduledRow(row, 0, logits_of=leader) for row in unit if row not in fed]
    return rows
