"""The worker of an object detector: the classifier worker's lanes and admission.

`DetectionWorker` is a `runtime.worker.LanedWorker`: requests are admitted whole against the
model's queue bound, split into chunks of at most ``max_batch_size`` images and queued in the
device lane. Within the lane, batches form per kind: Predict, and Explain per (method, grid), so
batch-mates share one forward pass and one vectorised backward pass over every detection rank
(`explain.detection_batch`). A replica per device, one thread each; a failing batch is retried
one request at a time (halves on out-of-memory), so a bad request never fails its batch-mates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from vitlens_server.domain import Predictions
from vitlens_server.domain_detection import DetectionResult
from vitlens_server.explain.detection_batch import (
    DetectionExplainJob,
    DetectionPredictJob,
    explain_detection_jobs,
    predict_detection_jobs,
)
from vitlens_server.models.detection_serving import LoadedDetector
from vitlens_server.runtime.worker import Lane, ReplicaWorker, row_chunks

__all__ = ["DetectionWorker"]


class DetectionWorker(ReplicaWorker):
    """One served detector; the interface `DataPlane` uses of `ModelWorker`."""

    model: LoadedDetector

    async def warm_up(self) -> None:
        """One small Predict through the batcher."""
        await self.predict(DetectionPredictJob(torch.zeros(1, *self.model.input_size)))

    async def explain(
        self,
        job: DetectionExplainJob,
        deadline: float | None = None,
        *,
        wait_for_room: bool = False,
    ) -> tuple[DetectionResult, float]:
        """Explain a job; returns the result and the longest queue wait of its chunks."""
        chunks = [
            dataclasses.replace(job, pixels=job.pixels[rows])
            for rows in row_chunks(job.size, self.max_batch_size)
        ]
        kind = ("explain", *job.group)
        done = await self._submit(chunks, Lane.DEVICE, kind, deadline, wait_for_room)
        return DetectionResult.concat([r for r, _ in done]), max(w for _, w in done)

    async def predict(
        self,
        job: DetectionPredictJob,
        deadline: float | None = None,
        *,
        wait_for_room: bool = False,
    ) -> tuple[Predictions, float]:
        """Detect a job's objects; the predictions and the longest queue wait of its chunks."""
        chunks = [
            dataclasses.replace(job, pixels=job.pixels[rows])
            for rows in row_chunks(job.size, self.max_batch_size)
        ]
        done = await self._submit(chunks, Lane.DEVICE, ("predict",), deadline, wait_for_room)
        return Predictions.concat([r for r, _ in done]), max(w for _, w in done)

    def _run_batch(
        self, replica: int, items: list[Any], interrupted: Callable[[], bool]
    ) -> list[Any]:
        model = self._replicas[replica]
        if isinstance(items[0], DetectionPredictJob):
            return predict_detection_jobs(model, items)
        return explain_detection_jobs(model, items, interrupted=interrupted)
