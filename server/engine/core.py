"""The engine's step, with no threads: schedule -> run -> postprocess.

`LLM` drives it in a plain loop; `Engine` drives it from its own thread and streams the output.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from server.engine.blocks import RESERVED_BLOCKS
from server.engine.calibrate import measure_step_cost
from server.engine.config import EngineConfig
from server.engine.gate import AdmissionGate
from server.engine.host_allocator import keep_freed_memory
from server.engine.metrics import EngineMetrics
from server.engine.request import (
    InvalidRequest,
    NonFiniteOutput,
    Request,
    RequestFailed,
    RequestGroup,
    RequestStatus,
)
from server.engine.runner import ModelRunner
from server.engine.scheduler import Schedule, ScheduledRow, Scheduler
from server.engine.step_cost import RowShape, StepCost
from server.engine.stopping import append_token, update_text
from server.models import LoadedModel

log = logging.getLogger(__name__)


NON_FINITE_ERROR = (
    "numerical overflow: the model's output for this request became NaN or infinite at token "
    "{position}; its prefix's values are likely too large for this model"
)


def group_noun(field: str) -> str:
    """What a group's rows are, in the words of the field that asked for them."""
    return "choices" if field == "n" else "members"


@dataclass(slots=True)
class StepOutput:
    request: Request
    token_ids: list[int]  # new this step
    text: str  # newly released text

    @property
    def finished(self) -> bool:
        return self.request.finished


