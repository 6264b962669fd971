"""The embedded default model, served when ``vitlens serve`` is given no model.

Until vitlens ships trained demo weights, this is a small ViT with seeded random weights:
the server says so in its log and in ``GetModel`` (``weights.random``).
"""

from __future__ import annotations

from vitlens_server.models.loading import ModelSpec

__all__ = ["DEMO_LABELS", "DEMO_MODEL_NAME", "demo_spec"]

DEMO_MODEL_NAME = "vitlens-demo"

# The object classes of vitlens' generated scenes.
DEMO_LABELS = ("disc", "square", "triangle", "star", "cross", "ring", "hexagon", "crescent")

# A ViT-Tiny/16 at half depth: 224 px input, 14 x 14 patch grid, 6 blocks x 3 heads, 2.9 M params.
DEMO_ARCHITECTURE = "vit_tiny_patch16_224"
DEMO_KWARGS = {"depth": 6, "num_classes": len(DEMO_LABELS)}


def demo_spec(device: str = "cpu") -> ModelSpec:
    """Spec of the default model on ``device``."""
    return ModelSpec(
        name=DEMO_MODEL_NAME,
        architecture=DEMO_ARCHITECTURE,
        labels=DEMO_LABELS,
        model_kwargs=DEMO_KWARGS,
        device=device,
        metadata={"note": "random initialisation (seed 0); no trained weights shipped yet"},
    )
