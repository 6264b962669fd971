"""Model workers: per served model, one dynamic batcher per lane in front of the devices.

Requests never run on the asyncio event loop. Each request is admitted whole against the
model's queue bound (a request that could never fit is refused with INVALID_ARGUMENT; one that
does not fit now gets RESOURCE_EXHAUSTED with a retry hint, or, for Evaluate's calls, waits for
room), split into chunks of at most ``max_batch_size`` images (chunks batch like
separate requests) and queued in the lane of its cost class:

    lane     cost classes                        what a batch costs
    device   predict, FORWARD, BACKWARD          one pass (and one backward per target rank)
    extra    EXTRA (saliency, token_reflection)  many further passes of the model
    host     HOST (attention_flow)               one pass, then CPU-bound graph search

Batches form only within one cost class, and every lane has its own thread per replica, so a
cheap request never waits behind a slow batch it does not belong to. (The lanes of one replica
share its device; `AttentionHooks` records per thread.) A batch whose requests all went away,
or whose batcher is stopping, is interrupted at its next step. A batch that fails is retried in
halves when the device ran out of memory and one request at a time otherwise, so one bad
request never fails its batch-mates.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Self

import torch

from vitlens_server.config import ServerConfig
from vitlens_server.domain import ExplainResult, Predictions, TargetSpec
from vitlens_server.errors import InvalidArgument, ResourceExhausted
from vitlens_server.explain import Cost, Explainer, ExplainJob, Interrupted, get_method
from vitlens_server.explain.engine import top_k_predictions
from vitlens_server.explain.params import parse_params
from vitlens_server.models import LoadedModel
from vitlens_server.runtime.batcher import BatchDone, Batcher, BatchStats

__all__ = [
    "LANES",
    "Lane",
    "LanedWorker",
    "ModelWorker",
    "PredictJob",
    "ReplicaWorker",
    "row_chunks",
]

log = logging.getLogger("vitlens.worker")


class Lane(enum.Enum):
    """Where a request's batches run (see the module docstring)."""

    DEVICE = "device"
    EXTRA = "extra"
    HOST = "host"


LANES = {Cost.FORWARD: Lane.DEVICE, Cost.BACKWARD: Lane.DEVICE, Cost.EXTRA: Lane.EXTRA,
         Cost.HOST: Lane.HOST}  # fmt: skip


@dataclass(frozen=True)
class PredictJob:
    """Classification only: (B, C, H, W) pixels in [0, 1] and the predictions to return
    (``top_k`` most probable classes; 0: the raw (B, classes) logits on the host)."""

    pixels: torch.Tensor
    top_k: int


