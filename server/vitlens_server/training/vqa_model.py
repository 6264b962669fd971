"""The exemplar VQA models: small Hugging Face ViLT, VisualBERT and LXMERT on the CLIP image tower.

All read 160 px scenes through the image tower of the shipped exemplar CLIP (open_clip
`VisionTransformer`: width 192, 3 heads, 6 blocks, patch 16, so 10 x 10 patches), which already
tells shapes, colours, sizes and positions apart (benchmarks/clip_training.md):

- **single stream, ViLT** (`build_vilt`): ViLT's own recipe, a ViT's weights as the joint
  encoder. The CLIP tower's patch embedding, class token, position embedding, 6 blocks and final
  norm are copied into `ViltForQuestionAnswering` (`clip_visual_to_vilt`, a key mapping; its
  image side then computes exactly the tower's tokens); the text embeddings, pooler and answer
  head start random. Text and patches then attend to each other in every layer.
- **single stream on regions, VisualBERT** (`build_visual_bert`): one stream over the question
  and the same frozen patch regions as LXMERT's below, all its weights random and learning at
  one rate (ViLT, whose joint attention starts as the tower's, learnt to read the image but not
  to match a question's words to an object: benchmarks/vqa_training.md).
- **two stream, LXMERT** (`build_lxmert`): `LxmertForQuestionAnswering` with random weights on
  *region* features, as LXMERT reads Faster R-CNN boxes. Its visual front-end is the frozen CLIP
  tower (`PatchFrontEnd`): each patch is one region, its feature the tower's token after the
  fifth block (the last block's patch outputs never reach the class token the tower was trained
  through), its box the patch's square in [0, 1] image coordinates
  (`vitlens_server.models.bimodal.frontend`).

The question tokenizer is a BERT word-level vocabulary of every word the generated questions use
(`vitlens_server.data.questions.vocab_lines`), so no word is split or unknown.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import (
    BertTokenizer,
    LxmertConfig,
    LxmertForQuestionAnswering,
    ViltConfig,
    ViltForQuestionAnswering,
    VisualBertConfig,
    VisualBertForQuestionAnswering,
)

from vitlens_server.data.questions import ANSWERS, vocab_lines

__all__ = [
    "MAX_QUESTION_TOKENS",
    "build_lxmert",
    "build_vilt",
    "build_visual_bert",
    "clip_visual_to_vilt",
    "question_tokenizer",
]

MAX_QUESTION_TOKENS = 16  # text positions: [CLS] + the longest question (8 tokens) + [SEP], padded


def question_tokenizer() -> BertTokenizer:
    """The BERT tokenizer of the questions' vocabulary (`vocab_lines`; [PAD] is id 0). The
    export writes the same lines to ``vocab.txt``."""
    vocab = {token: i for i, token in enumerate(vocab_lines())}
    return BertTokenizer(vocab=vocab, do_lower_case=True)  # not vocab_file= (transformers 5)


def _labels() -> dict[str, dict]:
    id2label = dict(enumerate(ANSWERS))
    return {"id2label": id2label, "label2id": {a: i for i, a in id2label.items()}}


def _region_trunk() -> dict[str, object]:
    """What the region exemplars share: the question vocabulary, width 192, 3 heads, no dropout,
    the closed answer vocabulary's labels."""
    return {
        "vocab_size": len(vocab_lines()),
        "hidden_size": 192,
        "num_attention_heads": 3,
        "intermediate_size": 768,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "max_position_embeddings": MAX_QUESTION_TOKENS,
        **_labels(),
    }


def build_vilt(visual: nn.Module | None = None, *, seed: int = 0) -> ViltForQuestionAnswering:
    """A ViLT for the exemplar (6 layers of width 192), its encoder the CLIP tower's ``visual``
    (`clip_visual_to_vilt`; None: random, for tests)."""
    torch.manual_seed(seed)
    config = ViltConfig(
        vocab_size=len(vocab_lines()),
        hidden_size=192,
        num_hidden_layers=6,
        num_attention_heads=3,
        intermediate_size=768,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=MAX_QUESTION_TOKENS,
        layer_norm_eps=1e-6,
        image_size=160,
        patch_size=16,
        num_channels=3,
        qkv_bias=True,
        max_image_length=-1,
        num_labels=len(ANSWERS),
        **_labels(),
    )
    model = ViltForQuestionAnswering(config)
    if visual is not None:
        _, unexpected = model.load_state_dict(clip_visual_to_vilt(visual), strict=False)
        if unexpected:
            raise RuntimeError(f"the CLIP tower does not fit ViLT: extra keys {unexpected}")
    return model


