"""Dynamic batching: concurrent requests become large model passes.

Requests queue per model. A consumer per model replica takes the oldest request and every later
one of the same *kind* (requests that can share a pass: classification, forward-only
explanation, explanation with gradients) until ``max_batch_size`` images are collected or the
oldest has waited ``max_delay_s``, then runs the batch on its replica's thread and hands each
request its own result. Results travel back through futures guarded by ``done()``: a caller that
went away (cancelled, deadline passed) never breaks the loop, and requests whose deadline has
passed are dropped before they reach the device.

Never imports torch: items and results are opaque to the batcher.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from vitlens_server.errors import DeadlineExceeded, ResourceExhausted, Unavailable

__all__ = ["BatchStats", "Batcher"]

log = logging.getLogger("vitlens.batcher")

T = TypeVar("T")
R = TypeVar("R")

RunBatch = Callable[[list[Any]], list[Any]]  # items → results or exceptions, same length


@dataclass(frozen=True)
class BatchStats:
    """What one batch looked like, for metrics: its images and each request's queue wait."""

    images: int
    requests: int
    queue_waits_s: tuple[float, ...]
    kind: Hashable
    replica: int


@dataclass(eq=False)
class _Pending(Generic[T]):
    item: T
    images: int
    kind: Hashable
    deadline: float | None  # an instant of the batcher's clock
    future: asyncio.Future
    enqueued: float


