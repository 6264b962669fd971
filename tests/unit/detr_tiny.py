"""A tiny random DETR (timm ``test_resnet`` backbone) saved as a Hugging Face directory.

d_model 32, 2 heads, 2 encoder and 2 decoder layers, 5 queries, 3 classes; weights re-drawn
(`image_text_tiny.sharpen`) so that attention is far from uniform and some queries are confident.
96 px inputs give a 3 x 3 feature map (N = 9 image tokens).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import DetrConfig, DetrForObjectDetection

from tests.unit.image_text_tiny import sharpen

LABELS = ("cat", "dog", "kite")
SIDE = 96
NUM_QUERIES = 5


def tiny_detr_config(**overrides) -> DetrConfig:
    fields = {
        "backbone_config": {
            "model_type": "timm_backbone",
            "backbone": "test_resnet",
            "num_channels": 3,
            "features_only": True,
            "use_pretrained_backbone": False,
            "out_indices": [-1],
        },
        "d_model": 32,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "encoder_attention_heads": 2,
        "decoder_attention_heads": 2,
        "encoder_ffn_dim": 64,
        "decoder_ffn_dim": 64,
        "num_queries": NUM_QUERIES,
        "id2label": dict(enumerate(LABELS)),
        "label2id": {label: i for i, label in enumerate(LABELS)},
    }
    fields.update(overrides)
    return DetrConfig(**fields)


def save_tiny_detr(directory: Path, seed: int = 0, **overrides) -> Path:
    """Write the tiny DETR to ``directory`` (``save_pretrained``) and return it."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        module = DetrForObjectDetection(tiny_detr_config(**overrides))
    sharpen(module, seed).save_pretrained(directory)
    return directory


def tiny_pixels(batch: int = 2, seed: int = 0) -> torch.Tensor:
    """(batch, 3, 96, 96) normalised-looking inputs."""
    return torch.randn(batch, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))
