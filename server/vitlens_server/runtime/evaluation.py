"""Evaluate runs: plan, dataset, one thread per run, every model call batched.

    stream(query, evaluand)  the `Evaluand` prepares the run (methods, metrics and options
                   parsed once and checked against the model, the dataset opened through
                   `Datasets`), which then works on a run thread, yielding its progress as it
                   happens and one summary per method x metric at the end

An `Evaluand` is what a run scores. `ImageEvaluand`s run `evaluate.run_evaluation` on image
datasets: a classifier (`ClassifierEvaluand`, below) or an image-text model classifying
zero-shot over its label prompts (`runtime.image_text_evaluation`); a VQA model runs
`evaluate.vqa_run` on scenes with questions (`runtime.vqa_evaluation`). Model calls are
submitted straight into the model's worker on the event loop (`asyncio.run_coroutine_threadsafe`)
and wait on the returned future, so an evaluation's passes batch with each other and with live
traffic, by cost class; the sanity metric's weight-randomised copy is served by a worker of its
own. When the caller goes away the run stops at its next step and the model call it is waiting
for is withdrawn (a running batch nobody else waits for is interrupted); on shutdown the run
fails with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, Protocol

import torch

from vitlens_server.config import ServerConfig
from vitlens_server.domain import ExplainResult, MetricSummary, Progress, TargetSpec
from vitlens_server.errors import (
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
    VitlensError,
    about,
)
from vitlens_server.evaluate import (
    Cancelled,
    EvaluationPlan,
    ModelCalls,
    plan_evaluation,
    run_evaluation,
)
from vitlens_server.explain import ExplainJob
from vitlens_server.models import LoadedModel
from vitlens_server.runtime.api import EvaluateQuery
from vitlens_server.runtime.evaluation_datasets import Datasets
from vitlens_server.runtime.worker import ModelWorker

__all__ = [
    "ClassifierEvaluand",
    "Datasets",
    "Evaluand",
    "Evaluations",
    "ImageEvaluand",
    "Submit",
    "Work",
]

RandomisedWorker = Callable[[LoadedModel], Awaitable[ModelWorker]]
Submit = Callable[[Coroutine[Any, Any, Any]], Any]  # run thread: one model call, its result


class Work(Protocol):
    """A prepared run, called once on its run thread: one summary per method x metric."""

    def __call__(
        self, *, progress: Callable[[Progress], None], cancelled: threading.Event
    ) -> list[MetricSummary]: ...


class Evaluand(Protocol):
    """What an Evaluate run scores, and how the run reaches it."""

    name: str

    async def prepare(self, query: EvaluateQuery, datasets: Datasets, submit: Submit) -> Work:
        """Parse and check ``query`` against the model (domain errors, before any model call),
        open its dataset and return the run; each model call is ``submit(coroutine)``."""
        ...


class ImageEvaluand:
    """An evaluand scored by `evaluate.run_evaluation` on image datasets.

    Subclasses set the attributes and give `check` and `calls`.

    Attributes:
        name: the model's name.
        labels: its class names (server datasets' classes are matched to them by name).
        input_size: (H, W) of its input.
        grid: (gh, gw) its token grid.
        max_queue_images: its worker's queue bound (a plan's model calls must fit in it).
    """

    name: str
    labels: tuple[str, ...]
    input_size: tuple[int, int]
    grid: tuple[int, int]
    max_queue_images: int

    def check(self, plan: EvaluationPlan, query: EvaluateQuery) -> None:
        """Refuse a plan (or dataset) this model cannot run, before the dataset is opened."""
        raise NotImplementedError

    async def calls(self, plan: EvaluationPlan, submit: Submit) -> ModelCalls:
        """The run's `ModelCalls`; each model call is ``submit(coroutine on the loop)``."""
        raise NotImplementedError

    async def prepare(self, query: EvaluateQuery, datasets: Datasets, submit: Submit) -> Work:
        plan = plan_evaluation(
            query.methods,
            query.metrics,
            method_options=query.method_options,
            metric_options=query.metric_options,
            explain_label=query.explain_label,
        )
        self.check(plan, query)
        _check_fits(plan, self.max_queue_images)
        dataset = await datasets.images(query, self)
        calls = await self.calls(plan, submit)
        return functools.partial(
            run_evaluation,
            plan,
            dataset,
            calls,
            input_size=self.input_size,
            grid=self.grid,
            num_classes=len(self.labels),
        )


class ClassifierEvaluand(ImageEvaluand):
    """A classifier as Evaluate scores it: its worker, and a weight-randomised copy's (made by
    ``randomised`` on first use) for the sanity metric."""

    def __init__(
        self, model: LoadedModel, worker: ModelWorker, randomised: RandomisedWorker
    ) -> None:
        self._model, self._worker, self._randomised = model, worker, randomised
        self.name = model.name
        self.labels = model.labels
        self.input_size = tuple(model.geometry.input_size[1:])
        self.grid = model.geometry.grid
        self.max_queue_images = worker.max_queue_images

    def check(self, plan: EvaluationPlan, query: EvaluateQuery) -> None:
        for planned in plan.methods:
            if not planned.spec.needs_mask:  # the oracle reads the dataset's masks
                with about(f"method_options[{planned.name}]"):
                    self._worker.explainer.check(planned.spec, planned.params, TargetSpec())

    async def calls(self, plan: EvaluationPlan, submit: Submit) -> ModelCalls:
        randomised = await self._randomised(self._model) if plan.needs_randomised else None
        return _ClassifierCalls(self._worker, randomised, submit)


