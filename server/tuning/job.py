"""One fine-tuning job, from its files to its registered prefix, on a thread of its own.

Every micro-batch runs in a turn on the device shared with serving (server/device_share.py).
Between turns the job checks whether it was cancelled, lost its lease, or the server is
stopping, and stops there: a cancelled job's training is dropped; a job stopped with its server
stays `running` in the database, and the next runner to take it over (this server restarted, or
another replica) resumes it from its last checkpoint.

Checkpoints are written between steps, outside any turn on the device: serving never waits for
one (server/tuning/checkpoint.py has what they hold).
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from prefixes import PrefixError, RawPrefix
from prefixes.catalog.names import parse_ref
from prefixes.errors import AlreadyExists, CorruptBlob
from prefixes.registry import Registry
from prefixes.tuning.checkpointing import Checkpoints
from prefixes.tuning.records import JobError, JobInfo
from prefixes.tuning.tuning import Tuning
from prefixes.usage.meter import UsageMeter
from prefixes.usage.records import Counts
from server.device_share import DeviceShare
from server.models import LoadedModel
from server.train import Example, PrefixTrainer
from server.tuning import checkpoint, plan, transfer
from server.tuning.checkpoint import START, Progress, Schedule
from server.tuning.data import parse_records, to_examples
from server.tuning.errors import SourceChanged, TuningError

log = logging.getLogger(__name__)


INTERNAL_ERROR = JobError(
    "internal_error", "training stopped on an internal error (the server log has the details)"
)


class Interrupted(Exception):
    """The job was cancelled, its runner lost its lease, or the server is stopping."""


class Diverged(Exception):
    """The loss is no longer a number: the job fails rather than register a broken prefix."""


@dataclass(frozen=True, slots=True)
class TrainingData:
    training: list[Example]
    validation: list[Example]


def prepare(job: JobInfo, tuning: Tuning, loaded: LoadedModel, max_len: int) -> TrainingData:
    """The job's files as token ids, each example checked against the context it will train
    in (TuningError naming the file and the line otherwise)."""
    training, validation = tuning.files_of(job)
    limit = min(max_len, loaded.spec.max_positions) - job.spec.num_virtual_tokens
    tokenizer = loaded.tokenizer

    def examples(content: bytes, field: str) -> list[Example]:
        return to_examples(parse_records(content, field), tokenizer, max_tokens=limit, field=field)

    return TrainingData(
        examples(training, "training_file"),
        [] if validation is None else examples(validation, "validation_file"),
    )


@dataclass
class JobRun:
    job: JobInfo
    tuning: Tuning
    checkpoints: Checkpoints
    registry: Registry
    loaded: LoadedModel
    share: DeviceShare
    max_len: int
    interrupted: threading.Event
    meter: UsageMeter  # the tokens it trains on, step by step
    runner: str  # the lease it trains under: whatever it writes counts only while it holds it
    checkpoint_interval: float  # seconds (0: after every step)
    _done: Progress = field(default=START, init=False)  # the last step completed
    _done_metrics: dict[str, float | int] = field(default_factory=dict, init=False)
    _saved: Progress = field(default=START, init=False)  # the last step checkpointed

    def run(self) -> None:
        """Train and register, or record why not; never raises."""
        try:
            self._run()
        except Interrupted:
            log.info("fine-tuning job %s stopped", self.job.id)
        except TuningError as exc:
            self._fail(JobError("invalid_training_file", exc.message, exc.field))
        except Diverged as exc:
            param = "hyperparameters.learning_rate_multiplier"
            self._fail(JobError("training_diverged", str(exc), param))
        except SourceChanged as exc:
            self._fail(JobError("source_changed", str(exc), "model"))
        except AlreadyExists:  # its name was taken while it trained
            taken = plan.suffix_taken(self.job.owner, self.job.spec.suffix)
            self._fail(JobError("AlreadyExists", taken.message, taken.field))
        except PrefixError as exc:  # a quota, a deleted source
            self._fail(JobError(type(exc).__name__, exc.message, exc.field))
        except Exception:
            log.exception("fine-tuning job %s crashed", self.job.id)
            self._fail(INTERNAL_ERROR)

    def _run(self) -> None:
        job, spec = self.job, self.job.spec
        data = prepare(job, self.tuning, self.loaded, self.max_len)
        trainer = self._resumed_trainer()
        try:
            try:
                trained_tokens = self._train(trainer, data)
            except Interrupted:
                self._checkpoint_on_stop(trainer)
                raise
            files = trainer.adapter_files()
        finally:
            trainer.close()
        self._check()
        self.registry.upload(
            job.owner,
            spec.suffix,
            files,
            description=f"fine-tuned by job {job.id} from {spec.model}",
            on_commit=self.tuning.succeed_on_commit(job, trained_tokens, runner=self.runner),
        )

    def _resumed_trainer(self) -> PrefixTrainer:
        """A trainer at the job's last checkpoint, or a new one (from its source prefix)."""
        config = plan.train_config(self.job.spec)
        try:
            found = self.checkpoints.latest(self.job)
        except CorruptBlob as exc:
            found = None
            self._starts_over(str(exc))
        if found is not None:
            saved, tensors = found
            trainer = PrefixTrainer(self.loaded, config)
            try:
                progress = Progress.from_json(saved.state)
                checkpoint.restore(trainer, tensors)
            except ValueError as exc:
                trainer.close()
                self._starts_over(str(exc))
            else:
                self._done = self._saved = progress
                self.tuning.event(
                    self.job, f"Training resumes from the checkpoint at step {progress.step}"
                )
                return trainer
        return PrefixTrainer(self.loaded, config, init_from=self._source())

    def _starts_over(self, why: str) -> None:
        log.warning("fine-tuning job %s: checkpoint unusable, starting over: %s", self.job.id, why)
        self.tuning.event(
            self.job, "The last checkpoint could not be read: training starts over", level="warn"
        )

    def _train(self, trainer: PrefixTrainer, data: TrainingData) -> int:
        hyper = self.job.spec.hyperparameters
        steps = plan.total_steps(len(data.training), hyper)
        per_epoch = steps // hyper.n_epochs
        trained_tokens = self._done.trained_tokens
        schedule = Schedule(self.checkpoint_interval)
        remaining = itertools.islice(
            enumerate(plan.batches(data.training, hyper, self.job.spec.seed), start=1),
            self._done.step,  # the data order is the seed's: skip the steps already taken
            None,
        )
        for step, (epoch, batch) in remaining:
            # While the engine is idle, one turn for the whole batch: the same gradient, with
            # fewer, larger forwards; while it serves, one example a turn keeps turns short.
            loss = trainer.step(batch, self._turn, whole_batch=not self.share.serving())
            step_tokens = sum(len(example.input_ids) for example in batch)
            trained_tokens += step_tokens
            # Counted as it trains: a job cancelled or failed midway counts what it trained.
            self.meter.add(self.job.owner, self._usage_model, Counts(tuning_tokens=step_tokens))
            metrics: dict[str, float | int] = {
                "step": step, "total_steps": steps, "epoch": epoch, "train_loss": loss,
            }  # fmt: skip
            message = f"Step {step}/{steps}: training loss={loss:.4f}"
            if data.validation and step % per_epoch == 0:
                metrics["valid_loss"] = trainer.evaluate(data.validation, self._turn)
                message += f", validation loss={metrics['valid_loss']:.4f}"
            broken = [name for name, value in metrics.items() if not math.isfinite(value)]
            if broken:
                raise Diverged(
                    f"training diverged at step {step}: {broken[0]} became "
                    f"{metrics[broken[0]]}; lower learning_rate_multiplier"
                )
            self.tuning.event(self.job, message, type_="metrics", data=metrics)
            self._done, self._done_metrics = Progress(step, epoch, trained_tokens), metrics
            if step < steps and schedule.due():
                if not self._checkpoint(trainer, self._done, metrics):
                    raise Interrupted  # another runner holds the job now, or it ended
                schedule.done()
        return trained_tokens

    def _checkpoint(
        self, trainer: PrefixTrainer, progress: Progress, metrics: dict[str, float | int]
    ) -> bool:
        """Save the trainer's state after `progress.step`; False if this runner no longer holds
        the job. Between steps, outside any turn: serving does not wait for it."""
        if progress.step == self._saved.step:
            return True  # nothing new since the last one
        saved = self.checkpoints.save(
            self.job,
            self.runner,
            step=progress.step,
            metrics=metrics,
            state=progress.to_json(),
            tensors=checkpoint.encode(trainer),
        )
        if saved:
            self._saved = progress
        return saved

    def _checkpoint_on_stop(self, trainer: PrefixTrainer) -> None:
        """The server is stopping (or the job ended): keep the steps taken since the last
        checkpoint for whoever resumes the job. The trainer stands at the last step completed:
        a step interrupted half-way has not updated anything yet. A runner that no longer holds
        the job writes nothing (Checkpoints.save checks)."""
        try:
            self._checkpoint(trainer, self._done, self._done_metrics)
        except Exception:  # the job stops all the same; it resumes from an older checkpoint
            log.exception("fine-tuning job %s: checkpoint on stop failed", self.job.id)

    def _fail(self, error: JobError) -> None:
        self.tuning.fail(self.job, error, runner=self.runner)

    @property
    def _usage_model(self) -> str:
        """What its tokens count under in usage: the base model, or the source prefix as
        `owner/name` (as a generation with it counts), however the job named it."""
        spec = self.job.spec
        if spec.model == self.loaded.model_id:
            return spec.model
        return "/".join(parse_ref(spec.model, self.job.owner))

    def _source(self) -> RawPrefix | None:
        """The prefix training starts from (prompt transfer), as trainable values."""
        spec = self.job.spec
        if spec.model == self.loaded.model_id:
            return None
        # Resolved again: the source may have a new version (of another kind) since planning.
        source = self.registry.resolve(spec.model, tenant=self.job.owner)
        return transfer.initial_values(
            source, spec.method, self.registry, self.job.owner, spec.num_virtual_tokens
        )

    @contextmanager
    def _turn(self) -> Iterator[None]:
        self._check()
        with self.share.train_step():
            yield

    def _check(self) -> None:
        if self.interrupted.is_set():
            raise Interrupted
