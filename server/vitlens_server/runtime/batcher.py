"""Dynamic batching: concurrent requests become large model passes.

Requests queue per model and lane (`runtime.worker`). A consumer per model replica takes the
oldest request and every later one of the same *kind* (requests that can share a pass: one cost
class, see `vitlens_server.explain.Cost`) until ``max_batch_size`` images are collected or the
oldest has waited ``max_delay_s``, then runs the batch on its replica's thread and hands each
request its own result. Results travel back through futures guarded by ``done()``: a caller that
went away (cancelled, deadline passed) never breaks the loop, and requests whose deadline has
passed are dropped before they reach the device.

Abandoned work stops: the batch's run gets an ``interrupted()`` callable, true once every
request of the batch was cancelled or passed its deadline, or the batcher is stopping; the
engine checks it at each step (pass, backward rank, chunk of extra passes) and gives up there.
Admission (the queue bound) is the caller's: a request is admitted whole before its chunks are
submitted, so its own chunks never refuse it.

Observation: ``on_batch`` sees each batch as it starts (`BatchStats`: sizes, each request's queue
wait and the `contextvars.Context` it was submitted from, e.g. its trace span); what it returns,
if anything, is called once the batch's run has ended, with each request's result or exception
(`BatchDone`). `Telemetry` records metrics from the first; `vitlens_server.tracing` opens spans
in each request's context on the first and ends them on the second.

Never imports torch: items and results are opaque to the batcher.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Generic, TypeVar

from vitlens_server.errors import DeadlineExceeded, Unavailable

__all__ = ["BatchDone", "BatchStats", "Batcher"]

log = logging.getLogger("vitlens.batcher")

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BatchStats:
    """What one batch looked like, for metrics and traces: its images, and per request (in
    batch order) its queue wait and the context it was submitted from."""

    images: int
    requests: int
    queue_waits_s: tuple[float, ...]
    kind: Hashable
    replica: int
    contexts: tuple[contextvars.Context, ...] = ()


# What ``on_batch`` may return: called on the event loop when the batch's run has ended, with
# each request's result or exception in batch order (empty when the run never finished).
BatchDone = Callable[[Sequence[object]], None]


@dataclass(eq=False)
class _Pending(Generic[T]):
    item: T
    images: int
    kind: Hashable
    deadline: float | None  # an instant of the batcher's clock
    future: asyncio.Future
    enqueued: float
    context: contextvars.Context  # the submitter's (O(1) to copy): its trace span, request id

    def abandoned(self, now: float) -> bool:
        """Nobody waits for the result any more: cancelled, answered, or past its deadline."""
        return self.future.done() or (self.deadline is not None and self.deadline <= now)


class Batcher(Generic[T, R]):
    """A bounded request queue feeding one consumer per replica.

    Args:
        run: executes a batch of items on a replica's thread; called as
            ``run(replica, items, interrupted)`` and returns one result or exception per item,
            in order. ``interrupted()`` turns true when the batch's work is no longer wanted.
        executors: one single-thread executor per replica (device).
        max_batch_size: images per batch (a single larger item still runs, alone).
        max_delay_s: longest the oldest request waits for batch-mates.
        on_batch: called on the event loop with each batch's `BatchStats` as it starts; may
            return a `BatchDone`, called when the batch's run has ended.
        on_leave: called on the event loop whenever a request leaves the queue.
        clock: monotonic seconds (deadlines are instants of it); injectable for tests.
    """

    def __init__(
        self,
        run: Callable[[int, list[T], Callable[[], bool]], list[R | BaseException]],
        executors: Sequence[Executor],
        *,
        max_batch_size: int,
        max_delay_s: float,
        on_batch: Callable[[BatchStats], BatchDone | None] | None = None,
        on_leave: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_batch_size < 1 or max_delay_s < 0:
            raise ValueError("max_batch_size must be ≥ 1 and max_delay_s ≥ 0")
        self._run = run
        self._executors = list(executors)
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self._on_batch = on_batch
        self._on_leave = on_leave
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
        """Stop taking work: queued requests fail with UNAVAILABLE at once, a running batch is
        interrupted at its next step (its requests fail with UNAVAILABLE) and awaited."""
        self._closed = True
        while self._queue:
            _fail(self._queue.popleft(), Unavailable(_SHUTTING_DOWN))
        self._queued_images = 0
        if self._on_leave is not None:
            self._on_leave()
        if self._changed is not None:
            async with self._changed:
                self._changed.notify_all()
        await asyncio.gather(*self._consumers, return_exceptions=True)

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
        future = asyncio.get_running_loop().create_future()
        pending = _Pending(
            item, images, kind, deadline, future, self._clock(), contextvars.copy_context()
        )
        self._queue.append(pending)
        self._queued_images += images
        async with self._changed:
            self._changed.notify_all()
        try:
            return await future
        except asyncio.CancelledError:  # the caller went away: its images leave the queue now
            if pending in self._queue:
                self._remove(pending)
            raise

    def retry_after_s(self) -> float:
        """How long the current queue takes to drain at the recent throughput (≥ 50 ms)."""
        if self._images_per_s <= 0:
            return 1.0
        return max(0.05, self._queued_images / self._images_per_s)

    async def _consume(self, replica: int) -> None:
        """One replica's loop. It outlives any one batch: a fault in the batcher's own
        bookkeeping fails that batch's requests, never the consumer (which would strand every
        later request of the model)."""
        while True:
            batch = await self._next_batch()
            if batch is None:
                return
            try:
                await self._serve(replica, batch)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.exception("the batcher failed a batch of %d requests", len(batch))
                for pending in batch:
                    _fail(pending, err)

    async def _serve(self, replica: int, batch: list[_Pending[T]]) -> None:
        """Run one batch on ``replica`` and hand every request its result."""
        loop = asyncio.get_running_loop()
        stats = BatchStats(
            images=sum(p.images for p in batch),
            requests=len(batch),
            queue_waits_s=tuple(self._clock() - p.enqueued for p in batch),
            kind=batch[0].kind,
            replica=replica,
            contexts=tuple(p.context for p in batch),
        )
        done = self._on_batch(stats) if self._on_batch is not None else None
        started = self._clock()

        def interrupted(batch: list[_Pending[T]] = batch) -> bool:
            now = self._clock()  # read on the replica's thread: flags only, no locking
            return self._closed or all(p.abandoned(now) for p in batch)

        items = [p.item for p in batch]
        results: list[R | BaseException] = []
        try:
            results = await loop.run_in_executor(
                self._executors[replica], self._run, replica, items, interrupted
            )
            if len(results) != len(batch):
                raise RuntimeError(f"batch of {len(batch)} returned {len(results)} results")
        except asyncio.CancelledError:  # the loop is going away under us
            for pending in batch:
                _fail(pending, Unavailable(_SHUTTING_DOWN))
            raise
        except Exception as err:  # the whole batch failed: every request learns why
            log.exception("batch of %d requests failed", len(batch))
            results = [err] * len(batch)
        finally:
            if done is not None:
                done(results)
        elapsed = max(self._clock() - started, 1e-6)
        self._images_per_s = 0.8 * self._images_per_s + 0.2 * stats.images / elapsed
        stopped = interrupted()
        for pending, result, wait_s in zip(batch, results, stats.queue_waits_s, strict=True):
            if pending.future.done():  # cancelled while it ran
                continue
            if stopped and isinstance(result, BaseException):
                _fail(pending, self._why_stopped(pending))
            elif isinstance(result, BaseException):
                pending.future.set_exception(result)
            else:
                pending.future.set_result((result, wait_s))

    def _why_stopped(self, pending: _Pending[T]) -> Exception:
        """The error of a request whose batch was interrupted."""
        if self._closed:
            return Unavailable(_SHUTTING_DOWN)
        return DeadlineExceeded("the request's deadline passed while it ran")

    async def _next_batch(self) -> list[_Pending[T]] | None:
        """Wait for the oldest live request, then for batch-mates until full or its delay;
        None once the batcher is stopping."""
        assert self._changed is not None
        async with self._changed:
            while True:
                if self._closed:
                    return None
                head = self._live_head()
                if head is None:
                    await self._changed.wait()
                    continue
                flush_at = head.enqueued + self.max_delay_s
                while not self._full_or_gone(head):
                    remaining = flush_at - self._clock()
                    if remaining <= 0:
                        break
                    try:
                        await asyncio.wait_for(self._changed.wait(), remaining)
                    except TimeoutError:
                        break
                if head.future.done() or self._closed:  # the oldest went away: start over
                    continue
                batch = self._take(head.kind)
                if batch:  # empty when every candidate expired while it waited for batch-mates
                    return batch

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

    def _full_or_gone(self, head: _Pending[T]) -> bool:
        """Stop waiting for batch-mates: a full batch of ``head``'s kind is queued, or nobody
        waits for ``head`` any more."""
        full = self._images_of_kind(head.kind) >= self.max_batch_size
        return full or head.abandoned(self._clock())

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
        if self._on_leave is not None:
            self._on_leave()


_SHUTTING_DOWN = "the server is shutting down; retry on another replica"


def _fail(pending: _Pending, error: BaseException) -> None:
    if not pending.future.done():
        pending.future.set_exception(error)
