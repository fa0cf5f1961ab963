"""A prompt ensemble's vote: every member answered alone; the most frequent text wins.

Ties between texts are broken by the higher mean token log-probability (the model's confidence
in a candidate's own tokens, at temperature 1), the best of each text's candidates; then by the
order of the members, so the same answers always give the same winner. A model served without a
tokenizer has no text: its answers are compared by their token ids (written "5 6 7").
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from server.engine.stream import Result


@dataclass(frozen=True, slots=True)
class Candidate:
    prefix: str
    result: Result
    mean_logprob: float


@dataclass(frozen=True, slots=True)
class Vote:
    winner: Candidate
    candidates: list[Candidate]
    counts: dict[str, int]  # answer -> members that gave it, most votes first
    winner_votes: int

    @property
    def agreement(self) -> float:
        """The share of members that gave the winning answer."""
        return self.winner_votes / len(self.candidates)


@dataclass(frozen=True, slots=True)
class VotedResult(Result):
    """The winner's result, with the whole vote."""

    vote: Vote | None = None


def mean_logprob(logprobs: list[float]) -> float:
    return sum(logprobs) / len(logprobs) if logprobs else float("-inf")


def tally(candidates: list[Candidate], *, by_text: bool = True) -> Vote:
    def answer(candidate: Candidate) -> str:
        result = candidate.result
        return result.text if by_text else " ".join(map(str, result.token_ids))

    counts = Counter(answer(c) for c in candidates)
    best: dict[str, Candidate] = {}
    for candidate in candidates:
        key = answer(candidate)
        if key not in best or candidate.mean_logprob > best[key].mean_logprob:
            best[key] = candidate
    # max() keeps the first of equals: members' order breaks exact ties.
    winner = max(best.values(), key=lambda c: (counts[answer(c)], c.mean_logprob))
    return Vote(winner, candidates, dict(counts.most_common()), counts[answer(winner)])


def voted_result(vote: Vote) -> VotedResult:
    r = vote.winner.result
    return VotedResult(
        r.text,
        r.token_ids,
        r.finish_reason,
        r.prompt_tokens,
        r.prefix_tokens,
        logprobs=r.logprobs,  # the winner's, under its own prefix
        vote=vote,
    )
