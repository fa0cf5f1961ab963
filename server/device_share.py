"""Serving and training take turns on the device, with training held to a share of its time.

Fine-tuning jobs train on the very weights the engine serves, on the same device. Run at the
same moment, the two would split the cores (or the GPU's queue) in whatever way the scheduler
falls into, and every running request's next token would wait for a whole training step. Here
they take turns instead: the engine wraps each of its steps in `engine_step()`, a trainer each
of its micro-steps (one micro-batch's forward and backward) in `train_step()`, and one turn runs
at a time.

While the engine has work, training gets at most `train_share` of the device's time: after a
training turn of t seconds, the engine runs for t * (1 - share) / share seconds of steps before
the next training turn starts. A request's next token therefore waits for at most one training
turn, and decoding slows by at most 1 / (1 - share) on average. While the engine is idle
(no step asked for within `idle_after` seconds), training turns follow one another freely, and
what the engine was still owed is forgiven. The counters (`engine_seconds`, `train_seconds`,
`train_seconds_serving`) are what /metrics exports.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class DeviceShare:
    def __init__(
        self,
        train_share: float,
        *,
        idle_after: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < train_share < 1:
            raise ValueError(f"train_share: expected a fraction in (0, 1), found {train_share}")
        self.train_share = train_share
        self.idle_after = idle_after
        self._clock = clock
        # Engine seconds owed to serving for each training second while serving has work.
        self._ratio = (1 - train_share) / train_share
        self._cond = threading.Condition()
        self._holder: str | None = None  # "engine" or "train" while a turn runs
        self._engine_waiting = False
        self._trainers_waiting = 0
        self._engine_last = -float("inf")  # when the engine's last step ended
        self._debt = 0.0  # engine seconds still owed before training's next turn
        self.engine_seconds = 0.0
        self.train_seconds = 0.0
        self.train_seconds_serving = 0.0  # the part of it taken while the engine had work

    def serving(self) -> bool:
        """Whether the engine has work: stepping, waiting for a turn, or stepped just now."""
        return (
            self._holder == "engine"
            or self._engine_waiting
            or self._clock() - self._engine_last < self.idle_after
        )

    def training_may_start(self) -> bool:
        """Whether a training turn may start now (the device being free aside)."""
        return self._debt <= 0 or not self.serving()

    @contextmanager
    def engine_step(self) -> Iterator[None]:
        with self._cond:
            self._engine_waiting = True
            try:
                # A trainer whose turn has come goes first; otherwise the engine never waits.
                while self._holder is not None or (
                    self._trainers_waiting and self.training_may_start()
                ):
                    self._cond.wait()
            finally:
                self._engine_waiting = False
            self._holder = "engine"
        start = self._clock()
        try:
            yield
        finally:
            end = self._clock()
            with self._cond:
                self._holder = None
                self._engine_last = end
                self.engine_seconds += end - start
                self._debt = max(0.0, self._debt - (end - start))
                self._cond.notify_all()

    @contextmanager
    def train_step(self) -> Iterator[None]:
        with self._cond:
            self._trainers_waiting += 1
            try:
                while self._holder is not None or not self.training_may_start():
                    # Timed: the engine going idle is the absence of a call, so nothing notifies.
                    self._cond.wait(self.idle_after)
            finally:
                self._trainers_waiting -= 1
            if not self.serving():
                self._debt = 0.0  # nothing was owed to an idle engine
            self._holder = "train"
        start = self._clock()
        try:
            yield
        finally:
            end = self._clock()
            with self._cond:
                self._holder = None
                self.train_seconds += end - start
                if self.serving():
                    self.train_seconds_serving += end - start
                    self._debt += (end - start) * self._ratio
                self._cond.notify_all()


class Unshared(DeviceShare):
    """No training beside serving: the engine's steps are not wrapped in anything."""

    def __init__(self) -> None:
        super().__init__(0.5)

    @contextmanager
    def engine_step(self) -> Iterator[None]:
        yield


UNSHARED = Unshared()
