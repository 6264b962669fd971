"""Write a model as fp16 safetensors plus the ``<weights>.json`` sidecar `load_model` reads."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from vitlens_server.models.default import DEMO_ARCHITECTURE, DEMO_KWARGS

__all__ = ["export_weights"]


def export_weights(
    model: nn.Module,
    path: Path,
    *,
    labels: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    metadata: Mapping[str, object],
    architecture: str = DEMO_ARCHITECTURE,
    model_kwargs: Mapping[str, object] = DEMO_KWARGS,
) -> None:
    """Floating tensors are stored as fp16 (half the size); `load_model` widens them to fp32."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: (t.half() if t.is_floating_point() else t).detach().cpu().contiguous()
        for name, t in model.state_dict().items()
    }
    save_file(tensors, str(path), metadata={"format": "pt", "architecture": architecture})
    sidecar = {
        "architecture": architecture,
        "model_kwargs": dict(model_kwargs),
        "input_size": [3, 224, 224],
        "labels": list(labels),
        "mean": list(mean),
        "std": list(std),
        "metadata": dict(metadata),
    }
    path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2) + "\n")
