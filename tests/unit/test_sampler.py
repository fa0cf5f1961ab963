"""The sampler draws from the distribution the parameters describe, row by row."""

from __future__ import annotations

import pytest
import torch

from server.engine.request import Request, SamplingParams
from server.engine.sampler import sample

LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])


def draw(params: SamplingParams, n: int, logits: torch.Tensor = LOGITS) -> torch.Tensor:
    request = Request([0], params)
    return torch.stack([sample(logits, [request]) for _ in range(n)]).flatten()


def test_greedy_takes_the_argmax() -> None:
    assert draw(SamplingParams(temperature=0), 5).tolist() == [0] * 5


def test_temperature_one_follows_the_softmax() -> None:
    tokens = draw(SamplingParams(temperature=1.0, seed=0), 20_000)
    freq = torch.bincount(tokens, minlength=6).float() / len(tokens)
    assert torch.allclose(freq, LOGITS[0].softmax(-1), atol=0.015)


def test_low_temperature_sharpens_and_high_temperature_flattens() -> None:
    cold = draw(SamplingParams(temperature=0.25, seed=0), 4000)
    hot = draw(SamplingParams(temperature=4.0, seed=0), 4000)
    assert (cold == 0).float().mean() > 0.95
    assert 0.2 < (hot == 0).float().mean() < 0.4


def test_top_k_keeps_only_the_k_most_likely() -> None:
    tokens = draw(SamplingParams(temperature=1.0, top_k=2, seed=0), 3000)
    assert set(tokens.tolist()) == {0, 1}


def test_top_p_keeps_the_smallest_nucleus_reaching_p() -> None:
    probs = LOGITS[0].softmax(-1)  # 0.56, 0.21, 0.13, 0.08, ...
    tokens = draw(SamplingParams(temperature=1.0, top_p=0.8, seed=0), 3000)
    assert set(tokens.tolist()) == {0, 1, 2}
    assert probs[:2].sum() < 0.8 <= probs[:3].sum()


def test_tiny_top_p_is_greedy() -> None:
    assert set(draw(SamplingParams(temperature=1.0, top_p=1e-6, seed=0), 200).tolist()) == {0}


def test_rows_in_one_call_use_their_own_parameters() -> None:
    logits = LOGITS.repeat(3, 1)
    requests = [
        Request([0], SamplingParams(temperature=0)),
        Request([0], SamplingParams(temperature=1.0, top_k=1, seed=3)),
        Request([0], SamplingParams(temperature=1.0, seed=4)),
    ]
    seen = torch.stack([sample(logits, requests) for _ in range(300)])
    assert set(seen[:, 0].tolist()) == {0}
    assert set(seen[:, 1].tolist()) == {0}
    assert len(set(seen[:, 2].tolist())) >= 4


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"stop": ("",)}, "stop"),
    ],
)
def test_invalid_sampling_parameters_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)
