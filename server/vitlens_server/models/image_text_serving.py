"""An image-text (CLIP) model as the server serves it: the adapter, its labels and prompt template.

Labels and the prompt template come, in this order, from the `ModelSpec`, from a ``"vitlens"``
object in the model's ``open_clip_config.json``, or from a ``vitlens.json`` sidecar in the model's
directory (the checkpoint's directory for ``open_clip:ARCH:FILE``)::

    {"labels": ["circle", "square"], "prompt_template": "a photo of a {}."}

The template defaults to ``a photo of a {}.``. Without labels the model has no zero-shot
classes: Explain then needs ``texts`` and Predict ``prompts``. Every other key (how the weights
were trained, their scores) is reported by GetModel as the weights' metadata.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vitlens_server.models.image_text import (
    ImageTextLoadError,
    ImageTextModel,
    ImageTextSource,
    load_image_text_model,
    parse_image_text_source,
)
from vitlens_server.models.loading import WeightsInfo, file_sha256
from vitlens_server.models.spec import ModelSpec

__all__ = [
    "DEFAULT_PROMPT_TEMPLATE",
    "SIDECAR",
    "LoadedImageTextModel",
    "load_image_text",
    "read_metadata",
]

log = logging.getLogger(__name__)

DEFAULT_PROMPT_TEMPLATE = "a photo of a {}."
SIDECAR = "vitlens.json"
_WEIGHT_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
)


@dataclass
class LoadedImageTextModel:
    """A loaded dual encoder with what requests need to know about it.

    Attributes:
        spec: what was asked for (``spec.source`` names the files).
        adapter: the `ImageTextModel` (eval mode, weights frozen, recording hooks attached).
        labels: zero-shot class names (may be empty).
        prompt_template: ``{}`` stands for a label.
        weights: where the weights came from and their SHA-256.
    """

    spec: ModelSpec
    adapter: ImageTextModel
    labels: tuple[str, ...]
    prompt_template: str
    weights: WeightsInfo

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def device(self) -> torch.device:
        return torch.device(self.spec.device)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.adapter.preprocess.input_size)  # type: ignore[return-value]

    @property
    def prompts(self) -> tuple[str, ...]:
        """The labels through the prompt template."""
        return tuple(self.prompt_template.format(label) for label in self.labels)


def load_image_text(spec: ModelSpec) -> LoadedImageTextModel:
    """Load ``spec.source`` with `load_image_text_model` and read its labels and template.

    Raises:
        ImageTextLoadError: the source, a file, the metadata or the template is wrong; the
            message names what to fix.
    """
    try:
        source = parse_image_text_source(spec.source or "")
    except ValueError as err:
        raise ImageTextLoadError(str(err)) from err
    metadata = read_metadata(source)
    labels = spec.labels if spec.labels is not None else tuple(metadata.get("labels", ()))
    if not all(isinstance(label, str) and label for label in labels):
        raise ImageTextLoadError(f"{source}: labels must be non-empty strings")
    template = spec.prompt_template or metadata.get("prompt_template") or DEFAULT_PROMPT_TEMPLATE
    if not isinstance(template, str) or template.count("{}") != 1:
        raise ImageTextLoadError(
            f"{source}: prompt_template must contain '{{}}' exactly once (the label); "
            f"got {template!r}"
        )
    adapter = load_image_text_model(source, device=spec.device)
    weights = _weights_info(source, {**_described(metadata), **spec.metadata})
    if not labels:
        log.info("image-text model %r has no labels: Explain needs texts", spec.name)
    return LoadedImageTextModel(spec, adapter, tuple(labels), template, weights)


def read_metadata(source: ImageTextSource) -> dict[str, Any]:
    """The config's ``"vitlens"`` object, then `SIDECAR`'s keys it lacks: ``labels``,
    ``prompt_template``, and anything else, which GetModel reports as the weights' metadata."""
    folder = source.path if source.architecture is None else source.path.parent
    found: dict[str, Any] = {}
    config = folder / "open_clip_config.json"
    if source.format == "open_clip" and source.architecture is None and config.is_file():
        found.update(_json(config).get("vitlens") or {})
    sidecar = folder / SIDECAR
    if sidecar.is_file():
        for key, value in _json(sidecar).items():
            found.setdefault(key, value)
    if "labels" in found and not isinstance(found["labels"], list):
        raise ImageTextLoadError(f"{source}: vitlens metadata 'labels' must be a list of strings")
    return found


def _described(metadata: Mapping[str, Any]) -> dict[str, str]:
    """The metadata's other keys (how the weights were made, their scores) as GetModel's
    ``weights.metadata``: strings as they are, anything else as compact JSON."""
    described = {}
    for key, value in metadata.items():
        if key in ("labels", "prompt_template"):
            continue
        described[str(key)] = value if isinstance(value, str) else json.dumps(value)
    return described


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ImageTextLoadError(f"cannot read {path}: {err}") from err
    if not isinstance(value, dict):
        raise ImageTextLoadError(f"{path} must hold a JSON object")
    return value


def _weights_info(source: ImageTextSource, metadata: Mapping[str, str]) -> WeightsInfo:
    """The checkpoint file's name and SHA-256."""
    if source.architecture is not None:
        path: Path | None = source.path
    else:
        path = next((source.path / n for n in _WEIGHT_FILES if (source.path / n).is_file()), None)
    return WeightsInfo(
        source=str(source),
        random=False,
        sha256=file_sha256(path) if path is not None else "",
        metadata=dict(metadata),
    )
