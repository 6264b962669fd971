"""The exemplar detector: a small Hugging Face `DetrForObjectDetection` on the demo ViT's trunk.

The backbone is timm's ``vit_tiny_patch16_224`` cut after its first ``trunk_blocks`` blocks
(timm's feature getter prunes the blocks after the last ``out_indices``): the first blocks of
the demo classifier's 6-block trunk, so `build_detr` starts it from the demo's trained weights.
Three blocks, not all six: the demo's last blocks mix every patch token with the whole image (it
was trained to classify), and a detector built on them saw every object's class everywhere and
placed its boxes at fixed positions (benchmarks/detr_training.md, run 1). The feature map is the
(192, 14, 14) patch grid at 224 px; DETR's encoder and decoder on top are small (d_model 128,
2 encoder and 3 decoder layers, 4 heads) and read 8 object queries, twice the most objects a
scene holds. Everything is a stock `DetrConfig`, so the exported directory is
the very format users' DETR checkpoints come in, and the adapter that serves it is theirs.
"""

from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import load_file
from transformers import DetrConfig, DetrForObjectDetection

from vitlens_server.data import CLASSES
from vitlens_server.models.default import ASSETS

__all__ = [
    "IMAGE_SIZE",
    "MEAN",
    "STD",
    "TRUNK_BLOCKS",
    "build_detr",
    "detr_config",
    "load_demo_trunk",
]

IMAGE_SIZE = 224
MEAN = (0.5, 0.5, 0.5)  # the demo ViT's normalisation
STD = (0.5, 0.5, 0.5)
_TRUNK = "vit_tiny_patch16_224"
TRUNK_BLOCKS = 3  # of the demo's 6


def detr_config(trunk_blocks: int = TRUNK_BLOCKS, **overrides: Any) -> DetrConfig:
    """The exemplar's `DetrConfig` (eager attention, so the maps are returned) on the demo's
    first ``trunk_blocks`` blocks; ``overrides`` replace any field, e.g. ``num_queries``."""
    fields: dict[str, Any] = {
        "backbone_config": {
            "model_type": "timm_backbone",
            "backbone": _TRUNK,
            "num_channels": 3,
            "features_only": True,
            "use_pretrained_backbone": False,
            "out_indices": [trunk_blocks - 1],
        },
        "d_model": 128,
        "encoder_layers": 2,
        "decoder_layers": 3,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "encoder_ffn_dim": 256,
        "decoder_ffn_dim": 256,
        "num_queries": 8,
        "dropout": 0.0,
        "auxiliary_loss": True,
        "id2label": dict(enumerate(CLASSES)),
        "label2id": {label: index for index, label in enumerate(CLASSES)},
        "attn_implementation": "eager",
    }
    fields.update(overrides)
    return DetrConfig(**fields)


def load_demo_trunk(model: DetrForObjectDetection) -> None:
    """Copy the demo classifier's trunk (its embeddings and the blocks the backbone keeps; not
    its later blocks, norm or head) into the detector's backbone."""
    backbone = model.model.backbone.model.model
    wanted = backbone.state_dict().keys()
    state = load_file(ASSETS / "vitlens-demo.safetensors")
    trunk = {k: v.float() for k, v in state.items() if k in wanted}
    missing, _ = backbone.load_state_dict(trunk, strict=False)
    if missing:
        raise RuntimeError(f"the demo trunk does not fit the backbone: missing {missing}")


def build_detr(
    *, seed: int = 0, init_trunk: bool = True, **overrides: Any
) -> DetrForObjectDetection:
    """A fresh exemplar detector, seeded; its backbone from the demo ViT when ``init_trunk``."""
    torch.manual_seed(seed)
    model = DetrForObjectDetection(detr_config(**overrides))
    if init_trunk:
        load_demo_trunk(model)
    return model
