"""What to serve under one name: a torch-free description, read by the settings and the CLI."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ModelSpec"]


@dataclass(frozen=True)
class ModelSpec:
    """What to serve under one name.

    Attributes:
        name: served name, used in requests.
        architecture: timm model name, e.g. ``vit_base_patch16_224``.
        weights: local weights file; ``None`` with ``pretrained=False`` means random weights.
        pretrained: load timm's pretrained weights from the local Hugging Face or torch hub
            cache (never downloaded).
        labels: class names; default: from a ``<weights>.json`` sidecar, ImageNet names for
            1000-class models, else ``class_<i>``.
        model_kwargs: extra ``timm.create_model`` arguments (``num_classes``, ``depth``...).
        device: torch device string.
        seed: seed of the random initialisation when no weights are given.
        precision: ``fp32``; ``tf32`` (CUDA matmuls in TensorFloat-32, a process-wide
            setting); ``bf16`` (model passes under bfloat16 autocast, weights and method math
            in float32).
        metadata: provenance shown in ``ModelInfo.weights.metadata``.
        source: an image-text (CLIP) model's local source, ``open_clip:DIR``,
            ``open_clip:ARCH:FILE`` or ``hf-clip:DIR`` (docs/image_text_models.md), loaded by
            `vitlens_server.models.image_text_serving`; or a visual question answering model's,
            ``hf-vqa:DIR`` (docs/vqa_models.md), loaded by `vitlens_server.models.vqa_serving`;
            or an object detector's, ``hf-detr:DIR`` (docs/detection_models.md), loaded by
            `vitlens_server.models.detection_serving`; ``architecture`` is then the source's
            format. None: a timm classifier.
        prompt_template: how an image-text model's labels become prompts (``{}`` is the
            label); None: the model's metadata, else ``a photo of a {}.``.
    """

    name: str
    architecture: str
    weights: Path | None = None
    pretrained: bool = False
    labels: tuple[str, ...] | None = None
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    seed: int = 0
    precision: str = "fp32"
    metadata: Mapping[str, str] = field(default_factory=dict)
    source: str | None = None
    prompt_template: str | None = None

    @property
    def image_text(self) -> bool:
        """Whether this names an image-text (CLIP) model."""
        return self.source is not None and not self.vqa and not self.detection

    @property
    def vqa(self) -> bool:
        """Whether this names a visual question answering model (an ``hf-vqa:`` source)."""
        return self.source is not None and self.source.startswith("hf-vqa:")

    @property
    def detection(self) -> bool:
        """Whether this names an object detector (an ``hf-detr:`` source)."""
        return self.source is not None and self.source.startswith("hf-detr:")
