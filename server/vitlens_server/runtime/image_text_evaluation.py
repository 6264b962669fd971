"""Evaluate on an image-text (CLIP) model: zero-shot classification over its label prompts.

Seed 004 (Table 2) scores CLIP-ViT explanations as those of a classifier whose classes are
the label prompts: the class probability is the softmax of the similarity logits over the
prompt set (METHODS.md, "Multi-modal metrics"). `ZeroShotEvaluand` makes the model that
classifier for `runtime.evaluation`, so every metric runs unchanged:

    explain(job)   the worker explains the job's images against the prompts, the target
                   choosing among them as it chooses among a classifier's classes (the
                   prediction, or per image the label's prompt: text targets)
    logits(pixels) the worker's zero-shot Predict over every prompt, as (n, M) logits

Methods are the image-text methods (`explain.image_text`) and the oracle, which reads the
masks. ``sanity`` is refused: it needs a weight-randomised copy of the model, which vitlens
makes for classifiers only.
"""

from __future__ import annotations

import torch

from vitlens_server.data.shapes import CLASSES
from vitlens_server.domain import ExplainResult
from vitlens_server.errors import FailedPrecondition, InvalidArgument
from vitlens_server.evaluate import EvaluationPlan, ModelCalls
from vitlens_server.explain import ExplainJob
from vitlens_server.explain.image_text import native_grid
from vitlens_server.explain.image_text_batch import ImageTextExplainJob
from vitlens_server.models.image_text_serving import LoadedImageTextModel
from vitlens_server.runtime.api import EvaluateQuery
from vitlens_server.runtime.evaluation import ImageEvaluand, Submit
from vitlens_server.runtime.image_text import check_method
from vitlens_server.runtime.image_text_worker import ImageTextWorker

__all__ = ["ZeroShotEvaluand"]


class ZeroShotEvaluand(ImageEvaluand):
    """An image-text model as Evaluate scores it: a zero-shot classifier over its prompts."""

    def __init__(self, served: LoadedImageTextModel, worker: ImageTextWorker) -> None:
        self._served, self._worker = served, worker
        self.name = served.name
        self.labels = served.labels
        self.input_size = tuple(served.adapter.preprocess.input_size[1:])
        self.grid = tuple(served.adapter.image_graph.grid)
        self.max_queue_images = worker.max_queue_images

    def check(self, plan: EvaluationPlan, query: EvaluateQuery) -> None:
        if not self.labels:
            raise FailedPrecondition(
                f"model {self.name!r} has no labels: Evaluate scores image-text models as "
                "zero-shot classifiers over their label prompts; its operator must give it "
                "labels (vitlens.json next to the weights, docs/image_text_models.md)"
            )
        for metric in plan.metrics:
            if metric.spec.needs_randomised:
                raise InvalidArgument(
                    f"metric {metric.name!r} needs a weight-randomised copy of the model, which "
                    f"vitlens makes for classifiers only; drop it for image-text model "
                    f"{self.name!r}",
                    field="metrics",
                )
        for planned in plan.methods:  # their options were parsed by the plan, as Explain's
            if not planned.spec.needs_mask:  # the oracle reads the masks, never the model
                check_method(self._served, planned.name, field="methods")
        if query.synthetic is not None and self.labels != CLASSES:
            raise InvalidArgument(
                f"synthetic scenes are labelled with the scene classes ({', '.join(CLASSES)}), "
                f"in that order, and model {self.name!r}'s labels are "
                f"({', '.join(self.labels[:16])}): evaluate it on a server_path or inline "
                "dataset labelled with its own classes",
                field="dataset.synthetic",
            )

    async def calls(self, plan: EvaluationPlan, submit: Submit) -> ModelCalls:
        return _ZeroShotCalls(self._served.prompts, self._worker, submit)


class _ZeroShotCalls:
    """`ModelCalls` of a zero-shot classifier: jobs become image-text jobs over the prompts."""

    def __init__(self, prompts: tuple[str, ...], worker: ImageTextWorker, submit: Submit) -> None:
        self._prompts, self._worker, self._submit = prompts, worker, submit

    def explain(self, job: ExplainJob) -> ExplainResult:
        """(B, K, h, w) maps at the method's own resolution (`native_grid`)."""
        query = ImageTextExplainJob(
            pixels=job.pixels,
            texts=self._prompts,
            method=job.method.name,
            target=job.target,
            params=job.params,
            grid=native_grid(job.method.name),
            top_k_predictions=1,
        )
        return self._submit(self._worker.explain(query, wait_for_room=True))[0]

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) pixels in [0, 1] → (n, M) similarity logits over the prompts."""
        count = len(self._prompts)
        call = self._worker.predict(pixels, self._prompts, count, wait_for_room=True)
        predictions, _ = self._submit(call)
        logits = torch.empty(len(pixels), count)
        logits.scatter_(
            1, torch.from_numpy(predictions.indices), torch.from_numpy(predictions.logits).float()
        )
        return logits

    def randomised_explain(self, job: ExplainJob) -> ExplainResult:
        raise RuntimeError("image-text plans never need the randomised copy (check refuses it)")
