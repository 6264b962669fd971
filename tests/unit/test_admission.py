"""Admission is whole: a request is queued whole or refused whole; one that could never fit is
refused by its bound; Evaluate's calls wait for room instead of being refused midway."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from tests.tiny import tiny_loaded
from vitlens_server.errors import InvalidArgument, ResourceExhausted
from vitlens_server.runtime.worker import ModelWorker


class Blocked:
    """Blocks the model's first forward until released (the device is busy)."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def __call__(self, _module, _inputs) -> None:
        self.calls += 1
        if self.calls == 1:
            self.started.set()
            assert self.release.wait(30)


@pytest.fixture
def worker():
    model = tiny_loaded(seed=21)
    worker = ModelWorker(model, max_batch_size=4, max_queue_images=4)
    blocked = Blocked()
    handle = model.module.register_forward_pre_hook(blocked)
    yield worker, blocked
    handle.remove()
    worker.close()


def _pixels(count: int) -> torch.Tensor:
    return torch.rand(count, 3, 32, 32)


async def _started(blocked: Blocked) -> None:
    await asyncio.get_running_loop().run_in_executor(None, blocked.started.wait, 30)


async def test_evaluate_calls_wait_for_room_while_others_are_refused(worker) -> None:
    worker, blocked = worker
    worker.start()
    running = asyncio.create_task(worker.predict(_pixels(4), 1))
    await _started(blocked)
    queued = asyncio.create_task(worker.predict(_pixels(3), 1))
    await asyncio.sleep(0)
    assert worker.queued_images == 3
    with pytest.raises(ResourceExhausted, match="queue is full"):
        await worker.predict(_pixels(2), 1)  # 3 + 2 > 4: refused whole, with a retry hint
    assert worker.queued_images == 3  # nothing of it was queued
    waiting = asyncio.create_task(worker.logits(_pixels(2), wait_for_room=True))
    await asyncio.sleep(0)
    assert not waiting.done() and worker.queued_images == 3  # waits, not refused
    blocked.release.set()
    assert (await running)[0].indices.shape == (4, 1) and (await queued)[0].indices.shape == (3, 1)
    assert (await waiting).shape == (2, 5)
    await worker.stop()


async def test_a_request_larger_than_the_queue_is_refused_even_when_idle(worker) -> None:
    worker, blocked = worker
    blocked.release.set()
    worker.start()
    for call in (worker.predict(_pixels(5), 1), worker.logits(_pixels(9), wait_for_room=True)):
        with pytest.raises(InvalidArgument, match="holds at most 4") as caught:
            await call
        assert caught.value.field == "images"
    assert (await worker.predict(_pixels(4), 1))[0].indices.shape == (4, 1)
    await worker.stop()
