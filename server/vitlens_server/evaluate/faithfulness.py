"""The registered perturbation metrics (METHODS.md `perturbation`, `deletion` / `insertion`,
`average_drop`): re-classify the chunk's images with pixels removed in the order of the map,
through ``ctx.calls.logits``. The curves and terms are `perturbation`'s building blocks.

Defaults follow the papers: Chefer's perturbation zeroes pixels, RISE deletes towards zeros and
inserts into a blurred image, seed 004's Average Drop keeps the top half of the map.
"""

from __future__ import annotations

from dataclasses import dataclass

from vitlens_server.evaluate.context import MetricContext
from vitlens_server.evaluate.perturbation import (
    BASELINES,
    CHEFER_STEPS,
    average_drop_increase,
    deletion_curve,
    insertion_curve,
    perturbation_auc,
    perturbation_curve,
)
from vitlens_server.evaluate.registry import Curve, Scores, register_metric
from vitlens_server.explain.params import choice, param

__all__ = [
    "AverageDropOptions",
    "DeletionOptions",
    "InsertionOptions",
    "PerturbationOptions",
    "average_drop",
    "deletion",
    "insertion",
    "perturbation",
]

_BATCH = "Perturbed images per model call."
_REMOVAL = (
    "What removed pixels become: 'zeros' (black), 'blur' (the pixel of a Gaussian-blurred copy) "
    "or 'inpaint' (filled from the kept pixels around them, so the removed region's shape does "
    "not remain visible)."
)
_STEPS = "K: the curve has K + 1 points, from 0 to all pixels."


@dataclass(frozen=True)
class PerturbationOptions:
    baseline: str = choice("zeros", *BASELINES, doc=_REMOVAL + " Chefer zeroes.")
    batch_size: int = param(64, _BATCH, low=1, high=4096)


@dataclass(frozen=True)
class DeletionOptions:
    steps: int = param(16, _STEPS, low=1, high=1024)
    baseline: str = choice("zeros", *BASELINES, doc=_REMOVAL + " RISE deletes towards zeros.")
    batch_size: int = param(64, _BATCH, low=1, high=4096)


@dataclass(frozen=True)
class InsertionOptions:
    steps: int = param(16, _STEPS, low=1, high=1024)
    baseline: str = choice(
        "blur", "zeros", "blur", doc="The canvas pixels are inserted into; RISE blurs."
    )
    batch_size: int = param(64, _BATCH, low=1, high=4096)


@dataclass(frozen=True)
class AverageDropOptions:
    keep: float = param(0.5, "Fraction of pixels kept, most relevant first.", low=0.0, high=1.0)
    batch_size: int = param(64, _BATCH, low=1, high=4096)


@register_metric(
    "perturbation",
    options=PerturbationOptions,
    description="Chefer's positive/negative perturbation: top-1 accuracy as pixels are removed.",
)
def perturbation(ctx: MetricContext, options: PerturbationOptions) -> Scores:
    """``positive_auc`` / ``negative_auc`` (B,) x100 and the hit curves (B, 10) at x = 0, 0.1,
    ..., 0.9, against the label (Chefer scores the ground truth whatever the map explains)."""
    values, curves = {}, {}
    for sign, positive in (("positive", True), ("negative", False)):
        hits = perturbation_curve(
            ctx.pixels, ctx.maps, ctx.labels[:, 0], ctx.calls.logits, positive=positive,
            baseline=options.baseline, batch_size=options.batch_size,
        )  # fmt: skip
        values[f"{sign}_auc"] = perturbation_auc(hits)
        curves[sign] = Curve((0.0, *CHEFER_STEPS), hits.double())
    return Scores(values, curves)


@register_metric(
    "deletion",
    options=DeletionOptions,
    description="RISE deletion: probability of the explained class as relevant pixels go.",
)
def deletion(ctx: MetricContext, options: DeletionOptions) -> Scores:
    """``auc`` (B,) in [0, 1] and the ``probability`` curve (B, K+1) of the explained class."""
    return _causal(deletion_curve, ctx, options)


@register_metric(
    "insertion",
    options=InsertionOptions,
    description="RISE insertion: probability of the explained class as relevant pixels return.",
)
def insertion(ctx: MetricContext, options: InsertionOptions) -> Scores:
    """``auc`` (B,) in [0, 1] and the ``probability`` curve (B, K+1) of the explained class."""
    return _causal(insertion_curve, ctx, options)


def _causal(curve, ctx: MetricContext, options: DeletionOptions | InsertionOptions) -> Scores:
    """A RISE curve (`deletion_curve` or `insertion_curve`) as ``auc`` and ``probability``."""
    result = curve(
        ctx.pixels, ctx.maps, ctx.explained, ctx.calls.logits,
        steps=options.steps, baseline=options.baseline, batch_size=options.batch_size,
    )  # fmt: skip
    fractions = tuple(result.fractions.tolist())
    return Scores({"auc": result.auc}, {"probability": Curve(fractions, result.probabilities)})


@register_metric(
    "average_drop",
    options=AverageDropOptions,
    description="Average Drop / Increase of the explained class's probability, top pixels kept.",
)
def average_drop(ctx: MetricContext, options: AverageDropOptions) -> Scores:
    """``average_drop`` and ``average_increase`` (B,) x100 (`average_drop_increase`)."""
    terms = average_drop_increase(
        ctx.pixels, ctx.maps, ctx.explained, ctx.calls.logits,
        keep=options.keep, batch_size=options.batch_size,
    )  # fmt: skip
    return Scores(terms)
