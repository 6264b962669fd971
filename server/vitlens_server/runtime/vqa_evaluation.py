"""Evaluate on a visual question answering model (seed 003's perturbation tests; in progress).

`VqaEvaluand` is the `runtime.evaluation.Evaluand` of a VQA model. Until its metrics are wired
(issue #17), it refuses every plan with FAILED_PRECONDITION, naming what does work today.
"""

from __future__ import annotations

from vitlens_server.errors import FailedPrecondition
from vitlens_server.evaluate import EvaluationPlan, ModelCalls
from vitlens_server.models.vqa_serving import LoadedVqaModel
from vitlens_server.runtime.api import EvaluateQuery
from vitlens_server.runtime.evaluation import Submit
from vitlens_server.runtime.vqa_worker import VqaWorker

__all__ = ["VqaEvaluand"]


class VqaEvaluand:
    """A VQA model as Evaluate will score it."""

    def __init__(self, served: LoadedVqaModel, worker: VqaWorker) -> None:
        self._served, self._worker = served, worker
        self.name = served.name
        self.labels = served.labels
        self.input_size = served.input_size[1:]
        self.grid = served.patch_grid or (1, 1)
        self.max_queue_images = worker.max_queue_images

    def check(self, plan: EvaluationPlan, query: EvaluateQuery) -> None:
        raise FailedPrecondition(
            f"Evaluate does not score VQA model {self.name!r} yet; Explain and Predict serve "
            "it (with questions)"
        )

    async def calls(self, plan: EvaluationPlan, submit: Submit) -> ModelCalls:
        raise RuntimeError("check refuses every plan")
