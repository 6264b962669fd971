"""Model passes a method runs itself (`Pass.EXTRA`), and interruption between steps.

`ExtraPasses` is the engine's `ModelPasses`: saliency's input gradients (the SmoothGrad samples
and Integrated Gradients steps of a batch, several to a pass) and token reflection's chunks of
masked images go through it. They run outside every recording, so through the bare model with
timm's fused attention and no hook (`vitlens_server.explain.capture`). Each pass first asks the
batch's ``interrupted`` callable whether to go on, so abandoned work stops within one pass.
The engine asks it at its own step boundaries too (`raise_if_interrupted`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["ExtraPasses", "Interrupted", "raise_if_interrupted", "summed_gradients"]


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
        max_rows: images per pass of `summed_input_gradients` (the memory bound): as many whole
            copies of the batch as fit, at least one.
    """

    module: nn.Module
    normalize: Callable[[Tensor], Tensor]
    autocast: Callable[[], AbstractContextManager]
    pixels: Tensor
    interrupted: Callable[[], bool] | None = None
    max_rows: int = 64

    def narrow(self, rows: slice) -> ExtraPasses:
        """The same passes for the images ``rows`` of the batch."""
        return dataclasses.replace(self, pixels=self.pixels[rows])

    def logits(self, pixels: Tensor) -> Tensor:
        """(n, C, H, W) pixels → (n, classes) float32 logits, computed in float32 even under
        bf16 autocast: token reflection reads logit differences between masked images that
        bfloat16 rounding erases (benchmarks/precision.md measured ρ 0.18 against fp32 maps)."""
        raise_if_interrupted(self.interrupted)
        with torch.inference_mode():
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

    def summed_input_gradients(self, copies: Iterable[Tensor], targets: Tensor) -> Tensor:
        """Σ_s ∂y_t/∂x at x = copy s over ``copies`` of the batch (`summed_gradients`)."""
        return summed_gradients(self.input_gradients, copies, targets, self.max_rows)


def summed_gradients(
    input_gradients: Callable[[Tensor, Tensor], Tensor],
    copies: Iterable[Tensor],
    targets: Tensor,
    max_rows: int,
) -> Tensor:
    """Σ_s ∂y_t/∂x at x = copy s, (B, C, H, W), over ``copies`` of a batch, each (B, C, H, W)
    (the steps of Integrated Gradients, the noisy samples of SmoothGrad).

    The copies are drawn lazily and concatenated, ⌊max_rows / B⌋ of them (at least one) to a
    call of ``input_gradients`` ((n, C, H, W) inputs, (n,) targets → (n, C, H, W)): one forward
    and one backward serve them all. ``targets`` (B,).
    """
    total: Tensor | None = None
    pending: list[Tensor] = []

    def run() -> Tensor:
        grads = input_gradients(torch.cat(pending), targets.repeat(len(pending)))
        summed = grads.view(len(pending), *pending[0].shape).sum(dim=0)
        pending.clear()
        return summed if total is None else total.add_(summed)

    for copy in copies:
        pending.append(copy)
        if len(pending) * copy.shape[0] >= max_rows:
            total = run()
    if pending:
        total = run()
    if total is None:
        raise ValueError("summed_gradients needs at least one copy")
    return total
