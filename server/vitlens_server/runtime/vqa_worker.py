"""The worker of a visual question answering model: the classifier worker's lanes and admission.

`VqaWorker` is a `runtime.worker.LanedWorker`: requests are admitted whole against the model's
queue bound, split into chunks of at most ``max_batch_size`` (image, question) pairs and queued
in the device lane (every VQA method is one forward pass and at most one backward pass per
target rank, with LRP where the method reads it). Within the lane, batches form per kind:
Predict per input kind (pixels or request regions), Explain per (method, averaging, grid,
relevance, K, input kind), so batch-mates share one forward pass and one backward pass per
rank (`explain.vqa_batch`). A replica per device, one thread each; a failing batch is retried
one request at a time (halves on out-of-memory), so a bad request never fails its batch-mates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from vitlens_server.domain import ExplainResult, Predictions
from vitlens_server.explain.vqa_batch import (
    VqaExplainJob,
    VqaPredictJob,
    explain_vqa_jobs,
    predict_vqa_jobs,
)
from vitlens_server.models.vqa_serving import LoadedVqaModel
from vitlens_server.runtime.worker import Lane, ReplicaWorker, row_chunks

__all__ = ["VqaWorker"]


class VqaWorker(ReplicaWorker):
    """One served VQA model; the interface `DataPlane` uses of `ModelWorker`."""

    model: LoadedVqaModel

    async def warm_up(self) -> None:
        """One small Predict through the batcher (models on request regions: none)."""
        if self.model.visual_input != "pixels":
            return
        _, height, width = self.model.input_size
        job = VqaPredictJob(torch.zeros(1, 3, height, width), ("is there a square?",), 1)
        await self.predict(job)

    async def explain(
        self,
        job: VqaExplainJob,
        deadline: float | None = None,
        *,
        wait_for_room: bool = False,
    ) -> tuple[ExplainResult, float]:
        """Explain a job; returns the result and the longest queue wait of its chunks."""
        chunks = [
            dataclasses.replace(
                job,
                pixels=job.pixels[rows],
                questions=job.questions[rows],
                regions=None if job.regions is None else job.regions[rows],
                target=job.target.subset(range(rows.start, rows.stop)),
            )
            for rows in row_chunks(job.size, self.max_batch_size)
        ]
        kind = ("explain", *job.group)
        done = await self._submit(chunks, Lane.DEVICE, kind, deadline, wait_for_room)
        return ExplainResult.concat([r for r, _ in done]), max(w for _, w in done)

    async def predict(
        self,
        job: VqaPredictJob,
        deadline: float | None = None,
        *,
        wait_for_room: bool = False,
    ) -> tuple[Predictions, float]:
        """Answer a job; the predictions and the longest queue wait of its chunks."""
        chunks = [job.rows(rows) for rows in row_chunks(job.size, self.max_batch_size)]
        kind = ("predict", job.regions is None)
        done = await self._submit(chunks, Lane.DEVICE, kind, deadline, wait_for_room)
        return Predictions.concat([r for r, _ in done]), max(w for _, w in done)

    def _run_batch(
        self, replica: int, items: list[Any], interrupted: Callable[[], bool]
    ) -> list[Any]:
        model = self._replicas[replica]
        if isinstance(items[0], VqaPredictJob):
            return predict_vqa_jobs(model, items)
        return explain_vqa_jobs(model, items, interrupted=interrupted)
