"""A served model as the data plane sees it: one class per task, one interface.

Each resolves an Explain query into its job (method, options, target and texts checked), runs a
Predict, and says how Evaluate scores it, so `DataPlane` never branches on the task:

    ServedClassifier   a timm classifier: `ModelWorker`, its methods and target checks
    ServedImageText    a CLIP-style dual encoder: `ImageTextWorker`, texts or the label prompts
    ServedVqa          a visual question answering model: `VqaWorker`, questions (and regions)
    ServedDetector     an object detector (DETR): `DetectionWorker`, detections and their maps
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from vitlens_server.config import ServerConfig
from vitlens_server.domain import Predictions
from vitlens_server.errors import InvalidArgument, about
from vitlens_server.explain import ExplainJob, MethodSpec, get_method
from vitlens_server.explain.bimodal import BimodalMethod
from vitlens_server.explain.detection import DETECTION_METHODS
from vitlens_server.explain.detection_batch import DetectionExplainJob
from vitlens_server.explain.image_text_batch import ImageTextExplainJob
from vitlens_server.explain.params import parse_params
from vitlens_server.explain.vqa_batch import VqaExplainJob
from vitlens_server.imaging import ImageDecoder
from vitlens_server.models import LoadedModel
from vitlens_server.models.detection_serving import LoadedDetector
from vitlens_server.models.image_text_serving import LoadedImageTextModel
from vitlens_server.models.vqa_serving import LoadedVqaModel
from vitlens_server.runtime import detection
from vitlens_server.runtime.api import ExplainQuery, ModelCard, PredictQuery
from vitlens_server.runtime.detection_evaluation import DetectionEvaluand
from vitlens_server.runtime.detection_worker import DetectionWorker
from vitlens_server.runtime.evaluation import ClassifierEvaluand, Evaluand
from vitlens_server.runtime.image_text import candidates, explain_job, refuse_texts
from vitlens_server.runtime.image_text_evaluation import ZeroShotEvaluand
from vitlens_server.runtime.image_text_worker import ImageTextWorker
from vitlens_server.runtime.vqa import cache_extra, predict_job, refuse_questions
from vitlens_server.runtime.vqa import explain_job as vqa_explain_job
from vitlens_server.runtime.vqa_evaluation import VqaEvaluand
from vitlens_server.runtime.vqa_worker import VqaWorker
from vitlens_server.runtime.worker import ModelWorker

__all__ = [
    "DEFAULT_METHOD",
    "Resolved",
    "Served",
    "ServedClassifier",
    "ServedDetector",
    "ServedImageText",
    "ServedVqa",
]

DEFAULT_METHOD = "generic"

RandomisedWorker = Callable[[LoadedModel], Awaitable[ModelWorker]]


@dataclass(frozen=True)
class Resolved:
    """An Explain query resolved: the job (``pixels`` still empty), its method and options,
    the names its targets index (classes or texts) and what else keys its cached answers."""

    job: ExplainJob | ImageTextExplainJob | VqaExplainJob | DetectionExplainJob
    method: MethodSpec | BimodalMethod
    params: object
    labels: tuple[str, ...]
    cache_extra: str


class Served(Protocol):
    """What the data plane needs of a served model."""

    model: LoadedModel | LoadedImageTextModel | LoadedVqaModel | LoadedDetector
    worker: ModelWorker | ImageTextWorker | VqaWorker | DetectionWorker
    decoder: ImageDecoder
    version: str
    card: ModelCard

    def resolve(self, query: ExplainQuery, config: ServerConfig, top_k: int) -> Resolved: ...

    async def predict(
        self, query: PredictQuery, pixels: torch.Tensor, top_k: int, deadline: float | None
    ) -> tuple[Predictions, float, tuple[str, ...]]:
        """Predictions, the queue wait in seconds, and the names the indices stand for."""
        ...

    def check_predict(self, query: PredictQuery, config: ServerConfig) -> None:
        """Refuse what Predict cannot run, before its images are decoded."""
        ...

    def for_images(self, job: Any, images: list[int], pixels: torch.Tensor) -> Any:
        """The resolved ``job`` for the request's ``images`` only (those not in the cache),
        with their decoded ``pixels``."""
        ...

    def evaluand(self, randomised: RandomisedWorker) -> Evaluand: ...


@dataclass(frozen=True)
class ServedClassifier:
    model: LoadedModel
    worker: ModelWorker
    decoder: ImageDecoder
    version: str
    card: ModelCard

    def resolve(self, query: ExplainQuery, config: ServerConfig, top_k: int) -> Resolved:
        if query.texts:
            raise refuse_texts("texts", self.model.name)
        _refuse_vqa_fields(query, self.model.name)
        with about("method"):
            method = get_method(query.method or DEFAULT_METHOD)
        options = "options.method_options"
        params = parse_params(
            method.params, query.method_options, method=method.name, field=options
        )
        if query.return_relevance and not method.relevance_matrix:
            with_matrix = [m.name for m in self.card.methods if m.relevance_matrix]
            raise InvalidArgument(
                f"method {method.name!r} has no token relevance matrix; unset return_relevance "
                f"or use one of: {', '.join(with_matrix)}",
                field="options.return_relevance",
            )
        with about(options):  # what check() leaves unnamed are the options' model limits
            self.worker.explainer.check(method, params, query.target)
        job = ExplainJob(
            pixels=torch.empty(0),
            method=method,
            params=params,
            target=query.target,
            grid=query.grid,
            relevance=query.return_relevance,
            top_k_predictions=top_k,
            output_dtype=query.output_dtype,
        )
        return Resolved(job, method, params, self.model.labels, "")

    def check_predict(self, query: PredictQuery, config: ServerConfig) -> None:
        if query.prompts:
            raise refuse_texts("prompts", self.model.name)
        _refuse_vqa_fields(query, self.model.name)

    def for_images(self, job: Any, images: list[int], pixels: torch.Tensor) -> Any:
        return _with_images(job, images, pixels)

    async def predict(
        self, query: PredictQuery, pixels: torch.Tensor, top_k: int, deadline: float | None
    ) -> tuple[Predictions, float, tuple[str, ...]]:
        predictions, queue_s = await self.worker.predict(pixels, top_k, deadline)
        return predictions, queue_s, self.model.labels

    def evaluand(self, randomised: RandomisedWorker) -> Evaluand:
        return ClassifierEvaluand(self.model, self.worker, randomised)


@dataclass(frozen=True)
class ServedImageText:
    model: LoadedImageTextModel
    worker: ImageTextWorker
    decoder: ImageDecoder
    version: str
    card: ModelCard

    def resolve(self, query: ExplainQuery, config: ServerConfig, top_k: int) -> Resolved:
        """Explain each image against the query's texts, or zero-shot over the label prompts."""
        _refuse_vqa_fields(query, self.model.name)
        job, method, params = explain_job(self.model, query, config, top_k=top_k)
        labels = job.texts if query.texts else self.model.labels
        return Resolved(job, method, params, labels, json.dumps([job.texts, job.target is None]))

    def check_predict(self, query: PredictQuery, config: ServerConfig) -> None:
        _refuse_vqa_fields(query, self.model.name)
        candidates(self.model, query.prompts, "prompts", config)

    def for_images(self, job: Any, images: list[int], pixels: torch.Tensor) -> Any:
        return _with_images(job, images, pixels)

    async def predict(
        self, query: PredictQuery, pixels: torch.Tensor, top_k: int, deadline: float | None
    ) -> tuple[Predictions, float, tuple[str, ...]]:
        texts = self.model.prompts if not query.prompts else tuple(query.prompts)
        predictions, queue_s = await self.worker.predict(pixels, texts, top_k, deadline)
        return predictions, queue_s, texts if query.prompts else self.model.labels

    def evaluand(self, randomised: RandomisedWorker) -> Evaluand:
        return ZeroShotEvaluand(self.model, self.worker)


