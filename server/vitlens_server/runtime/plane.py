"""The data plane: every request is resolved, admitted, batched and answered here.

    explain(query)   model and method resolved, options parsed once, capabilities checked,
                     cached images answered, the rest decoded on the decode pool and sent
                     through the model's worker (batched by cost class), then cached
    predict(query)   decoded, batched, answered
    evaluate(query)  `runtime.evaluation`: one thread per run, every model call batched

Each model is served by the class of its task (`runtime.served`: a classifier, or an image-text
model over texts or its label prompts), which resolves its queries, so the flow here is the
same for all. The RPC layer hands in domain queries (`runtime.api`) and gets domain replies
back; errors are `VitlensError`s. `drain` lets in-flight calls finish, then `stop` fails the
rest with UNAVAILABLE and interrupts running batches at their next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import torch

from vitlens_server.config import ServerConfig
from vitlens_server.domain import ImageInput, MetricSummary, Progress
from vitlens_server.errors import InvalidArgument, Unavailable
from vitlens_server.evaluate import randomised_copy
from vitlens_server.explain import METHODS, MethodSpec
from vitlens_server.imaging import ImageDecoder
from vitlens_server.models import LoadedModel, ModelRegistry
from vitlens_server.models.detection_serving import LoadedDetector
from vitlens_server.models.image_text_serving import LoadedImageTextModel
from vitlens_server.models.vqa_serving import LoadedVqaModel
from vitlens_server.runtime.api import (
    EvaluateQuery,
    ExplainQuery,
    ExplainReply,
    ModelCard,
    PredictQuery,
    PredictReply,
    Timing,
)
from vitlens_server.runtime.batcher import BatchStats
from vitlens_server.runtime.cache import ResultCache, cache_key
from vitlens_server.runtime.cards import model_card, model_version
from vitlens_server.runtime.detection import detection_card, detection_version
from vitlens_server.runtime.detection_worker import DetectionWorker
from vitlens_server.runtime.evaluation import Evaluations
from vitlens_server.runtime.image_text import (
    image_text_card,
    image_text_version,
)
from vitlens_server.runtime.image_text_worker import ImageTextWorker
from vitlens_server.runtime.served import (
    DEFAULT_METHOD,
    Served,
    ServedClassifier,
    ServedDetector,
    ServedImageText,
    ServedVqa,
)
from vitlens_server.runtime.vqa import vqa_card, vqa_version
from vitlens_server.runtime.vqa_worker import VqaWorker
from vitlens_server.runtime.worker import ModelWorker

__all__ = ["DEFAULT_METHOD", "DEFAULT_TOP_K", "DataPlane", "Observer", "cuda_memory"]

DEFAULT_TOP_K = 5


class Observer(Protocol):
    """Where the data plane reports what it did (the Prometheus telemetry)."""

    def on_batch(self, model: str, stats: BatchStats) -> None: ...

    def on_cache(self, model: str, hits: int, misses: int) -> None: ...


class DataPlane:
    """Implements `runtime.api.DataPlaneApi` over the registry's models."""

    def __init__(
        self,
        config: ServerConfig,
        registry: ModelRegistry,
        replicas: Mapping[str, Sequence[LoadedModel]] | None = None,
        observer: Observer | None = None,
    ) -> None:
        self._config = config
        self._registry = registry
        self._observer = observer
        self._served: dict[str, Served] = {}
        for model in registry:
            extra = (replicas or {}).get(model.name, ())
            if isinstance(model, LoadedImageTextModel):
                self._served[model.name] = self._serve_image_text(model, extra)
            elif isinstance(model, LoadedVqaModel):
                self._served[model.name] = self._serve_vqa(model, extra)
            elif isinstance(model, LoadedDetector):
                self._served[model.name] = self._serve_detector(model, extra)
            else:
                self._served[model.name] = self._serve_classifier(model, extra)
        self._decode_pool = ThreadPoolExecutor(config.decode_threads, "vitlens-decode")
        self._cache = ResultCache(config.cache_bytes)
        self._randomised: dict[str, ModelWorker] = {}
        self._randomised_lock = asyncio.Lock()
        self.evaluations = Evaluations(config, self._decode_pool)
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle

    @property
    def workers(self) -> list[ModelWorker]:
        return [served.worker for served in self._served.values()]

    def start(self) -> None:
        """Start the workers' batchers (on the running event loop)."""
        for worker in self.workers:
            worker.start()

    async def warm_up(self) -> None:
        await asyncio.gather(*(worker.warm_up() for worker in self.workers))

    async def drain(self, grace_s: float) -> None:
        """Let in-flight calls finish for up to ``grace_s``, then `stop`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace_s)
        await self.stop()

    async def stop(self) -> None:
        """Fail queued work and running evaluations with UNAVAILABLE; interrupt running
        batches at their next step and wait for them."""
        self._stopping = True
        self.evaluations.stop()
        workers = [*self.workers, *self._randomised.values()]
        await asyncio.gather(*(worker.stop() for worker in workers))

    def close(self) -> None:
        """Join every thread (after `stop`: the running batches end at their next step)."""
        self.evaluations.close()
        self._decode_pool.shutdown(wait=True)
        for worker in [*self.workers, *self._randomised.values()]:
            worker.close()

    # ------------------------------------------------------------------ models

    @property
    def default_model(self) -> str:
        return self._registry.default_name

    @property
    def method_names(self) -> frozenset[str]:
        return frozenset(METHODS)

    def models(self) -> list[ModelCard]:
        return [served.card for served in self._served.values()]

    def model(self, name: str) -> ModelCard:
        return self._serve(name).card

    def queued_images(self, model: str) -> int:
        return self._served[model].worker.queued_images

    # ------------------------------------------------------------------ requests

    async def explain(self, query: ExplainQuery) -> ExplainReply:
        with self._call():
            received = time.perf_counter()
            served = self._serve(query.model)
            top_k = query.top_k_predictions or DEFAULT_TOP_K
            resolved = served.resolve(query, self._config, top_k)
            self._check_count(query.images)
            job, method, params = resolved.job, resolved.method, resolved.params
            keys = self._cache_keys(served, method, params, query, resolved.cache_extra)
            results = [self._cache.get(key) for key in keys] or [None] * len(query.images)
            missing = [i for i, value in enumerate(results) if value is None]
            if keys and self._observer is not None:
                self._observer.on_cache(served.model.name, len(keys) - len(missing), len(missing))
            decode_s = queue_s = compute_s = 0.0
            if missing:
                pixels, decode_s = await self._decode(served, [query.images[i] for i in missing])
                job = served.for_images(job, missing, pixels)
                computed, queue_s = await served.worker.explain(job, self._deadline(query))
                compute_s = computed.compute_seconds
                for i, row in zip(missing, computed.rows(), strict=True):
                    results[i] = row
                    if keys:
                        self._cache.put(keys[i], row, row.nbytes)
            return ExplainReply(
                model=served.model.name,
                method=method.name,
                labels=resolved.labels,
                ids=tuple(image.id for image in query.images),
                results=tuple(results),
                timing=_timing(received, decode_s, queue_s, compute_s),
            )

    async def predict(self, query: PredictQuery) -> PredictReply:
        with self._call():
            received = time.perf_counter()
            served = self._serve(query.model)
            served.check_predict(query, self._config)
            self._check_count(query.images)
            pixels, decode_s = await self._decode(served, query.images)
            started = time.perf_counter()
            top_k = query.top_k or DEFAULT_TOP_K
            predictions, queue_s, labels = await served.predict(
                query, pixels, top_k, self._deadline(query)
            )
            compute_s = time.perf_counter() - started - queue_s
            return PredictReply(
                model=served.model.name,
                labels=labels,
                ids=tuple(image.id for image in query.images),
                predictions=predictions,
                timing=_timing(received, decode_s, queue_s, compute_s),
            )

    async def evaluate(self, query: EvaluateQuery) -> AsyncIterator[Progress | MetricSummary]:
        with self._call():
            served = self._serve(query.model)
            evaluand = served.evaluand(self._randomised_worker)
            async for event in self.evaluations.stream(query, evaluand):
                yield event

    # ------------------------------------------------------------------ helpers

    def _serve_classifier(self, model: LoadedModel, replicas: Sequence[LoadedModel]) -> Served:
        worker = self._worker(model, replicas)
        decoder = ImageDecoder(model.geometry.input_size[1:], self._config.max_pixels)
        card = model_card(model, worker.explainer.supported_methods())
        return ServedClassifier(model, worker, decoder, model_version(model), card)

    def _serve_image_text(
        self, model: LoadedImageTextModel, replicas: Sequence[LoadedImageTextModel]
    ) -> Served:
        worker = ImageTextWorker.configured(
            model,
            self._config,
            replicas=replicas,
            on_batch=None if self._observer is None else self._observer.on_batch,
        )
        decoder = ImageDecoder(model.input_size[1:], self._config.max_pixels)
        return ServedImageText(
            model, worker, decoder, image_text_version(model), image_text_card(model)
        )

    def _serve_vqa(self, model: LoadedVqaModel, replicas: Sequence[LoadedVqaModel]) -> Served:
        worker = VqaWorker.configured(
            model,
            self._config,
            replicas=replicas,
            on_batch=None if self._observer is None else self._observer.on_batch,
        )
        decoder = ImageDecoder(model.input_size[1:], self._config.max_pixels)
        return ServedVqa(model, worker, decoder, vqa_version(model), vqa_card(model), self._config)

    def _serve_detector(self, model: LoadedDetector, replicas: Sequence[LoadedDetector]) -> Served:
        worker = DetectionWorker.configured(
            model,
            self._config,
            replicas=replicas,
            on_batch=None if self._observer is None else self._observer.on_batch,
        )
        decoder = ImageDecoder(model.input_size[1:], self._config.max_pixels)
        card = detection_card(model)
        return ServedDetector(model, worker, decoder, detection_version(model), card)

    def _cache_keys(
        self,
        served: Served,
        method: MethodSpec,
        params: object,
        query: ExplainQuery,
        texts: str = "",
    ) -> list[bytes]:
        """Per image: SHA-256 of model version, image content, method, its target, options
        (none when the cache is off)."""
        if not self._cache.enabled:
            return []
        top_k = query.top_k_predictions or DEFAULT_TOP_K
        shared = (
            served.model.name,
            served.version,
            method.name,
            json.dumps(dataclasses.asdict(params), sort_keys=True),
            f"{query.grid}|{int(query.return_relevance)}|{top_k}|{query.output_dtype}",
            texts,
        )
        return [
            cache_key(*shared, query.target.key(i), image.content())
            for i, image in enumerate(query.images)
        ]

    def _serve(self, name: str) -> Served:
        if self._stopping:
            raise Unavailable("the server is shutting down; retry on another replica")
        return self._served[self._registry.get(name).name]  # NOT_FOUND names the models

    def _check_count(self, images: Sequence[ImageInput]) -> None:
        if not images:
            raise InvalidArgument(
                "the request has no images; add at least one to `images`", field="images"
            )
        limit = self._config.max_images_per_request
        if len(images) > limit:
            raise InvalidArgument(
                f"the request has {len(images)} images; this server accepts at most {limit} per "
                "request, so split it",
                field="images",
            )

    def _deadline(self, query: ExplainQuery | PredictQuery) -> float | None:
        """The caller's deadline, or the server's default for callers that set none."""
        if query.deadline is not None:
            return query.deadline
        default_s = self._config.default_deadline_s
        return None if default_s is None else time.monotonic() + default_s

    async def _decode(
        self, served: Served, images: Sequence[ImageInput]
    ) -> tuple[torch.Tensor, float]:
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        pixels = await loop.run_in_executor(self._decode_pool, served.decoder, images)
        return pixels, time.perf_counter() - started

    def _worker(self, model: LoadedModel, replicas: Sequence[LoadedModel] = ()) -> ModelWorker:
        on_batch = None if self._observer is None else self._observer.on_batch
        return ModelWorker.configured(model, self._config, replicas=replicas, on_batch=on_batch)

    async def _randomised_worker(self, model: LoadedModel) -> ModelWorker:
        """The worker of ``model``'s weight-randomised copy (the ``sanity`` metric), made on
        first use and kept."""
        async with self._randomised_lock:
            if model.name not in self._randomised:
                copy = await asyncio.to_thread(randomised_copy, model)
                worker = self._worker(copy)
                worker.start()
                self._randomised[model.name] = worker
            return self._randomised[model.name]

    @contextlib.contextmanager
    def _call(self) -> Iterator[None]:
        """Count a call in flight (what `drain` waits for)."""
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()


def cuda_memory(device: torch.device) -> Callable[[], tuple[int, int]]:
    """A reader of (allocated, reserved) bytes PyTorch holds on a CUDA ``device``."""
    return lambda: (torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device))


def _timing(received: float, decode_s: float, queue_s: float, compute_s: float) -> Timing:
    return Timing(decode_s, queue_s, compute_s, time.perf_counter() - received)
