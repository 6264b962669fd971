"""A served model as the data plane sees it: one class per task, one interface.

Each resolves an Explain query into its job (method, options, target and texts checked), runs a
Predict, and says how Evaluate scores it, so `DataPlane` never branches on the task:

    ServedClassifier   a timm classifier: `ModelWorker`, its methods and target checks
    ServedImageText    a CLIP-style dual encoder: `ImageTextWorker`, texts or the label prompts
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from vitlens_server.config import ServerConfig
from vitlens_server.domain import Predictions
from vitlens_server.errors import InvalidArgument, about
from vitlens_server.explain import ExplainJob, MethodSpec, get_method
from vitlens_server.explain.image_text_batch import ImageTextExplainJob
from vitlens_server.explain.params import parse_params
from vitlens_server.imaging import ImageDecoder
from vitlens_server.models import LoadedModel
from vitlens_server.models.image_text_serving import LoadedImageTextModel
from vitlens_server.runtime.api import ExplainQuery, ModelCard, PredictQuery
from vitlens_server.runtime.evaluation import ClassifierEvaluand, Evaluand
from vitlens_server.runtime.image_text import candidates, explain_job, refuse_texts
from vitlens_server.runtime.image_text_evaluation import ZeroShotEvaluand
from vitlens_server.runtime.image_text_worker import ImageTextWorker
from vitlens_server.runtime.worker import ModelWorker

__all__ = ["DEFAULT_METHOD", "Resolved", "Served", "ServedClassifier", "ServedImageText"]

DEFAULT_METHOD = "generic"

RandomisedWorker = Callable[[LoadedModel], Awaitable[ModelWorker]]


@dataclass(frozen=True)
class Resolved:
    """An Explain query resolved: the job (``pixels`` still empty), its method and options,
    the names its targets index (classes or texts) and what else keys its cached answers."""

    job: ExplainJob | ImageTextExplainJob
    method: MethodSpec
    params: object
    labels: tuple[str, ...]
    cache_extra: str


class Served(Protocol):
    """What the data plane needs of a served model."""

    model: LoadedModel | LoadedImageTextModel
    worker: ModelWorker | ImageTextWorker
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
        job, method, params = explain_job(self.model, query, config, top_k=top_k)
        labels = job.texts if query.texts else self.model.labels
        return Resolved(job, method, params, labels, json.dumps([job.texts, job.target is None]))

    def check_predict(self, query: PredictQuery, config: ServerConfig) -> None:
        candidates(self.model, query.prompts, "prompts", config)

    async def predict(
        self, query: PredictQuery, pixels: torch.Tensor, top_k: int, deadline: float | None
    ) -> tuple[Predictions, float, tuple[str, ...]]:
        texts = self.model.prompts if not query.prompts else tuple(query.prompts)
        predictions, queue_s = await self.worker.predict(pixels, texts, top_k, deadline)
        return predictions, queue_s, texts if query.prompts else self.model.labels

    def evaluand(self, randomised: RandomisedWorker) -> Evaluand:
        return ZeroShotEvaluand(self.model, self.worker)
