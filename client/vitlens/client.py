"""Blocking client for the vitlens service.

`Client` wraps one gRPC channel. Every call has a deadline (``timeout_s``) and every failure is
raised as a typed `vitlens.errors.VitlensError`. The request builders (`vitlens.build`) are
shared with `vitlens.aio.AsyncClient`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc

from vitlens.build import (
    TargetSpec,
    build_answer_request,
    build_explain_request,
    build_predict_request,
    build_target,
)
from vitlens.errors import UnavailableError, from_rpc_error
from vitlens.evaluation import EvaluationResult, MetricResult, Progress, build_evaluate_request
from vitlens.images import ImageInput
from vitlens.results import Classification, ExplainResult, ModelInfo
from vitlens.v1 import vitlens_pb2, vitlens_pb2_grpc
from vitlens.vqa import Answer, QuestionsSpec, Regions, RegionsSpec, answers_from_proto

__all__ = [
    "DEFAULT_TARGET",
    "Client",
    "TargetSpec",
    "build_explain_request",
    "build_predict_request",
    "build_target",
]

DEFAULT_TARGET = "localhost:50051"

_T = TypeVar("_T")


HEALTH_CHECK = "/grpc.health.v1.Health/Check"
SERVING = 1  # grpc.health.v1.HealthCheckResponse.ServingStatus.SERVING


def empty_request(_request: object) -> bytes:
    return b""  # HealthCheckRequest{service: ""}: the server as a whole


def health_status(data: bytes) -> int:
    """The status of an encoded HealthCheckResponse (field 1, a varint below 128).

    Decoded by hand so the SDK needs no grpcio-health-checking; 0 (UNKNOWN) if absent.
    """
    return data[1] if len(data) >= 2 and data[0] == 0x08 else 0


def channel_options(
    max_message_bytes: int, options: Iterable[tuple[str, Any]] = (), target: str = ""
) -> list[tuple[str, Any]]:
    """gRPC channel arguments: message size limits and keepalive; ``options`` override them.

    A ``dns:///`` target (e.g. a Kubernetes headless Service, which resolves to every pod) gets
    the ``round_robin`` load-balancing policy, so calls spread over all addresses instead of
    sticking to the first.
    """
    merged: dict[str, Any] = {
        "grpc.max_send_message_length": max_message_bytes,
        "grpc.max_receive_message_length": max_message_bytes,
        "grpc.keepalive_time_ms": 60_000,
        "grpc.keepalive_timeout_ms": 20_000,
        "grpc.keepalive_permit_without_calls": 0,
    }
    if target.startswith("dns:"):
        merged["grpc.lb_policy_name"] = "round_robin"
    merged.update(dict(options))
    return list(merged.items())


class Client:
    """Blocking vitlens client over one gRPC channel.

    Args:
        target: server address, "host:port".
        timeout_s: default deadline of every call in seconds (None: no deadline); each method
            takes ``timeout_s=`` to override it.
        credentials: TLS channel credentials; None opens an insecure (plaintext) channel.
        metadata: (key, value) pairs sent with every call, e.g. an auth token.
        max_message_bytes: send and receive size limit (large batches and input-grid
            heatmaps need room).
        options: extra gRPC channel arguments; they override the defaults.
        token: bearer token for servers started with ``--auth-token-file`` (sent as
            ``authorization: Bearer <token>`` on every call).

    Use as a context manager, or call `close()`.
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
            self._channel = grpc.insecure_channel(target, options=opts)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=opts)
        # The raw generated stub, for calls the SDK does not wrap.
        self.stub = vitlens_pb2_grpc.VitlensServiceStub(self._channel)

    def _call(self, rpc: Callable[..., _T], request: Any, timeout_s: float | None) -> _T:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            return rpc(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def explain(
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
        """Classify and explain one image or a batch with one method (VQA models: answer a
        question about each image and explain the answer; object detection models: detect and
        explain each detection, in `ImageExplanation.detections`).

        Args:
            images: one image or an iterable of them (see `vitlens.images.to_image`).
            method: method key from `ModelInfo.methods`.
            model: model name; "" selects the server's default.
            target: None explains the predicted class; an int explains that class for every
                image; a sequence of ints gives one class per image.
            top_k: explain each of the k most probable classes (exclusive with ``target``).
            grid: "tokens" for (gh, gw) heatmaps, "input" for (H, W) at the model's input size.
            relevance: also return the (N, N) token relevance matrix (methods that have one).
            dtype: "float32" or "float16", the dtype of the returned arrays.
            top_k_predictions: predictions returned per image.
            method_options: method parameters, e.g. {"head_fusion": "max"}.
            ids: one id per image, echoed in the results.
            texts: image-text models only: explain each image against each text (one
                `Explanation` per text, in order, each with its `Explanation.text` token
                relevance); empty: zero-shot over the model's labels through its prompt
                template, ``target``/``top_k`` selecting among the labels.
            questions: VQA models only: one question for every image, or one per image; the
                explained answer is the predicted one unless ``target``/``top_k`` select
                among `ModelInfo.labels` (the answers). Each `Explanation` then has the
                question tokens' relevance (`Explanation.question`), ``region_relevance`` on
                ``regions`` (``heatmap`` empty) and, with ``relevance``, `Explanation.matrices`.
            regions: VQA models reading detector regions (`ModelInfo.visual_input`
                "regions") only: one `vitlens.Regions` or (features, boxes) pair per image.
            detection_threshold: object detection models only: explain the detections whose
                class probability exceeds this, in [0, 1) (None or 0: the server's 0.5).
            max_detections: object detection models only: at most this many detections per
                image, most probable first (0: all).
            queries: object detection models only: explain these object queries of every
                image instead, whatever their probability (exclusive with
                ``detection_threshold``). Any detection argument leaves ``target``/``top_k``
                unusable; without any, a detector explains every detection above 0.5.
            timeout_s: deadline for this call; None uses the client's default.
        """
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
        return ExplainResult.from_proto(self._call(self.stub.Explain, request, timeout_s))

    def predict(
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
        """Classify one image or a batch; one `Classification` per image, in order.

        ``prompts`` (image-text models only): classify zero-shot against these texts
        (`Prediction.index` into them, label = the prompt); empty: the model's labels.
        ``detection_threshold`` (object detection models only): the least class probability of
        a detection (`Classification.detections`), in [0, 1); None or 0: the server's 0.5.
        """
        request = build_predict_request(
            images,
            model=model,
            top_k=top_k,
            ids=ids,
            prompts=prompts,
            detection_threshold=detection_threshold,
        )
        response = self._call(self.stub.Predict, request, timeout_s)
        return [Classification.from_proto(c) for c in response.results]

    def answer(
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
        """Ask a VQA model about one image or a batch; one `Answer` per image, in order.

        Args:
            images: one image or an iterable of them.
            questions: one question for every image, or one per image.
            model: model name; "" selects the server's default.
            top_k: answers returned per image, most probable first.
            regions: models reading detector regions only: one `vitlens.Regions` per image.
            ids: one id per image, echoed in the answers.
            timeout_s: deadline for this call; None uses the client's default.
        """
        request = build_answer_request(
            images, questions, model=model, top_k=top_k, regions=regions, ids=ids
        )
        response = self._call(self.stub.Predict, request, timeout_s)
        return answers_from_proto(response, request.questions)

    def evaluate(
        self,
        methods: Sequence[str],
        metrics: Sequence[str],
        *,
        dataset: str = "synthetic:100",
        model: str = "",
        method_options: Mapping[str, Mapping[str, Any]] | None = None,
        metric_options: Mapping[str, Mapping[str, Any]] | None = None,
        explain_label: bool = False,
        limit: int = 0,
        on_progress: Callable[[Progress], None] | None = None,
        timeout_s: float | None = None,
    ) -> EvaluationResult:
        """Score explanation methods with quality metrics on a dataset (server-side).

        ``dataset`` is ``synthetic:N[:seed][:two_object]``, ``synthetic_vqa:N[:seed]`` (VQA
        models), ``synthetic_detection:N[:seed]`` (detectors) or an absolute folder on the
        server (VOC or ImageFolder layout; COCO for detectors; under a root its operator
        allowed). Progress events go to
        ``on_progress`` as they arrive; interrupting (Ctrl-C) cancels the server's run. The
        default deadline is the client's; long runs may need ``timeout_s``.
        """
        request = build_evaluate_request(
            methods=methods,
            metrics=metrics,
            dataset=dataset,
            model=model,
            method_options=method_options,
            metric_options=metric_options,
            explain_label=explain_label,
            limit=limit,
        )
        timeout = self.timeout_s if timeout_s is None else timeout_s
        call = self.stub.Evaluate(request, timeout=timeout, metadata=self._metadata)
        results = []
        try:
            for event in call:
                if event.WhichOneof("event") == "progress":
                    if on_progress is not None:
                        on_progress(Progress.from_proto(event.progress))
                else:
                    results.append(MetricResult.from_proto(event.result))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        except BaseException:
            call.cancel()
            raise
        return EvaluationResult(model or self.default_model, dataset, tuple(results))

    def _list_models(self, timeout_s: float | None = None) -> vitlens_pb2.ListModelsResponse:
        return self._call(self.stub.ListModels, vitlens_pb2.ListModelsRequest(), timeout_s)

    def models(self, *, timeout_s: float | None = None) -> list[ModelInfo]:
        """The models the server has loaded."""
        return [ModelInfo.from_proto(m) for m in self._list_models(timeout_s).models]

    def model(self, name: str = "", *, timeout_s: float | None = None) -> ModelInfo:
        """One model's details; "" selects the default model."""
        request = vitlens_pb2.GetModelRequest(name=name)
        return ModelInfo.from_proto(self._call(self.stub.GetModel, request, timeout_s))

    @property
    def default_model(self) -> str:
        """Name of the model used when a request leaves ``model`` empty."""
        return self._list_models().default_model

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Block until the server reports SERVING on grpc.health.v1 (models loaded and warmed
        up; a server without the health service counts as ready once it answers).

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
                if check(None, timeout=remaining, wait_for_ready=True) == SERVING:
                    return
            except grpc.RpcError as e:
                code = e.code() if callable(getattr(e, "code", None)) else None
                if code == grpc.StatusCode.UNIMPLEMENTED:
                    return
                if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise from_rpc_error(e) from None
            time.sleep(min(0.05, max(deadline - time.monotonic(), 0.0)))

    def close(self) -> None:
        """Close the channel; further calls fail."""
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.target!r})"
