"""The Vitlens servicer: validate and decode, call a worker, encode. No math here."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from vitlens.v1 import tensor_pb2, vitlens_pb2, vitlens_pb2_grpc
from vitlens_server.config import ServerConfig
from vitlens_server.errors import InvalidArgument, VitlensError
from vitlens_server.explain import ExplainJob, get_method
from vitlens_server.explain.params import parse_params
from vitlens_server.imaging import ImageDecoder
from vitlens_server.metrics import Metrics
from vitlens_server.models import LoadedModel, ModelRegistry
from vitlens_server.rpc import convert
from vitlens_server.rpc.evaluate import Evaluator
from vitlens_server.rpc.status import map_errors
from vitlens_server.runtime import WorkerPool
from vitlens_server.runtime.cache import ResultCache, cache_key
from vitlens_server.runtime.worker import monotonic_deadline

__all__ = ["VitlensServicer"]

DEFAULT_METHOD = "generic"
DEFAULT_TOP_K = 5


class VitlensServicer(vitlens_pb2_grpc.VitlensServicer):
    def __init__(
        self,
        config: ServerConfig,
        registry: ModelRegistry,
        workers: WorkerPool,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics  # read by `map_errors`
        self._config = config
        self._registry = registry
        self._workers = workers
        self._decode_pool = ThreadPoolExecutor(config.decode_threads, "vitlens-decode")
        self._decoders = {
            m.name: ImageDecoder(m.geometry.input_size[1:], config.max_pixels) for m in registry
        }
        self._cache = ResultCache(config.cache_bytes)
        self._evaluator = Evaluator(config.dataset_roots, config.max_pixels)
        self._versions = {m.name: _model_version(m) for m in registry}
        self._infos = {
            m.name: convert.model_info(m, workers.get(m.name).explainer.supported_methods())
            for m in registry
        }

    def close(self) -> None:
        self._decode_pool.shutdown(wait=True)
        self._evaluator.close()

    @map_errors
    async def Explain(
        self, request: vitlens_pb2.ExplainRequest, context
    ) -> vitlens_pb2.ExplainResponse:
        received = time.perf_counter()
        model = self._registry.get(request.model)
        method = get_method(request.method or DEFAULT_METHOD)
        options = request.options
        params = parse_params(method.params, convert.method_options(options), method=method.name)
        if options.return_relevance and not method.relevance_matrix:
            raise InvalidArgument(
                f"method {method.name!r} has no token relevance matrix; unset return_relevance "
                "or use one of: "
                + ", ".join(s.name for s in _methods_with_relevance(self._infos[model.name]))
            )
        self._check_count(request.images)
        target = convert.target_spec(request.target, len(request.images))
        worker = self._workers.get(model.name)
        worker.explainer.check(method, params, target)
        grid = "input" if options.grid == vitlens_pb2.OUTPUT_GRID_INPUT else "tokens"
        top_k = options.top_k_predictions or DEFAULT_TOP_K
        dtype = convert.output_dtype(options.output_dtype)
        keys = self._cache_keys(model, method.name, params, request, target, grid, top_k, dtype)
        cached = [self._cache.get(key) for key in keys] if keys else [None] * len(request.images)
        missing = [i for i, value in enumerate(cached) if value is None]
        if self.metrics is not None and keys:
            self.metrics.cache_hits.labels(model.name).inc(len(cached) - len(missing))
            self.metrics.cache_misses.labels(model.name).inc(len(missing))
        decode_s = queue_s = compute_s = 0.0
        computed: dict[int, vitlens_pb2.ImageExplanation] = {}
        if missing:
            pixels, decode_s = await self._decode(model, [request.images[i] for i in missing])
            job = ExplainJob(
                pixels=pixels,
                method=method,
                params=params,
                target=target.subset(missing),
                grid=grid,
                relevance=options.return_relevance,
                top_k_predictions=top_k,
                output_dtype=dtype,
            )
            deadline = self._deadline(context)
            result, queue_s = await worker.explain(job, deadline)
            compute_s = result.compute_seconds
            messages = convert.image_explanations(model, result, [""] * len(missing))
            for i, message in zip(missing, messages, strict=True):
                computed[i] = message
                if keys:
                    self._cache.put(keys[i], message.SerializeToString())
        results = []
        for i, image in enumerate(request.images):
            message = computed[i] if i in computed else _decode_cached(cached[i])
            message.id = image.id
            results.append(message)
        return vitlens_pb2.ExplainResponse(
            model=model.name,
            method=method.name,
            results=results,
            timing=_timing(received, decode_s, queue_s, compute_s),
        )

    def _cache_keys(
        self, model, method: str, params, request, target, grid: str, top_k: int, dtype: str
    ) -> list[bytes] | None:
        """Per image: SHA-256 of model version, image bytes, method, its target and options."""
        if not self._cache.enabled:
            return None
        shared = (
            model.name,
            self._versions[model.name],
            method,
            json.dumps(dataclasses.asdict(params), sort_keys=True),
            f"{grid}|{int(request.options.return_relevance)}|{top_k}|{dtype}",
        )
        return [
            cache_key(*shared, target.key(i), _image_bytes(image))
            for i, image in enumerate(request.images)
        ]

    @map_errors
    async def Predict(
        self, request: vitlens_pb2.PredictRequest, context
    ) -> vitlens_pb2.PredictResponse:
        received = time.perf_counter()
        model = self._registry.get(request.model)
        self._check_count(request.images)
        pixels, decode_s = await self._decode(model, request.images)
        started = time.perf_counter()
        worker = self._workers.get(model.name)
        preds, queue_s = await worker.predict(
            pixels, request.top_k or DEFAULT_TOP_K, self._deadline(context)
        )
        compute_s = time.perf_counter() - started - queue_s
        return vitlens_pb2.PredictResponse(
            model=model.name,
            results=convert.classifications(model, preds, [i.id for i in request.images]),
            timing=_timing(received, decode_s, queue_s, compute_s),
        )

    @map_errors
    async def ListModels(self, request, context) -> vitlens_pb2.ListModelsResponse:
        return vitlens_pb2.ListModelsResponse(
            models=list(self._infos.values()), default_model=self._registry.default_name
        )

    @map_errors
    async def GetModel(
        self, request: vitlens_pb2.GetModelRequest, context
    ) -> vitlens_pb2.ModelInfo:
        return self._infos[self._registry.get(request.name).name]

    async def Evaluate(
        self, request: vitlens_pb2.EvaluateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[vitlens_pb2.EvaluateEvent]:
        try:
            model = self._registry.get(request.model)
        except VitlensError as err:
            await context.abort(grpc.StatusCode[err.status], str(err))
        worker = self._workers.get(model.name)
        async for event in self._evaluator.stream(request, model, worker, context):
            yield event

    def _deadline(self, context) -> float | None:
        """The call's deadline, or the server's default for callers that set none."""
        remaining = context.time_remaining()
        if remaining is None:
            remaining = self._config.default_deadline_s
        return monotonic_deadline(remaining)

    def _check_count(self, images: Sequence[tensor_pb2.Image]) -> None:
        if not images:
            raise InvalidArgument("the request has no images; add at least one to `images`")
        limit = self._config.max_images_per_request
        if len(images) > limit:
            raise InvalidArgument(
                f"the request has {len(images)} images; this server accepts at most {limit} per "
                "request, so split it"
            )

    async def _decode(
        self, model: LoadedModel, images: Sequence[tensor_pb2.Image]
    ) -> tuple[torch.Tensor, float]:
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        pixels = await loop.run_in_executor(self._decode_pool, self._decoders[model.name], images)
        return pixels, time.perf_counter() - started


def _decode_cached(value: bytes) -> vitlens_pb2.ImageExplanation:
    return vitlens_pb2.ImageExplanation.FromString(value)


def _image_bytes(image: tensor_pb2.Image) -> bytes:
    """What identifies an image's content (not its id): the encoded file or the raw tensor."""
    if image.WhichOneof("source") == "encoded":
        return b"encoded:" + image.encoded
    pixels = image.pixels
    header = f"pixels:{pixels.dtype}:{list(pixels.shape)}:".encode()
    return header + pixels.data


def _model_version(model: LoadedModel) -> str:
    """The weights a model answers with: their file's SHA-256, or how they were initialised."""
    spec = model.spec
    weights = model.weights.sha256 or f"{model.weights.source}:seed={spec.seed}"
    return f"{spec.architecture}|{json.dumps(dict(spec.model_kwargs), sort_keys=True)}|{weights}"


def _methods_with_relevance(info: vitlens_pb2.ModelInfo) -> list[vitlens_pb2.MethodInfo]:
    return [m for m in info.methods if m.relevance_matrix]


def _timing(received: float, decode_s: float, queue_s: float, compute_s: float):
    return vitlens_pb2.Timing(
        preprocess_seconds=decode_s,
        queue_seconds=queue_s,
        compute_seconds=compute_s,
        total_seconds=time.perf_counter() - received,
    )
