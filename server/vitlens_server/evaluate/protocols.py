"""Scene-based checks of explanation methods: class specificity and parameter randomisation.

Both run in-process through `Explainer` (the same code path as the service) on generated scenes
whose objects' masks are known exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from vitlens_server.data import Scene
from vitlens_server.domain import Summary
from vitlens_server.evaluate.metrics import iou, otsu_masks, spearman
from vitlens_server.explain import Explainer, ExplainJob, TargetSpec, get_method
from vitlens_server.explain.params import parse_params
from vitlens_server.models import LoadedModel, ModelSpec, load_model

__all__ = [
    "Summary",
    "class_specificity",
    "explain_maps",
    "randomised_copy",
    "sanity_correlations",
    "scene_pixels",
]


def scene_pixels(scenes: Sequence[Scene]) -> Tensor:
    """Scene images as (B, 3, H, W) float32 in [0, 1]."""
    images = np.stack([s.image for s in scenes])  # (B, H, W, 3) uint8
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)


def explain_maps(
    explainer: Explainer,
    method: str,
    pixels: Tensor,
    targets: Sequence[int] | None = None,
    *,
    grid: str = "input",
    batch_size: int = 16,
    options: dict | None = None,
) -> Tensor:
    """Raw maps (B, h, w) of ``method`` for (B, 3, H, W) pixels; ``targets`` (B,) or predicted."""
    spec = get_method(method)
    params = parse_params(spec.params, options or {}, method=method)
    maps = []
    for start in range(0, len(pixels), batch_size):
        chunk = pixels[start : start + batch_size]
        target = (
            TargetSpec()
            if targets is None
            else TargetSpec(kind="per_image", indices=tuple(targets[start : start + len(chunk)]))
        )
        explainer.check(spec, params, target)
        result = explainer.explain(ExplainJob(chunk, spec, params, target, grid=grid))
        maps.append(torch.from_numpy(result.heatmaps[:, 0]))
    return torch.cat(maps)


def class_specificity(explainer: Explainer, method: str, scenes: Sequence[Scene]) -> dict:
    """Per two-object scene and per object: IoU of the Otsu mask of the map explaining that
    object's class with that object's mask, and with the other object's mask.

    Returns arrays of length 2·S: ``explained``, ``other`` and ``difference`` (the metric); and
    of length S: ``between_classes``, the Spearman correlation of the scene's two maps (1 for a
    method whose map ignores the class).
    """
    pixels = scene_pixels(scenes)
    size = tuple(pixels.shape[-2:])
    explained, other, per_class = [], [], []
    shared = None if get_method(method).class_specific else explain_maps(explainer, method, pixels)
    for k in range(2):
        targets = [s.labels[k] for s in scenes]
        maps = shared if shared is not None else explain_maps(explainer, method, pixels, targets)
        per_class.append(maps)
        masks = otsu_masks(maps, size)
        truth = torch.from_numpy(np.stack([s.masks[k] for s in scenes]))
        rest = torch.from_numpy(np.stack([s.masks[1 - k] for s in scenes]))
        explained.append(iou(masks, truth).numpy())
        other.append(iou(masks, rest).numpy())
    explained_a, other_a = np.concatenate(explained), np.concatenate(other)
    return {
        "explained": explained_a,
        "other": other_a,
        "difference": explained_a - other_a,
        "between_classes": spearman(*per_class).numpy(),
    }


def randomised_copy(model: LoadedModel, seed: int = 1) -> LoadedModel:
    """The same architecture with every weight re-initialised (Adebayo et al. 2018)."""
    spec: ModelSpec = dataclasses.replace(
        model.spec, name=f"{model.name}-randomised", weights=None, pretrained=False, seed=seed
    )
    return load_model(spec)


def sanity_correlations(
    trained: Explainer, randomised: Explainer, method: str, scenes: Sequence[Scene]
) -> np.ndarray:
    """(S,) Spearman correlations between the two models' token-grid maps of each scene.

    Both models explain the class the trained model predicts, so only the weights differ.
    """
    pixels = scene_pixels(scenes)
    predicted = trained.predict(pixels, top_k=1).indices[:, 0].tolist()
    a = explain_maps(trained, method, pixels, predicted, grid="tokens")
    b = explain_maps(randomised, method, pixels, predicted, grid="tokens")
    return spearman(a, b).numpy()