class Evaluations:
    """The Evaluate runs of a data plane.

    Args:
        config: the server's settings (dataset roots, pixel and inline limits).
        decode_pool: where inline images are decoded and server folders opened.
        threads: runs at once; further calls wait for a thread.
    """

    def __init__(
        self,
        config: ServerConfig,
        decode_pool: concurrent.futures.Executor,
        threads: int = 2,
    ) -> None:
        self.datasets = Datasets(config, decode_pool)
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, "vitlens-evaluate")
        self._runs: set[_RunState] = set()

    @property
    def running(self) -> int:
        """Runs whose thread has not finished (a cancelled one stops at its next step)."""
        return len(self._runs)

    def stop(self) -> None:
        """Fail every run with UNAVAILABLE at its next step."""
        for state in list(self._runs):
            state.stop(Unavailable("the server is shutting down; retry on another replica"))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    async def stream(
        self, query: EvaluateQuery, evaluand: Evaluand
    ) -> AsyncIterator[Progress | MetricSummary]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Progress] = asyncio.Queue()
        state = _RunState()
        submit = functools.partial(_submit, loop, state)
        prepared = await evaluand.prepare(query, self.datasets, submit)

        def work() -> list[MetricSummary]:
            try:
                return prepared(
                    progress=lambda p: loop.call_soon_threadsafe(events.put_nowait, p),
                    cancelled=state.cancelled,
                )
            finally:
                loop.call_soon_threadsafe(self._runs.discard, state)

        self._runs.add(state)
        context = contextvars.copy_context()  # the run's log lines carry the request id
        run = loop.run_in_executor(self._pool, context.run, work)
        run.add_done_callback(_retrieve)  # a run the caller left still ends with an outcome
        try:
            while not run.done() or not events.empty():
                waiter = asyncio.ensure_future(events.get())
                try:
                    await asyncio.wait({waiter, run}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                if waiter.done() and not waiter.cancelled():
                    yield waiter.result()
            try:
                results = run.result()
            except Cancelled:
                if state.reason is not None:
                    raise state.reason from None
                return
            for summary in results:
                yield summary
        finally:
            state.stop(None)  # the caller went away, or the run is over


def _check_fits(plan: EvaluationPlan, queue_images: int) -> None:
    """Refuse a plan whose model calls could never be admitted to the model's queue: the
    explanation of a chunk of samples, or a metric's batch of perturbed images."""
    if plan.chunk_size > queue_images:
        raise FailedPrecondition(
            f"Evaluate explains {plan.chunk_size} samples per model call, more than this "
            f"server's queue of {queue_images} images per model; its operator must raise "
            "--max-queue-images"
        )
    for metric in plan.metrics:
        batch = getattr(metric.options, "batch_size", None)
        if batch is not None and batch > queue_images:
            raise InvalidArgument(
                f"{metric.name}.batch_size {batch} is more than this server's queue of "
                f"{queue_images} images per model; use at most {queue_images}",
                field=f"metric_options[{metric.name}].batch_size",
            )


def _retrieve(run: asyncio.Future) -> None:
    if not run.cancelled():
        run.exception()


class _RunState:
    """A run's cancellation: the event the runner checks between steps, why it was set, and
    the model call the run thread is waiting for (withdrawn when the run stops)."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.reason: VitlensError | None = None
        self.waiting: concurrent.futures.Future | None = None

    def stop(self, reason: VitlensError | None) -> None:
        if not self.cancelled.is_set():
            self.reason = reason
            self.cancelled.set()
        waiting = self.waiting
        if waiting is not None:
            waiting.cancel()


def _submit(
    loop: asyncio.AbstractEventLoop, state: _RunState, coro: Coroutine[Any, Any, Any]
) -> Any:
    """From the run thread: run ``coro`` on the loop and wait for it; a cancelled run withdraws
    the call it is waiting for (`_RunState.stop`) and raises `Cancelled`."""
    if state.cancelled.is_set():
        coro.close()
        raise Cancelled("the evaluation was cancelled")
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    state.waiting = future
    try:
        return future.result()
    except concurrent.futures.CancelledError:
        raise Cancelled("the evaluation was cancelled") from None
    finally:
        state.waiting = None


class _ClassifierCalls:
    """`ModelCalls` for the run thread: each call is one request to the model's worker."""

    def __init__(self, worker: ModelWorker, randomised: ModelWorker | None, submit: Submit) -> None:
        self._worker, self._randomised, self._submit = worker, randomised, submit

    def explain(self, job: ExplainJob) -> ExplainResult:
        return self._submit(self._worker.explain(job, wait_for_room=True))[0]

    def randomised_explain(self, job: ExplainJob) -> ExplainResult:
        if self._randomised is None:
            raise RuntimeError("the plan has no metric that needs the randomised copy")
        return self._submit(self._randomised.explain(job, wait_for_room=True))[0]

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._submit(self._worker.logits(pixels, wait_for_room=True))
