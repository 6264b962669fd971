"""Model workers: a dynamic batcher in front of each loaded model's device thread.

Requests never run on the asyncio event loop: they queue in the model's `Batcher`, which hands
batches to the model's own thread. A request larger than ``max_batch_size`` is split into chunks
that batch like separate requests. A batch that fails is retried in halves when the device ran
out of memory and one request at a time otherwise, so one bad request never fails its
batch-mates.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from vitlens_server.errors import NotFound, ResourceExhausted
from vitlens_server.explain import (
    Explainer,
    ExplainJob,
    ExplainResult,
    Pass,
    Predictions,
    TargetSpec,
)
from vitlens_server.explain.engine import top_k_predictions
from vitlens_server.models import LoadedModel
from vitlens_server.runtime.batcher import Batcher, BatchStats

__all__ = ["ModelWorker", "PredictJob", "WorkerPool"]

log = logging.getLogger("vitlens.worker")


@dataclass(frozen=True)
class PredictJob:
    """Classification only: (B, C, H, W) pixels in [0, 1] and the predictions to return
    (``top_k`` most probable classes; 0: the raw (B, classes) logits on the host)."""

    pixels: torch.Tensor
    top_k: int


class ModelWorker:
    """One served model: a replica per device (each with its cached hooks and its own thread)
    fed by one batcher, so whichever device is free takes the next batch."""

    def __init__(
        self,
        model: LoadedModel,
        *,
        replicas: Sequence[LoadedModel] = (),
        max_batch_size: int = 32,
        max_delay_s: float = 0.0,
        max_queue_images: int = 1024,
        on_batch: Callable[[str, BatchStats], None] | None = None,
    ) -> None:
        self.model = model
        self.explainer = Explainer(model)
        self.max_batch_size = max_batch_size
        self._replicas = [self.explainer, *(Explainer(m) for m in replicas)]
        self._executors = [
            ThreadPoolExecutor(1, thread_name_prefix=f"vitlens-{model.name}-{e.model.device}")
            for e in self._replicas
        ]
        self._batcher: Batcher[Any, Any] = Batcher(
            self._run,
            self._executors,
            max_batch_size=max_batch_size,
            max_delay_s=max_delay_s,
            max_queue_images=max_queue_images,
            on_batch=None if on_batch is None else lambda stats: on_batch(model.name, stats),
        )

    @property
    def queued_images(self) -> int:
        return self._batcher.queued_images

    def start(self) -> None:
        """Start batching (on the running event loop)."""
        self._batcher.start()

    async def stop(self) -> None:
        await self._batcher.stop()

    async def explain(
        self, job: ExplainJob, deadline: float | None = None
    ) -> tuple[ExplainResult, float]:
        """Explain a job; returns the result and the longest queue wait of its chunks."""
        kind = ("explain", Pass.BACKWARD in job.method.passes)
        chunks = [
            dataclasses.replace(job, pixels=pixels)
            for pixels in job.pixels.split(self.max_batch_size)
        ]
        done = await self._submit_all(chunks, kind, deadline)
        return ExplainResult.concat([r for r, _ in done]), max(w for _, w in done)

    async def predict(
        self, pixels: torch.Tensor, top_k: int, deadline: float | None = None
    ) -> tuple[Predictions, float]:
        """Classify (B, C, H, W) pixels; returns predictions and the queue wait in seconds."""
        chunks = [PredictJob(chunk, top_k) for chunk in pixels.split(self.max_batch_size)]
        done = await self._submit_all(chunks, ("predict",), deadline)
        return Predictions.concat([r for r, _ in done]), max(w for _, w in done)

    async def logits(self, pixels: torch.Tensor, deadline: float | None = None) -> torch.Tensor:
        """(B, C, H, W) pixels → (B, classes) float32 logits on the host, batched like Predict
        (Evaluate's re-classification of perturbed images)."""
        chunks = [PredictJob(chunk, 0) for chunk in pixels.split(self.max_batch_size)]
        done = await self._submit_all(chunks, ("predict",), deadline)
        return torch.cat([r for r, _ in done])

    async def warm_up(self) -> None:
        """One small pass of each kind through the batcher: classification, a forward-only and
        a gradient explanation, and the attention-flow solver's compilation."""
        from vitlens_server.explain import get_method
        from vitlens_server.explain.params import parse_params

        _, height, width = self.model.geometry.input_size
        pixels = torch.zeros(1, 3, height, width)
        await self.predict(pixels, 1)
        for name in ("rollout", "generic", "attention_flow"):
            spec = get_method(name)
            if self.explainer.refusal(spec) is None:
                params = parse_params(spec.params, {}, method=name)
                await self.explain(ExplainJob(pixels, spec, params, TargetSpec()))

    async def _submit_all(self, chunks: Sequence[Any], kind, deadline) -> list[tuple[Any, float]]:
        self._batcher.admit(sum(c.pixels.shape[0] for c in chunks))  # all chunks or none
        tasks = [
            self._batcher.submit(c, images=c.pixels.shape[0], kind=kind, deadline=deadline)
            for c in chunks
        ]
        if len(tasks) == 1:
            return [await tasks[0]]
        return list(await asyncio.gather(*tasks))

    def _run(self, replica: int, items: list[Any]) -> list[Any]:
        """Run one batch on replica ``replica``'s thread (all items of one kind)."""
        explainer = self._replicas[replica]
        if isinstance(items[0], PredictJob):
            return _isolated(lambda batch: _predict_batch(explainer, batch), items)
        return _isolated(explainer.explain_batch, items)

    def close(self) -> None:
        for executor in self._executors:
            executor.shutdown(wait=True)
        for explainer in self._replicas:
            explainer.close()


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
    """``run(items)``, retried in halves on out-of-memory and one by one on other failures."""
    try:
        return run(items)
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
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


class WorkerPool:
    """The workers of every loaded model, by model name."""

    def __init__(self, workers: Iterable[ModelWorker]) -> None:
        self._workers = {w.model.name: w for w in workers}

    def __iter__(self):
        return iter(self._workers.values())

    def get(self, name: str) -> ModelWorker:
        worker = self._workers.get(name)
        if worker is None:
            raise NotFound(f"model {name!r} is not loaded")
        return worker

    def start(self) -> None:
        for worker in self._workers.values():
            worker.start()

    async def stop(self) -> None:
        await asyncio.gather(*(w.stop() for w in self._workers.values()))

    async def warm_up(self) -> None:
        await asyncio.gather(*(w.warm_up() for w in self._workers.values()))

    def close(self) -> None:
        for worker in self._workers.values():
            worker.close()


def monotonic_deadline(time_remaining_s: float | None) -> float | None:
    """A gRPC ``context.time_remaining()`` as a `time.monotonic` instant (None: no deadline)."""
    return None if time_remaining_s is None else time.monotonic() + time_remaining_s
