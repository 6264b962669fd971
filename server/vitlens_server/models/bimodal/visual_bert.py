"""VisualBERT (``transformers.VisualBertForQuestionAnswering``): text + region tokens, one stream.

Joint order: text positions 0..T-1 (CLS at 0, ..., SEP, padding), then the R regions at
T..T+R-1 (no image CLS). The answer head reads neither the pooler nor CLS: it gathers position
``text_mask.sum(1) - 2`` (the last token before the final SEP of a right-padded question), so
that is the readout row of each item.

Token removal (`BimodalModel.remove_tokens`, seed 003 §4 perturbation): a removed region gets
region_mask 0 (``visual_attention_mask``). A removed word token is dropped from the sequence:
the kept tokens move left and the end is padded, as Chefer et al.'s reference code removes
text tokens. Masking it in place would move the head's readout, which gathers at
``text_mask.sum(1) - 2`` and so assumes one contiguous run of real tokens. The later tokens'
position embeddings shift with the drop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from vitlens_server.models.bimodal.base import BimodalInputs, BimodalLoadError, BimodalModel
from vitlens_server.models.bimodal.graphs import JOINT, single_stream_graph
from vitlens_server.models.bimodal.records import BimodalTokens

__all__ = ["VisualBertAdapter"]

DROPOUT_PATH = "visual_bert.encoder.layer.{}.attention.self.dropout"


class VisualBertAdapter(BimodalModel):
    """A transformers ``VisualBertForQuestionAnswering``: region features in."""

    architecture = "single_stream"
    visual_input = "regions"

    def __init__(
        self, module: nn.Module, *, tokenizer: Any, answers: Sequence[str], source: str
    ) -> None:
        config = module.config
        if getattr(config, "bypass_transformer", False):
            raise BimodalLoadError(
                f"{source}: config.json sets bypass_transformer=True, whose joint attention "
                "runs in a layer vitlens does not record; it takes bypass_transformer=False"
            )
        super().__init__(
            module,
            graph=single_stream_graph(config.num_hidden_layers, DROPOUT_PATH),
            tokenizer=tokenizer,
            answers=answers,
            source=source,
            max_text_length=config.max_position_embeddings,
        )

    @staticmethod
    def head_size(module: nn.Module) -> int:
        """The number of answer logits (``cls``)."""
        return int(module.cls.out_features)

    def _check_visual(self, inputs: BimodalInputs) -> None:
        assert inputs.regions is not None
        want = int(self.module.config.visual_embedding_dim)
        if inputs.regions.shape[-1] != want:
            raise ValueError(
                f"region features of width {inputs.regions.shape[-1]}; the model takes {want} "
                "(visual_embedding_dim)"
            )

    def _prepare(self, inputs: BimodalInputs) -> tuple[dict[str, Any], BimodalTokens]:
        regions = inputs.regions
        assert regions is not None
        b, r = regions.shape[:2]
        region_mask = self._region_mask(inputs)
        t = inputs.ids.shape[1]
        device = inputs.ids.device
        tokens = BimodalTokens(
            text_set=JOINT,
            image_set=JOINT,
            text_positions=torch.arange(t, device=device),
            image_positions=torch.arange(t, t + r, device=device),
            text_valid=self._word_tokens(inputs),
            image_valid=region_mask.bool(),
            readout_rows=(inputs.text_mask.sum(dim=1) - 2).long(),  # as the head gathers
            sizes={JOINT: t + r},
        )
        kwargs = {
            "input_ids": inputs.ids,
            "attention_mask": inputs.text_mask,
            "visual_embeds": regions,
            "visual_attention_mask": region_mask.to(inputs.text_mask.dtype),
            "visual_token_type_ids": torch.ones(b, r, dtype=torch.long, device=regions.device),
        }
        return kwargs, tokens

    def _remove_text(self, inputs: BimodalInputs, remove: Tensor) -> BimodalInputs:
        """Removed word tokens (``remove`` (B, T) bool) leave the sequence; the rest close up."""
        keep = inputs.text_mask.bool() & ~(remove & self._word_tokens(inputs))  # (B, T)
        order = (~keep).long().argsort(dim=1, stable=True)  # kept tokens first, in order
        kept = keep.gather(1, order)
        pad = self.tokenizer.pad_token_id or 0
        ids = inputs.ids.gather(1, order).masked_fill(~kept, pad)
        return replace(inputs, ids=ids, text_mask=kept.to(inputs.text_mask.dtype))

    def _logits(self, kwargs: dict[str, Any]) -> Tensor:
        return self.module(**kwargs).logits
