"""Evaluate on an object detector: seed 003's weakly supervised segmentation, box AP.

`DetectionEvaluand` is the `runtime.evaluation.Evaluand` of a detector. It prepares an
`evaluate.detection_run` run: the plan (detection methods and ``random``; metrics
``detection_segmentation`` and ``detection``), the dataset (`Datasets.detections`: held-out
``synthetic_detection:N[:seed]`` scenes, or a COCO instances folder under an allowed root) and
the model calls, each an Explain or Predict job through the model's `DetectionWorker`, batched
with live traffic.
"""

from __future__ import annotations

import functools

from torch import Tensor

from vitlens_server.domain_detection import Detections
from vitlens_server.evaluate.detection_run import (
    plan_detection_evaluation,
    run_detection_evaluation,
)
from vitlens_server.explain.detection_batch import (
    DetectionChoice,
    DetectionExplainJob,
    DetectionPredictJob,
)
from vitlens_server.models.detection_serving import LoadedDetector
from vitlens_server.runtime.api import EvaluateQuery
from vitlens_server.runtime.detection_worker import DetectionWorker
from vitlens_server.runtime.evaluation import Datasets, Submit, Work

__all__ = ["DetectionEvaluand"]

CHUNK_IMAGES = 16  # images per model call


class DetectionEvaluand:
    """A detector as Evaluate scores it."""

    def __init__(
        self, served: LoadedDetector, worker: DetectionWorker, grid: tuple[int, int]
    ) -> None:
        self._served, self._worker, self._grid = served, worker, grid
        self.name = served.name

    async def prepare(self, query: EvaluateQuery, datasets: Datasets, submit: Submit) -> Work:
        plan = plan_detection_evaluation(
            query.methods,
            query.metrics,
            query.metric_options,
            query.method_options,
            chunk_size=min(CHUNK_IMAGES, self._worker.max_queue_images),
        )
        served = self._served
        _, height, width = served.input_size
        dataset = await datasets.detections(query, self.name, served.labels, (height, width))
        return functools.partial(
            run_detection_evaluation,
            plan,
            dataset,
            _WorkerCalls(self._worker, submit),
            input_size=(height, width),
            grid=self._grid,
        )


class _WorkerCalls:
    """`evaluate.detection_run.DetectionCalls` through the worker; each call waits for room."""

    def __init__(self, worker: DetectionWorker, submit: Submit) -> None:
        self._worker, self._submit = worker, submit

    def explain(self, pixels: Tensor, method: str, averaging: str = "gradient") -> list[Detections]:
        job = DetectionExplainJob(pixels, method, DetectionChoice(), averaging=averaging)
        result, _ = self._submit(self._worker.explain(job, wait_for_room=True))
        return list(result.detections)

    def detect(self, pixels: Tensor) -> list[Detections]:
        job = DetectionPredictJob(pixels, DetectionChoice(threshold=0.0))
        predictions, _ = self._submit(self._worker.predict(job, wait_for_room=True))
        return list(predictions.detections)
