"""The dynamic batcher, with a fake runner: batching, delays, deadlines, cancellation, limits."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from vitlens_server.errors import DeadlineExceeded, ResourceExhausted
from vitlens_server.runtime.batcher import Batcher, BatchStats


class Runner:
    """Records batches; optionally blocks the first batch until released; fails on "poison"."""

    def __init__(self, block_first: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not block_first:
            self.release.set()

    def __call__(self, replica: int, items: list[str]) -> list:
        self.batches.append(list(items))
        first = len(self.batches) == 1
        self.started.set()
        if first:
            self.release.wait(timeout=30)
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
    options = {"max_batch_size": 4, "max_delay_s": 30.0, "max_queue_images": 64, **kwargs}
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


async def test_a_full_queue_answers_resource_exhausted_with_a_retry_hint() -> None:
    runner = Runner(block_first=True)
    batcher, _ = make(runner, max_queue_images=2, max_delay_s=0.0)
    first = asyncio.create_task(batcher.submit("first", images=4, kind="k"))
    await _started(runner)
    queued = [asyncio.create_task(batcher.submit(f"q{i}", images=1, kind="k")) for i in range(2)]
    await asyncio.sleep(0)
    assert batcher.queued_images == 2
    with pytest.raises(ResourceExhausted, match="queue is full") as info:
        await batcher.submit("one too many", images=1, kind="k")
    assert info.value.retry_after_s > 0
    runner.release.set()
    assert [(await q)[0] for q in queued] == ["done q0", "done q1"]
    await first
    await batcher.stop()


async def test_a_free_replica_takes_the_next_batch_while_another_is_busy() -> None:
    runner = Runner(block_first=True)  # replica that takes the first batch stays busy
    stats: list[BatchStats] = []
    executors = [ThreadPoolExecutor(1), ThreadPoolExecutor(1)]
    batcher = Batcher(
        runner, executors, max_batch_size=1, max_delay_s=0.0, max_queue_images=8,
        on_batch=stats.append,
    )  # fmt: skip
    batcher.start()
    first = asyncio.create_task(batcher.submit("first", images=1, kind="k"))
    await _started(runner)
    second = await batcher.submit("second", images=1, kind="k")  # served while "first" blocks
    assert second[0] == "done second" and not first.done()
    assert {s.replica for s in stats} == {0, 1}
    runner.release.set()
    assert (await first)[0] == "done first"
    await batcher.stop()
