"""A running job's checkpoint: the trainer's tensors (trainable parameters and AdamW's state) as
safetensors, where the job stands as JSON. Never pickle: a checkpoint is read back by another
process, possibly on another machine, and holds nothing but numbers.

The data order needs no state of its own: each epoch's order is drawn from the job's seed
(`plan.batches`), so the step number says where in it training stands; training itself draws
no random numbers (the model runs in eval mode, no dropout).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from safetensors.torch import load, save

from server.train import PrefixTrainer

FORMAT = 1


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a job stands after a step: training resumes at `step + 1`."""

    step: int  # optimiser steps taken
    epoch: int
    trained_tokens: int

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "step": self.step, "epoch": self.epoch,
            "trained_tokens": self.trained_tokens,
        }  # fmt: skip

    @classmethod
    def from_json(cls, state: dict[str, Any]) -> Progress:
        if state.get("format") != FORMAT:
            raise ValueError(f"checkpoint: format {FORMAT} expected, found {state.get('format')}")
        try:
            return cls(int(state["step"]), int(state["epoch"]), int(state["trained_tokens"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"checkpoint: progress unreadable ({exc!r})") from None


START = Progress(0, 0, 0)


def encode(trainer: PrefixTrainer) -> bytes:
    return save(trainer.training_state())


def restore(trainer: PrefixTrainer, tensors: bytes) -> None:
    """ValueError if the bytes are not a checkpoint of this trainer's shape."""
    try:
        state = load(tensors)
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"checkpoint: not a safetensors file ({exc})") from None
    trainer.load_training_state(state)


class Schedule:
    """A checkpoint at the end of the first step after `interval` seconds since the last (or
    since the job started or resumed); 0: after every step."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.interval

    def done(self) -> None:
        self._last = time.monotonic()
