"""What a step costs: the model the scheduler reads to size each step's prefill.

A step's time on a device is close to linear in four things the scheduler knows before it runs:
the forwards it takes (each reads every weight once and pays launches and Python), the tokens
fed (where forwards are padded, every row of one is fed its longest chunk's length; packed,
each token once), the query x key pairs attention computes, and the cached positions attention
reads. `StepCost` holds the seconds each
costs. The engine fits it to steps measured on its own device at start-up (calibrate.py) and
refits it online from the steps it runs (`observe`), so the budget follows the machine and its
load instead of a constant.

The scheduler asks one thing of it: how many prompt tokens fit beside the decoding rows in a
step that must not take longer than `gap_target` times what the decode alone costs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import NamedTuple, Protocol, TypeVar

import numpy as np

# A forward's fixed cost (Python, kernel launches, weight reads) in padded-token equivalents,
# until a calibration replaces it with what the device measured.
FORWARD_OVERHEAD_TOKENS = 64


class HasNumTokens(Protocol):
    @property
    def num_tokens(self) -> int: ...


Row = TypeVar("Row", bound=HasNumTokens)


def plan_forwards(
    rows: Sequence[Row], overhead_tokens: int = FORWARD_OVERHEAD_TOKENS
) -> list[list[Row]]:
    """One padded forward for all rows, or decode rows and prefill rows apart when padding
    every decode row to the longest chunk would cost more than a second forward."""
    decode = [row for row in rows if row.num_tokens == 1]
    prefill = [row for row in rows if row.num_tokens > 1]
    if not decode or not prefill:
        return [list(rows)]
    longest = max(row.num_tokens for row in prefill)
    if splits(len(decode), len(prefill), longest, overhead_tokens):
        return [decode, prefill]
    return [list(rows)]


def splits(num_decode: int, num_prefill: int, longest: int, overhead_tokens: int) -> bool:
    """Whether decode rows run apart from prefill rows: padding each decode row to the longest
    chunk would feed more tokens than a second forward's overhead."""
    joint = (num_decode + num_prefill) * longest
    return num_decode + num_prefill * longest + overhead_tokens < joint


class RowShape(NamedTuple):
    num_tokens: int  # fed this step
    kv_len: int  # positions it attends to, its new ones included


FEATURES = ("forwards", "tokens", "pairs", "kv_read")


def step_features(
    rows: Sequence[RowShape],
    overhead_tokens: int = FORWARD_OVERHEAD_TOKENS,
    *,
    packed: bool = False,
) -> tuple[float, float, float, float]:
    """(forwards, tokens fed, query x key pairs, cached positions read) of one step, as the
    runner will run it: packed (packed.py: every token once, each row against its own
    positions) or padded (plan_forwards: rows padded to the longest chunk)."""
    if not rows:
        return (0.0, 0.0, 0.0, 0.0)
    if packed:
        tokens = sum(n for n, _ in rows)
        pairs = sum(n * kv_len for n, kv_len in rows)
        return (1.0, float(tokens), float(pairs), float(sum(kv_len for _, kv_len in rows)))
    num_decode = decode_kv = num_prefill = prefill_kv = longest = 0
    for num_tokens, kv_len in rows:
        if num_tokens == 1:
            num_decode += 1
            decode_kv += kv_len
        else:
            num_prefill += 1
            prefill_kv += kv_len
            longest = max(longest, num_tokens)
    kv_read = decode_kv + prefill_kv
    if not num_prefill:
        return (1.0, float(num_decode), float(decode_kv), float(kv_read))
    if num_decode and splits(num_decode, num_prefill, longest, overhead_tokens):
        tokens = num_decode + num_prefill * longest
        return (2.0, float(tokens), float(decode_kv + longest * prefill_kv), float(kv_read))
    tokens = (num_decode + num_prefill) * longest
    return (1.0, float(tokens), float(longest * kv_read), float(kv_read))


