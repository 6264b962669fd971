"""The Vitlens servicer: decode → await the data plane → encode. Nothing else happens here.

Errors are raised as `VitlensError`s by the data plane and become statuses in one place,
`rpc.interceptor.CallInterceptor`, which also stamps request ids and records the metrics.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc

from vitlens.v1 import vitlens_pb2, vitlens_pb2_grpc
from vitlens_server.rpc import convert
from vitlens_server.runtime.api import DataPlaneApi

__all__ = ["VitlensServicer"]


class VitlensServicer(vitlens_pb2_grpc.VitlensServiceServicer):
    def __init__(self, plane: DataPlaneApi) -> None:
        self._plane = plane

    async def Explain(
        self, request: vitlens_pb2.ExplainRequest, context: grpc.aio.ServicerContext
    ) -> vitlens_pb2.ExplainResponse:
        query = convert.explain_query(request, _deadline(context))
        return convert.explain_response(await self._plane.explain(query))

    async def Predict(
        self, request: vitlens_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> vitlens_pb2.PredictResponse:
        query = convert.predict_query(request, _deadline(context))
        return convert.predict_response(await self._plane.predict(query))

    async def ListModels(
        self, request: vitlens_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> vitlens_pb2.ListModelsResponse:
        return vitlens_pb2.ListModelsResponse(
            models=[convert.model_info(card) for card in self._plane.models()],
            default_model=self._plane.default_model,
        )

    async def GetModel(
        self, request: vitlens_pb2.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> vitlens_pb2.ModelInfo:
        return convert.model_info(self._plane.model(request.name))

    async def Evaluate(
        self, request: vitlens_pb2.EvaluateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[vitlens_pb2.EvaluateEvent]:
        async for event in self._plane.evaluate(convert.evaluate_query(request)):
            yield convert.evaluate_event(event)


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline as a `time.monotonic` instant (None: the caller set none)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining
