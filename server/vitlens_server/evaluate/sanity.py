"""Model-parameter randomisation (Adebayo et al. 2018; METHODS.md `sanity`).

The trained model's maps are compared with those of a copy whose weights are re-initialised
(`randomised_copy`), both explaining the classes the trained model's maps explain: a method that
reads what the model learned decorrelates, one that reads only the image (or the mask) does not.
"""

from __future__ import annotations

import dataclasses

from vitlens_server.evaluate.context import MetricContext, resized
from vitlens_server.evaluate.primitives import spearman
from vitlens_server.evaluate.registry import Scores, register_metric
from vitlens_server.explain.params import NoParams
from vitlens_server.models import LoadedModel, ModelSpec, load_model

__all__ = ["randomised_copy", "sanity"]


@register_metric(
    "sanity",
    needs_randomised=True,
    description="Spearman correlation of the maps of the model and of a weight-randomised copy.",
)
def sanity(ctx: MetricContext, _options: NoParams) -> Scores:
    """``spearman`` (B,): rank correlation of the token-grid maps (B, gh, gw) of the model and
    of its randomised copy (``ctx.calls.randomised_explain``) for ``ctx.explained``. A method
    that reads only the mask gets the same map from either model: 1."""
    masks = None if ctx.masks is None else ctx.masks[:, 0]
    randomised = ctx.explain(ctx.explained, masks, randomised=True)  # (B, h, w)
    trained_tokens, randomised_tokens = resized(ctx.native, ctx.grid), resized(randomised, ctx.grid)
    return Scores({"spearman": spearman(trained_tokens, randomised_tokens)})


def randomised_copy(model: LoadedModel, seed: int = 1) -> LoadedModel:
    """The same architecture with every weight re-initialised (Adebayo et al. 2018)."""
    spec: ModelSpec = dataclasses.replace(
        model.spec, name=f"{model.name}-randomised", weights=None, pretrained=False, seed=seed
    )
    return load_model(spec)
