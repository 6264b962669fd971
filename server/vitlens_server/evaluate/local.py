"""`ModelCalls` in process, straight on an `Explainer`: scripts and tests run the same
`run_evaluation` as the service, without its batcher.
"""

from __future__ import annotations

from torch import Tensor

from vitlens_server.domain import ExplainResult
from vitlens_server.explain import Explainer, ExplainJob

__all__ = ["LocalCalls"]


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
