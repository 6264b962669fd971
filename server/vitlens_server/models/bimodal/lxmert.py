"""LXMERT (``transformers.LxmertForQuestionAnswering``): a text and an image stream (two stream).

Text stream: positions 0..T-1 (CLS at 0, ..., SEP, padding); image stream: the R regions (no
CLS). The language and vision encoders run first, then each cross-modality layer: one
co-attention module (one set of weights) called text ← image then image ← text on the same
inputs, then a self-attention layer per stream. The answer is read at the text CLS after the
last cross layer. Only some of these maps come back with ``output_attentions``; the hooks
capture all of them. The last cross layer's image ← text and image self-attention do not reach
the answer: their gradients are zero.

Token removal (`BimodalModel.remove_tokens`, seed 003 §4 perturbation): a removed word token
gets text_mask 0, a removed region visual_attention_mask 0 (the masks LXMERT gives padding).
With every region removed the text's co-attention has no real key left and spreads evenly over
the masked regions: the model's own behaviour on an all-padding image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from vitlens_server.models.bimodal.base import BimodalInputs, BimodalModel
from vitlens_server.models.bimodal.graphs import IMAGE, TEXT, two_stream_graph
from vitlens_server.models.bimodal.records import BimodalTokens

__all__ = ["LxmertAdapter"]


class LxmertAdapter(BimodalModel):
    """A transformers ``LxmertForQuestionAnswering``: region features and boxes in."""

    architecture = "two_stream"
    visual_input = "regions"

    def __init__(
        self, module: nn.Module, *, tokenizer: Any, answers: Sequence[str], source: str
    ) -> None:
        config = module.config
        super().__init__(
            module,
            graph=two_stream_graph(config.l_layers, config.r_layers, config.x_layers),
            tokenizer=tokenizer,
            answers=answers,
            source=source,
            max_text_length=config.max_position_embeddings,
        )

    @staticmethod
    def head_size(module: nn.Module) -> int:
        """The number of answer logits (``num_qa_labels``: the answer head's last Linear)."""
        return int(module.answer_head.logit_fc[-1].out_features)

    def _check_visual(self, inputs: BimodalInputs) -> None:
        assert inputs.regions is not None
        config = self.module.config
        if inputs.regions.shape[-1] != config.visual_feat_dim:
            raise ValueError(
                f"region features of width {inputs.regions.shape[-1]}; the model takes "
                f"{config.visual_feat_dim} (visual_feat_dim)"
            )
        if inputs.boxes is None:
            raise ValueError("LXMERT needs the region boxes (x1, y1, x2, y2 in [0, 1])")
        if inputs.boxes.shape[-1] != config.visual_pos_dim:
            raise ValueError(f"LXMERT takes boxes of {config.visual_pos_dim} numbers")

    def _prepare(self, inputs: BimodalInputs) -> tuple[dict[str, Any], BimodalTokens]:
        regions = inputs.regions
        assert regions is not None
        b, r = regions.shape[:2]
        region_mask = self._region_mask(inputs)
        t = inputs.ids.shape[1]
        device = inputs.ids.device
        tokens = BimodalTokens(
            text_set=TEXT,
            image_set=IMAGE,
            text_positions=torch.arange(t, device=device),
            image_positions=torch.arange(r, device=device),
            text_valid=self._word_tokens(inputs),
            image_valid=region_mask.bool(),
            readout_rows=torch.zeros(b, dtype=torch.long, device=device),
            sizes={TEXT: t, IMAGE: r},
        )
        kwargs = {
            "input_ids": inputs.ids,
            "attention_mask": inputs.text_mask,
            "visual_feats": regions,
            "visual_pos": inputs.boxes,
            "visual_attention_mask": region_mask,
        }
        return kwargs, tokens

    def _logits(self, kwargs: dict[str, Any]) -> Tensor:
        return self.module(**kwargs).question_answering_score