class StepCostModel(Protocol):
    """What the scheduler reads: the predicted seconds of a step of these rows."""

    def seconds(self, rows: Sequence[RowShape]) -> float: ...


class StepCost:
    """seconds = per_forward * forwards + per_token * tokens + per_pair * pairs
    + per_kv * positions read, fitted by least squares on relative error (a decode step's
    few milliseconds matter as much as a prefill's seconds), every coefficient >= 0.

    The measurements it was calibrated on are kept; steps observed while serving join them in
    a sliding window, and the fit is redone every `refit_every` observations."""

    def __init__(
        self,
        samples: Sequence[tuple[Sequence[RowShape], float]],
        *,
        overhead_tokens: int = FORWARD_OVERHEAD_TOKENS,
        packed: bool = False,
        window: int = 512,
        refit_every: int = 8,
    ) -> None:
        self.overhead_tokens = overhead_tokens
        self.packed = packed  # the runner packs its forwards (packed.py)
        self._calibration = [(self.features(r), s) for r, s in samples]
        self._recent: deque[tuple[tuple[float, ...], float]] = deque(maxlen=window)
        self._refit_every = refit_every
        self._since_fit = 0
        self.coefficients = fit(self._calibration)

    def features(self, rows: Sequence[RowShape]) -> tuple[float, float, float, float]:
        return step_features(rows, self.overhead_tokens, packed=self.packed)

    def seconds(self, rows: Sequence[RowShape]) -> float:
        features = self.features(rows)
        return sum(c * f for c, f in zip(self.coefficients, features, strict=True))

    def observe(self, rows: Sequence[RowShape], seconds: float) -> None:
        """A step the engine ran: it joins the window; every `refit_every` of them, refit."""
        if seconds <= 0 or not rows:
            return
        self._recent.append((self.features(rows), seconds))
        self._since_fit += 1
        if self._since_fit >= self._refit_every:
            self._since_fit = 0
            self.coefficients = fit([*self._calibration, *self._recent], self.coefficients)

    def describe(self) -> str:
        per_forward, per_token, per_pair, per_kv = self.coefficients
        return (
            f"{per_forward * 1e3:.2f} ms per forward, {per_token * 1e6:.1f} us per token, "
            f"{per_pair * 1e9:.2f} ns per attention pair, {per_kv * 1e9:.1f} ns per position read"
        )


def fit(
    samples: Sequence[tuple[Sequence[float], float]],
    fallback: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
) -> tuple[float, ...]:
    """Non-negative least squares on relative error, by dropping the most negative coefficient
    until none is left (four features: at most four solves)."""
    usable = [(f, s) for f, s in samples if s > 0]
    if not usable:
        return tuple(fallback)
    features = np.array([f for f, _ in usable], dtype=np.float64)
    seconds = np.array([s for _, s in usable], dtype=np.float64)
    weighted = features / seconds[:, None]
    active = [i for i in range(features.shape[1]) if features[:, i].any()]
    while active:
        solution, *_ = np.linalg.lstsq(weighted[:, active], np.ones(len(usable)), rcond=None)
        if (solution >= 0).all():
            coefficients = np.zeros(features.shape[1])
            coefficients[active] = solution
            return tuple(float(c) for c in coefficients)
        del active[int(np.argmin(solution))]
    return tuple(fallback)


def max_chunk(
    cost: StepCostModel,
    planned: Sequence[RowShape],
    starts: Sequence[int],
    most: int,
    limit: float,
) -> int:
    """The largest chunk (<= most) that rows at `starts` (positions already cached: a lockstep
    group's rows take the same chunk) can each be fed beside `planned` within `limit` seconds;
    0 if none."""
    planned = list(planned)

    def fits(chunk: int) -> bool:
        extra = [RowShape(chunk, start + chunk) for start in starts]
        return cost.seconds(planned + extra) <= limit

    low, high = 0, most
    while low < high:  # the step's cost grows with the chunk
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low
