"""Serving and training take turns on the device; while the engine has work, training gets at
most its share of the time (server/device_share.py)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from server.device_share import DeviceShare
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import SamplingParams
from tests.tiny import tiny_loaded


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def step(share: DeviceShare, clock: Clock, who: str, seconds: float) -> None:
    with share.engine_step() if who == "engine" else share.train_step():
        clock.now += seconds


def test_training_waits_for_the_engine_to_run_its_share_after_each_turn() -> None:
    clock = Clock()
    share = DeviceShare(0.25, idle_after=1.0, clock=clock)
    assert share.training_may_start() and not share.serving()
    # Binary fractions keep the sums exact.
    step(share, clock, "engine", 0.125)
    assert share.serving()
    step(share, clock, "train", 0.125)  # owes the engine 0.375 s: (1 - 0.25) / 0.25 per second
    assert not share.training_may_start()
    step(share, clock, "engine", 0.25)
    assert not share.training_may_start()
    step(share, clock, "engine", 0.125)
    assert share.training_may_start()
    assert (share.engine_seconds, share.train_seconds) == (0.5, 0.125)


def test_an_idle_engine_is_owed_nothing() -> None:
    clock = Clock()
    share = DeviceShare(0.25, idle_after=1.0, clock=clock)
    step(share, clock, "engine", 0.1)
    step(share, clock, "train", 0.1)
    assert not share.training_may_start()
    clock.now += 1.0  # no step asked for: the engine has no work
    assert share.training_may_start() and not share.serving()
    for _ in range(3):  # training runs back to back, owing nothing
        step(share, clock, "train", 2.0)
        assert share.training_may_start()


def test_a_shares_bounds() -> None:
    for share in (0.0, 1.0, -0.5, 2.0):
        with pytest.raises(ValueError, match="train_share"):
            DeviceShare(share)


def test_the_engine_waits_for_a_training_turn_to_end() -> None:
    share = DeviceShare(0.5)
    training, release, stepped = threading.Event(), threading.Event(), threading.Event()

    def train() -> None:
        with share.train_step():
            training.set()
            release.wait(10)

    def engine() -> None:
        with share.engine_step():
            stepped.set()

    threads = [threading.Thread(target=train), threading.Thread(target=engine)]
    threads[0].start()
    assert training.wait(10)
    threads[1].start()
    assert not stepped.wait(0.2)  # one turn at a time
    release.set()
    assert stepped.wait(10)
    for thread in threads:
        thread.join(10)


def test_under_a_busy_engine_training_keeps_to_its_share() -> None:
    # A long idle_after: the engine below never counts as idle between its steps.
    share = DeviceShare(0.25, idle_after=60.0)
    stop, first_step = threading.Event(), threading.Event()

    def engine() -> None:
        while not stop.is_set():
            with share.engine_step():
                time.sleep(0.001)
            first_step.set()

    thread = threading.Thread(target=engine)
    thread.start()
    try:
        assert first_step.wait(10)
        for _ in range(5):
            with share.train_step():
                time.sleep(0.005)
        trained = share.train_seconds
        with share.train_step():  # starts only once the engine was paid for all turns above
            engine_then = share.engine_seconds
    finally:
        stop.set()
        thread.join(10)
    assert engine_then >= 3 * trained * (1 - 1e-9)  # (1 - 0.25) / 0.25, up to float rounding


def test_the_engine_takes_its_steps_in_turns_with_training() -> None:
    loaded = tiny_loaded("llama")
    share = DeviceShare(0.5)
    engine = Engine(loaded, EngineConfig(num_slots=2, max_len=64), device_share=share).start()
    training, release = threading.Event(), threading.Event()

    def train() -> None:
        with share.train_step():
            training.set()
            release.wait(10)

    async def generate() -> list[int]:
        stream = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=4, temperature=0))
        return (await stream.result()).token_ids

    trainer = threading.Thread(target=train)
    trainer.start()
    try:
        assert training.wait(10)
        result: list[list[int]] = []
        generating = threading.Thread(target=lambda: result.append(asyncio.run(generate())))
        generating.start()
        generating.join(0.3)
        assert generating.is_alive() and share.engine_seconds == 0  # held by the turn
        release.set()
        generating.join(30)
        assert len(result[0]) == 4 and share.engine_seconds > 0
    finally:
        release.set()
        trainer.join(10)
        engine.stop()
