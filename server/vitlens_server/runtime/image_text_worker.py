"""The worker of an image-text (CLIP) model: admission, chunks and one batcher, as for classifiers.

Requests are admitted whole against the model's queue bound, split into chunks of at most
``max_batch_size`` images and queued in one batcher whose batches form per kind: Predict per
text set, Explain per (texts, method, grid, relevance), so batch-mates share one text forward
(`explain.image_text_batch`). A replica per device, one thread each; a failing batch is
retried one request at a time (halves on out-of-memory), so a bad request never fails its
batch-mates.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from vitlens_server.config import ServerConfig
from vitlens_server.domain import ExplainResult, Predictions
from vitlens_server.errors import InvalidArgument, ResourceExhausted
from vitlens_server.explain.image_text_batch import (
    ImageTextExplainJob,
    ImageTextPredictJob,
    TextCache,
    explain_jobs,
    predict_jobs,
)
from vitlens_server.models.image_text_serving import LoadedImageTextModel
from vitlens_server.runtime.batcher import BatchDone, Batcher, BatchStats
from vitlens_server.runtime.worker import _isolated

__all__ = ["ImageTextWorker"]


class ImageTextWorker:
    """One served image-text model; the interface `DataPlane` uses of `ModelWorker`."""

    def __init__(
        self,
        model: LoadedImageTextModel,
        *,
        replicas: Sequence[LoadedImageTextModel] = (),
        max_batch_size: int = 32,
        max_delay_s: float = 0.0,
        max_queue_images: int = 1024,
        on_batch: Callable[[str, BatchStats], BatchDone | None] | None = None,
    ) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_queue_images = max_queue_images
        self._caches = [TextCache(m.adapter) for m in (model, *replicas)]
        self._executors = [
            ThreadPoolExecutor(1, f"vitlens-{model.name}-{m.device}") for m in (model, *replicas)
        ]
        self._batcher: Batcher[Any, Any] = Batcher(
            self._run,
            self._executors,
            max_batch_size=max_batch_size,
            max_delay_s=max_delay_s,
            on_batch=None if on_batch is None else lambda s: on_batch(model.name, s),
        )

    @classmethod
    def configured(
        cls,
        model: LoadedImageTextModel,
        config: ServerConfig,
        *,
        replicas: Sequence[LoadedImageTextModel] = (),
        on_batch: Callable[[str, BatchStats], BatchDone | None] | None = None,
    ) -> ImageTextWorker:
        """The worker with the server's batching and queue settings."""
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
        return self._batcher.queued_images

    def start(self) -> None:
        self._batcher.start()

    async def stop(self) -> None:
        await self._batcher.stop()

    def close(self) -> None:
        for executor in self._executors:
            executor.shutdown(wait=True)

    async def warm_up(self) -> None:
        """One small Predict against the label prompts (or one text) through the batcher."""
        _, height, width = self.model.input_size
        texts = self.model.prompts or ("a photo",)
        await self.predict(torch.zeros(1, 3, height, width), texts, 1)

    async def explain(
        self, job: ImageTextExplainJob, deadline: float | None = None
    ) -> tuple[ExplainResult, float]:
        """Explain a job; returns the result and the longest queue wait of its chunks."""
        chunks = [
            dataclasses.replace(job, pixels=pixels, target=_chunk_target(job, start, len(pixels)))
            for start, pixels in _chunks(job.pixels, self.max_batch_size)
        ]
        done = await self._submit(chunks, ("explain", *job.group), deadline)
        return ExplainResult.concat([r for r, _ in done]), max(w for _, w in done)

    async def predict(
        self,
        pixels: torch.Tensor,
        texts: tuple[str, ...],
        top_k: int,
        deadline: float | None = None,
    ) -> tuple[Predictions, float]:
        """Zero-shot classify against ``texts``; predictions and the queue wait in seconds."""
        chunks = [
            ImageTextPredictJob(chunk, texts, top_k) for chunk in pixels.split(self.max_batch_size)
        ]
        done = await self._submit(chunks, ("predict", texts), deadline)
        return Predictions.concat([r for r, _ in done]), max(w for _, w in done)

    async def _submit(
        self, chunks: Sequence[Any], kind: tuple, deadline: float | None
    ) -> list[tuple[Any, float]]:
        images = sum(len(c.pixels) for c in chunks)
        if images > self.max_queue_images:
            raise InvalidArgument(
                f"the request needs {images} images in model {self.model.name!r}'s queue, which "
                f"holds at most {self.max_queue_images}; send at most that many per request",
                field="images",
            )
        queued = self.queued_images
        if queued and queued + images > self.max_queue_images:
            retry_s = self._batcher.retry_after_s()
            raise ResourceExhausted(
                f"the model's queue is full ({queued} images waiting, limit "
                f"{self.max_queue_images}); retry after about {retry_s:.1f} s",
                retry_after_s=retry_s,
            )
        tasks = [
            asyncio.ensure_future(
                self._batcher.submit(c, images=len(c.pixels), kind=kind, deadline=deadline)
            )
            for c in chunks
        ]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

    def _run(self, replica: int, items: list[Any], interrupted: Callable[[], bool]) -> list[Any]:
        cache = self._caches[replica]
        if isinstance(items[0], ImageTextPredictJob):
            return _isolated(lambda jobs: predict_jobs(cache, jobs), items)
        return _isolated(lambda jobs: explain_jobs(cache, jobs, interrupted=interrupted), items)


def _chunks(pixels: torch.Tensor, size: int) -> list[tuple[int, torch.Tensor]]:
    return [(start, pixels[start : start + size]) for start in range(0, len(pixels), size)]


def _chunk_target(job: ImageTextExplainJob, start: int, count: int):
    target = job.target
    if target is None:
        return None
    return target.subset(range(start, start + count))