@dataclass(frozen=True)
class ServedVqa:
    model: LoadedVqaModel
    worker: VqaWorker
    decoder: ImageDecoder
    version: str
    card: ModelCard
    config: ServerConfig  # Predict's question limits

    def resolve(self, query: ExplainQuery, config: ServerConfig, top_k: int) -> Resolved:
        """Explain each image's answer to its question (over both modalities)."""
        _refuse_detection_fields(query, self.model.name)
        job, method, params = vqa_explain_job(self.model, query, config, top_k=top_k)
        return Resolved(job, method, params, self.model.labels, cache_extra(job))

    def check_predict(self, query: PredictQuery, config: ServerConfig) -> None:
        _refuse_detection_fields(query, self.model.name)
        predict_job(self.model, query, config, 1)

    def for_images(self, job: Any, images: list[int], pixels: torch.Tensor) -> Any:
        regions = None if job.regions is None else tuple(job.regions[i] for i in images)
        return dataclasses.replace(
            job,
            pixels=pixels,
            questions=tuple(job.questions[i] for i in images),
            regions=regions,
            target=job.target.subset(images),
        )

    async def predict(
        self, query: PredictQuery, pixels: torch.Tensor, top_k: int, deadline: float | None
    ) -> tuple[Predictions, float, tuple[str, ...]]:
        job = dataclasses.replace(predict_job(self.model, query, self.config, top_k), pixels=pixels)
        predictions, queue_s = await self.worker.predict(job, deadline)
        return predictions, queue_s, self.model.labels

    def evaluand(self, randomised: RandomisedWorker) -> Evaluand:
        return VqaEvaluand(self.model, self.worker)