class EngineCore:
    def __init__(
        self, loaded: LoadedModel, config: EngineConfig, gate: AdmissionGate | None = None
    ) -> None:
        self.loaded = loaded
        self.config = config
        keep_freed_memory()  # process-wide, once: activations reuse freed memory (CPUs)
        spec = loaded.spec
        self.max_len = min(config.max_len, spec.max_positions)
        num_blocks = config.num_blocks(spec, loaded.dtype, loaded.device)
        device = loaded.device
        self.runner = ModelRunner(
            loaded.model,
            spec,
            num_blocks,
            config.block_size,
            max_rows=config.num_slots,
            max_len=self.max_len,
            static_decode=config.uses_static_decode(device),
            cuda_graphs=config.uses_cuda_graphs(device),
            paged_attention=config.uses_paged_attention,
            eos_token_ids=loaded.eos_token_ids,
        )
        self.scheduler = Scheduler(config, num_blocks)
        # The step's cost on this device, measured now and refitted from every step run: what
        # sizes each step's prefill beside decoding rows (step_cost.py).
        self.step_cost: StepCost | None = None
        if config.gap_target is not None:
            self.step_cost = measure_step_cost(
                self.runner, self.scheduler.pool, config.num_slots, self.max_len
            )
            self.scheduler.cost = self.step_cost
        self.gate = gate
        self.eos_token_ids = loaded.eos_token_ids
        self.metrics = EngineMetrics()

    @property
    def running(self) -> list[Request]:
        return self.scheduler.running

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def check(self, request: Request) -> None:
        """Raise InvalidRequest if the request can never run on this model."""
        used = request.prefix_len + len(request.prompt_token_ids)
        if used >= self.max_len:
            raise InvalidRequest(
                f"prompt: expected prefix + prompt tokens < {self.max_len}, found {used}"
            )
        vocab = self.loaded.spec.vocab_size
        bad = [t for t in request.prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(f"prompt: expected token ids in [0, {vocab}), found {bad[0]}")
        if request.prefix is not None:
            spec = self.loaded.spec
            expected = (spec.num_layers, 2, spec.num_kv_heads, request.prefix_len, spec.head_dim)
            if tuple(request.prefix.kv.shape) != expected:
                raise InvalidRequest(
                    f"prefix: expected KV of shape {expected}, "
                    f"found {tuple(request.prefix.kv.shape)}"
                )

    def check_group(self, size: int, field: str = "prefixes") -> None:
        """Raise InvalidRequest if a group of `size` rows could never run together: more rows
        than slots, than one tenant may run at once, or than the KV pool holds with every row
        at max_len. `field` names what asked for the rows (an ensemble's `prefixes`, `n`)."""
        slots, cap = self.config.num_slots, self.config.max_running_per_tenant
        rows = group_noun(field)
        if size > slots:
            raise InvalidRequest(
                f"{field}: expected at most {slots} {rows} (rows decoded together), found {size}"
            )
        if cap and size > cap:
            raise InvalidRequest(
                f"{field}: expected at most {cap} {rows} (the rows one tenant may run at "
                f"once), found {size}"
            )
        per_row = -(-self.max_len // self.config.block_size) + 1  # + its partial prefix block
        usable = self.scheduler.pool.num_blocks - RESERVED_BLOCKS
        if size * per_row > usable:
            raise InvalidRequest(
                f"{field}: expected at most {usable // per_row} {rows} (the KV cache holds "
                f"that many rows of {self.max_len} tokens), found {size}"
            )

    def add(self, request: Request) -> None:
        """Queue a request, or a group through its leader (members[0])."""
        rows = request.rows
        if len(rows) > 1:
            shares_prompt = request.group is not None and request.group.shares_prompt
            self.check_group(len(rows), "n" if shares_prompt else "prefixes")
        for row in rows:
            self.check(row)
        self.scheduler.add(request)

    def abort(
        self, request: Request, reason: str = "cancelled", error: RequestFailed | None = None
    ) -> list[Request]:
        """Finish a waiting or running request now, with the rows that go with it (its group's
        while the group waits, a lockstep group's always); returns them, [] if already gone."""
        rows = self.scheduler.remove(request)
        for row in rows:
            self._release(row, reason, error)
        return rows

    def step(self) -> list[StepOutput]:
        """Schedule, run one forward, retire what finished."""
        plan = self.scheduler.schedule()
        self.metrics.preemptions += len(plan.preempted)
        for request in plan.admitted:
            if request.num_preemptions == 0:
                self.metrics.prompt_tokens += len(request.prompt_token_ids)
            if self.gate is not None:
                self.gate.dequeued(request.request_id, request.tenant)
        outputs = self._prepare(plan)
        rows = [row for row in plan.rows if not row.request.finished]
        if not rows:
            return outputs
        started = time.monotonic()
        sampling = [row.request for row in rows if row.samples]
        shapes = [
            RowShape(row.num_tokens, row.request.next_position + row.num_tokens) for row in rows
        ]
        self.metrics.prefill_tokens += sum(
            min(row.num_tokens, max(0, len(row.request.prompt_token_ids) - row.request.num_cached))
            for row in rows
        )
        try:
            tokens = self.runner.step(rows)
            outcomes: dict[int, int | RequestFailed | None] = {
                id(request): token for request, token in zip(sampling, tokens, strict=True)
            }
            if self.step_cost is not None:
                self.step_cost.observe(shapes, time.monotonic() - started)
        except Exception:  # never the engine, and never the whole batch for one bad row
            log.exception("engine step failed; running its %d rows alone", len(rows))
            self.metrics.failed_steps += 1
            outcomes = self._step_rows_alone(rows)
        self._fork_shared_prompts(rows, outcomes)
        now = time.monotonic()
        self.metrics.steps += 1
        self.metrics.step_seconds.observe(now - started)
        for row in rows:
            request = row.request
            if id(request) not in outcomes:
                continue  # fed a prompt chunk; samples once its whole prompt is in
            outcome = outcomes[id(request)]
            if isinstance(outcome, int) and request.sampling.max_new_tokens == 0:
                request.finish("length")  # its prompt is scored: nothing to generate
                outputs.append(StepOutput(request, [], ""))
                continue
            group = request.lockstep_group
            if isinstance(outcome, int) and group is not None:
                if request is group.leader:  # one token for the whole group, once
                    outputs += self._postprocess_group(group, outcome, now)
                continue
            if isinstance(outcome, int):
                outputs.append(self._postprocess(request, outcome, now))
                continue
            if outcome is None:  # this row's own values overflowed; the others are unaffected
                self.metrics.non_finite_rows += 1
                outcome = NonFiniteOutput(NON_FINITE_ERROR.format(position=request.num_tokens))
            request.finish("error", outcome)
            outputs.append(StepOutput(request, [], ""))
        finished = [row.request for row in rows if row.request.finished]
        for request in finished:
            if request.status is RequestStatus.FINISHED:
                continue  # left with its group, below
            group = request.group
            if group is not None and group.waits_for_fork:
                # A leader that failed before its prompt was in: its choices have nothing
                # to fork from, and fail with it.
                reason = request.finish_reason or "error"
                others = self.abort(request, reason, request.error)
                outputs += [StepOutput(row, [], "") for row in others if row is not request]
                continue
            self.scheduler.retire(request)
            self._release(request, request.finish_reason or "stop", request.error)
        if self.gate is not None:
            self.gate.note_finish_rate(len(finished) / max(now - started, 1e-6))
        return outputs

    def _prepare(self, plan: Schedule) -> list[StepOutput]:
        """Zero fresh blocks, write new prefixes, copy partial blocks. A prefix that fails to
        load fails the rows that attached it, and only them."""
        cache = self.runner.cache
        cache.zero(plan.zero_blocks)
        failed: dict[str, Exception] = {}
        for resident, prefix in plan.prefix_loads:
            try:
                cache.load_prefix(resident.blocks, prefix)
            except Exception as exc:
                log.exception("loading prefix %s failed", resident.key[:12])
                failed[resident.key] = exc
        for source, target in plan.block_copies:
            cache.copy_block(source, target)
        outputs = []
        for request in plan.admitted:
            if request.prefix is not None and request.prefix.digest in failed:
                cause = failed[request.prefix.digest]
                error = RequestFailed(f"prefix could not be loaded: {cause}")
                outputs += [StepOutput(row, [], "") for row in self.abort(request, "error", error)]
        for key in failed:  # never serve a half-written prefix to a later row
            self.scheduler.prefixes.forget(key)
        return outputs

    def _fork_shared_prompts(
        self, rows: list[ScheduledRow], outcomes: dict[int, int | RequestFailed | None]
    ) -> None:
        """The `n` choices whose leader just fed its prompt's last token take its blocks (a
        leader whose step failed fed nothing: its group fails together, unforked)."""
        leaders = {id(r.logits_of): r.logits_of for r in rows if r.logits_of is not None}
        for leader in leaders.values():
            if isinstance(outcomes.get(id(leader)), RequestFailed):
                continue
            assert leader.group is not None  # a row with choices to fork leads a group
            for source, target in self.scheduler.fork(leader.group):
                self.runner.cache.copy_block(source, target)

    def _step_rows_alone(self, rows: list[ScheduledRow]) -> dict[int, int | RequestFailed | None]:
        """After a failed step: each row once more on its own (a lockstep group's rows
        together), so only the row that makes the step fail fails. A failed forward advanced
        nobody, so a retry rewrites the same places."""
        units: dict[int, list[ScheduledRow]] = {}
        for row in rows:
            owner = row.logits_of or row.request.lockstep_group or row.request
            units.setdefault(id(owner), []).append(row)
        outcomes: dict[int, int | RequestFailed | None] = {}
        for unit in units.values():
            sampling = [row.request for row in unit if row.samples]
            try:
                tokens = self.runner.step(unit)
            except Exception as exc:
                log.exception("request %s fails its step alone", unit[0].request.request_id)
                failure = RequestFailed(f"generation failed: {exc}")
                outcomes.update({id(row.request): failure for row in unit})
                continue
            outcomes.update({id(r): t for r, t in zip(sampling, tokens, strict=True)})
        return outcomes

    def _postprocess(self, request: Request, token: int, now: float) -> StepOutput:
        if request.first_token_time is None:
            request.first_token_time = now
            self.metrics.time_to_first_token.observe(now - request.arrival_time)
        elif request.last_token_time is not None:
            self.metrics.inter_token_latency.observe(now - request.last_token_time)
        request.last_token_time = now
        self.metrics.generated_tokens += 1
        append_token(request, token, eos_token_ids=self.eos_token_ids, max_len=self.max_len)
        text = update_text(request, self.loaded.tokenizer)
        return StepOutput(request, [token], text)

    def _postprocess_group(self, group: RequestGroup, token: int, now: float) -> list[StepOutput]:
        """Append the group's token to every row; when one row finishes (its own length limit,
        or the leader's stop string) they all do, with its reason."""
        leader = group.leader
        for member in group.members:
            if member is not leader:
                append_token(member, token, eos_token_ids=self.eos_token_ids, max_len=self.max_len)
        # The leader's text is decoded once the group's outcome is known: a finished request
        # releases all of its text, a running one holds back a possible stop string.
        self._finish_together(group)
        outputs = [self._postprocess(leader, token, now)]
        self._finish_together(group)
        outputs += [StepOutput(m, [token], "") for m in group.members if m is not leader]
        return outputs

    @staticmethod
    def _finish_together(group: RequestGroup) -> None:
        first = next((m for m in group.members if m.finished), None)
        if first is not None:
            for member in group.members:
                member.finish(first.finish_reason or "stop", first.error)

    def _release(self, request: Request, reason: str, error: RequestFailed | None) -> None:
        """The request has left the scheduler: record its outcome and unpin its prefix."""
        request.finish(reason, error)
        request.status = RequestStatus.FINISHED
        self.metrics.requests_finished[request.finish_reason or reason] += 1
        if self.gate is not None:
            self.gate.done(request.request_id, request.tenant)
        if request.release is not None:
            release, request.release = request.release, None
            try:
                release()
            except Exception:  # the caller's callback: never the engine thread's end
                log.exception("releasing %s failed", request.request_id)
        if request.on_finish is not None:
            on_finish, request.on_finish = request.on_finish, None
            try:
                on_finish(request)
            except Exception:  # the caller's callback: never the engine thread's end
                log.exception("counting %s failed", request.request_id)
