"""Model passes a method runs itself (`Pass.EXTRA`), and interruption between steps.

`ExtraPasses` is the engine's `ModelPasses`: saliency's input gradients (one per SmoothGrad
sample or Integrated Gradients step) and token reflection's chunks of masked images go through
it, and each pass first asks the batch's ``interrupted`` callable whether to go on, so abandoned
work stops within one pass. The engine asks it at its own step boundaries too
(`raise_if_interrupted`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["ExtraPasses", "Interrupted", "raise_if_interrupted"]


class Interrupted(Exception):
    """The work was abandoned: ``interrupted()`` returned True at a step boundary."""


def raise_if_interrupted(interrupted: Callable[[], bool] | None) -> None:
    """Raise `Interrupted` when ``interrupted`` is given and returns True."""
    if interrupted is not None and interrupted():
        raise Interrupted("the explanation was interrupted: its requests were abandoned")


@dataclass(frozen=True)
class ExtraPasses:
    """Passes of ``module`` on pixels in [0, 1], normalised as the explained batch was.

    Attributes:
        module: the explained model; these passes are not recorded (no recording is active
            in the thread while methods run).
        normalize: (n, C, H, W) pixels in [0, 1] → the model's input, on its device.
        autocast: a fresh autocast context for a model pass (bfloat16 under ``bf16``).
        pixels: (B, C, H, W) the explained images in [0, 1] on the model's device.
        interrupted: asked before every pass; True raises `Interrupted`.
    """

    module: nn.Module
    normalize: Callable[[Tensor], Tensor]
    autocast: Callable[[], AbstractContextManager]
    pixels: Tensor
    interrupted: Callable[[], bool] | None = None

    def narrow(self, rows: slice) -> ExtraPasses:
        """The same passes for the images ``rows`` of the batch."""
        return dataclasses.replace(self, pixels=self.pixels[rows])

    def logits(self, pixels: Tensor) -> Tensor:
        """(n, C, H, W) pixels → (n, classes) float32 logits, computed in float32 even under
        bf16 autocast: token reflection reads logit differences between masked images that
        bfloat16 rounding erases (benchmarks/precision.md measured ρ 0.18 against fp32 maps)."""
        raise_if_interrupted(self.interrupted)
        with torch.no_grad():
            return self.module(self.normalize(pixels)).float()

    def input_gradients(self, pixels: Tensor, targets: Tensor) -> Tensor:
        """∂y_t/∂pixels, (n, C, H, W), for targets (n,): one backward for the whole batch."""
        raise_if_interrupted(self.interrupted)
        with torch.enable_grad():
            pixels = pixels.detach().requires_grad_(True)
            with self.autocast():
                logits = self.module(self.normalize(pixels))
            (grad,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), pixels)
        return grad
