"""The dynamic batcher, with a fake runner: batching, delays, deadlines, cancellation, and the
interruption of batches nobody waits for any more."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from vitlens_server.errors import DeadlineExceeded, Unavailable
from vitlens_server.runtime.batcher import Batcher, BatchStats


class Runner:
    """Records batches; optionally blocks the first batch until released; fails on "poison".

    After a blocked batch is released it reports what ``interrupted()`` said then
    (``interrupted_after_release``) and, if it was interrupted, fails as the engine does."""

    def __init__(self, block_first: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.interrupted_after_release: bool | None = None
        if not block_first:
            self.release.set()

    def __call__(self, replica: int, items: list[str], interrupted) -> list:
        self.batches.append(list(items))
        first = len(self.batches) == 1
        self.started.set()
        if first:
            self.release.wait(timeout=30)
            self.interrupted_after_release = interrupted()
            if self.interrupted_after_release:
                raise InterruptedError("stopped at a step boundary")
        if "poison-all" in items:
            raise RuntimeError("the whole batch failed")
        return [ValueError(f"bad {i}") if i.startswith("bad") else f"done {i}" for i in items]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(runner: Runner, **kwargs) -> tuple[Batcher, list[BatchStats]]:
    stats: list[BatchStats] = []
    options = {"max_batch_size": 4, "max_delay_s": 30.0, **kwargs}
    batcher = Batcher(runner, [ThreadPoolExecutor(1)], on_batch=stats.append, **options)
    batcher.start()
    return batcher, stats


async def _started(runner: Runner) -> None:
    await asyncio.get_running_loop().run_in_executor(None, runner.started.wait, 30)


async def test_concurrent_requests_form_full_batches() -> None:
    runner = Runner()
    batcher, stats = make(runner)
    results = await asyncio.gather(*(batcher.submit(f"r{i}", images=1, kind="k") for i in range(8)))
    assert [r for r, _ in results] == [f"done r{i}" for i in range(8)]
    assert runner.batches == [["r0", "r1", "r2", "r3"], ["r4", "r5", "r6", "r7"]]
    assert [s.images for s in stats] == [4, 4] and all(w >= 0 for _, w in results)
    await batcher.stop()


async def test_a_lone_request_runs_after_the_delay() -> None:
    batcher, stats = make(Runner(), max_delay_s=0.01)
    result, wait_s = await batcher.submit("only", images=1, kind="k")
    assert result == "done only" and stats[0].requests == 1 and wait_s >= 0
    await batcher.stop()


async def test_kinds_never_share_a_batch_and_sizes_count_images() -> None:
    runner = Runner()
    batcher, _ = make(runner, max_delay_s=0.05)
    await asyncio.gather(
        batcher.submit("a1", images=3, kind="a"),
        batcher.submit("b1", images=1, kind="b"),
        batcher.submit("a2", images=2, kind="a"),  # 3 + 2 > 4: next batch, a3 still fits
        batcher.submit("b2", images=3, kind="b"),
        batcher.submit("a3", images=1, kind="a"),
    )
    assert sorted(runner.batches) == [["a1", "a3"], ["a2"], ["b1", "b2"]]
    await batcher.stop()


async def test_one_failing_request_fails_alone_and_a_failing_batch_fails_its_members() -> None:
    batcher, _ = make(Runner(), max_delay_s=0.0)
    good, bad = await asyncio.gather(
        batcher.submit("good", images=1, kind="k"),
        batcher.submit("bad", images=1, kind="k"),
        return_exceptions=True,
    )
    assert good[0] == "done good" and isinstance(bad, ValueError)
    with pytest.raises(RuntimeError, match="whole batch"):
        await batcher.submit("poison-all", images=1, kind="k")
    assert (await batcher.submit("after", images=1, kind="k"))[0] == "done after"
    await batcher.stop()


async def test_expired_requests_are_dropped_before_they_run() -> None:
    runner, clock = Runner(block_first=True), Clock()
    batcher, _ = make(runner, max_delay_s=0.0, clock=clock)
    first = asyncio.create_task(batcher.submit("first", images=4, kind="k"))
    await _started(runner)  # the device is busy with "first"
    late = asyncio.create_task(batcher.submit("late", images=1, kind="k", deadline=clock.now + 1))
    kept = asyncio.create_task(batcher.submit("kept", images=1, kind="k", deadline=clock.now + 9))
    await asyncio.sleep(0)  # let both enqueue
    clock.now += 5  # "late" expires while queued
    runner.release.set()
    with pytest.raises(DeadlineExceeded, match="while"):
        await late
    assert (await kept)[0] == "done kept" and (await first)[0] == "done first"
    assert ["late"] not in runner.batches and all("late" not in b for b in runner.batches)
    with pytest.raises(DeadlineExceeded, match="before it was queued"):
        await batcher.submit("past", images=1, kind="k", deadline=clock.now - 1)
    await batcher.stop()


async def test_cancelled_requests_never_reach_the_device() -> None:
    runner = Runner(block_first=True)
    batcher, _ = make(runner, max_delay_s=0.0)
    first = asyncio.create_task(batcher.submit("first", images=4, kind="k"))
    await _started(runner)
    gone = asyncio.create_task(batcher.submit("gone", images=1, kind="k"))
    stays = asyncio.create_task(batcher.submit("stays", images=1, kind="k"))
    await asyncio.sleep(0)
    gone.cancel()
    runner.release.set()
    assert (await stays)[0] == "done stays" and (await first)[0] == "done first"
    assert gone.cancelled() and all("gone" not in b for b in runner.batches)
    await batcher.stop()


async def test_a_cancelled_request_leaves_the_queue_at_once() -> None:
    runner = Runner(block_first=True)
    batcher, _ = make(runner, max_delay_s=0.0)
    first = asyncio.create_task(batcher.submit("first", images=4, kind="k"))
    await _started(runner)
    queued = [asyncio.create_task(batcher.submit(f"q{i}", images=2, kind="k")) for i in range(2)]
    await asyncio.sleep(0)
    assert batcher.queued_images == 4
    queued[0].cancel()
    await asyncio.gather(queued[0], return_exceptions=True)
    assert batcher.queued_images == 2  # not when a consumer next looks
    runner.release.set()
    assert (await queued[1])[0] == "done q1" and (await first)[0] == "done first"
    await batcher.stop()


async def test_a_running_batch_is_interrupted_once_every_caller_left() -> None:
    runner = Runner(block_first=True)
    batcher, _ = make(runner, max_delay_s=0.0)
    both = [asyncio.create_task(batcher.submit(f"r{i}", images=1, kind="k")) for i in range(2)]
    await _started(runner)
    both[0].cancel()
    await asyncio.gather(both[0], return_exceptions=True)
    # one caller still waits: the batch runs on and answers it
    runner.release.set()
    assert (await both[1])[0] == "done r1" and runner.interrupted_after_release is False

    runner = Runner(block_first=True)
    batcher, _ = make(runner, max_delay_s=0.0)
    both = [asyncio.create_task(batcher.submit(f"r{i}", images=1, kind="k")) for i in range(2)]
    await _started(runner)
    for task in both:
        task.cancel()
    await asyncio.gather(*both, return_exceptions=True)
    runner.release.set()
    assert (await batcher.submit("next", images=1, kind="k"))[0] == "done next"
    assert runner.interrupted_after_release is True
    await batcher.stop()


async def test_a_deadline_passing_while_the_batch_runs_interrupts_it() -> None:
    runner, clock = Runner(block_first=True), Clock()
    batcher, _ = make(runner, max_delay_s=0.0, clock=clock)
    call = asyncio.create_task(batcher.submit("slow", images=1, kind="k", deadline=clock.now + 1))
    await _started(runner)
    clock.now += 5
    runner.release.set()
    with pytest.raises(DeadlineExceeded, match="while it ran"):
        await call
    assert runner.interrupted_after_release is True
    await batcher.stop()


async def test_stopping_fails_the_queue_and_interrupts_the_running_batch() -> None:
    runner = Runner(block_first=True)
    batcher, _ = make(runner, max_delay_s=0.0)
    running = asyncio.create_task(batcher.submit("running", images=4, kind="k"))
    await _started(runner)
    queued = asyncio.create_task(batcher.submit("queued", images=1, kind="k"))
    await asyncio.sleep(0)
    stopping = asyncio.create_task(batcher.stop())
    with pytest.raises(Unavailable, match="shutting down"):
        await queued  # at once, while the batch still runs
    assert not stopping.done()
    runner.release.set()
    await stopping  # returns once the running batch has ended
    assert runner.interrupted_after_release is True
    with pytest.raises(Unavailable, match="shutting down"):
        await running
    with pytest.raises(Unavailable):
        await batcher.submit("late", images=1, kind="k")


async def test_a_free_replica_takes_the_next_batch_while_another_is_busy() -> None:
    runner = Runner(block_first=True)  # replica that takes the first batch stays busy
    stats: list[BatchStats] = []
    executors = [ThreadPoolExecutor(1), ThreadPoolExecutor(1)]
    batcher = Batcher(runner, executors, max_batch_size=1, max_delay_s=0.0, on_batch=stats.append)
    batcher.start()
    first = asyncio.create_task(batcher.submit("first", images=1, kind="k"))
    await _started(runner)
    second = await batcher.submit("second", images=1, kind="k")  # served while "first" blocks
    assert second[0] == "done second" and not first.done()
    assert {s.replica for s in stats} == {0, 1}
    runner.release.set()
    assert (await first)[0] == "done first"
    await batcher.stop()


async def test_a_head_expiring_while_it_waits_for_batch_mates_never_stalls_the_queue() -> None:
    """Found by the fuzz suite: a 1 ms deadline passed while the request waited for batch-mates,
    the batch came out empty and the consumer died, so every later request hung."""
    runner, clock = Runner(), Clock()
    batcher, _ = make(runner, max_delay_s=30.0, clock=clock)
    doomed = asyncio.create_task(
        batcher.submit("doomed", images=1, kind="a", deadline=clock.now + 1)
    )
    for _ in range(5):  # the consumer takes "doomed" as its head and waits for batch-mates
        await asyncio.sleep(0)
    clock.now += 60  # its deadline and its batching delay both pass while it waits
    other = asyncio.create_task(batcher.submit("other", images=4, kind="b"))  # wakes the consumer
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(doomed, 10)
    assert (await asyncio.wait_for(other, 10))[0] == "done other"
    assert (await asyncio.wait_for(batcher.submit("later", images=4, kind="a"), 10))[
        0
    ] == "done later"
    assert all("doomed" not in b for b in runner.batches)
    await batcher.stop()
