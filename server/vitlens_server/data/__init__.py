"""Generated ground-truth data: seeded scenes with exact object masks, and Pascal VOC folders."""

from vitlens_server.data.scenes import (
    CLASSES,
    MAX_OBJECTS,
    SPLIT_OFFSETS,
    SPLIT_STRIDE,
    Scene,
    SceneConfig,
    render_background,
    render_batch,
    render_scene,
    split_seeds,
)
from vitlens_server.data.shapes import SceneObject, render_object_mask

__all__ = [
    "CLASSES",
    "MAX_OBJECTS",
    "SPLIT_OFFSETS",
    "SPLIT_STRIDE",
    "Scene",
    "SceneConfig",
    "SceneObject",
    "render_background",
    "render_batch",
    "render_object_mask",
    "render_scene",
    "split_seeds",
]
