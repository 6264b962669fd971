"""What a metric reads: one chunk of samples explained by one method, and the model calls.

`ModelCalls` is the only way Evaluate reaches a model (in the server: the model's batcher, so an
evaluation's passes batch with each other and with live traffic; in process: `LocalCalls`).
`method_maps` is the one place a method's maps are made, for the runner and for metrics that
explain again (other classes, the weight-randomised model). A method that reads the
ground-truth masks (``spec.needs_mask``, the oracle) is called with them instead of the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from vitlens_server.domain import ExplainResult, TargetSpec
from vitlens_server.evaluate.plan import PlannedMethod
from vitlens_server.explain import ExplainJob
from vitlens_server.explain.engine import resize_maps

__all__ = ["MetricContext", "ModelCalls", "method_maps", "resized"]


class ModelCalls(Protocol):
    """Synchronous access to the model, called from the evaluation run's own thread."""

    def explain(self, job: ExplainJob) -> ExplainResult: ...

    def logits(self, pixels: Tensor) -> Tensor:
        """(n, 3, H, W) pixels in [0, 1] → (n, classes) float logits."""
        ...

    def randomised_explain(self, job: ExplainJob) -> ExplainResult:
        """``job`` explained by the model's weight-randomised copy (the ``sanity`` metric)."""
        ...


def method_maps(
    method: PlannedMethod,
    pixels: Tensor,
    calls: ModelCalls,
    classes: Tensor,
    masks: Tensor | None,
    *,
    label: bool,
    randomised: bool = False,
) -> tuple[Tensor, Tensor]:
    """Maps (B, h, w) float32 of ``method`` at its own resolution (token grid or input pixels)
    and the classes (B,) they explain.

    pixels (B, 3, H, W) in [0, 1]; ``label``: explain ``classes`` (B,), else the prediction;
    ``randomised``: ask the weight-randomised model. A method that reads the ground-truth
    ``masks`` (B, H, W) instead of the model explains the masks' objects, ``classes``; the
    randomised model, which it never reads, changes nothing.
    """
    spec = method.spec
    if spec.needs_mask:
        if masks is None:
            raise ValueError(f"method {method.name!r} needs masks")
        return spec.fn(masks, classes, method.params).heatmap.float(), classes
    target = TargetSpec("per_image", tuple(classes.tolist())) if label else TargetSpec()
    explain = calls.randomised_explain if randomised else calls.explain
    result = explain(ExplainJob(pixels, spec, method.params, target, grid="native"))
    return torch.from_numpy(result.heatmaps[:, 0]).float(), torch.from_numpy(result.targets[:, 0])


def resized(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, h, w) → (B, *size) as the service resizes maps for its ``tokens``/``input`` grids."""
    return resize_maps(maps[:, None], size)[:, 0]


@dataclass(frozen=True, eq=False)
class MetricContext:
    """One chunk of B samples explained by one planned method.

    Attributes:
        pixels: (B, 3, H, W) float32 in [0, 1] at the model's input size.
        labels: (B, K) long class labels; column 0 is the scored object.
        masks: (B, K, H, W) bool ground-truth masks per label, or None.
        native: (B, h, w) the method's maps at its own resolution (token grid or pixels).
        maps: (B, H, W) ``native`` resized to the input, as Explain's ``input`` grid returns.
        explained: (B,) the classes the maps explain (labels[:, 0] or the prediction).
        grid: (gh, gw) the model's token grid.
        method: the planned method.
        calls: the model.
    """

    pixels: Tensor
    labels: Tensor
    masks: Tensor | None
    native: Tensor
    maps: Tensor
    explained: Tensor
    grid: tuple[int, int]
    method: PlannedMethod
    calls: ModelCalls

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the pixels."""
        return tuple(self.pixels.shape[-2:])

    def explain(self, classes: Tensor, masks: Tensor | None, *, randomised: bool = False) -> Tensor:
        """The method's native maps (B, h, w) explaining ``classes`` (B,); ``masks`` (B, H, W)
        are those classes' objects (read by mask methods), ``randomised``: by the randomised
        model."""
        maps, _ = method_maps(
            self.method, self.pixels, self.calls, classes, masks, label=True, randomised=randomised
        )
        return maps
