"""One fine-tuning job, from its files to its registered prefix, on a thread of its own.

Every micro-batch runs in a turn on the device shared with serving (server/device_share.py).
Between turns the job checks whether it was cancelled or the server is stopping, and stops
there: a cancelled job's training is dropped; a job stopped by the server stays `running` in
the database, and the next start marks it failed (`Tuning.recover`).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from prefixes import PrefixError, PrefixKind, RawPrefix
from prefixes.errors import AlreadyExists
from prefixes.registry import Registry
from prefixes.tuning.records import JobError, JobInfo
from prefixes.tuning.tuning import Tuning
from prefixes.usage.meter import UsageMeter
from prefixes.usage.records import Counts
from server.device_share import DeviceShare
from server.models import LoadedModel
from server.train import Example, PrefixTrainer
from server.tuning import plan
from server.tuning.data import parse_records, to_examples
from server.tuning.errors import TuningError

log = logging.getLogger(__name__)


INTERNAL_ERROR = JobError(
    "internal_error", "training stopped on an internal error (the server log has the details)"
)


class Interrupted(Exception):
    """The job was cancelled, or the server is stopping."""


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
    registry: Registry
    loaded: LoadedModel
    share: DeviceShare
    max_len: int
    interrupted: threading.Event
    meter: UsageMeter

    def run(self) -> None:
        """Train and register, or record why not; never raises."""
        try:
            self._run()
        except Interrupted:
            log.info("fine-tuning job %s stopped", self.job.id)
        except TuningError as exc:
            self.tuning.fail(self.job, JobError("invalid_training_file", exc.message, exc.field))
        except Diverged as exc:
            param = "hyperparameters.learning_rate_multiplier"
            self.tuning.fail(self.job, JobError("training_diverged", str(exc), param))
        except AlreadyExists:  # its name was taken while it trained
            taken = plan.suffix_taken(self.job.owner, self.job.spec.suffix)
            self.tuning.fail(self.job, JobError("AlreadyExists", taken.message, taken.field))
        except PrefixError as exc:  # a quota, a deleted source
            self.tuning.fail(self.job, JobError(type(exc).__name__, exc.message, exc.field))
        except Exception:
            log.exception("fine-tuning job %s crashed", self.job.id)
            self.tuning.fail(self.job, INTERNAL_ERROR)

    def _run(self) -> None:
        job, spec = self.job, self.job.spec
        data = prepare(job, self.tuning, self.loaded, self.max_len)
        trainer = PrefixTrainer(self.loaded, plan.train_config(spec), init_from=self._source())
        try:
            trained_tokens = self._train(trainer, data)
            files = trainer.adapter_files()
        finally:
            trainer.close()
        self._check()
        self.registry.upload(
            job.owner,
            spec.suffix,
            files,
            description=f"fine-tuned by job {job.id} from {spec.model}",
            on_commit=self.tuning.succeed_on_commit(job, trained_tokens),
        )

    def _train(self, trainer: PrefixTrainer, data: TrainingData) -> int:
        hyper = self.job.spec.hyperparameters
        steps = plan.total_steps(len(data.training), hyper)
        per_epoch = steps // hyper.n_epochs
        trained_tokens = 0
        for step, (epoch, batch) in enumerate(
            plan.batches(data.training, hyper, self.job.spec.seed), start=1
        ):
            # While the engine is idle, one turn for the whole batch: the same gradient, with
            # fewer, larger forwards; while it serves, one example a turn keeps turns short.
            loss = trainer.step(batch, self._turn, whole_batch=not self.share.serving())
            step_tokens = sum(len(example.input_ids) for example in batch)
            trained_tokens += step_tokens
            # Counted as it trains: a job cancelled or failed midway counts what it trained.
            self.meter.add(self.job.owner, self.job.spec.model, Counts(tuning_tokens=step_tokens))
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
        return trained_tokens

    def _source(self) -> RawPrefix | None:
        """The prefix training starts from (prompt transfer), as trainable values."""
        if self.job.spec.model == self.loaded.model_id:
            return None
        with self.registry.acquire(self.job.spec.model, tenant=self.job.owner) as handle:
            return RawPrefix(PrefixKind.PREFIX_TUNING, handle.prefix.kv.float().cpu())

    @contextmanager
    def _turn(self) -> Iterator[None]:
        self._check()
        with self.share.train_step():
            yield

    def _check(self) -> None:
        if self.interrupted.is_set():
            raise Interrupted
