"""Loading a DETR from a local Hugging Face directory: what the files must be, and what is wrong.

The directory is ``save_pretrained``'s layout of a `DetrForObjectDetection`: ``config.json``
(``model_type`` "detr"; a timm backbone is created from its ``backbone_config`` without
downloading: ``use_pretrained_backbone`` must be false, as the weights file holds the backbone)
and ``model.safetensors``. An optional ``preprocessor_config.json`` (``DetrImageProcessor``'s)
gives the input size and normalisation; without one, images are resized to 800 x 800 and
normalised with ImageNet's mean and std, the released DETR checkpoints' settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, DetrForObjectDetection

from vitlens_server.models.detection.detr import DetrDetector
from vitlens_server.models.loading import ModelLoadError

__all__ = ["DetrLoadError", "Preprocessing", "load_detr", "preprocessing"]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_DEFAULT_SIDE = 800  # DETR's shortest edge


class DetrLoadError(ModelLoadError):
    """A DETR directory could not be loaded: the message names the file or setting to fix."""


@dataclass(frozen=True)
class Preprocessing:
    """How request images become the model's input: resized to (height, width), then
    normalised with ``mean``/``std`` after scaling to [0, 1]."""

    height: int
    width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def preprocessing(directory: Path) -> Preprocessing:
    """The input size and normalisation from ``preprocessor_config.json`` (or DETR's defaults).

    ``size`` {"height", "width"} is used as it is; {"shortest_edge": s} (DETR's aspect-keeping
    resize) becomes s x s, since the service resizes every image to one size without cropping.
    """
    path = directory / "preprocessor_config.json"
    found: dict[str, Any] = {}
    if path.is_file():
        try:
            found = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise DetrLoadError(f"cannot read {path}: {err}") from err
    size = found.get("size") or {}
    if not isinstance(size, dict):
        raise DetrLoadError(f"{path}: 'size' must be an object")
    if "height" in size and "width" in size:
        height, width = size["height"], size["width"]
    else:
        height = width = size.get("shortest_edge", _DEFAULT_SIDE)
    mean = tuple(found.get("image_mean", _IMAGENET_MEAN))
    std = tuple(found.get("image_std", _IMAGENET_STD))
    if not all(isinstance(v, int) and v > 0 for v in (height, width)):
        raise DetrLoadError(f"{path}: size must give positive integer pixels, got {size}")
    if len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std):
        raise DetrLoadError(f"{path}: image_mean and image_std need 3 values, std > 0")
    return Preprocessing(int(height), int(width), mean, std)  # type: ignore[arg-type]


def load_detr(directory: str | Path, *, device: str = "cpu") -> DetrDetector:
    """The `DetrDetector` of ``directory`` on ``device`` (float32, eval, eager attention).

    Raises:
        DetrLoadError: a missing or unreadable file, another model type, a pretrained-backbone
            download asked for, or weights that do not fit the config.
    """
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise DetrLoadError(f"{directory}: no config.json (a save_pretrained directory)")
    if not (directory / "model.safetensors").is_file():
        raise DetrLoadError(
            f"{directory}: no model.safetensors; vitlens loads safetensors weights only"
        )
    try:
        config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError) as err:
        raise DetrLoadError(f"{directory}/config.json: {err}") from err
    if config.model_type != "detr":
        raise DetrLoadError(
            f"{directory}/config.json: model_type {config.model_type!r}; expected 'detr' "
            "(DetrForObjectDetection)"
        )
    backbone = getattr(config, "backbone_config", None)
    if getattr(config, "use_pretrained_backbone", False) or getattr(
        backbone, "use_pretrained_backbone", False
    ):
        raise DetrLoadError(
            f"{directory}/config.json: use_pretrained_backbone is true, which downloads the "
            "backbone; set it to false (model.safetensors holds the backbone's weights)"
        )
    try:
        module, info = DetrForObjectDetection.from_pretrained(
            directory,
            dtype=torch.float32,
            attn_implementation="eager",
            output_loading_info=True,
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise DetrLoadError(f"{directory}: cannot load the weights: {err}") from err
    missing = [k for k in info["missing_keys"] if not k.endswith("num_batches_tracked")]
    if missing or info["unexpected_keys"] or info["mismatched_keys"]:
        raise DetrLoadError(
            f"{directory}/model.safetensors does not fit config.json: missing {missing[:5]}, "
            f"unexpected {info['unexpected_keys'][:5]}, mismatched {info['mismatched_keys'][:5]}"
        )
    return DetrDetector(module.to(device))
