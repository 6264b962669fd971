"""The exemplar CLIP: an open_clip `CLIP` whose image tower is the trained demo ViT.

The image tower is open_clip's own `VisionTransformer` (width 192, 3 heads, 6 blocks, patch 16,
224 px, class-token pooling, no pre-norm, LayerNorm eps 1e-6): exactly the demo classifier's
architecture. open_clip's timm adapter (`TimmModel`) cannot pass ``depth=6`` to timm, so the demo
weights are copied into open_clip's modules by `demo_to_open_clip` (a documented key mapping);
the copy computes the same pooled features as the demo ViT. The text tower is open_clip's
`TextTransformer` with the bundled BPE tokenizer (vocabulary 49,408), narrow and short.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from vitlens_server.models.default import DEMO_WEIGHTS

__all__ = [
    "CLIP_MODEL_CFG",
    "EXEMPLAR_IMAGE_SIZE",
    "MEAN",
    "STD",
    "TokenCache",
    "build_clip",
    "demo_to_open_clip",
    "low_resolution",
    "model_cfg_at",
    "resample_position_embedding",
    "tokenizer",
]

MEAN = STD = (0.5, 0.5, 0.5)  # the demo classifier's normalisation

# open_clip model_cfg (what open_clip_config.json stores). 9.9 M parameters, 6.3 M of them the
# token embedding; fp16 storage is 19.8 MB.
CLIP_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 128,
    "quick_gelu": False,
    "vision_cfg": {
        "image_size": 224,
        "patch_size": 16,
        "width": 192,
        "layers": 6,
        "head_width": 64,
        "mlp_ratio": 4.0,
        "no_ln_pre": True,
        "pool_type": "tok",
        "norm_kwargs": {"eps": 1e-6},
    },
    "text_cfg": {
        "context_length": 32,
        "vocab_size": 49408,
        "width": 128,
        "heads": 2,
        "layers": 3,
    },
}


# The shipped exemplar's native side: 160 px (10 x 10 patches), half the 224 px compute, which a
# CPU-only training budget affords; at 112 px a small object's shape was no longer legible
# (disc and hexagon confused: benchmarks/clip_training.md).
EXEMPLAR_IMAGE_SIZE = 160


def model_cfg_at(image_size: int, model_cfg: Mapping[str, Any] = CLIP_MODEL_CFG) -> dict[str, Any]:
    """A copy of ``model_cfg`` whose image tower takes ``image_size`` px images."""
    cfg = copy.deepcopy(dict(model_cfg))
    cfg["vision_cfg"]["image_size"] = image_size
    return cfg


def resample_position_embedding(param: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic resampling of a (1 + h * w, D) class + square-grid position embedding to
    (1 + rows * cols, D) for ``grid`` = (rows, cols); differentiable."""
    cls, patches = param[:1], param[1:]  # (1, D), (N, D)
    side, width = math.isqrt(patches.shape[0]), param.shape[1]
    patches = patches.reshape(1, side, side, width).permute(0, 3, 1, 2)  # (1, D, h, w)
    patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(-1, width)])  # (1 + n, D)


def build_clip(
    model_cfg: Mapping[str, Any] = CLIP_MODEL_CFG,
    *,
    demo_weights: Path | None = DEMO_WEIGHTS,
    seed: int = 0,
) -> open_clip.CLIP:
    """A fresh CLIP (seeded init); its image tower from ``demo_weights`` unless None. At another
    ``image_size`` than the demo's 224 px its position embedding is resampled to the grid."""
    torch.manual_seed(seed)
    cfg = copy.deepcopy(dict(model_cfg))
    model = open_clip.CLIP(**cfg)
    if demo_weights is not None:
        demo = {k: v.float() for k, v in load_file(str(demo_weights)).items()}
        state = demo_to_open_clip(demo)
        if state["positional_embedding"].shape != model.visual.positional_embedding.shape:
            grid = tuple(model.visual.grid_size)
            state["positional_embedding"] = resample_position_embedding(
                state["positional_embedding"], grid
            )
        missing, unexpected = model.visual.load_state_dict(state, strict=False)
        if unexpected or set(missing) != {"proj"}:
            raise RuntimeError(f"demo weights do not fit: missing {missing}, extra {unexpected}")
    return model


def demo_to_open_clip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a timm ViT state dict (the demo classifier) to open_clip `VisionTransformer` keys.

    ``cls_token`` (1, 1, D) → ``class_embedding`` (D,); ``pos_embed`` (1, 1 + N, D) →
    ``positional_embedding`` (1 + N, D), with the patch projection's bias added to the N patch
    rows (open_clip's ``conv1`` has no bias; the sum is the same); ``patch_embed.proj.weight`` →
    ``conv1.weight``; per block i: ``norm1/2`` → ``ln_1/2``, ``attn.qkv`` →
    ``attn.in_proj_*`` (same q, k, v packing), ``attn.proj`` → ``attn.out_proj``,
    ``mlp.fc1/2`` → ``mlp.c_fc/c_proj``; ``norm`` → ``ln_post``. The classifier ``head`` is
    dropped (the CLIP projection ``proj`` is new).
    """
    out = {
        "class_embedding": state["cls_token"].reshape(-1),
        "conv1.weight": state["patch_embed.proj.weight"],
        "ln_post.weight": state["norm.weight"],
        "ln_post.bias": state["norm.bias"],
    }
    pos = state["pos_embed"][0].clone()  # (1 + N, D)
    pos[1:] += state["patch_embed.proj.bias"]
    out["positional_embedding"] = pos
    renames = {
        "norm1": "ln_1",
        "norm2": "ln_2",
        "attn.qkv.weight": "attn.in_proj_weight",
        "attn.qkv.bias": "attn.in_proj_bias",
        "attn.proj": "attn.out_proj",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
    }
    for key, value in state.items():
        if not key.startswith("blocks."):
            continue
        _, index, rest = key.split(".", 2)
        for old, new in renames.items():
            if rest.startswith(old):
                rest = new + rest[len(old) :]
                break
        out[f"transformer.resblocks.{index}.{rest}"] = value
    return out


def tokenizer(model_cfg: Mapping[str, Any] = CLIP_MODEL_CFG) -> open_clip.SimpleTokenizer:
    """open_clip's bundled BPE tokenizer at the model's context length (works offline)."""
    return open_clip.SimpleTokenizer(context_length=model_cfg["text_cfg"]["context_length"])


@contextmanager
def low_resolution(visual: nn.Module, side: int):
    """Within the block, ``visual`` (open_clip `VisionTransformer`) takes ``side`` px images:
    its (1 + N, D) position embedding is replaced by a bicubic resampling of itself to the
    smaller grid, computed from the parameter so that gradients flow back to it."""
    param = visual._parameters.pop("positional_embedding")
    try:
        patch = visual.patch_size[0]
        new = resample_position_embedding(param, (side // patch, side // patch))  # (1 + n, D)
        visual.positional_embedding = new  # a plain attribute meanwhile
        yield visual
    finally:
        visual.__dict__.pop("positional_embedding", None)
        visual._parameters["positional_embedding"] = param


class TokenCache:
    """`tokenizer` with a cache of token rows: captions repeat across steps."""

    def __init__(self, model_cfg: dict[str, Any]) -> None:
        self.tokenize = tokenizer(model_cfg)
        self.rows: dict[str, torch.Tensor] = {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        new = [t for t in dict.fromkeys(texts) if t not in self.rows]
        if new:
            self.rows.update(zip(new, self.tokenize(new), strict=True))
        return torch.stack([self.rows[t] for t in texts])  # (T, L)
