"""The training worker: moves fine-tuning jobs along beside serving.

One thread validates new jobs' files against the model (`validating_files` -> `queued`) and
starts queued jobs, oldest first, within the caps: one running job per tenant and
`max_running` in all. Each running job trains on a thread of its own (server/tuning/job.py),
taking turns on the device with the engine through the shared `DeviceShare`.
"""

from __future__ import annotations

import logging
import threading
import time

from prefixes import PrefixError
from prefixes.registry import Registry
from prefixes.tuning.records import JobError, JobInfo, JobStatus
from prefixes.tuning.tuning import Tuning
from prefixes.usage.meter import UsageMeter
from server.device_share import DeviceShare
from server.models import LoadedModel
from server.tuning.errors import TuningError
from server.tuning.job import INTERNAL_ERROR, JobRun, prepare

log = logging.getLogger(__name__)


class TuningWorker:
    def __init__(
        self,
        tuning: Tuning,
        registry: Registry,
        loaded: LoadedModel,
        share: DeviceShare,
        *,
        max_running: int,
        max_len: int,
        recover: bool = True,
        meter: UsageMeter | None = None,
    ) -> None:
        """`recover`: at start, fail the jobs the previous process left running. Not with
        several replicas on one database: those jobs may be running on another replica."""
        self.tuning = tuning
        self.registry = registry
        self.loaded = loaded
        self.share = share
        self.max_running = max_running
        self.max_len = max_len
        self._recover = recover
        self.meter = meter or UsageMeter()  # the tokens each job trains on, step by step
        self._cond = threading.Condition()
        self._woken = True  # the first pass picks up what the previous process left queued
        self._stopping = False
        self._running: dict[str, tuple[threading.Thread, threading.Event]] = {}
        self._thread = threading.Thread(target=self._loop, name="tuning", daemon=True)

    def start(self) -> TuningWorker:
        failed = self.tuning.recover() if self._recover else []
        if failed:
            log.warning(
                "fine-tuning: %d jobs were running when the server stopped, marked failed: %s",
                len(failed),
                ", ".join(failed),
            )
        self._thread.start()
        return self

    @property
    def num_running(self) -> int:
        with self._cond:
            return len(self._running)

    def wake(self) -> None:
        """A job was created or one ended: look for work now."""
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def interrupt(self, job_id: str) -> None:
        """A job was cancelled: its thread stops before its next turn on the device."""
        with self._cond:
            running = self._running.get(job_id)
            if running is not None:
                running[1].set()
        self.wake()

    def stop(self, timeout: float) -> None:
        """Stop every job at its next turn and wait up to `timeout` s for the threads."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._stopping = True
            threads = [thread for thread, _ in self._running.values()]
            for _, interrupted in self._running.values():
                interrupted.set()
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(max(0.0, deadline - time.monotonic()))
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._woken or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    return
                self._woken = False
            try:
                self._validate_new()
                self._start_queued()
            except Exception:  # the database failing, or a bug: keep the worker alive
                log.exception("fine-tuning worker pass failed")

    def _validate_new(self) -> None:
        for job in self.tuning.jobs(JobStatus.VALIDATING_FILES):
            if self._stopping:
                return
            try:
                data = prepare(job, self.tuning, self.loaded, self.max_len)
            except TuningError as exc:
                self.tuning.fail(job, JobError("invalid_training_file", exc.message, exc.field))
                continue
            except PrefixError as exc:
                self.tuning.fail(job, JobError(type(exc).__name__, exc.message, exc.field))
                continue
            except Exception:  # a bug: fail this job alone, never block the ones behind it
                log.exception("validating fine-tuning job %s failed", job.id)
                self.tuning.fail(job, INTERNAL_ERROR)
                continue
            message = f"Files validated: {len(data.training)} training examples"
            if job.spec.validation_file is not None:
                message += f", {len(data.validation)} validation examples"
            self.tuning.queue(job, message + "; the job is queued")

    def _start_queued(self) -> None:
        for job in self.tuning.start_queued(self.max_running):
            interrupted = threading.Event()
            run = JobRun(
                job,
                self.tuning,
                self.registry,
                self.loaded,
                self.share,
                self.max_len,
                interrupted,
                self.meter,
            )
            thread = threading.Thread(
                target=self._run_job, args=(run,), name=f"tuning-{job.id}", daemon=True
            )
            with self._cond:
                if self._stopping:  # it stays running in the database: the next start fails it
                    interrupted.set()
                self._running[job.id] = (thread, interrupted)
            thread.start()

    def _run_job(self, run: JobRun) -> None:
        try:
            run.run()
        finally:
            self._finished(run.job)

    def _finished(self, job: JobInfo) -> None:
        with self._cond:
            self._running.pop(job.id, None)
            self._woken = True
            self._cond.notify_all()
