"""Visual front-ends: what turns pixels into the region features a region-based VQA model reads.

LXMERT and VisualBERT read detector regions (features and boxes). Without a detector, a frozen
ViT can stand in (`PatchFrontEnd`): every patch is one region, its feature the patch token after
a chosen block, its box the patch's square. The exemplar LXMERT declares the exemplar CLIP's
image tower as its front-end (its ``vitlens.json``: ``"frontend": {"kind": "vit_patch_tokens",
"model": "vitlens-clip", "blocks": 5}``).
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from vitlens_server.models.default import CLIP_DIR

__all__ = ["PatchFrontEnd", "load_clip_visual", "patch_boxes"]


def load_clip_visual(directory: Path = CLIP_DIR) -> nn.Module:
    """The exemplar CLIP's image tower (open_clip `VisionTransformer`, float32, eval mode)."""
    cfg = json.loads((directory / "open_clip_config.json").read_text())["model_cfg"]
    model = open_clip.CLIP(**cfg)
    state = {
        k: v.float() for k, v in load_file(str(directory / "open_clip_model.safetensors")).items()
    }
    model.load_state_dict(state)
    return model.visual.eval()


def patch_boxes(grid: tuple[int, int]) -> Tensor:
    """(rows * cols, 4) the boxes (x1, y1, x2, y2), in [0, 1], of a patch grid in raster order."""
    rows, cols = grid
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    r, c = r.flatten().float(), c.flatten().float()
    return torch.stack([c / cols, r / rows, (c + 1) / cols, (r + 1) / rows], dim=1)


class PatchFrontEnd(nn.Module):
    """A frozen ViT as a region front-end: every patch a region.

    ``forward(pixels)`` takes (B, 3, S, S) normalised pixels and returns the patch tokens after
    block ``layer`` (default: all but the last), (B, n, D), and their boxes (B, n, 4).
    """

    def __init__(self, visual: nn.Module, layer: int = -1) -> None:
        super().__init__()
        self.visual = visual.eval().requires_grad_(False)
        blocks = len(visual.transformer.resblocks)
        self.blocks = blocks + layer if layer < 0 else layer
        if not 0 < self.blocks <= blocks:
            raise ValueError(f"layer {layer} is outside the tower's {blocks} blocks")
        self.register_buffer("boxes", patch_boxes(tuple(visual.grid_size)), persistent=False)

    @property
    def feature_dim(self) -> int:
        return int(self.visual.class_embedding.shape[0])

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        visual = self.visual
        x = visual.conv1(pixels).flatten(2).transpose(1, 2)  # (B, n, D)
        cls = visual.class_embedding.to(x.dtype).expand(len(x), 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        x = visual.ln_pre(x)
        for block in visual.transformer.resblocks[: self.blocks]:
            x = block(x)
        return x[:, 1:], self.boxes.expand(len(x), -1, -1)
