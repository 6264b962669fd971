"""Accuracy of a classifier on held-out generated scenes (single- and two-object)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vitlens_server.data import SceneConfig, render_scene, split_seeds

__all__ = ["SceneAccuracy", "scene_accuracy", "to_model_input"]


@dataclass(frozen=True)
class SceneAccuracy:
    """Top-1 accuracy on single-object scenes; on two-object scenes, the fraction whose top-2
    holds both labels, and the top-1 hit rate on either label."""

    count: int
    top1: float
    two_object_top2_both: float
    two_object_top1_either: float


def to_model_input(
    images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> torch.Tensor:
    """(B, H, W, 3) uint8 → normalised (B, 3, H, W) float32 on ``device``."""
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div_(255)
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


@torch.inference_mode()
def _logits(model: nn.Module, seeds, two_object: bool, config, mean, std, batch_size: int):
    """Logits (S, C) and labels (S, K) of the scenes of ``seeds``."""
    device = next(model.parameters()).device
    outputs, labels = [], []
    for start in range(0, len(seeds), batch_size):
        scenes = [
            render_scene(s, two_object=two_object, config=config)
            for s in seeds[start : start + batch_size]
        ]
        images = np.stack([scene.image for scene in scenes])
        outputs.append(model(to_model_input(images, mean, std, device)).float().cpu())
        labels.append(torch.tensor([scene.labels for scene in scenes]))
    return torch.cat(outputs), torch.cat(labels)


def scene_accuracy(
    model: nn.Module,
    *,
    count: int = 1000,
    split: str = "test",
    base_seed: int = 0,
    mean: tuple[float, ...] = (0.5, 0.5, 0.5),
    std: tuple[float, ...] = (0.5, 0.5, 0.5),
    config: SceneConfig | None = None,
    batch_size: int = 100,
) -> SceneAccuracy:
    """Evaluate ``model`` (in eval mode) on ``count`` held-out scenes of each kind."""
    config = config or SceneConfig()
    seeds = list(split_seeds(split, count, base_seed=base_seed))
    logits, labels = _logits(model, seeds, False, config, mean, std, batch_size)
    top1 = (logits.argmax(1) == labels[:, 0]).float().mean().item()
    pair_logits, pairs = _logits(model, seeds, True, config, mean, std, batch_size)
    top2 = pair_logits.topk(2, dim=1).indices.sort(dim=1).values
    both = (top2 == pairs.sort(dim=1).values).all(dim=1).float().mean().item()
    either = (pair_logits.argmax(1)[:, None] == pairs).any(dim=1).float().mean().item()
    return SceneAccuracy(count, top1, both, either)
