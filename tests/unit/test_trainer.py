"""The trainer behind `prefix-server train` and fine-tuning jobs: micro-batches, and the served
model left as it was."""

from __future__ import annotations

import pytest
import torch

from server.models import weights_digest
from server.train import Example, PrefixTrainer, TrainConfig
from server.tuning import checkpoint
from tests.tiny import tiny_loaded

EXAMPLES = [
    Example([1, 2, 3, 4], [-100, -100, 3, 4]),
    Example([5, 6], [-100, 6]),
    Example([7, 8, 9], [-100, 8, 9]),
]


def trained(kind: str, micro: int | None) -> tuple[list[float], torch.Tensor]:
    loaded = tiny_loaded("llama")
    config = TrainConfig(kind=kind, virtual_tokens=4, batch_size=3, micro_batch_size=micro)
    trainer = PrefixTrainer(loaded, config)
    try:
        losses = [trainer.step(EXAMPLES) for _ in range(3)]
        (weight,) = [p for p in trainer.model.parameters() if p.requires_grad]
        return losses, weight.detach().clone()
    finally:
        trainer.close()


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_micro_batches_give_the_whole_batchs_loss_and_update(kind: str) -> None:
    whole_losses, whole = trained(kind, None)
    micro_losses, micro = trained(kind, 1)
    assert micro_losses == pytest.approx(whole_losses, rel=1e-5)
    assert micro_losses[-1] < micro_losses[0]
    torch.testing.assert_close(micro, whole, rtol=1e-4, atol=1e-6)


def test_each_micro_batch_takes_its_own_turn() -> None:
    loaded = tiny_loaded("llama")
    turns = []

    class Turn:
        def __enter__(self) -> None:
            turns.append("in")

        def __exit__(self, *exc: object) -> None:
            turns.append("out")

    trainer = PrefixTrainer(loaded, TrainConfig(virtual_tokens=2, micro_batch_size=2))
    try:
        trainer.step(EXAMPLES, Turn)
        assert turns == ["in", "out"] * 2  # 3 examples, 2 per micro-batch
        trainer.step(EXAMPLES, Turn, whole_batch=True)
        assert len(turns) == 6
        trainer.evaluate(EXAMPLES, Turn)
        assert len(turns) == 10
    finally:
        trainer.close()


def test_training_wraps_the_served_model_without_copying_or_changing_it() -> None:
    loaded = tiny_loaded("llama")
    digest = weights_digest(loaded.model)
    pointers = [p.data_ptr() for p in loaded.model.parameters()]
    trainer = PrefixTrainer(loaded, TrainConfig(virtual_tokens=4))
    try:
        assert trainer.model.base_model is loaded.model
        trainer.step(EXAMPLES)
        assert not loaded.model.training  # dropout stays off for requests served meanwhile
        trainable = [p for p in trainer.model.parameters() if p.requires_grad]
        assert sum(p.numel() for p in trainable) == 4 * 3 * 2 * 2 * 24  # T * L * (K, V) * H * D
    finally:
        trainer.close()
    assert weights_digest(loaded.model) == digest
    assert [p.data_ptr() for p in loaded.model.parameters()] == pointers
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_wrapping_the_model_warns_nothing_a_user_could_act_on() -> None:
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = PrefixTrainer(tiny_loaded("llama"), TrainConfig(virtual_tokens=2))
        trainer.close()
    assert [w for w in caught if issubclass(w.category, FutureWarning)] == []


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_a_trainer_resumed_from_a_checkpoint_takes_the_same_steps(kind: str) -> None:
    loaded = tiny_loaded("llama")
    config = TrainConfig(kind=kind, virtual_tokens=4, batch_size=3, seed=3)

    def weight(trainer: PrefixTrainer) -> torch.Tensor:
        return next(p for p in trainer.model.parameters() if p.requires_grad).detach().clone()

    uninterrupted = PrefixTrainer(loaded, config)
    try:
        losses = [uninterrupted.step(EXAMPLES) for _ in range(4)]
        final = weight(uninterrupted)
    finally:
        uninterrupted.close()
    first = PrefixTrainer(loaded, config)
    try:
        assert [first.step(EXAMPLES) for _ in range(2)] == losses[:2]
        saved = checkpoint.encode(first)
    finally:
        first.close()
    # Another process would start from another initialisation: the checkpoint replaces it.
    resumed = PrefixTrainer(loaded, TrainConfig(kind=kind, virtual_tokens=4, seed=99))
    try:
        checkpoint.restore(resumed, saved)
        assert [resumed.step(EXAMPLES) for _ in range(2)] == losses[2:]  # exactly
        assert torch.equal(weight(resumed), final)
    finally:
        resumed.close()
    other = PrefixTrainer(loaded, TrainConfig(kind=kind, virtual_tokens=2))
    try:
        with pytest.raises(ValueError, match="expected shape"):
            checkpoint.restore(other, saved)
        with pytest.raises(ValueError, match="not a safetensors file"):
            checkpoint.restore(other, b"\x80\x04pickled")
    finally:
        other.close()