class LanedWorker:
    """The lanes of one served model: per lane a batcher and a thread per replica, the queue
    bound over all lanes, admission and waiting for room. Subclasses run the batches
    (`_run_batch`) and split requests into jobs; `ModelWorker` for classifiers,
    `runtime.image_text_worker.ImageTextWorker` for image-text models."""

    def __init__(
        self,
        name: str,
        devices: Sequence[object],
        *,
        max_batch_size: int = 32,
        max_delay_s: float = 0.0,
        max_queue_images: int = 1024,
        on_batch: Callable[[str, BatchStats], BatchDone | None] | None = None,
    ) -> None:
        """``devices``: one per replica (thread names only); replica i runs on thread i."""
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_queue_images = max_queue_images
        self._executors: list[ThreadPoolExecutor] = []
        self._room_waiters: list[asyncio.Future] = []
        self._lanes: dict[Lane, Batcher[Any, Any]] = {}
        for lane in Lane:
            executors = [
                ThreadPoolExecutor(1, f"vitlens-{name}-{lane.value}-{device}") for device in devices
            ]  # threads start on first use: an idle lane costs nothing
            self._executors += executors
            self._lanes[lane] = Batcher(
                self._run,
                executors,
                max_batch_size=max_batch_size,
                max_delay_s=max_delay_s,
                on_batch=None if on_batch is None else lambda s: on_batch(name, s),
                on_leave=self._left_queue,
            )

    @classmethod
    def configured(
        cls,
        model: Any,
        config: ServerConfig,
        *,
        replicas: Sequence[Any] = (),
        on_batch: Callable[[str, BatchStats], BatchDone | None] | None = None,
    ) -> Self:
        """The worker of ``model`` (and its ``replicas``) with the server's batching and queue
        settings; for subclasses built as ``cls(model, replicas=..., max_batch_size=...)``."""
        return cls(
            model,
            replicas=replicas,
            max_batch_size=config.max_batch_size,
            max_delay_s=config.max_delay_ms / 1000,
            max_queue_images=config.max_queue_images,
            on_batch=on_batch,
        )

    @property
    def queued_images(self) -> int:
        """Images waiting in every lane (what the queue bound limits)."""
        return sum(batcher.queued_images for batcher in self._lanes.values())

    def start(self) -> None:
        """Start batching (on the running event loop)."""
        for batcher in self._lanes.values():
            batcher.start()

    async def stop(self) -> None:
        """Fail queued requests with UNAVAILABLE; interrupt and await the running batches."""
        await asyncio.gather(*(batcher.stop() for batcher in self._lanes.values()))

    def close(self) -> None:
        for executor in self._executors:
            executor.shutdown(wait=True)

    async def _submit(
        self,
        chunks: Sequence[Any],
        lane: Lane,
        kind: tuple,
        deadline: float | None,
        wait_for_room: bool,
    ) -> list[tuple[Any, float]]:
        """Admit the whole request, then queue its chunks; the first failure cancels the rest."""
        images = sum(c.pixels.shape[0] for c in chunks)
        if images > self.max_queue_images:  # it could never be admitted
            raise InvalidArgument(
                f"the request needs {images} images in model {self.name!r}'s queue, which "
                f"holds at most {self.max_queue_images}; send at most that many per request",
                field="images",
            )
        if wait_for_room:
            await self._room(images)
        else:
            self._admit(images, lane)
        batcher = self._lanes[lane]

        def submit(chunk: Any) -> Awaitable[tuple[Any, float]]:
            return batcher.submit(chunk, images=chunk.pixels.shape[0], kind=kind, deadline=deadline)

        if len(chunks) == 1:
            return [await submit(chunks[0])]
        tasks = [asyncio.ensure_future(submit(c)) for c in chunks]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()  # no-op for the finished; withdraws the rest after a failure

    def _fits(self, images: int) -> bool:
        """Whether ``images`` more fit in the queue (an empty queue takes any admitted request)."""
        queued = self.queued_images
        return not queued or queued + images <= self.max_queue_images

    def _admit(self, images: int, lane: Lane) -> None:
        """RESOURCE_EXHAUSTED, with a retry hint, unless ``images`` more images fit now."""
        if not self._fits(images):
            retry_s = self._lanes[lane].retry_after_s()
            raise ResourceExhausted(
                f"the model's queue is full ({self.queued_images} images waiting, limit "
                f"{self.max_queue_images}); retry after about {retry_s:.1f} s",
                retry_after_s=retry_s,
            )

    async def _room(self, images: int) -> None:
        """Wait until ``images`` more images fit in the queue."""
        while not self._fits(images):
            waiter = asyncio.get_running_loop().create_future()
            self._room_waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._room_waiters:
                    self._room_waiters.remove(waiter)

    def _left_queue(self) -> None:
        """A request left a queue (taken into a batch, cancelled, expired): waiters re-check."""
        for waiter in self._room_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._room_waiters.clear()

    def _run_batch(
        self, replica: int, items: list[Any], interrupted: Callable[[], bool]
    ) -> list[Any]:
        """One batch (all items of one kind) on replica ``replica``: a result or an exception
        per item."""
        raise NotImplementedError

    def _run(self, replica: int, items: list[Any], interrupted: Callable[[], bool]) -> list[Any]:
        """`_run_batch` on its lane's thread, isolated: a failing item never fails the rest."""
        return _isolated(lambda batch: self._run_batch(replica, batch, interrupted), items)


class ReplicaWorker(LanedWorker):
    """A `LanedWorker` over a loaded model and its replicas, one per device (``model.name``,
    ``model.device``): ``self.model`` and ``self._replicas``, replica i on thread i."""

    def __init__(
        self,
        model: Any,
        *,
        replicas: Sequence[Any] = (),
        max_batch_size: int = 32,
        max_delay_s: float = 0.0,
        max_queue_images: int = 1024,
        on_batch: Callable[[str, BatchStats], BatchDone | None] | None = None,
    ) -> None:
        self.model = model
        self._replicas = [model, *replicas]
        super().__init__(
            model.name,
            [m.device for m in self._replicas],
            max_batch_size=max_batch_size,
            max_delay_s=max_delay_s,
            max_queue_images=max_queue_images,
            on_batch=on_batch,
        )


def row_chunks(count: int, size: int) -> list[slice]:
    """``count`` rows as slices of at most ``size``."""
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]


