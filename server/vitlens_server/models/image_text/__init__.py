"""Image-text (dual-encoder, CLIP-style) models from local files: adapters and attention recording.

`load_image_text_model` reads an open_clip directory or built-in architecture + checkpoint, or a
Hugging Face ``CLIPModel`` directory, and returns an `ImageTextModel`: both towers' embeddings,
similarity logits, tokenization, preprocessing, each tower's attention graph (`TowerGraph`) and
recording of both towers' attention maps and their gradients (`capture`, `record_pairs`).

`ImageTextSource` and `parse_image_text_source` never import torch; the rest loads on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from vitlens_server.models.image_text.source import (
    FORMATS,
    ImageTextSource,
    parse_image_text_source,
)

__all__ = [
    "FORMATS",
    "ImageTextCapture",
    "ImageTextLoadError",
    "ImageTextModel",
    "ImageTextRecording",
    "ImageTextSource",
    "Preprocess",
    "TokenizedTexts",
    "TowerGraph",
    "TowerRecording",
    "capture",
    "load_image_text_model",
    "parse_image_text_source",
    "record_pairs",
]

_LAZY = {
    "ImageTextCapture": "recording",
    "capture": "recording",
    "record_pairs": "recording",
    "ImageTextLoadError": "base",
    "ImageTextModel": "base",
    "Preprocess": "base",
    "ImageTextRecording": "records",
    "TowerGraph": "records",
    "TowerRecording": "records",
    "TokenizedTexts": "tokenizer",
    "load_image_text_model": "loading",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
    return getattr(module, name)