class Batcher(Generic[T, R]):
    """A bounded request queue feeding one consumer per replica.

    Args:
        run: executes a batch of items on a replica's thread; called as ``run(replica, items)``
            and returns one result or exception per item, in order.
        executors: one single-thread executor per replica (device).
        max_batch_size: images per batch (a single larger item still runs, alone).
        max_delay_s: longest the oldest request waits for batch-mates.
        max_queue_images: images allowed to wait; beyond it `submit` answers RESOURCE_EXHAUSTED.
        on_batch: called on the event loop with each batch's `BatchStats`.
        clock: monotonic seconds (deadlines are instants of it); injectable for tests.
    """

    def __init__(
        self,
        run: Callable[[int, list[T]], list[R | BaseException]],
        executors: Sequence[Executor],
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue_images: int,
        on_batch: Callable[[BatchStats], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_batch_size < 1 or max_delay_s < 0 or max_queue_images < 1:
            raise ValueError("max_batch_size and max_queue_images must be ≥ 1, max_delay_s ≥ 0")
        self._run = run
        self._executors = list(executors)
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue_images = max_queue_images
        self._on_batch = on_batch
        self._clock = clock
        self._queue: collections.deque[_Pending[T]] = collections.deque()
        self._queued_images = 0
        self._changed: asyncio.Condition | None = None
        self._consumers: list[asyncio.Task] = []
        self._closed = False
        self._images_per_s = 0.0  # recent throughput, for the retry hint

    @property
    def queued_images(self) -> int:
        return self._queued_images

    def start(self) -> None:
        """Start the consumers on the running event loop."""
        self._changed = asyncio.Condition()
        self._consumers = [
            asyncio.create_task(self._consume(replica), name=f"vitlens-batcher-{replica}")
            for replica in range(len(self._executors))
        ]

    async def stop(self) -> None:
        """Stop taking work; queued requests fail with UNAVAILABLE, running batches finish."""
        self._closed = True
        for task in self._consumers:
            task.cancel()
        await asyncio.gather(*self._consumers, return_exceptions=True)
        while self._queue:
            pending = self._queue.popleft()
            _fail(pending, Unavailable("the server is shutting down; retry on another replica"))
        self._queued_images = 0

    async def submit(
        self, item: T, *, images: int, kind: Hashable, deadline: float | None = None
    ) -> tuple[R, float]:
        """Queue ``item`` (``images`` images); returns its result and its queue wait in seconds.

        ``deadline`` is a `time.monotonic` instant; a request still queued then is dropped with
        DEADLINE_EXCEEDED. Cancelling the awaiting task removes the request.
        """
        if self._closed or self._changed is None:
            raise Unavailable("the model's batcher is not running")
        if deadline is not None and deadline <= self._clock():
            raise DeadlineExceeded("the request's deadline passed before it was queued")
        self.admit(images)
        future = asyncio.get_running_loop().create_future()
        pending = _Pending(item, images, kind, deadline, future, self._clock())
        self._queue.append(pending)
        self._queued_images += images
        async with self._changed:
            self._changed.notify_all()
        return await future

    def admit(self, images: int) -> None:
        """Raise RESOURCE_EXHAUSTED unless ``images`` more images fit in the queue.

        An empty queue admits any request, so a request larger than the bound still runs.
        """
        if self._queued_images + images > self.max_queue_images and self._queue:
            raise ResourceExhausted(
                f"the model's queue is full ({self._queued_images} images waiting, limit "
                f"{self.max_queue_images}); retry after about {self.retry_after_s():.1f} s",
                retry_after_s=self.retry_after_s(),
            )

    def retry_after_s(self) -> float:
        """How long the current queue takes to drain at the recent throughput (≥ 50 ms)."""
        if self._images_per_s <= 0:
            return 1.0
        return max(0.05, self._queued_images / self._images_per_s)

    async def _consume(self, replica: int) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            stats = BatchStats(
                images=sum(p.images for p in batch),
                requests=len(batch),
                queue_waits_s=tuple(self._clock() - p.enqueued for p in batch),
                kind=batch[0].kind,
                replica=replica,
            )
            if self._on_batch is not None:
                self._on_batch(stats)
            started = self._clock()
            items = [p.item for p in batch]
            try:
                results = await loop.run_in_executor(
                    self._executors[replica], self._run, replica, items
                )
                if len(results) != len(batch):
                    raise RuntimeError(f"batch of {len(batch)} returned {len(results)} results")
            except asyncio.CancelledError:
                for pending in batch:
                    _fail(pending, Unavailable("the server is shutting down"))
                raise
            except Exception as err:  # the whole batch failed: every request learns why
                log.exception("batch of %d requests failed", len(batch))
                results = [err] * len(batch)
            elapsed = max(self._clock() - started, 1e-6)
            self._images_per_s = 0.8 * self._images_per_s + 0.2 * stats.images / elapsed
            for pending, result, wait_s in zip(batch, results, stats.queue_waits_s, strict=True):
                if pending.future.done():  # cancelled while it ran
                    continue
                if isinstance(result, BaseException):
                    pending.future.set_exception(result)
                else:
                    pending.future.set_result((result, wait_s))

    async def _next_batch(self) -> list[_Pending[T]]:
        """Wait for the oldest live request, then for batch-mates until full or its delay."""
        assert self._changed is not None
        async with self._changed:
            while True:
                head = self._live_head()
                if head is None:
                    await self._changed.wait()
                    continue
                flush_at = head.enqueued + self.max_delay_s
                while (
                    self._images_of_kind(head.kind) < self.max_batch_size and not head.future.done()
                ):
                    remaining = flush_at - self._clock()
                    if remaining <= 0:
                        break
                    try:
                        await asyncio.wait_for(self._changed.wait(), remaining)
                    except TimeoutError:
                        break
                if head.future.done():  # the oldest went away while we waited: start over
                    continue
                return self._take(head.kind)

    def _live_head(self) -> _Pending[T] | None:
        """Drop cancelled and expired requests from the front; return the first live one."""
        now = self._clock()
        while self._queue:
            head = self._queue[0]
            if head.future.done():
                self._remove(head)
            elif head.deadline is not None and head.deadline <= now:
                self._remove(head)
                _fail(head, DeadlineExceeded("the request's deadline passed while it was queued"))
            else:
                return head
        return None

    def _images_of_kind(self, kind: Hashable) -> int:
        return sum(p.images for p in self._queue if p.kind == kind and not p.future.done())

    def _take(self, kind: Hashable) -> list[_Pending[T]]:
        """Remove and return the oldest requests of ``kind`` fitting in one batch."""
        now = self._clock()
        batch: list[_Pending[T]] = []
        images = 0
        for pending in list(self._queue):
            if pending.kind != kind:
                continue
            if pending.future.done():
                self._remove(pending)
                continue
            if pending.deadline is not None and pending.deadline <= now:
                self._remove(pending)
                _fail(pending, DeadlineExceeded("the request's deadline passed while queued"))
                continue
            if batch and images + pending.images > self.max_batch_size:
                continue  # a later, smaller request may still fit; this one heads a later batch
            batch.append(pending)
            images += pending.images
            self._remove(pending)
        return batch

    def _remove(self, pending: _Pending[T]) -> None:
        self._queue.remove(pending)
        self._queued_images -= pending.images


def _fail(pending: _Pending, error: BaseException) -> None:
    if not pending.future.done():
        pending.future.set_exception(error)
