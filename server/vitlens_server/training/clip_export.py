"""Write the exemplar CLIP in open_clip's hub layout, and load it back with open_clip.

The directory holds ``open_clip_config.json`` (``{"model_cfg", "preprocess_cfg"}``),
``open_clip_model.safetensors`` (floating tensors stored as fp16; open_clip's loader copies them
into its fp32 model, so they come back widened) and ``vitlens.json`` (labels, prompt template,
training command, seeds, time and the held-out metrics recorded at export).
``open_clip.create_model_and_transforms("local-dir:DIR")`` loads it offline.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import open_clip
from safetensors.torch import save_file
from torch import nn

from vitlens_server.training.clip_model import MEAN, STD

__all__ = ["CLIP_ASSET_DIR", "export_clip", "load_clip"]

CLIP_ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "vitlens-clip"

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
METADATA_NAME = "vitlens.json"


def export_clip(
    model: nn.Module,
    directory: Path,
    *,
    model_cfg: Mapping[str, Any],
    metadata: Mapping[str, Any],
) -> None:
    """Write ``model`` (an open_clip CLIP built from ``model_cfg``) to ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: (t.half() if t.is_floating_point() else t).detach().cpu().contiguous()
        for name, t in model.state_dict().items()
    }
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    config = {
        "model_cfg": dict(model_cfg),
        "preprocess_cfg": {
            "size": model_cfg["vision_cfg"]["image_size"],
            "mode": "RGB",
            "mean": list(MEAN),
            "std": list(STD),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    (directory / METADATA_NAME).write_text(json.dumps(dict(metadata), indent=2) + "\n")


def load_clip(directory: Path, device: str = "cpu"):
    """``(model in eval mode, preprocess, tokenizer, metadata)`` of an exported directory, via
    open_clip's own ``local-dir:`` loader (fp32 weights)."""
    name = f"local-dir:{directory}"
    model, _, preprocess = open_clip.create_model_and_transforms(name, device=device)
    metadata_path = directory / METADATA_NAME
    metadata = json.loads(metadata_path.read_text()) if metadata_path.is_file() else {}
    return model.eval(), preprocess, open_clip.get_tokenizer(name), metadata
