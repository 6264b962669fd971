"""The Evaluate RPC: validate, run `evaluate.run_evaluation` on a thread, stream its events.

Model calls of the run go through the model's batcher on the event loop, so an evaluation's
passes batch together and with live traffic. Progress events are streamed as they happen, then
one result per method x metric. When the client cancels (or its deadline passes) the run stops
at its next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import torch
from google.protobuf import json_format

from vitlens.tensors import tensor_to_numpy
from vitlens.v1 import vitlens_pb2
from vitlens_server.errors import InvalidArgument, VitlensError
from vitlens_server.evaluate.datasets import Sample, open_server_path, parse_synthetic
from vitlens_server.evaluate.protocols import randomised_copy
from vitlens_server.evaluate.runner import (
    Cancelled,
    EvaluationPlan,
    MetricSummary,
    Progress,
    run_evaluation,
)
from vitlens_server.explain import Explainer, ExplainJob, ExplainResult, TargetSpec, get_method
from vitlens_server.explain.params import parse_params
from vitlens_server.imaging import ImageDecoder
from vitlens_server.models import LoadedModel
from vitlens_server.runtime import ModelWorker

__all__ = ["Evaluator"]

log = logging.getLogger("vitlens.evaluate")


class Evaluator:
    """Runs Evaluate calls for the servicer; ``dataset_roots`` bound server-side folders."""

    def __init__(self, dataset_roots: Sequence[Path], max_pixels: int, threads: int = 2) -> None:
        self._roots = tuple(Path(r) for r in dataset_roots)
        self._max_pixels = max_pixels
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="vitlens-evaluate")
        self._randomised = _RandomisedCopies()
        self.running = 0  # runs whose thread has not finished (cancelled ones stop at a step)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._randomised.close()

    async def stream(
        self,
        request: vitlens_pb2.EvaluateRequest,
        model: LoadedModel,
        worker: ModelWorker,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[vitlens_pb2.EvaluateEvent]:
        try:
            plan = _plan(request, worker)
            dataset = self._dataset(request.dataset, model)
        except VitlensError as err:
            await context.abort(grpc.StatusCode[err.status], str(err))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Progress] = asyncio.Queue()
        cancelled = threading.Event()
        calls = _BatcherCalls(worker, loop, cancelled, self._randomised)

        def work() -> list[MetricSummary]:
            try:
                return run_evaluation(
                    plan,
                    dataset,
                    calls,
                    input_size=model.geometry.input_size[1:],
                    grid=model.geometry.grid,
                    num_classes=model.geometry.num_classes,
                    progress=lambda p: loop.call_soon_threadsafe(events.put_nowait, p),
                    cancelled=cancelled,
                )
            finally:
                loop.call_soon_threadsafe(self._finished)

        self.running += 1
        run = loop.run_in_executor(self._pool, work)
        waiter: asyncio.Future | None = None
        try:
            while not run.done() or not events.empty():
                waiter = asyncio.ensure_future(events.get())
                await asyncio.wait({waiter, run}, return_when=asyncio.FIRST_COMPLETED)
                if waiter.done():
                    yield vitlens_pb2.EvaluateEvent(progress=_progress(waiter.result()))
                else:
                    waiter.cancel()
            try:
                results = run.result()
            except VitlensError as err:
                await context.abort(grpc.StatusCode[err.status], str(err))
            except Cancelled:
                return
            except Exception:
                incident = uuid.uuid4().hex[:12]
                log.exception("Evaluate failed (incident %s)", incident)
                await context.abort(
                    grpc.StatusCode.INTERNAL,
                    f"internal server error (incident {incident}); the server log has details",
                )
            for summary in results:
                yield vitlens_pb2.EvaluateEvent(result=_result(summary))
        finally:
            cancelled.set()  # the client went away, or the run is over
            if waiter is not None and not waiter.done():
                waiter.cancel()

    def _finished(self) -> None:
        self.running -= 1

    def _dataset(self, spec: vitlens_pb2.Dataset, model: LoadedModel) -> Sequence[Sample]:
        kind = spec.WhichOneof("source")
        if kind == "synthetic":
            dataset: Sequence[Sample] = parse_synthetic(spec.synthetic)
        elif kind == "server_path":
            dataset = open_server_path(spec.server_path, self._roots, model.labels)
        elif kind == "inline":
            dataset = _inline(spec.inline, model, self._max_pixels)
        else:
            raise InvalidArgument("dataset is empty: set synthetic, server_path or inline")
        return _Limited(dataset, spec.limit) if spec.limit else dataset


class _BatcherCalls:
    """`ModelCalls` for the runner's thread, through the worker's batcher on the event loop.

    Once the run is cancelled no further model call is made: the run stops within one call.
    """

    def __init__(
        self,
        worker: ModelWorker,
        loop: asyncio.AbstractEventLoop,
        cancelled: threading.Event,
        randomised: _RandomisedCopies,
    ) -> None:
        self._worker, self._loop, self._cancelled = worker, loop, cancelled
        self._randomised = randomised

    def randomised_explain(self, job: ExplainJob) -> ExplainResult:
        if self._cancelled.is_set():
            raise Cancelled("the evaluation was cancelled")
        return self._randomised.explain(self._worker.model, job)

    def explain(self, job: ExplainJob) -> ExplainResult:
        return self._call(self._worker.explain(job))[0]

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._call(self._worker.logits(pixels))

    def _call(self, coro):
        if self._cancelled.is_set():
            coro.close()
            raise Cancelled("the evaluation was cancelled")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()


class _RandomisedCopies:
    """Weight-randomised copies of served models for the ``sanity`` metric, made on first use
    and kept (one per model, on its device). Only evaluation runs use them, one at a time per
    model, on the evaluation's thread: the batches are already whole chunks of the dataset."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._copies: dict[str, tuple[Explainer, threading.Lock]] = {}

    def explain(self, model: LoadedModel, job: ExplainJob) -> ExplainResult:
        with self._lock:
            if model.name not in self._copies:
                log.info("making a weight-randomised copy of %s for the sanity metric", model.name)
                explainer = Explainer(randomised_copy(model))
                self._copies[model.name] = explainer, threading.Lock()
            explainer, lock = self._copies[model.name]
        with lock:
            return explainer.explain(job)

    def close(self) -> None:
        with self._lock:
            for explainer, _ in self._copies.values():
                explainer.close()
            self._copies.clear()