@dataclass(frozen=True)
class ServedDetector:
    model: LoadedDetector
    worker: DetectionWorker
    decoder: ImageDecoder
    version: str
    card: ModelCard

    def resolve(self, query: ExplainQuery, config: ServerConfig, top_k: int) -> Resolved:
        """Explain each image's detections (per ``query.detection``)."""
        job, params = detection.explain_job(self.model, query)
        choice = json.dumps(dataclasses.asdict(job.choice))
        return Resolved(job, DETECTION_METHODS[job.method], params, self.model.labels, choice)

    def check_predict(self, query: PredictQuery, config: ServerConfig) -> None:
        detection.predict_job(self.model, query)

    def for_images(self, job: Any, images: list[int], pixels: torch.Tensor) -> Any:
        return dataclasses.replace(job, pixels=pixels)

    async def predict(
        self, query: PredictQuery, pixels: torch.Tensor, top_k: int, deadline: float | None
    ) -> tuple[Predictions, float, tuple[str, ...]]:
        job = dataclasses.replace(detection.predict_job(self.model, query), pixels=pixels)
        predictions, queue_s = await self.worker.predict(job, deadline)
        return predictions, queue_s, self.model.labels

    def evaluand(self, randomised: RandomisedWorker) -> Evaluand:
        return DetectionEvaluand(self.model, self.worker, self.card.patch_grid)


def _refuse_vqa_fields(query: ExplainQuery | PredictQuery, model: str) -> None:
    if query.questions:
        raise refuse_questions("questions", model)
    if query.regions:
        raise refuse_questions("regions", model)
    _refuse_detection_fields(query, model)


def _refuse_detection_fields(query: ExplainQuery | PredictQuery, model: str) -> None:
    """A model that is not a detector given detection options."""
    field = "detection" if isinstance(query, ExplainQuery) else "detection_threshold"
    if getattr(query, field) is not None:
        raise InvalidArgument(
            f"{field} is for object detection models (ModelInfo.task TASK_OBJECT_DETECTION); "
            f"model {model!r} is not one: unset {field}",
            field=field,
        )


def _with_images(job: Any, images: list[int], pixels: torch.Tensor) -> Any:
    target = None if job.target is None else job.target.subset(images)
    return dataclasses.replace(job, pixels=pixels, target=target)
