"""The Vitlens servicer: validate and decode, call a worker, encode. No math here."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from vitlens.v1 import tensor_pb2, vitlens_pb2, vitlens_pb2_grpc
from vitlens_server.config import ServerConfig
from vitlens_server.errors import InvalidArgument
from vitlens_server.explain import ExplainJob, get_method
from vitlens_server.explain.params import parse_params
from vitlens_server.imaging import ImageDecoder
from vitlens_server.metrics import Metrics
from vitlens_server.models import LoadedModel, ModelRegistry
from vitlens_server.rpc import convert
from vitlens_server.rpc.status import map_errors
from vitlens_server.runtime import WorkerPool
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
        self._infos = {
            m.name: convert.model_info(m, workers.get(m.name).explainer.supported_methods())
            for m in registry
        }

    def close(self) -> None:
        self._decode_pool.shutdown(wait=True)

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
        pixels, decode_s = await self._decode(model, request.images)
        job = ExplainJob(
            pixels=pixels,
            method=method,
            params=params,
            target=target,
            grid="input" if options.grid == vitlens_pb2.OUTPUT_GRID_INPUT else "tokens",
            relevance=options.return_relevance,
            top_k_predictions=options.top_k_predictions or DEFAULT_TOP_K,
            output_dtype=convert.output_dtype(options.output_dtype),
        )
        result, queue_s = await worker.explain(job, monotonic_deadline(context.time_remaining()))
        ids = [image.id for image in request.images]
        return vitlens_pb2.ExplainResponse(
            model=model.name,
            method=method.name,
            results=convert.image_explanations(model, result, ids),
            timing=_timing(received, decode_s, queue_s, result.compute_seconds),
        )

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
            pixels, request.top_k or DEFAULT_TOP_K, monotonic_deadline(context.time_remaining())
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
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "Evaluate is declared but not implemented in this server version yet",
        )
        yield vitlens_pb2.EvaluateEvent()  # unreachable; makes this an async generator

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


def _methods_with_relevance(info: vitlens_pb2.ModelInfo) -> list[vitlens_pb2.MethodInfo]:
    return [m for m in info.methods if m.relevance_matrix]


def _timing(received: float, decode_s: float, queue_s: float, compute_s: float):
    return vitlens_pb2.Timing(
        preprocess_seconds=decode_s,
        queue_seconds=queue_s,
        compute_seconds=compute_s,
        total_seconds=time.perf_counter() - received,
    )
