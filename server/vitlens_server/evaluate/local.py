"""`ModelCalls` in process, straight on an `Explainer` (classifiers) or an image-text model
(zero-shot over prompts): scripts and tests run the same `run_evaluation` as the service,
without its batcher.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vitlens_server.domain import ExplainResult
from vitlens_server.explain import Explainer, ExplainJob
from vitlens_server.explain.image_text import native_grid
from vitlens_server.explain.image_text_batch import (
    ImageTextExplainJob,
    TextCache,
    explain_jobs,
)
from vitlens_server.models.image_text import ImageTextModel

__all__ = ["LocalCalls", "ZeroShotLocalCalls"]


class LocalCalls:
    """`ModelCalls` on ``explainer``; ``randomised`` (e.g. ``Explainer(randomised_copy(model))``)
    answers `randomised_explain`, for the ``sanity`` metric.

    Each job is checked as the service checks a request before queueing it
    (`Explainer.check`), so a method the model cannot run is refused the same way.
    """

    def __init__(self, explainer: Explainer, randomised: Explainer | None = None) -> None:
        self.explainer = explainer
        self.randomised = randomised

    def explain(self, job: ExplainJob) -> ExplainResult:
        return _explain(self.explainer, job)

    def logits(self, pixels: Tensor) -> Tensor:
        """(n, 3, H, W) pixels in [0, 1] → (n, classes) float32 logits on the model's device."""
        return self.explainer.logits(pixels)

    def randomised_explain(self, job: ExplainJob) -> ExplainResult:
        if self.randomised is None:
            raise ValueError(
                "these LocalCalls have no randomised model: pass "
                "randomised=Explainer(randomised_copy(model)) for the sanity metric"
            )
        return _explain(self.randomised, job)


def _explain(explainer: Explainer, job: ExplainJob) -> ExplainResult:
    explainer.check(job.method, job.params, job.target)
    return explainer.explain(job)


class ZeroShotLocalCalls:
    """`ModelCalls` of an image-text ``model`` as a zero-shot classifier over ``prompts``
    (one class per prompt), as the service's `runtime.image_text_evaluation` makes it."""

    def __init__(self, model: ImageTextModel, prompts: tuple[str, ...]) -> None:
        self.prompts = prompts
        self._cache = TextCache(model)

    def explain(self, job: ExplainJob) -> ExplainResult:
        """(B, K, h, w) maps at the method's own resolution, the target choosing among the
        prompts."""
        name = job.method.name
        query = ImageTextExplainJob(
            job.pixels, self.prompts, name, job.target, job.params, grid=native_grid(name)
        )
        return explain_jobs(self._cache, [query])[0]

    def logits(self, pixels: Tensor) -> Tensor:
        """(n, 3, H, W) pixels in [0, 1] → (n, M) float32 similarity logits on the host."""
        model = self._cache.model
        with torch.inference_mode():
            images = model.encode_images(model.preprocess.normalise(pixels.to(model.device)))
            return model.similarity(images, self._cache.embeds(self.prompts)).float().cpu()

    def randomised_explain(self, job: ExplainJob) -> ExplainResult:
        raise ValueError("image-text models have no weight-randomised copy (no sanity metric)")
