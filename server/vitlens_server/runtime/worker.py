"""One worker thread per loaded model: device work never runs on the asyncio event loop.

A request's images are split into chunks of at most ``max_batch_size`` so memory stays bounded
whatever the request size.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from vitlens_server.errors import NotFound
from vitlens_server.explain import Explainer, ExplainJob, ExplainResult, Predictions
from vitlens_server.models import LoadedModel

__all__ = ["ModelWorker", "WorkerPool"]

T = TypeVar("T")


class ModelWorker:
    """Serialises passes of one model on its own thread."""

    def __init__(self, model: LoadedModel, *, max_batch_size: int = 32) -> None:
        self.model = model
        self.explainer = Explainer(model)
        self.max_batch_size = max_batch_size
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"vitlens-{model.name}")

    async def explain(self, job: ExplainJob) -> tuple[ExplainResult, float]:
        """Explain a job; returns the result and the seconds it waited for the thread."""
        chunks = [
            dataclasses.replace(job, pixels=pixels)
            for pixels in job.pixels.split(self.max_batch_size)
        ]
        results, queue_s = await self._run(lambda: [self.explainer.explain(c) for c in chunks])
        return ExplainResult.concat(results), queue_s

    async def predict(self, pixels: torch.Tensor, top_k: int) -> tuple[Predictions, float]:
        """Classify (B, C, H, W) pixels; returns predictions and the queue wait in seconds."""
        chunks = pixels.split(self.max_batch_size)
        results, queue_s = await self._run(
            lambda: [self.explainer.predict(c, top_k) for c in chunks]
        )
        return Predictions.concat(results), queue_s

    async def _run(self, work: Callable[[], T]) -> tuple[T, float]:
        submitted = time.perf_counter()
        started: list[float] = []

        def timed() -> T:
            started.append(time.perf_counter())
            return work()

        result = await asyncio.get_running_loop().run_in_executor(self._executor, timed)
        return result, started[0] - submitted

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.explainer.close()


class WorkerPool:
    """The workers of every loaded model, by model name."""

    def __init__(self, workers: Iterable[ModelWorker]) -> None:
        self._workers = {w.model.name: w for w in workers}

    def get(self, name: str) -> ModelWorker:
        worker = self._workers.get(name)
        if worker is None:
            raise NotFound(f"model {name!r} is not loaded")
        return worker

    def close(self) -> None:
        for worker in self._workers.values():
            worker.close()
