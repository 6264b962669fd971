"""asyncio client for the vitlens service, on `grpc.aio`.

`AsyncClient` has the same methods and arguments as `vitlens.Client`, as coroutines. Create it
inside the event loop that will use it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
import grpc.aio

from vitlens.client import (
    DEFAULT_TARGET,
    HEALTH_CHECK,
    SERVING,
    TargetSpec,
    build_answer_request,
    build_explain_request,
    build_predict_request,
    channel_options,
    empty_request,
    health_status,
)
from vitlens.errors import UnavailableError, from_rpc_error
from vitlens.images import ImageInput
from vitlens.results import Classification, ExplainResult, ModelInfo
from vitlens.v1 import vitlens_pb2, vitlens_pb2_grpc
from vitlens.vqa import Answer, QuestionsSpec, Regions, RegionsSpec, answers_from_proto

__all__ = ["AsyncClient"]

_T = TypeVar("_T")


class AsyncClient:
    """asyncio vitlens client over one `grpc.aio` channel; see `vitlens.Client` for arguments.

    Use ``async with AsyncClient(...) as client:``, or ``await client.close()``.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout_s: float | None = 60.0,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        max_message_bytes: int = 256 * 1024 * 1024,
        options: Iterable[tuple[str, Any]] = (),
        token: str | None = None,
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self._metadata = tuple(metadata) + (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        opts = channel_options(max_message_bytes, options, target)
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=opts)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=opts)
        # The raw generated stub, for calls the SDK does not wrap.
        self.stub = vitlens_pb2_grpc.VitlensServiceStub(self._channel)

    async def _call(
        self, rpc: Callable[..., Awaitable[_T]], request: Any, timeout_s: float | None
    ) -> _T:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            return await rpc(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    async def explain(
        self,
        images: ImageInput | Iterable[ImageInput],
        *,
        method: str = "generic",
        model: str = "",
        target: TargetSpec = None,
        top_k: int | None = None,
        grid: str = "tokens",
        relevance: bool = False,
        dtype: str = "float32",
        top_k_predictions: int = 5,
        method_options: Mapping[str, Any] | None = None,
        ids: Sequence[str] | None = None,
        texts: Sequence[str] = (),
        questions: QuestionsSpec = (),
        regions: Sequence[RegionsSpec] | Regions | None = None,
        detection_threshold: float | None = None,
        max_detections: int = 0,
        queries: Sequence[int] | None = None,
        timeout_s: float | None = None,
    ) -> ExplainResult:
        """Classify and explain images; see `vitlens.Client.explain`."""
        request = build_explain_request(
            images,
            method=method,
            model=model,
            target=target,
            top_k=top_k,
            grid=grid,
            relevance=relevance,
            dtype=dtype,
            top_k_predictions=top_k_predictions,
            method_options=method_options,
            ids=ids,
            texts=texts,
            questions=questions,
            regions=regions,
            detection_threshold=detection_threshold,
            max_detections=max_detections,
            queries=queries,
        )
        return ExplainResult.from_proto(await self._call(self.stub.Explain, request, timeout_s))

    async def predict(
        self,
        images: ImageInput | Iterable[ImageInput],
        *,
        model: str = "",
        top_k: int = 5,
        ids: Sequence[str] | None = None,
        prompts: Sequence[str] = (),
        detection_threshold: float | None = None,
        timeout_s: float | None = None,
    ) -> list[Classification]:
        """Classify images; see `vitlens.Client.predict`."""
        request = build_predict_request(
            images,
            model=model,
            top_k=top_k,
            ids=ids,
            prompts=prompts,
            detection_threshold=detection_threshold,
        )
        response = await self._call(self.stub.Predict, request, timeout_s)
        return [Classification.from_proto(c) for c in response.results]

    async def answer(
        self,
        images: ImageInput | Iterable[ImageInput],
        questions: QuestionsSpec,
        *,
        model: str = "",
        top_k: int = 5,
        regions: Sequence[RegionsSpec] | Regions | None = None,
        ids: Sequence[str] | None = None,
        timeout_s: float | None = None,
    ) -> list[Answer]:
        """Ask a VQA model about images; see `vitlens.Client.answer`."""
        request = build_answer_request(
            images, questions, model=model, top_k=top_k, regions=regions, ids=ids
        )
        response = await self._call(self.stub.Predict, request, timeout_s)
        return answers_from_proto(response, request.questions)

    async def _list_models(self, timeout_s: float | None = None) -> vitlens_pb2.ListModelsResponse:
        return await self._call(self.stub.ListModels, vitlens_pb2.ListModelsRequest(), timeout_s)

    async def models(self, *, timeout_s: float | None = None) -> list[ModelInfo]:
        """The models the server has loaded."""
        return [ModelInfo.from_proto(m) for m in (await self._list_models(timeout_s)).models]

    async def model(self, name: str = "", *, timeout_s: float | None = None) -> ModelInfo:
        """One model's details; "" selects the default model."""
        request = vitlens_pb2.GetModelRequest(name=name)
        return ModelInfo.from_proto(await self._call(self.stub.GetModel, request, timeout_s))

    @property
    async def default_model(self) -> str:
        """Name of the default model (``await client.default_model``)."""
        return (await self._list_models()).default_model

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Wait until the server reports SERVING on grpc.health.v1 (see `Client.wait_ready`).

        Raises:
            UnavailableError: not ready within ``timeout_s`` seconds.
        """
        deadline = time.monotonic() + timeout_s
        check = self._channel.unary_unary(
            HEALTH_CHECK, request_serializer=empty_request, response_deserializer=health_status
        )
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise UnavailableError(f"server at {self.target} not ready within {timeout_s:g} s")
            try:
                if await check(None, timeout=remaining, wait_for_ready=True) == SERVING:
                    return
            except grpc.RpcError as e:
                code = e.code() if callable(getattr(e, "code", None)) else None
                if code == grpc.StatusCode.UNIMPLEMENTED:
                    return
                if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise from_rpc_error(e) from None
            await asyncio.sleep(min(0.05, max(deadline - time.monotonic(), 0.0)))

    async def close(self) -> None:
        """Close the channel; further calls fail."""
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncClient({self.target!r})"
