"""The worker of an image-text (CLIP) model: the classifier worker's lanes, admission and chunks.

`ImageTextWorker` is a `runtime.worker.LanedWorker`: requests are admitted whole against the
model's queue bound, split into chunks of at most ``max_batch_size`` images and queued in the
lane of their method's cost class (`explain.Cost` of the registered method):

    lane     image-text methods
    device   Predict; rollout, raw_attention (forward); generic, transformer_attribution,
             gradcam, agcam (one backward per round of each tower)
    extra    saliency, token_reflection (further passes of the image tower)

so a cheap request never waits behind a token-reflection batch. Within a lane, batches form per
kind: Predict per text set, Explain per (cost, texts, method, options, grid, relevance), so
batch-mates share one text forward (`explain.image_text_batch`). A replica per device, one
thread per lane each; a failing batch is retried one request at a time (halves on
out-of-memory), so a bad request never fails its batch-mates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from vitlens_server.domain import ExplainResult, Predictions
from vitlens_server.explain import get_method
from vitlens_server.explain.image_text_batch import (
    ImageTextExplainJob,
    ImageTextPredictJob,
    TextCache,
    explain_jobs,
    predict_jobs,
)
from vitlens_server.models.image_text_serving import LoadedImageTextModel
from vitlens_server.runtime.batcher import BatchDone, BatchStats
from vitlens_server.runtime.worker import LANES, Lane, LanedWorker

__all__ = ["ImageTextWorker"]


class ImageTextWorker(LanedWorker):
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
        self._caches = [TextCache(m.adapter) for m in (model, *replicas)]
        super().__init__(
            model.name,
            [m.device for m in (model, *replicas)],
            max_batch_size=max_batch_size,
            max_delay_s=max_delay_s,
            max_queue_images=max_queue_images,
            on_batch=on_batch,
        )

    async def warm_up(self) -> None:
        """One small Predict against the label prompts (or one text) through the batcher."""
        _, height, width = self.model.input_size
        texts = self.model.prompts or ("a photo",)
        await self.predict(torch.zeros(1, 3, height, width), texts, 1)

    async def explain(
        self,
        job: ImageTextExplainJob,
        deadline: float | None = None,
        *,
        wait_for_room: bool = False,
    ) -> tuple[ExplainResult, float]:
        """Explain a job; returns the result and the longest queue wait of its chunks.

        ``wait_for_room``: wait until the queue has room instead of answering RESOURCE_EXHAUSTED
        (Evaluate's calls)."""
        chunks = [
            dataclasses.replace(job, pixels=pixels, target=_chunk_target(job, start, len(pixels)))
            for start, pixels in _chunks(job.pixels, self.max_batch_size)
        ]
        cost = get_method(job.method).cost
        kind = ("explain", cost, *job.group)
        done = await self._submit(chunks, LANES[cost], kind, deadline, wait_for_room)
        return ExplainResult.concat([r for r, _ in done]), max(w for _, w in done)

    async def predict(
        self,
        pixels: torch.Tensor,
        texts: tuple[str, ...],
        top_k: int,
        deadline: float | None = None,
        *,
        wait_for_room: bool = False,
    ) -> tuple[Predictions, float]:
        """Zero-shot classify against ``texts``; predictions and the queue wait in seconds."""
        chunks = [
            ImageTextPredictJob(chunk, texts, top_k) for chunk in pixels.split(self.max_batch_size)
        ]
        done = await self._submit(chunks, Lane.DEVICE, ("predict", texts), deadline, wait_for_room)
        return Predictions.concat([r for r, _ in done]), max(w for _, w in done)

    def _run_batch(
        self, replica: int, items: list[Any], interrupted: Callable[[], bool]
    ) -> list[Any]:
        cache = self._caches[replica]
        if isinstance(items[0], ImageTextPredictJob):
            return predict_jobs(cache, items)
        return explain_jobs(cache, items, interrupted=interrupted)


def _chunks(pixels: torch.Tensor, size: int) -> list[tuple[int, torch.Tensor]]:
    return [(start, pixels[start : start + size]) for start in range(0, len(pixels), size)]


def _chunk_target(job: ImageTextExplainJob, start: int, count: int):
    target = job.target
    if target is None:
        return None
    return target.subset(range(start, start + count))