class ModelWorker(LanedWorker):
    """One served model: a replica per device, each with its cached hooks and one thread per
    lane, fed by one batcher per lane, so whichever replica is free takes the next batch."""

    def __init__(
        self,
        model: LoadedModel,
        *,
        replicas: Sequence[LoadedModel] = (),
        max_batch_size: int = 32,
        max_delay_s: float = 0.0,
        max_queue_images: int = 1024,
        on_batch: Callable[[str, BatchStats], BatchDone | None] | None = None,
    ) -> None:
        self.model = model
        # a method's further passes (IG steps, SmoothGrad samples) are bounded as batches are
        self.explainer = Explainer(model, max_pass_rows=max_batch_size)
        self._replicas = [
            self.explainer,
            *(Explainer(m, max_pass_rows=max_batch_size) for m in replicas),
        ]
        super().__init__(
            model.name,
            [e.model.device for e in self._replicas],
            max_batch_size=max_batch_size,
            max_delay_s=max_delay_s,
            max_queue_images=max_queue_images,
            on_batch=on_batch,
        )

    def close(self) -> None:
        super().close()
        for explainer in self._replicas:
            explainer.close()

    async def explain(
        self, job: ExplainJob, deadline: float | None = None, *, wait_for_room: bool = False
    ) -> tuple[ExplainResult, float]:
        """Explain a job; returns the result and the longest queue wait of its chunks.

        ``wait_for_room``: wait until the queue has room instead of answering RESOURCE_EXHAUSTED
        (Evaluate's calls: a long run feeds the queue, it is never refused midway)."""
        chunks = [
            dataclasses.replace(job, pixels=pixels)
            for pixels in job.pixels.split(self.max_batch_size)
        ]
        lane = LANES[job.method.cost]
        kind = ("explain", job.method.cost)
        done = await self._submit(chunks, lane, kind, deadline, wait_for_room)
        return ExplainResult.concat([r for r, _ in done]), max(w for _, w in done)

    async def predict(
        self, pixels: torch.Tensor, top_k: int, deadline: float | None = None
    ) -> tuple[Predictions, float]:
        """Classify (B, C, H, W) pixels; returns predictions and the queue wait in seconds."""
        chunks = [PredictJob(chunk, top_k) for chunk in pixels.split(self.max_batch_size)]
        done = await self._submit(chunks, Lane.DEVICE, ("predict",), deadline, False)
        return Predictions.concat([r for r, _ in done]), max(w for _, w in done)

    async def logits(
        self, pixels: torch.Tensor, deadline: float | None = None, *, wait_for_room: bool = False
    ) -> torch.Tensor:
        """(B, C, H, W) pixels → (B, classes) float32 logits on the host, batched like Predict
        (Evaluate's re-classification of perturbed images)."""
        chunks = [PredictJob(chunk, 0) for chunk in pixels.split(self.max_batch_size)]
        done = await self._submit(chunks, Lane.DEVICE, ("predict",), deadline, wait_for_room)
        return torch.cat([r for r, _ in done])

    async def warm_up(self) -> None:
        """One small pass of each kind through the batchers, all at once (each waits out
        ``max_delay_s`` for batch-mates only once): classification, a forward-only and a
        gradient explanation, and the attention-flow solver's compilation."""
        _, height, width = self.model.geometry.input_size
        pixels = torch.zeros(1, 3, height, width)
        passes: list[Awaitable[Any]] = [self.predict(pixels, 1)]
        for name in ("rollout", "generic", "attention_flow"):
            spec = get_method(name)
            if self.explainer.refusal(spec) is None:
                params = parse_params(spec.params, {}, method=name)
                passes.append(self.explain(ExplainJob(pixels, spec, params, TargetSpec())))
        await asyncio.gather(*passes)

    def _run_batch(
        self, replica: int, items: list[Any], interrupted: Callable[[], bool]
    ) -> list[Any]:
        explainer = self._replicas[replica]
        if isinstance(items[0], PredictJob):
            return _predict_batch(explainer, items)
        return explainer.explain_batch(items, interrupted=interrupted)


def _predict_batch(
    explainer: Explainer, jobs: Sequence[PredictJob]
) -> list[Predictions | torch.Tensor]:
    """One fused forward for every job; each gets its own rows, as top-k or raw logits."""
    pixels = torch.cat([j.pixels for j in jobs]) if len(jobs) > 1 else jobs[0].pixels
    logits = explainer.logits(pixels)
    results: list[Predictions | torch.Tensor] = []
    first = 0
    for job in jobs:
        rows = logits[first : first + job.pixels.shape[0]]
        first += job.pixels.shape[0]
        results.append(top_k_predictions(rows, job.top_k) if job.top_k else rows.cpu())
    return results


def _isolated(run: Callable[[list[Any]], list[Any]], items: list[Any]) -> list[Any]:
    """``run(items)``, retried in halves on out-of-memory and one by one on other failures;
    an interrupted batch is not retried."""
    try:
        return run(items)
    except Interrupted as err:
        return [err] * len(items)
    except Exception as err:
        if _is_out_of_memory(err):
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(items) == 1:
                return [
                    ResourceExhausted(
                        "the device ran out of memory for this request alone; send fewer "
                        "images per request"
                    )
                ]
            log.warning("out of memory on a batch of %d requests; splitting it", len(items))
            half = len(items) // 2
            return _isolated(run, items[:half]) + _isolated(run, items[half:])
        if len(items) == 1:
            return [err]
        log.warning("a batch of %d requests failed (%s); running them one by one", len(items), err)
        return [result for item in items for result in _isolated(run, [item])]


def _is_out_of_memory(err: BaseException) -> bool:
    """A CUDA out-of-memory error, or the CPU allocator's failure (DefaultCPUAllocator: "not
    enough memory ... Cannot allocate memory")."""
    if isinstance(err, torch.OutOfMemoryError | MemoryError):
        return True
    message = str(err).lower()
    return any(
        words in message
        for words in ("out of memory", "cannot allocate memory", "can't allocate memory")
    )
