"""The embedded default model, served when ``vitlens serve`` is given no model.

Its weights ship in ``assets/`` (written by ``vitlens train-demo``). Without that file the model
falls back to seeded random weights, and the server says so in its log and in ``GetModel``
(``weights.random``).
"""

from __future__ import annotations

import json
from pathlib import Path

from vitlens_server.models.spec import ModelSpec

__all__ = ["DEMO_LABELS", "DEMO_MODEL_NAME", "DEMO_WEIGHTS", "demo_spec"]

DEMO_WEIGHTS = Path(__file__).resolve().parents[1] / "assets" / "vitlens-demo.safetensors"

DEMO_MODEL_NAME = "vitlens-demo"

# The object classes of vitlens' generated scenes, as the shipped weights' sidecar names them
# (read here rather than from `vitlens_server.data`: models never import the scene generator).
DEMO_LABELS: tuple[str, ...] = tuple(
    json.loads(DEMO_WEIGHTS.with_suffix(".json").read_text())["labels"]
)

# A ViT-Tiny/16 at half depth: 224 px input, 14 x 14 patch grid, 6 blocks x 3 heads, 2.9 M params.
DEMO_ARCHITECTURE = "vit_tiny_patch16_224"
DEMO_KWARGS = {"depth": 6, "num_classes": len(DEMO_LABELS)}


def demo_spec(device: str = "cpu", weights: Path | None = DEMO_WEIGHTS) -> ModelSpec:
    """Spec of the default model on ``device``; random weights if ``weights`` is missing."""
    if weights is not None and weights.is_file():
        return ModelSpec(
            name=DEMO_MODEL_NAME,
            architecture=DEMO_ARCHITECTURE,
            weights=weights,
            labels=DEMO_LABELS,
            model_kwargs=DEMO_KWARGS,
            device=device,
        )
    return ModelSpec(
        name=DEMO_MODEL_NAME,
        architecture=DEMO_ARCHITECTURE,
        labels=DEMO_LABELS,
        model_kwargs=DEMO_KWARGS,
        device=device,
        metadata={"note": f"random initialisation (seed 0): {weights} is missing"},
    )
