"""Load an image-text model from local files: the one entry point over both formats."""

from __future__ import annotations

from vitlens_server.models.image_text.base import ImageTextLoadError, ImageTextModel
from vitlens_server.models.image_text.source import (
    HF_CLIP,
    OPEN_CLIP,
    ImageTextSource,
    parse_image_text_source,
)

__all__ = ["load_image_text_model"]


def load_image_text_model(source: str | ImageTextSource, *, device: str = "cpu") -> ImageTextModel:
    """The adapter of the model at ``source`` (``open_clip:DIR``, ``open_clip:ARCH:FILE`` or
    ``hf-clip:DIR``; see `source`), in eval mode on ``device``. Reads local files only.

    Raises:
        ImageTextLoadError: the source, a file or the model is not one vitlens can load; the
            message names what to fix.
    """
    if isinstance(source, str):
        try:
            source = parse_image_text_source(source)
        except ValueError as err:
            raise ImageTextLoadError(str(err)) from err
    if source.format == OPEN_CLIP:
        from vitlens_server.models.image_text.open_clip_model import load_open_clip

        return load_open_clip(source, device=device)
    if source.format == HF_CLIP:
        from vitlens_server.models.image_text.hf_clip import load_hf_clip

        return load_hf_clip(source.path, device=device)
    raise ImageTextLoadError(f"unknown image-text model format {source.format!r}")