def clip_visual_to_vilt(visual: nn.Module) -> dict[str, Tensor]:
    """open_clip `VisionTransformer` weights under ViLT's keys: patch embedding (its bias zero:
    open_clip's has none), class token, position embedding, blocks and final norm; ViLT's
    modality embeddings zero, so its image tokens start as exactly the tower's.

    Shapes: conv (D, 3, p, p); position (1 + n, D) → (1, 1 + n, D); each block's fused
    ``in_proj`` (3D, D) splits into query, key and value (D, D) in that order.
    """
    out: dict[str, Tensor] = {}
    emb = "vilt.embeddings."
    out[emb + "patch_embeddings.projection.weight"] = visual.conv1.weight.detach().clone()
    out[emb + "patch_embeddings.projection.bias"] = visual.conv1.weight.new_zeros(
        visual.conv1.weight.shape[0]
    )
    out[emb + "cls_token"] = visual.class_embedding.detach().reshape(1, 1, -1).clone()
    out[emb + "position_embeddings"] = visual.positional_embedding.detach()[None].clone()
    width = visual.class_embedding.shape[0]  # modality embeddings start at zero: the image side
    out[emb + "token_type_embeddings.weight"] = visual.class_embedding.new_zeros(2, width)
    for i, block in enumerate(visual.transformer.resblocks):
        layer = f"vilt.encoder.layer.{i}."
        q, k, v = block.attn.in_proj_weight.detach().chunk(3)
        qb, kb, vb = block.attn.in_proj_bias.detach().chunk(3)
        for name, w, b in (("query", q, qb), ("key", k, kb), ("value", v, vb)):
            out[f"{layer}attention.attention.{name}.weight"] = w.clone()
            out[f"{layer}attention.attention.{name}.bias"] = b.clone()
        pairs = {
            "attention.output.dense": block.attn.out_proj,
            "layernorm_before": block.ln_1,
            "layernorm_after": block.ln_2,
            "intermediate.dense": block.mlp.c_fc,
            "output.dense": block.mlp.c_proj,
        }
        for name, module in pairs.items():
            out[f"{layer}{name}.weight"] = module.weight.detach().clone()
            out[f"{layer}{name}.bias"] = module.bias.detach().clone()
    out["vilt.layernorm.weight"] = visual.ln_post.weight.detach().clone()
    out["vilt.layernorm.bias"] = visual.ln_post.bias.detach().clone()
    return out


def build_visual_bert(feature_dim: int = 192, *, seed: int = 0) -> VisualBertForQuestionAnswering:
    """A VisualBERT for the exemplar: 6 layers of width 192, 3 heads, from random weights, on
    ``feature_dim`` region features (VisualBERT reads no boxes: where a patch lies is in its
    feature, the tower's position embedding carried through its blocks)."""
    torch.manual_seed(seed)
    config = VisualBertConfig(
        num_hidden_layers=6,
        visual_embedding_dim=feature_dim,
        num_labels=len(ANSWERS),
        **_region_trunk(),
    )
    return VisualBertForQuestionAnswering(config)


def build_lxmert(feature_dim: int = 192, *, seed: int = 0) -> LxmertForQuestionAnswering:
    """An LXMERT for the exemplar: width 192, 3 heads, 3 language, 2 vision and 3 cross layers,
    on ``feature_dim`` region features with (x1, y1, x2, y2) boxes."""
    torch.manual_seed(seed)
    config = LxmertConfig(
        l_layers=3,
        r_layers=2,
        x_layers=3,
        visual_feat_dim=feature_dim,
        visual_pos_dim=4,
        num_qa_labels=len(ANSWERS),
        num_object_labels=1,
        num_attr_labels=1,
        **_region_trunk(),
    )
    return LxmertForQuestionAnswering(config)
