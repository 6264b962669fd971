"""Evaluate on an object detector (placeholder while the metric lands; see issue #18)."""

from __future__ import annotations

from vitlens_server.errors import FailedPrecondition
from vitlens_server.models.detection_serving import LoadedDetector
from vitlens_server.runtime.api import EvaluateQuery
from vitlens_server.runtime.detection_worker import DetectionWorker
from vitlens_server.runtime.evaluation import Datasets, Submit, Work

__all__ = ["DetectionEvaluand"]


class DetectionEvaluand:
    """A detector as Evaluate scores it."""

    def __init__(self, served: LoadedDetector, worker: DetectionWorker) -> None:
        self._served, self._worker = served, worker
        self.name = served.name

    async def prepare(self, query: EvaluateQuery, datasets: Datasets, submit: Submit) -> Work:
        raise FailedPrecondition(f"Evaluate does not score detector {self.name!r} yet")
