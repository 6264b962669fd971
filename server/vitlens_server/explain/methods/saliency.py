"""Input-gradient saliency (Simonyan et al. 2014), with SmoothGrad and Integrated Gradients."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vitlens_server.explain.params import choice, param
from vitlens_server.explain.records import Recording
from vitlens_server.explain.registry import ExtraCount, MethodOutput, Pass, register_method

__all__ = ["SaliencyParams", "attribution", "saliency"]


@dataclass(frozen=True)
class SaliencyParams:
    mode: str = choice(
        "gradient",
        "gradient",
        "smoothgrad",
        "integrated_gradients",
        doc="Plain gradient; SmoothGrad (Smilkov et al. 2017): mean gradient over noisy copies; "
        "Integrated Gradients (Sundararajan et al. 2017) from a black image.",
    )
    samples: int = param(25, "SmoothGrad: noisy copies per image.", low=1, high=256)
    noise: float = param(
        0.15, "SmoothGrad: noise σ as a fraction of the pixel range [0, 1].", low=0.0, high=1.0
    )
    steps: int = param(32, "Integrated Gradients: Riemann steps.", low=1, high=512)
    seed: int = param(
        0, "SmoothGrad: seed of the noise (results are reproducible).", low=0, high=2**32 - 1
    )


def _extra(params: SaliencyParams, _tokens: int) -> ExtraCount:
    """One input gradient, or one per SmoothGrad sample / IG step."""
    if params.mode == "smoothgrad":
        return ExtraCount(gradients=params.samples)
    if params.mode == "integrated_gradients":
        return ExtraCount(gradients=params.steps)
    return ExtraCount(gradients=1)


@register_method(
    "saliency",
    passes=Pass.EXTRA,
    class_specific=True,
    readouts=None,
    params=SaliencyParams,
    extra=_extra,
    description="Saliency (Simonyan et al. 2014): max over colour channels of |∂y_c/∂x| at input "
    "resolution; options SmoothGrad and Integrated Gradients.",
)
def saliency(rec: Recording, targets: Tensor, params: SaliencyParams) -> MethodOutput:
    """map = max over channels of |a|, with a from `attribution`.

    Returns a pixel map (B, H, W); on the token grid it is averaged over each patch.
    """
    return MethodOutput(attribution(rec, targets, params).abs().amax(dim=1))


def attribution(rec: Recording, targets: Tensor, params: SaliencyParams) -> Tensor:
    """(B, C, H, W): the pixel gradient, its SmoothGrad mean, or the IG attribution, for
    ``targets`` (B,). The SmoothGrad samples and IG steps of the whole batch go through the
    model as large batches (`ModelPasses.summed_input_gradients`), not one pass each.

    SmoothGrad's noise is drawn sample by sample, one (B, C, H, W) draw each from the seeded
    generator, so a map does not depend on how the samples are grouped into passes.
    """
    passes = rec.model_passes()
    pixels = passes.pixels  # (B, C, H, W) in [0, 1]
    if params.mode == "smoothgrad":
        generator = torch.Generator(device=pixels.device).manual_seed(params.seed)
        draw = dict(generator=generator, device=pixels.device, dtype=pixels.dtype)
        noisy = (
            pixels + params.noise * torch.randn(pixels.shape, **draw) for _ in range(params.samples)
        )
        return passes.summed_input_gradients(noisy, targets) / params.samples
    if params.mode == "integrated_gradients":
        # right Riemann sum from the black baseline: x·k/S for k = 1 … S
        scaled = (pixels * (step / params.steps) for step in range(1, params.steps + 1))
        return pixels * passes.summed_input_gradients(scaled, targets) / params.steps
    return passes.input_gradients(pixels, targets)
