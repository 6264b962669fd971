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

import math
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
TRUNK_BLOCKS = 6  # the demo's depth


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


def init_anchor_queries(model: DetrForObjectDetection, sharpness: float = 4.0) -> None:
    """Start each object query looking at one cell of a square grid over the image.

    DETR's cross-attention starts near uniform and takes long to focus (benchmarks/
    detr_training.md, runs 1-4). Here, for Q = g² queries, query q's position embedding is the
    encoder's own sine embedding of the feature map at anchor cell q of a g x g grid, and every
    decoder layer's cross-attention query and key projections start as ``sharpness`` times a
    permutation that gives each head as many y as x dimensions (biases 0), so that at the start
    q·k is mostly sharpness² times the dot product of the anchor's and the token's position
    embeddings: each query attends around its anchor (70 to 82 % of its attention within 3
    cells of it at sharpness 4 on the 14 x 14 grid, on position alone; 15 % if uniform).
    Initialisation only: the model is a stock DETR, every weight trained as usual.
    """
    config = model.config
    side = math.isqrt(config.num_queries)
    if side * side != config.num_queries:
        raise ValueError(
            f"anchor queries need a square number of queries, not {config.num_queries}"
        )
    height = width = IMAGE_SIZE // 16
    pos = model.model.position_embedding(
        shape=torch.Size([1, config.d_model, height, width]), device="cpu", dtype=torch.float32
    )[0]  # (d, H, W)
    cells = [(round((i + 0.5) * height / side - 0.5), round((j + 0.5) * width / side - 0.5))
             for i in range(side) for j in range(side)]  # fmt: skip
    half = config.d_model // 2  # sine dims: y features, then x features
    heads = config.decoder_attention_heads
    per_head = config.d_model // heads
    order = torch.cat([
        torch.cat([torch.arange(h * per_head // 2, (h + 1) * per_head // 2),
                   half + torch.arange(h * per_head // 2, (h + 1) * per_head // 2)])
        for h in range(heads)
    ])  # fmt: skip
    projection = torch.zeros(config.d_model, config.d_model)
    projection[torch.arange(config.d_model), order] = sharpness
    with torch.no_grad():
        model.model.query_position_embeddings.weight.copy_(
            torch.stack([pos[:, r, c] for r, c in cells])
        )
        for layer in model.model.decoder.layers:
            for proj in (layer.encoder_attn.q_proj, layer.encoder_attn.k_proj):
                proj.weight.copy_(projection)
                proj.bias.zero_()


def build_detr(
    *,
    seed: int = 0,
    init_trunk: bool = True,
    trunk_blocks: int = TRUNK_BLOCKS,
    anchors: bool = False,
    **overrides: Any,
) -> DetrForObjectDetection:
    """A fresh exemplar detector, seeded: on the demo ViT's first ``trunk_blocks`` blocks (its
    trained weights when ``init_trunk``), its queries anchored on a grid when ``anchors``
    (`init_anchor_queries`); ``overrides`` are `DetrConfig` fields."""
    unknown = set(overrides) - set(DetrConfig().to_dict())
    if unknown:
        raise TypeError(f"not DetrConfig fields: {sorted(unknown)}")
    torch.manual_seed(seed)
    model = DetrForObjectDetection(detr_config(trunk_blocks, **overrides))
    if init_trunk:
        load_demo_trunk(model)
    if anchors:
        init_anchor_queries(model)
    return model
