"""Where an image-text model lives on disk: a torch-free description parsed from one string.

Syntax (the ``SOURCE`` of a later ``--model NAME=SOURCE``; see docs/image_text_models.md):

``open_clip:DIR``
    a directory in open_clip's hub layout: ``open_clip_config.json`` (``model_cfg`` and
    ``preprocess_cfg``) and ``open_clip_model.safetensors`` (or ``open_clip_pytorch_model.bin``).
``open_clip:ARCH:CHECKPOINT``
    one of open_clip's built-in architectures (``ViT-B-32``...) with a local checkpoint file
    (``.safetensors``, or a ``.bin``/``.pt``/``.pth`` that ``torch.load(weights_only=True)`` reads).
``hf-clip:DIR``
    a Hugging Face ``CLIPModel`` directory: ``config.json``, ``model.safetensors`` (or
    ``pytorch_model.bin``) and the tokenizer files (``tokenizer.json`` or ``vocab.json`` +
    ``merges.txt``); ``preprocessor_config.json`` when present.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["FORMATS", "ImageTextSource", "parse_image_text_source"]

OPEN_CLIP = "open_clip"
HF_CLIP = "hf-clip"
FORMATS = (OPEN_CLIP, HF_CLIP)


@dataclass(frozen=True)
class ImageTextSource:
    """A local image-text model.

    Attributes:
        format: ``open_clip`` or ``hf-clip``.
        path: the model directory, or the checkpoint file of a built-in open_clip architecture.
        architecture: open_clip's built-in model name (``ViT-B-32``) when ``path`` is a
            checkpoint file; None for directories.
    """

    format: str
    path: Path
    architecture: str | None = None

    def __str__(self) -> str:
        middle = f"{self.architecture}:" if self.architecture else ""
        return f"{self.format}:{middle}{self.path}"


def parse_image_text_source(text: str) -> ImageTextSource:
    """``open_clip:DIR``, ``open_clip:ARCH:CHECKPOINT`` or ``hf-clip:DIR`` (see the module doc).

    Only the syntax is checked here; the loader checks the files.

    Raises:
        ValueError: an unknown format, or no path.
    """
    fmt, sep, rest = text.partition(":")
    if not sep or fmt not in FORMATS:
        raise ValueError(
            f"image-text model source {text!r} must start with one of "
            f"{', '.join(f + ':' for f in FORMATS)} (e.g. open_clip:/models/clip-dir)"
        )
    arch, sep, checkpoint = rest.partition(":")
    if fmt == OPEN_CLIP and sep and arch and "/" not in arch and checkpoint:
        return ImageTextSource(fmt, Path(checkpoint), architecture=arch)
    if not rest:
        raise ValueError(f"image-text model source {text!r} names no path")
    return ImageTextSource(fmt, Path(rest))
