"""One interface over both exemplar VQA models: pixels and a question in, answer logits out.

`VqaNet` wraps a Hugging Face model (``.model``) with what training needs: its question
tokenizer, which parameters are the pretrained trunk (`VqaNet.is_trunk`) and, for the region
models (VisualBERT, LXMERT), the frozen patch front-end (``.frontend``) that turns pixels into
region features and boxes.

Training also reads the final image-token states (`VqaNet.grounded`): a linear ``grounding``
head scores each patch token for "belongs to what the question is about", an auxiliary loss in
the spirit of ViLT's word-patch alignment and LXMERT's object-level pre-training objectives
(`vqa_train`). The head is training-only; the export holds the Hugging Face model alone.
"""

from __future__ import annotations

import open_clip
import torch
from torch import Tensor, nn
from transformers import BertTokenizer
from transformers.modeling_outputs import SequenceClassifierOutput

from vitlens_server.models.bimodal.frontend import PatchFrontEnd, load_clip_visual
from vitlens_server.models.bimodal.vilt import raster_order
from vitlens_server.training.clip_model import model_cfg_at
from vitlens_server.training.vqa_model import (
    build_lxmert,
    build_vilt,
    build_visual_bert,
    clip_visual_to_vilt,
    question_tokenizer,
)

__all__ = ["ARCHS", "MEAN", "STD", "VqaNet", "build_net"]

MEAN = STD = (0.5, 0.5, 0.5)  # the exemplar CLIP's normalisation


class VqaNet(nn.Module):
    """An exemplar VQA model: ``forward(pixels (B, 3, S, S), ids (B, T), mask (B, T))`` →
    answer logits (B, A).

    Attributes:
        arch: ``"vilt"``, ``"visualbert"`` or ``"lxmert"``.
        model: the Hugging Face model.
        frontend: the region models' frozen `PatchFrontEnd`; None for ViLT (it reads pixels).
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
        self.grounding = nn.Linear(int(model.config.hidden_size), 1)

    def is_trunk(self, name: str) -> bool:
        return name.removeprefix("model.") in self.trunk

    def forward(self, pixels: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        if self.frontend is None:
            return self.model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        with torch.no_grad():
            features, boxes = self.frontend(pixels)  # (B, n, D), (B, n, 4)
        if self.arch == "visualbert":
            return self._visual_bert(ids, mask, features).logits
        out = self.model(
            input_ids=ids, attention_mask=mask, visual_feats=features, visual_pos=boxes
        )
        return out.question_answering_score

    def grounded(self, pixels: Tensor, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Answer logits (B, A) and the ``grounding`` head's score of every patch token in
        raster order (B, n), from one forward pass. The logits equal `forward`'s."""
        if self.frontend is None:
            logits, patches = self._vilt_states(pixels, ids, mask)
        else:
            with torch.no_grad():
                features, boxes = self.frontend(pixels)  # (B, n, D), (B, n, 4)
            if self.arch == "visualbert":
                out = self._visual_bert(ids, mask, features, states=True)
                patches = out.hidden_states[-1][:, ids.shape[1] :]  # (B, n, D), raster order
                return out.logits, self.grounding(patches).squeeze(-1)
            out = self.model.lxmert(
                input_ids=ids, attention_mask=mask, visual_feats=features, visual_pos=boxes
            )
            logits = self.model.answer_head(out.pooled_output)
            patches = out.vision_output  # (B, n, D), the regions' order: raster
        return logits, self.grounding(patches).squeeze(-1)

    def _visual_bert(
        self, ids: Tensor, mask: Tensor, features: Tensor, states: bool = False
    ) -> SequenceClassifierOutput:
        """VisualBERT's output on region ``features`` (B, n, D), called as its adapter calls it
        (`models.bimodal.visual_bert`): every region attended to, visual token type 1."""
        b, n = features.shape[:2]
        return self.model(
            input_ids=ids,
            attention_mask=mask,
            visual_embeds=features,
            visual_attention_mask=mask.new_ones(b, n),
            visual_token_type_ids=torch.ones(b, n, dtype=torch.long, device=features.device),
            output_hidden_states=states,
        )

    def _vilt_states(self, pixels: Tensor, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """ViLT's logits and final patch-token states, sorted into raster order (its own patch
        embedding draws a random order; full images have no padding slots)."""
        vilt = self.model.vilt
        pixel_mask = torch.ones(pixels.shape[0], *pixels.shape[2:], dtype=torch.long)
        embeds, embeds_mask, (cells, (gh, gw)) = vilt.embeddings.visual_embed(
            pixels, pixel_mask.to(pixels.device), max_image_length=-1
        )  # (B, 1+n, D), (B, 1+n), ((B, n, 2), grid)
        order = raster_order(cells, embeds_mask[:, 1:].bool(), (int(gh), int(gw)))  # (B, n)
        out = vilt(input_ids=ids, attention_mask=mask, image_embeds=embeds, pixel_mask=embeds_mask)
        t = ids.shape[1]
        patches = out.last_hidden_state[:, t + 1 :]  # (B, n, D), drawn order
        patches = patches.gather(1, order[..., None].expand(-1, -1, patches.shape[-1]))
        return self.model.classifier(out.pooler_output), patches

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
    if arch in REGION_BUILDERS:
        if visual is None:
            visual = open_clip.CLIP(**model_cfg_at(160)).visual
        frontend = PatchFrontEnd(visual)
        model = REGION_BUILDERS[arch](frontend.feature_dim, seed=seed)
        return VqaNet(arch, model, tokenizer, frontend)
    raise ValueError(f"unknown VQA architecture {arch!r}; use vilt, visualbert or lxmert")


# The exemplars on the patch front-end's regions, by architecture name.
REGION_BUILDERS = {"visualbert": build_visual_bert, "lxmert": build_lxmert}
ARCHS = ("vilt", *REGION_BUILDERS)
