"""The training worker: moves fine-tuning jobs along beside serving.

One thread validates new jobs' files against the model (`validating_files` -> `queued`) and
starts queued jobs, oldest first, within the caps: one running job per tenant and
`max_running` in all. Each running job trains on a thread of its own (server/tuning/job.py),
taking turns on the device with the engine through the shared `DeviceShare`.

Every job this worker runs is held under its lease (`runner`, renewed by a heartbeat thread
every third of `lease_s`). A running job whose lease expired, because the server running it
died or stopped, is taken over within the local cap and resumes from its last checkpoint: after
a restart, or on another replica sharing the database. A clean stop releases the leases, so
the next start takes its jobs over at once.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time

from prefixes import PrefixError
from prefixes.registry import Registry
from prefixes.tuning.checkpointing import Checkpoints
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
        checkpoints: Checkpoints,
        registry: Registry,
        loaded: LoadedModel,
        share: DeviceShare,
        *,
        max_running: int,
        max_len: int,
        lease_s: float,
        checkpoint_interval: float,
        meter: UsageMeter | None = None,
    ) -> None:
        self.tuning = tuning
        self.checkpoints = checkpoints
        self.registry = registry
        self.loaded = loaded
        self.share = share
        self.max_running = max_running
        self.max_len = max_len
        self.lease_s = lease_s
        self.checkpoint_interval = checkpoint_interval
        self.runner = runner_id()
        self.meter = meter or UsageMeter()  # the tokens each job trains on, step by step
        self._cond = threading.Condition()
        self._woken = True  # the first pass picks up what the previous process left
        self._stopping = False
        self._running: dict[str, tuple[threading.Thread, threading.Event]] = {}
        self._thread = threading.Thread(target=self._loop, name="tuning", daemon=True)
        self._heart = threading.Thread(target=self._heartbeat, name="tuning-lease", daemon=True)

    def start(self) -> TuningWorker:
        self._thread.start()
        self._heart.start()
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
        for thread in (self._thread, self._heart, *threads):
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))
        # After the jobs' checkpoints on stop. A job thread still in a long turn past the grace
        # writes nothing more once released: it cannot fail a job the next runner resumes.
        try:
            released = self.tuning.release(self.runner)
        except Exception:  # the leases expire on their own
            log.exception("fine-tuning: releasing the leases of %s failed", self.runner)
        else:
            if released:
                log.info("fine-tuning: jobs left to resume at the next start: %s", released)

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
                self.checkpoints.sweep()
            except Exception:  # the database failing, or a bug: keep the worker alive
                log.exception("fine-tuning worker pass failed")

    def _heartbeat(self) -> None:
        """Renew this runner's leases every third of the lease; stop the jobs it lost (cancelled
        elsewhere, or taken over after a lease expired); wake the loop to take over the jobs of
        runners that stopped."""
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping, timeout=self.lease_s / 3)
                if self._stopping:
                    return
                job_ids = list(self._running)
            try:  # outside the lock: a slow database never holds up wake() or interrupt()
                held = self.tuning.renew(self.runner, job_ids, self.lease_s)
            except Exception:
                log.exception("fine-tuning: renewing the leases failed")
                continue
            with self._cond:
                for job_id in set(job_ids) - held:
                    if job_id in self._running:
                        log.info("fine-tuning job %s: no longer held here, stopping", job_id)
                        self._running[job_id][1].set()
                self._woken = True
                self._cond.notify_all()

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
        with self._cond:
            free = self.max_running - len(self._running)
        jobs = self.tuning.take_over(self.runner, self.lease_s, free)
        jobs += self.tuning.start_queued(self.max_running, runner=self.runner, lease_s=self.lease_s)
        for job in jobs:
            with self._cond:
                # Its own job, whose lease lapsed while the database was out of reach: taking
                # it over renewed the lease; the thread training it goes on.
                if job.id in self._running:
                    continue
            interrupted = threading.Event()
            run = JobRun(
                job,
                self.tuning,
                self.checkpoints,
                self.registry,
                self.loaded,
                self.share,
                self.max_len,
                interrupted,
                self.meter,
                runner=self.runner,
                checkpoint_interval=self.checkpoint_interval,
            )
            thread = threading.Thread(
                target=self._run_job, args=(run,), name=f"tuning-{job.id}", daemon=True
            )
            with self._cond:
                if self._stopping:  # it stays running in the database: the next start resumes it
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


def runner_id() -> str:
    """Names this process in the leases it holds: host, pid and a random part (a pid can be
    reused after a restart)."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(4)}"
