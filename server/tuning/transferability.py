"""Transferability: which existing prefix fits a training file best, before training on it.

A candidate is scored by its mean loss per target token on a sample of the file: the tokens
a job's loss covers (server/tuning/data.py: a completion and its EOS, a conversation's last
reply), each weighed once, as `PrefixTrainer.evaluate` weighs them. A lower loss than the base
model's means the candidate already does part of the task: a source to start a job from (prompt
transfer, Su et al. 2022, who found a source's loss on the target task a fair predictor of how
much it helps).

This module is the arithmetic: which examples, which positions, and the ranking. Running the
rows on the engine is the API's (server/api/transferability.py).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from server.train import Example
from server.tuning.data import Record


def draw_sample(records: Sequence[Record], size: int, seed: int) -> list[Record]:
    """`size` examples drawn from `seed` without replacement, in file order (all of them when
    the file has no more): the same file, size and seed score the same examples."""
    if len(records) <= size:
        return list(records)
    chosen = random.Random(seed).sample(range(len(records)), size)
    return [records[i] for i in sorted(chosen)]


def target_positions(example: Example) -> list[int]:
    """Positions of the tokens the loss covers. Position 0 never counts: nothing of the
    prompt precedes it (every example has a prompt, so a target never starts there)."""
    return [i for i, label in enumerate(example.labels) if i > 0 and label != -100]


@dataclass(frozen=True, slots=True)
class LossSum:
    """Negative log-likelihood summed over target tokens, and how many there were."""

    total: float = 0.0
    tokens: int = 0

    def __add__(self, other: LossSum) -> LossSum:
        return LossSum(self.total + other.total, self.tokens + other.tokens)

    @property
    def mean(self) -> float:
        return self.total / self.tokens


def example_loss(example: Example, prompt_logprobs: Sequence[float | None]) -> LossSum:
    """The loss of one example from the engine's prompt log-probs of its tokens (token i's at
    index i - 1, as `Result.prompt_logprobs` holds them)."""
    positions = target_positions(example)
    values = [prompt_logprobs[i - 1] for i in positions]
    if any(value is None for value in values):
        raise ValueError("a target token was not scored")
    return LossSum(-math.fsum(v for v in values if v is not None), len(positions))


@dataclass(frozen=True, slots=True)
class Scored:
    """One candidate's outcome: its mean loss, or why it has none."""

    ref: str | None  # None: the base model
    loss: float | None
    error: str | None = None  # e.g. its values overflowed on these examples


def ranked(scores: Sequence[Scored]) -> list[Scored]:
    """Lowest loss first (ties by reference, so the order never depends on timing); the
    candidates without a loss last."""
    return sorted(
        scores, key=lambda s: (s.loss is None, s.loss if s.loss is not None else 0.0, s.ref or "")
    )