class _Limited:
    def __init__(self, dataset: Sequence[Sample], limit: int) -> None:
        self._dataset, self._count = dataset, min(limit, len(dataset))

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self._count:
            raise IndexError(index)
        return self._dataset[index]


def _plan(request: vitlens_pb2.EvaluateRequest, worker: ModelWorker) -> EvaluationPlan:
    method_options = {k: json_format.MessageToDict(v) for k, v in request.method_options.items()}
    for method in request.methods:
        spec = get_method(method)
        params = parse_params(spec.params, method_options.get(method, {}), method=method)
        if not spec.needs_mask:  # the oracle reads the dataset's masks, not the model
            worker.explainer.check(spec, params, TargetSpec())
    return EvaluationPlan(
        methods=tuple(request.methods),
        metrics=tuple(request.metrics),
        method_options=method_options,
        metric_options={k: json_format.MessageToDict(v) for k, v in request.metric_options.items()},
        explain_label=request.explain_label,
    )


def _inline(data: vitlens_pb2.InlineDataset, model: LoadedModel, max_pixels: int) -> list[Sample]:
    """Decode inline samples (images at the model's input size, masks resized by the runner)."""
    decoder = ImageDecoder(model.geometry.input_size[1:], max_pixels)
    samples = []
    classes = model.geometry.num_classes
    for i, sample in enumerate(data.samples):
        where = f"dataset.inline.samples[{i}]"
        if not 0 <= sample.label < classes:
            raise InvalidArgument(f"{where}.label {sample.label} is not in 0..{classes - 1}")
        pixels = decoder.decode(i, sample.image)  # (3, H, W) float in [0, 1]
        image = (pixels * 255).round().byte().permute(1, 2, 0).numpy()
        masks = None
        if sample.HasField("mask"):
            mask = tensor_to_numpy(sample.mask)
            if mask.ndim != 2:
                raise InvalidArgument(f"{where}.mask must be (H, W); got shape {mask.shape}")
            masks = (mask != 0)[None]
        samples.append(Sample(sample.image.id or f"sample_{i}", image, (sample.label,), masks))
    if any(s.masks is None for s in samples) and any(s.masks is not None for s in samples):
        raise InvalidArgument("give a mask for every inline sample or for none")
    return samples


def _progress(p: Progress) -> vitlens_pb2.Progress:
    return vitlens_pb2.Progress(
        done=p.done,
        total=p.total,
        images_per_second=p.images_per_second,
        eta_seconds=p.eta_seconds,
        stage=p.stage,
    )


def _result(summary: MetricSummary) -> vitlens_pb2.MetricResult:
    return vitlens_pb2.MetricResult(
        method=summary.method,
        metric=summary.metric,
        values=[
            vitlens_pb2.Statistic(
                name=name,
                mean=s.mean,
                std=s.std,
                ci95_low=s.mean - s.ci95,
                ci95_high=s.mean + s.ci95,
                n=s.n,
            )
            for name, s in summary.values.items()
        ],
        curves=[
            vitlens_pb2.Curve(name=name, x=x, y=list(np.asarray(y, dtype=float)))
            for name, (x, y) in summary.curves.items()
        ],
    )
