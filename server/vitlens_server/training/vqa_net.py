"""One interface over both exemplar VQA models: pixels and a question in, answer logits out.

`VqaNet` wraps a Hugging Face model (``.model``) with what training needs: its question
tokenizer, which parameters are the pretrained trunk (`VqaNet.is_trunk`) and, for LXMERT, the
frozen patch front-end (``.frontend``) that turns pixels into region features and boxes.
"""

from __future__ import annotations

import open_clip
import torch
from torch import Tensor, nn
from transformers import BertTokenizer

from vitlens_server.models.bimodal.frontend import PatchFrontEnd, load_clip_visual
from vitlens_server.training.clip_model import model_cfg_at
from vitlens_server.training.vqa_model import (
    build_lxmert,
    build_vilt,
    clip_visual_to_vilt,
    question_tokenizer,
)

__all__ = ["MEAN", "STD", "VqaNet", "build_net"]

MEAN = STD = (0.5, 0.5, 0.5)  # the exemplar CLIP's normalisation


class VqaNet(nn.Module):
    """An exemplar VQA model: ``forward(pixels (B, 3, S, S), ids (B, T), mask (B, T))`` →
    answer logits (B, A).

    Attributes:
        arch: ``"vilt"`` or ``"lxmert"``.
        model: the Hugging Face model.
        frontend: LXMERT's frozen `PatchFrontEnd`; None for ViLT (it reads pixels itself).
        tokenizer: the question tokenizer.
        trunk: names of the parameters initialised from the CLIP tower (ViLT's encoder).
    """

    def __init__(
        self,
        arch: str,
        model: nn.Module,
        tokenizer: BertTokenizer,
        frontend: PatchFrontEnd | None = None,
        trunk: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__()
        self.arch = arch
        self.model = model
        self.frontend = frontend
        self.tokenizer = tokenizer
        self.trunk = trunk

    def is_trunk(self, name: str) -> bool:
        return name.removeprefix("model.") in self.trunk

    def forward(self, pixels: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        if self.frontend is None:
            return self.model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        with torch.no_grad():
            features, boxes = self.frontend(pixels)  # (B, n, D), (B, n, 4)
        out = self.model(
            input_ids=ids, attention_mask=mask, visual_feats=features, visual_pos=boxes
        )
        return out.question_answering_score

    def train(self, mode: bool = True) -> VqaNet:
        super().train(mode)
        if self.frontend is not None:
            self.frontend.eval()  # frozen: always in eval mode
        return self

    @torch.no_grad()
    def round_to_half(self) -> None:
        """Round the model's weights to float16 and back, as the export stores them."""
        for tensor in self.model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())


def build_net(arch: str, *, seed: int = 0, clip: bool = True) -> VqaNet:
    """A fresh exemplar of ``arch`` (seeded), on the shipped CLIP tower (``clip`` False: a random
    tower, for tests)."""
    visual = load_clip_visual() if clip else None
    tokenizer = question_tokenizer()
    if arch == "vilt":
        if visual is None:
            return VqaNet(arch, build_vilt(seed=seed), tokenizer)
        trunk = frozenset(clip_visual_to_vilt(visual))
        trunk -= {"vilt.embeddings.token_type_embeddings.weight"}  # new: modality embeddings
        return VqaNet(arch, build_vilt(visual, seed=seed), tokenizer, trunk=trunk)
    if arch == "lxmert":
        if visual is None:
            visual = open_clip.CLIP(**model_cfg_at(160)).visual
        frontend = PatchFrontEnd(visual)
        return VqaNet(arch, build_lxmert(frontend.feature_dim, seed=seed), tokenizer, frontend)
    raise ValueError(f"unknown VQA architecture {arch!r}; use vilt or lxmert")
