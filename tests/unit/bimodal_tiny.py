"""Tiny random ViLT, VisualBERT and LXMERT VQA models saved as Hugging Face directories.

Configs as in docs/bimodal_hf_notes.md §6 (hidden 32, 2 heads, 2 layers per stack, 5 answers),
weights re-drawn (`image_text_tiny.sharpen`) so attention is far from uniform; each directory
holds ``config.json`` + ``model.safetensors`` (``save_pretrained``) and a 17-word ``vocab.txt``.
Batches: two questions of 8 and 7 tokens (the second padded), a padded image / padded region.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from tests.unit.image_text_tiny import sharpen

WORDS = (
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "what",
    "color",
    "is",
    "the",
    "cat",
    "dog",
    "how",
    "many",
    "?",
    "red",
    "blue",
    "##s",
)
QUESTIONS = ("what color is the cat?", "how many dogs?")  # T = 8; the second has 1 padding
ANSWERS = ("yes", "no", "red", "blue", "2")
FEATURES = 16  # region feature width
IMAGE_HW = (64, 96)  # pixels: a 4 x 6 grid of 16 px patches
PADDED_WIDTH = 64  # the second image's real width: 4 x 4 real patches

_COMMON = {
    "vocab_size": len(WORDS),
    "hidden_size": 32,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "id2label": dict(enumerate(ANSWERS)),
    "label2id": {a: i for i, a in enumerate(ANSWERS)},
}
ARCHITECTURES = ("vilt", "visual_bert", "lxmert")


def build(kind: str, seed: int = 0, **overrides) -> nn.Module:
    """A tiny sharpened ``*ForQuestionAnswering`` of ``kind`` (vilt, visual_bert, lxmert)."""
    import transformers as tf

    common = {**_COMMON, **overrides}
    if kind == "vilt":
        config = tf.ViltConfig(
            num_hidden_layers=2,
            max_position_embeddings=40,
            image_size=64,
            patch_size=16,
            num_labels=len(ANSWERS),
            **common,
        )
        model = tf.ViltForQuestionAnswering(config)
    elif kind == "visual_bert":
        config = tf.VisualBertConfig(
            num_hidden_layers=2,
            visual_embedding_dim=FEATURES,
            max_position_embeddings=64,
            pad_token_id=0,
            num_labels=len(ANSWERS),
            **common,
        )
        model = tf.VisualBertForQuestionAnswering(config)
    elif kind == "lxmert":
        config = tf.LxmertConfig(
            l_layers=2,
            x_layers=2,
            r_layers=2,
            visual_feat_dim=common.pop("visual_feat_dim", FEATURES),
            visual_pos_dim=4,
            num_qa_labels=len(ANSWERS),
            num_object_labels=3,
            num_attr_labels=3,
            max_position_embeddings=64,
            **common,
        )
        model = tf.LxmertForQuestionAnswering(config)
    else:
        raise ValueError(kind)
    return sharpen(model, seed)


def write_vocab(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    return path


def write_dir(path: Path, kind: str, seed: int = 0, *, answers: list[str] | None = None, **cfg):
    """``path`` as ``save_pretrained`` writes the model, plus vocab.txt (and vitlens.json)."""
    build(kind, seed, **cfg).save_pretrained(path)
    write_vocab(path)
    if answers is not None:
        (path / "vitlens.json").write_text(json.dumps({"answers": answers}))
    return path


def batch(kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The visual inputs of a B = 2 batch: pixels + pixel_mask (ViLT; the second image padded
    to ``PADDED_WIDTH``), or region features + boxes + region_mask (the second item's last
    region padded)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "vilt":
        pixels = torch.randn(2, 3, *IMAGE_HW, generator=gen)
        mask = torch.ones(2, *IMAGE_HW, dtype=torch.long)
        mask[1, :, PADDED_WIDTH:] = 0
        return {"pixels": pixels, "pixel_mask": mask}
    regions = 3 if kind == "visual_bert" else 4
    low = torch.rand(2, regions, 2, generator=gen)  # (x1, y1)
    high = low + torch.rand(2, regions, 2, generator=gen) * (1 - low)  # (x2, y2)
    boxes = torch.cat([low, high], dim=-1)  # (B, R, 4) in [0, 1]
    mask = torch.ones(2, regions, dtype=torch.long)
    mask[1, -1] = 0
    return {
        "regions": torch.randn(2, regions, FEATURES, generator=gen),
        "boxes": boxes,
        "region_mask": mask,
    }
